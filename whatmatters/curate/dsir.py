"""DSIR: data selection with importance resampling (Xie et al. 2023), streamed over sharded corpora.

"Data Selection for Language Models via Importance Resampling" picks, from a large raw pool, the
documents that look most like a small target corpus: both corpora become bag-of-n-grams models over
hashed unigram and bigram features (``buckets`` hash buckets, 10,000 by default as in the paper and the
reference package ``data-selection``); each raw document gets the log importance weight

    log w(x) = sum over the n-grams of x of  log q(bucket) - log p(bucket)

(``q``: the target model, ``p``: the raw model, both with ``smoothing`` = 1e-8 added as the reference
does), and ``k`` documents are drawn without replacement with probability proportional to ``w`` by the
Gumbel top-k trick: the ``k`` largest ``log w + Gumbel noise`` (``topk=True``: the ``k`` largest ``log w``).

:func:`dsir` runs the pipeline on files: JSON lines or Parquet shards given as paths, globs or folders,
streamed piece by piece (never the whole pool in memory), on this machine's cores (``engine="local"``)
or on Ray (``engine="ray"``). Its stages, each resumable:

1. *fit*: n-gram counts of the whole target and of the raw pool (all of it, or a sample when
   ``raw_sample_tokens`` is smaller than the pool: the first ``raw_sample_tokens / pieces`` tokens of
   every piece, as the reference fits on the first tokens of each of its shards); ``model.npz``.
2. *weigh*: the log weight of every raw document, one Parquet file per piece in ``weights/``.
3. *select*: a deterministic pass over the finished weight files (a document's Gumbel noise is a hash of
   ``(seed, file, row)``, so it depends neither on the engine, the worker count, the pieces nor the order
   in which they finished); per-piece top-k merged into the global top-k; ``selection.parquet``.
4. *write*: the selected documents with all their fields plus ``dsir_log_weight``, ``dsir_source`` (the
   file) and ``dsir_row`` (the 0-based line of a JSON-lines file, the row of a Parquet file), one Parquet
   file per piece in ``selected/``.

Every file is written atomically (a temporary file renamed onto its name) and is its own "done" mark,
so a crash at any point loses only the pieces in flight; running the same call again with the same
``out`` reuses everything finished and writes exactly the documents an uninterrupted run writes.
``manifest.json`` records the settings and the input files (path, size, modification time): a rerun with
other model settings or changed files is refused instead of mixing two runs (``overwrite=True`` starts
over); a rerun with another ``k``, ``seed``, ``topk``, ``min_tokens`` or quotas reuses the weights and
only selects and writes again.

:func:`dsir_weights` is the same method on in-memory lists of texts, returning an
:class:`~whatmatters.core.importance.Importance` of unit ``"document"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from whatmatters.core.errors import InputError
from whatmatters.core.fractions import whole
from whatmatters.core.registry import scorer
from whatmatters.curate import shards as sh
from whatmatters.curate.engines import Engine, check_engine
from whatmatters.curate.hashing import NgramHasher, splitmix64

RUN_FORMAT = "whatmatters-dsir"
RUN_VERSION = 1
AUTO_TOKENS_PER_BUCKET = 100_000  # the reference's num_tokens_to_fit="auto": 100,000 x buckets
PIECE_BYTES = 128 << 20
_OUR_ENTRIES = ("manifest.json", "model.npz", "selection.parquet", "summary.json", "weights", "selected", "_counts")
Paths = str | os.PathLike | Sequence[str | os.PathLike]
Progress = Callable[[str, float, float], None]


# ------------------------------------------------------------------ result
@dataclass
class DSIRResult:
    """What a :func:`dsir` run did: where its files are, what it read, what it selected, how long it took.

    ``documents`` counts the usable raw documents, ``bad_lines`` the raw lines/rows skipped (bad JSON, no
    text field, a null text; ``bad_examples`` shows the first ones as ``"FILE line N: reason"``),
    ``blank_lines`` the blank ones; ``empty_files`` are raw files without a document. ``reused`` counts,
    per stage, the pieces taken from an earlier (interrupted) run instead of being computed again.
    """

    out: Path
    selected_files: list[Path]
    weights_files: list[Path]
    k: int
    selected: int
    documents: int
    bad_lines: int
    blank_lines: int
    bad_examples: list[str]
    empty_files: list[Path]
    target_documents: int
    target_bad_lines: int
    raw_files: int
    pieces: int
    engine: str
    seconds: float
    stage_seconds: dict[str, float]
    reused: dict[str, int]
    selected_by_domain: dict[str, int] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def documents_per_second(self) -> float:
        """Raw documents per second of wall time, end to end (all stages)."""
        return self.documents / self.seconds if self.seconds > 0 else math.inf

    def read(self, columns: Sequence[str] | None = None):
        """The selected documents as a pandas DataFrame (all of them: for a large ``k``, read ``selected_files``)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.out / "selected", columns=list(columns) if columns else None).to_pandas()

    def weights(self):
        """Every raw document's ``source``, ``row``, ``log_weight`` and ``tokens`` (and ``domain``) as a DataFrame."""
        return read_weights(self.out)

    def summary(self) -> dict[str, Any]:
        """The counts and timings as a JSON-able dict (also in ``OUT/summary.json``)."""
        d = asdict(self)
        d["out"] = str(self.out)
        d["selected_files"] = [str(p) for p in self.selected_files]
        d["weights_files"] = [str(p) for p in self.weights_files]
        d["empty_files"] = [str(p) for p in self.empty_files]
        d["documents_per_second"] = self.documents_per_second
        return d

    def __repr__(self) -> str:
        return (
            f"DSIRResult(selected={self.selected} of {self.documents} documents, bad_lines={self.bad_lines}, "
            f"out={str(self.out)!r}, seconds={self.seconds:.3g}, engine={self.engine!r})"
        )


# ------------------------------------------------------------------ in memory
def _texts(values: Any, name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InputError(f"{name} must be a list of texts, got {type(values).__name__}")
    texts = list(values)
    if not texts:
        raise InputError(f"{name} is empty: give at least one text")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise InputError(f"{name}[{bad}] is a {type(texts[bad]).__name__}, not a string")
    return texts


def _batches(texts: list[str], size: int = 4096):
    for i in range(0, len(texts), size):
        yield texts[i : i + size]


def log_ratio(target_counts: np.ndarray, raw_counts: np.ndarray, smoothing: float = 1e-8) -> np.ndarray:
    """``log(q + smoothing) - log(p + smoothing)`` of the normalized bucket counts (the reference's formula)."""
    q = target_counts / max(int(target_counts.sum()), 1)
    p = raw_counts / max(int(raw_counts.sum()), 1)
    return np.log(q + smoothing) - np.log(p + smoothing)


@scorer("dsir", verb="curate", units="document", family="importance resampling", needs="texts", per_sample=False)
def dsir_weights(
    target_texts: Sequence[str],
    raw_texts: Sequence[str],
    *,
    buckets: int = 10_000,
    ngrams: int = 2,
    smoothing: float = 1e-8,
    hash: str = "fast",
):
    """DSIR log importance weights of ``raw_texts`` for a target: hashed n-gram models, unit ``"document"``.

    Importance resampling (Xie et al. 2023): how much more likely each raw text is under the target's
    bag-of-n-grams model than under the raw pool's. For files and corpora too big for memory, with
    resampling, resume and Ray, use :func:`whatmatters.curate.dsir` (``whatmatters curate dsir``).

    ``values[i]`` is ``log q(x_i) - log p(x_i)`` under the hashed n-gram models of the target and of
    ``raw_texts`` (fitted on all of them). ``extra["tokens"]`` holds each raw text's token count.
    ``hash="sha256"`` gives the reference package's exact buckets (and so its weights).
    :func:`gumbel_topk` turns the weights into a sample.
    """
    import torch

    from whatmatters.core.importance import Importance

    start = time.perf_counter()
    target_texts = _texts(target_texts, "target_texts")
    raw_texts = _texts(raw_texts, "raw_texts")
    smoothing = _smoothing(smoothing)
    hasher = NgramHasher(buckets, ngrams, hash)
    q = sum(hasher.counts(b) for b in _batches(target_texts))
    p = sum(hasher.counts(b) for b in _batches(raw_texts))
    ratio = log_ratio(q, p, smoothing)
    weights, tokens = zip(*(hasher.log_weights(b, ratio) for b in _batches(raw_texts)))
    return Importance(
        values=torch.from_numpy(np.concatenate(weights)),
        unit="document",
        per_sample=False,
        method="dsir",
        params={"buckets": hasher.buckets, "ngrams": hasher.ngrams, "smoothing": smoothing, "hash": hash},
        seconds=time.perf_counter() - start,
        extra={"tokens": np.concatenate(tokens).tolist(), "target_documents": len(target_texts)},
    )


def gumbel_noise(seed: int, shard: int, rows: np.ndarray) -> np.ndarray:
    """Gumbel(0, 1) noise of documents ``rows`` of file ``shard``: a hash of (seed, shard, row), nothing else.

    Counter-based, so a document's noise does not depend on how the files were cut into pieces, on the
    engine or the worker count, nor on the order in which pieces finished.
    """
    base = splitmix64(np.array([seed], np.uint64)) ^ splitmix64(np.array([shard], np.uint64) + np.uint64(1 << 63))
    bits = splitmix64(np.asarray(rows).astype(np.uint64) ^ base)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    return -np.log(-np.log(uniform))


def gumbel_topk(log_weights: Any, k: int, *, seed: int = 0, topk: bool = False) -> np.ndarray:
    """Indices of ``k`` items drawn without replacement with probability proportional to ``exp(log_weights)``.

    The Gumbel top-k trick: the ``k`` largest ``log_weights + Gumbel(0, 1)`` noise (seeded; ``topk=True``:
    no noise, the ``k`` largest weights). Ties go to the earlier item. Sorted by decreasing key. The noise
    of item ``i`` is :func:`gumbel_noise` ``(seed, 0, i)``, what :func:`dsir` gives line ``i`` of its first
    file: on one JSON-lines file of clean lines the two select the same documents.
    """
    values = np.asarray(log_weights, dtype=np.float64).reshape(-1)
    k = whole(k, "k")
    seed = whole(seed, "seed", minimum=0)
    if k > len(values):
        raise InputError(f"k={k} is larger than the pool of {len(values)} items")
    keys = values if topk else values + gumbel_noise(seed, 0, np.arange(len(values)))
    chosen = _top(keys, k)
    return chosen[np.lexsort((chosen, -keys[chosen]))]


def _top(keys: np.ndarray, q: int) -> np.ndarray:
    """Sorted indices of the ``q`` largest ``keys``; among equal keys the lower indices (O(n), exact)."""
    n = len(keys)
    if q >= n:
        return np.arange(n)
    if q <= 0:
        return np.zeros(0, np.int64)
    kth = np.partition(keys, n - q)[n - q]
    above = np.flatnonzero(keys > kth)
    tied = np.flatnonzero(keys == kth)
    return np.sort(np.concatenate([above, tied[: q - len(above)]]))


# ------------------------------------------------------------------ workers (run in worker processes / Ray tasks)
@lru_cache(maxsize=4)
def _hasher(buckets: int, ngrams: int, hash: str) -> NgramHasher:
    """One hasher per process and setting: with ``hash="sha256"`` its n-gram buckets are remembered across pieces."""
    return NgramHasher(buckets, ngrams, hash)


def _count_task(spec: dict[str, Any]) -> dict[str, Any]:
    """n-gram counts of a piece (up to ``budget`` tokens), saved to ``spec["path"]``."""
    piece: sh.Piece = spec["piece"]
    hasher = _hasher(spec["buckets"], spec["ngrams"], spec["hash"])
    counts = np.zeros(hasher.buckets, np.int64)
    stats = sh.PieceStats()
    tokens = 0
    batches = sh.iter_batches(piece, spec["text_field"], None, stats, what=spec["what"])
    try:
        for batch in batches:
            if spec["budget"] is None:
                counts += hasher.counts(batch.texts)
                continue
            f = hasher.features(batch.texts)
            reached = np.cumsum(f.tokens) + tokens >= spec["budget"]
            if reached.any():  # the budget ends inside this batch: its documents up to the one that fills it
                last = int(np.argmax(reached))
                counts += np.bincount(f.bucket[f.doc <= last], minlength=hasher.buckets)
                tokens += int(f.tokens[: last + 1].sum())
                stats.complete = False
                break
            counts += np.bincount(f.bucket, minlength=hasher.buckets)
            tokens += int(f.tokens.sum())
    finally:
        batches.close()
    result = {"stats": stats.to_dict()}
    sh.write_arrays(Path(spec["path"]), counts=counts, meta=np.array(json.dumps(result)))
    return {"counts": counts, **result}


def _weigh_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Log weights of every document of a piece, saved as ``weights/part-NAME.parquet``."""
    import pyarrow as pa

    piece: sh.Piece = spec["piece"]
    hasher = _hasher(spec["buckets"], spec["ngrams"], spec["hash"])
    ratio = np.asarray(spec["log_ratio"], np.float64)
    stats = sh.PieceStats()
    rows, weights, tokens, domains = [], [], [], []
    for batch in sh.iter_batches(piece, spec["text_field"], spec["domain_field"], stats):
        w, t = hasher.log_weights(batch.texts, ratio)
        rows.append(batch.rows)
        weights.append(w)
        tokens.append(t)
        if batch.domains is not None:
            domains.extend(batch.domains)
    columns = {
        "row": pa.array(np.concatenate(rows) if rows else np.zeros(0, np.int64)),
        "log_weight": pa.array(np.concatenate(weights) if weights else np.zeros(0)),
        "tokens": pa.array(np.concatenate(tokens) if tokens else np.zeros(0, np.int64)),
    }
    if spec["domain_field"] is not None:
        columns["domain"] = pa.array(domains, pa.string()).dictionary_encode()
    meta = {"stats": stats.to_dict(), "piece": asdict(piece)}
    sh.write_table(pa.table(columns), Path(spec["path"]), meta)
    return meta


def _write_task(spec: dict[str, Any]) -> dict[str, Any]:
    """The selected documents of a piece with all their fields, saved as ``selected/part-NAME.parquet``."""
    import pyarrow as pa

    piece: sh.Piece = spec["piece"]
    rows = np.asarray(spec["rows"], np.int64)
    table = sh.read_rows(piece, rows)
    table = table.drop_columns([c for c in ("dsir_log_weight", "dsir_source", "dsir_row") if c in table.column_names])
    table = table.append_column("dsir_log_weight", pa.array(np.asarray(spec["log_weight"], np.float64)))
    table = table.append_column("dsir_source", pa.array([piece.path] * len(rows), pa.string()))
    table = table.append_column("dsir_row", pa.array(rows + spec["row_offset"]))
    sh.write_table(table, Path(spec["path"]), {"selection": spec["key"], "piece": piece.name, "rows": len(rows)})
    return {"rows": len(rows)}


# ------------------------------------------------------------------ progress
class _Progress:
    """Stage-wise progress: a user callback ``(stage, done, total)``, a rich bar on stderr, or nothing."""

    def __init__(self, progress: bool | Progress | None) -> None:
        self.callback = progress if callable(progress) else None
        self.bar = None
        self.task = None
        self.stage_name = ""
        self.done = 0.0
        self.total = 0.0
        if self.callback is None and (progress or (progress is None and sys.stderr.isatty())):
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description:<28}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.bar.start()

    def stage(self, name: str, total: float, done: float = 0.0) -> None:
        self.stage_name, self.total, self.done = name, max(float(total), 1.0), float(done)
        if self.bar is not None:
            self.task = self.bar.add_task(name, total=self.total, completed=self.done)
        self._report()

    def advance(self, amount: float) -> None:
        self.done += amount
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.stage_name, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------------------ checks
def _smoothing(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
        raise InputError(f"smoothing must be a number in (0, 1), got {value!r}")
    return float(value)


def _budget(raw_sample_tokens: int | str | None, buckets: int) -> int | None:
    if raw_sample_tokens == "auto":
        return AUTO_TOKENS_PER_BUCKET * buckets
    if raw_sample_tokens is None or raw_sample_tokens == "all":
        return None
    return whole(raw_sample_tokens, "raw_sample_tokens", meaning="'auto', 'all' or a number of tokens")


def _field(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{name} must be a field name (a non-empty string), got {value!r}")
    return value


def quota_counts(quotas: Mapping[str, float] | None, k: int) -> dict[str, int] | None:
    """Documents per domain: whole numbers summing to ``k``, or fractions summing to 1 (largest remainders)."""
    if quotas is None:
        return None
    if not isinstance(quotas, Mapping) or not quotas:
        raise InputError(f"quotas must be a non-empty mapping domain -> count or fraction, got {quotas!r}")
    values = {str(d): v for d, v in quotas.items()}
    bad = [d for d, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or v < 0]
    if bad:
        raise InputError(f"quota of domain {bad[0]!r} must be a count or a fraction >= 0, got {values[bad[0]]!r}")
    if all(isinstance(v, (int, np.integer)) for v in values.values()):
        counts = {d: int(v) for d, v in values.items()}
        if sum(counts.values()) != k:
            raise InputError(f"the quotas add up to {sum(counts.values())} documents, not k={k}")
        return counts
    total = float(sum(values.values()))
    if not math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-6):
        raise InputError(f"quota fractions must add up to 1, got {total:g} (or give whole numbers adding up to k)")
    exact = {d: float(v) * k for d, v in values.items()}
    counts = {d: math.floor(x) for d, x in exact.items()}
    for d in sorted(exact, key=lambda d: (counts[d] - exact[d], list(exact).index(d)))[: k - sum(counts.values())]:
        counts[d] += 1
    return counts


# ------------------------------------------------------------------ the run folder
def _open_run(out: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    path = out / "manifest.json"
    if overwrite and out.is_dir():
        import shutil

        for name in _OUR_ENTRIES:
            entry = out / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read {path} ({err}); pass overwrite=True (--overwrite) to start over") from None
        if old.get("format") != RUN_FORMAT:
            raise InputError(f"{path} is not the manifest of a DSIR run; give another out folder")
        changed = [part for part in ("settings", "target", "raw") if old.get(part) != manifest[part]]
        if not changed:
            return
        if _has_work(out):
            part = changed[0]
            raise InputError(
                f"{out} holds a DSIR run with other {_difference(old.get(part), manifest[part], part)}; "
                "give a new out folder, or pass overwrite=True (--overwrite) to start over"
            )
        # a run that failed before its model was fitted (a wrong text field, say): start afresh
        import shutil

        shutil.rmtree(out / "_counts", ignore_errors=True)
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise InputError(f"out folder {out} is not empty and holds no DSIR run; give a new or empty folder")
    sh.write_json(manifest, path)


def _has_work(out: Path) -> bool:
    """Whether a run folder holds work past the fit stage (the model, weights or selected files)."""
    return (out / "model.npz").exists() or any(
        any((out / folder).glob("*.parquet")) for folder in ("weights", "selected")
    )


@contextmanager
def _locked(out: Path):
    """Hold ``OUT/.lock`` for the run: a second run on the same folder at the same time is refused."""
    if out.exists() and not out.is_dir():
        raise InputError(f"out {out} is a file; give a folder for the DSIR run")
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another DSIR run is using {out} right now; wait for it, or give another out folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _difference(old: Any, new: Any, part: str) -> str:
    if part == "settings" and isinstance(old, dict):
        keys = [key for key in {**old, **new} if old.get(key) != new.get(key)]
        return ", ".join(f"{key} ({old.get(key)!r}, now {new.get(key)!r})" for key in keys[:3])
    what = "target" if part == "target" else "raw"
    if isinstance(old, list) and isinstance(new, list):
        old_paths = [f["path"] for f in old]
        new_paths = [f["path"] for f in new]
        if old_paths != new_paths:
            return f"{what} files ({len(old_paths)} files then, {len(new_paths)} now)"
        changed = next(n["path"] for o, n in zip(old, new) if o != n)
        return f"{what} files ({changed} changed since)"
    return f"{what} files"


def read_weights(out: str | os.PathLike):
    """Every raw document's weight from a DSIR run folder: ``source``, ``row``, ``log_weight``, ``tokens``.

    ``row`` is the 0-based line of a JSON-lines file, the row of a Parquet file (as ``dsir_row``).
    """
    import pandas as pd
    import pyarrow.parquet as pq

    out = Path(out)
    files = sorted((out / "weights").glob("part-*.parquet"))
    if not files:
        raise InputError(f"{out} holds no DSIR weights (weights/part-*.parquet)")
    frames, offsets = [], {}
    for path in files:
        meta = sh.read_meta(path)
        if meta is None:
            raise InputError(f"{path} is damaged; rerun the DSIR run to write it again")
        piece = sh.Piece(**meta["piece"])
        frame = pq.read_table(path).to_pandas()
        offset = piece.row_offset if piece.kind == "parquet" else offsets.get(piece.shard, 0)
        offsets[piece.shard] = offset + meta["stats"]["rows"]
        frame["row"] += offset
        frame.insert(0, "source", piece.path)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------ the pipeline
def dsir(
    target: Paths,
    raw: Paths,
    k: int,
    out: str | os.PathLike,
    *,
    text_field: str = "text",
    target_text_field: str | None = None,
    buckets: int = 10_000,
    ngrams: int = 2,
    hash: str = "fast",
    raw_sample_tokens: int | str | None = "auto",
    smoothing: float = 1e-8,
    min_tokens: int = 0,
    seed: int = 0,
    topk: bool = False,
    domain_field: str | None = None,
    quotas: Mapping[str, float] | None = None,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    piece_bytes: int = PIECE_BYTES,
    overwrite: bool = False,
    progress: bool | Progress | None = None,
) -> DSIRResult:
    """Select ``k`` documents of the ``raw`` shards that resemble the ``target`` ones, into ``out``; resumable.

    ``target`` / ``raw``: JSON-lines or Parquet files as paths, globs (``"shards/*.jsonl"``, ``**``
    recursive) or folders, or lists of them; the text of a record is ``text_field``
    (``target_text_field`` for the target, default the same). ``buckets`` / ``ngrams``: the hashed
    n-gram features (``ngrams=2``: unigrams and bigrams). ``raw_sample_tokens``: tokens of the raw pool
    the raw model is fitted on: ``"auto"`` = 100,000 x ``buckets`` (the reference's default; all of any
    pool smaller than that), ``"all"``, or a number. ``min_tokens``: documents with fewer tokens are
    never selected (the reference's ``min_example_length``, 100 there). ``seed``: the Gumbel noise;
    ``topk=True`` takes the ``k`` largest weights instead of sampling. ``domain_field`` + ``quotas``
    (``{"wiki": 0.3, "web": 0.7}`` or counts adding up to ``k``): that many documents of each domain, by
    importance resampling within the domain; other domains are not selected.
    ``engine``: ``"local"`` (``workers`` processes, default all cores) or ``"ray"`` (see
    :mod:`whatmatters.curate.engines`). ``piece_bytes``: the size of a unit of work (and of resuming).
    ``progress``: a progress bar on stderr (None: when it is a terminal) or a callback
    ``(stage, done, total)``.

    Bad JSON lines, records without the text field and null texts are skipped, counted and reported
    (``result.bad_lines``, ``result.bad_examples`` and a warning); a file whose first 100 lines hold no
    document, a missing path, a glob without a match, an empty target or pool, and ``k`` larger than
    the pool raise :class:`~whatmatters.core.errors.InputError`.
    """
    start = time.perf_counter()
    hasher = NgramHasher(buckets, ngrams, hash)
    k = whole(k, "k", meaning="the number of documents to select")
    seed = whole(seed, "seed", minimum=0)
    min_tokens = whole(min_tokens, "min_tokens", minimum=0)
    piece_bytes = whole(piece_bytes, "piece_bytes", minimum=1024)
    text_field = _field(text_field, "text_field")
    target_text_field = _field(target_text_field or text_field, "target_text_field")
    if domain_field is not None:
        domain_field = _field(domain_field, "domain_field")
    if quotas is not None and domain_field is None:
        raise InputError("quotas need domain_field: the field that holds each document's domain")
    counts_per_domain = quota_counts(quotas, k)
    smoothing = _smoothing(smoothing)
    budget = _budget(raw_sample_tokens, hasher.buckets)
    engine = check_engine(engine)
    if workers is not None:
        workers = whole(workers, "workers")
    raw_files = sh.resolve_files(raw, "raw")
    target_files = sh.resolve_files(target, "target")
    out = Path(out).expanduser()
    settings = {
        "buckets": hasher.buckets,
        "ngrams": hasher.ngrams,
        "hash": hasher.hash,
        "text_field": text_field,
        "target_text_field": target_text_field,
        "domain_field": domain_field,
        "raw_sample_tokens": budget,
        "smoothing": smoothing,
        "piece_bytes": piece_bytes,
    }
    manifest = {
        "format": RUN_FORMAT,
        "format_version": RUN_VERSION,
        "settings": settings,
        "target": [sh.identity(p) for p in target_files],
        "raw": [sh.identity(p) for p in raw_files],
    }
    target_pieces = sh.plan(target_files, piece_bytes, target_text_field, None, what="target")
    raw_pieces = sh.plan(raw_files, piece_bytes, text_field, domain_field, what="raw")
    with _locked(out), Engine(engine, workers, ray_address) as run:
        _open_run(out, manifest, overwrite)
        _preload()
        bar = _Progress(progress)
        stage_seconds: dict[str, float] = {}
        reused: dict[str, int] = {}
        try:
            t = time.perf_counter()
            ratio, target_info = _fit(out, target_pieces, raw_pieces, settings, budget, run, bar, reused, k)
            stage_seconds["fit"] = time.perf_counter() - t

            t = time.perf_counter()
            weight_meta = _weigh(out, raw_pieces, settings, ratio, run, bar, reused)
            stage_seconds["weigh"] = time.perf_counter() - t
            totals = _totals(raw_pieces, weight_meta)
            if totals["docs"] == 0:
                raise InputError(f"the raw pool has no documents{_bad_note(totals)}")

            t = time.perf_counter()
            offsets = _row_offsets(raw_pieces, weight_meta)
            key, selection = _select(
                out, raw_pieces, k, seed, topk, min_tokens, counts_per_domain, totals, offsets, bar
            )
            stage_seconds["select"] = time.perf_counter() - t

            t = time.perf_counter()
            selected_files = _write(out, raw_pieces, weight_meta, key, selection, run, bar, reused)
            _unify_schemas(selected_files)
            stage_seconds["write"] = time.perf_counter() - t
        finally:
            bar.close()

        by_domain = None
        if "domain" in selection:
            by_domain = dict(sorted(Counter(selection["domain"]).items()))
        result = DSIRResult(
            out=out,
            selected_files=selected_files,
            weights_files=[out / "weights" / f"part-{p.name}.parquet" for p in raw_pieces],
            k=k,
            selected=len(selection["row"]),
            documents=totals["docs"],
            bad_lines=totals["bad"],
            blank_lines=totals["blank"],
            bad_examples=totals["examples"],
            empty_files=totals["empty"],
            target_documents=target_info["docs"],
            target_bad_lines=target_info["bad"],
            raw_files=len(raw_files),
            pieces=len(raw_pieces),
            engine=engine,
            seconds=time.perf_counter() - start,
            stage_seconds=stage_seconds,
            reused=reused,
            selected_by_domain=by_domain,
            settings={
                **settings,
                "k": k,
                "seed": seed,
                "topk": topk,
                "min_tokens": min_tokens,
                "quotas": counts_per_domain,
            },
        )
        sh.write_json(result.summary(), out / "summary.json")
        for what, info in (("raw pool", totals), ("target", target_info)):
            if info["bad"]:
                first = info["examples"][0] if info["examples"] else "?"
                warnings.warn(
                    f"skipped {info['bad']} bad lines of the {what} (first: {first}); see result.bad_examples",
                    UserWarning,
                    stacklevel=3,
                )
        if totals["empty"]:
            warnings.warn(
                f"{len(totals['empty'])} raw files hold no document: {', '.join(map(str, totals['empty'][:3]))}",
                UserWarning,
                stacklevel=2,
            )
        return result


def _preload() -> None:
    """Load once, here, what every worker needs (forked workers inherit it instead of each loading it).

    The character-class table of the tokenizer, and pyarrow's pandas shim (``pa.array`` imports pandas on
    first use, most of a second).
    """
    import pyarrow as pa

    from whatmatters.curate.hashing import _class_table

    _class_table()
    pa.array([0.0])


def _task_common(settings: dict[str, Any]) -> dict[str, Any]:
    return {"buckets": settings["buckets"], "ngrams": settings["ngrams"], "hash": settings["hash"]}


def _load_counts(path: Path) -> dict[str, Any] | None:
    try:
        with np.load(path) as f:
            return {"counts": f["counts"], **json.loads(str(f["meta"]))}
    except Exception:  # missing or damaged: counted again
        return None


def _fit(
    out: Path,
    target_pieces: list[sh.Piece],
    raw_pieces: list[sh.Piece],
    settings: dict[str, Any],
    budget: int | None,
    run: Engine,
    bar: _Progress,
    reused: dict[str, int],
    k: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The log ratio of the target and raw n-gram models (``model.npz``), with what the target held."""
    model_path = out / "model.npz"
    if model_path.exists():
        try:
            with np.load(model_path) as f:
                info = json.loads(str(f["meta"]))
                reused["fit"] = len(target_pieces) + len(raw_pieces)
                return f["log_ratio"], info["target"]
        except Exception:  # damaged: fitted again
            pass
    share = None if budget is None else max(1, math.ceil(budget / len(raw_pieces)))
    specs = []
    for what, pieces, text_field, piece_budget in (
        ("target", target_pieces, settings["target_text_field"], None),
        ("raw", raw_pieces, settings["text_field"], share),
    ):
        for piece in pieces:
            path = out / "_counts" / f"{what}-{piece.name}.npz"
            spec = {
                **_task_common(settings),
                "piece": piece,
                "text_field": text_field,
                "budget": piece_budget,
                "what": what,
                "path": str(path),
            }
            specs.append(spec)
    results: list[dict[str, Any] | None] = [_load_counts(Path(s["path"])) for s in specs]
    todo = [i for i, r in enumerate(results) if r is None]
    reused["fit"] = len(specs) - len(todo)
    sizes = [max(s["piece"].size, 1) for s in specs]
    bar.stage("fit n-gram models", sum(sizes), sum(sizes) - sum(sizes[i] for i in todo))

    def done(j: int, result: dict[str, Any]) -> None:
        results[todo[j]] = result
        bar.advance(sizes[todo[j]])

    run.run(_count_task, [specs[i] for i in todo], done)
    infos = {}
    counts = {}
    for what in ("target", "raw"):
        mine = [(s, r) for s, r in zip(specs, results) if s["what"] == what]
        counts[what] = sum(r["counts"] for _, r in mine)
        stats = [(s["piece"], sh.PieceStats.from_dict(r["stats"])) for s, r in mine]
        infos[what] = {
            "docs": sum(st.docs for _, st in stats),
            "bad": sum(st.bad for _, st in stats),
            "complete": all(st.complete for _, st in stats),
            "examples": _examples(stats, _row_offsets([p for p, _ in stats], [r for _, r in mine]))
            if all(st.complete for _, st in stats)
            else [],
        }
    if infos["target"]["docs"] == 0:
        raise InputError(f"the target has no documents{_bad_note(infos['target'])}")
    if infos["raw"]["complete"]:
        if infos["raw"]["docs"] == 0:
            raise InputError(f"the raw pool has no documents{_bad_note(infos['raw'])}")
        if infos["raw"]["docs"] < k:
            raise InputError(
                f"k={k} is larger than the raw pool: it has {infos['raw']['docs']} documents{_bad_note(infos['raw'])}"
            )
    ratio = log_ratio(counts["target"], counts["raw"], settings["smoothing"])
    meta = json.dumps({"target": infos["target"], "raw": infos["raw"]})
    sh.write_arrays(
        model_path, target_counts=counts["target"], raw_counts=counts["raw"], log_ratio=ratio, meta=np.array(meta)
    )
    import shutil

    shutil.rmtree(out / "_counts", ignore_errors=True)  # folded into model.npz
    return ratio, infos["target"]


def _bad_note(info: dict[str, Any]) -> str:
    if not info.get("bad"):
        return ""
    return f" ({info['bad']} bad lines skipped, the first: {info['examples'][0]})" if info["examples"] else ""


def _examples(stats: list[tuple[sh.Piece, sh.PieceStats]], offsets: dict[tuple[int, int], int]) -> list[str]:
    """The first bad rows as ``"FILE line N: reason"`` (``offsets``: the first row of each JSON-lines piece)."""
    lines = []
    for piece, st in stats:
        for row, reason in st.bad_examples:
            if piece.kind == "parquet":
                lines.append(f"{piece.path} row {piece.row_offset + row}: {reason}")
            elif (piece.shard, piece.index) in offsets or piece.index == 0:
                lines.append(f"{piece.path} line {offsets.get((piece.shard, piece.index), 0) + row + 1}: {reason}")
            if len(lines) >= 10:
                return lines
    return lines


def _weigh(
    out: Path,
    raw_pieces: list[sh.Piece],
    settings: dict[str, Any],
    ratio: np.ndarray,
    run: Engine,
    bar: _Progress,
    reused: dict[str, int],
) -> list[dict[str, Any]]:
    """Weight files of every raw piece (the finished ones of an earlier run are kept); their metadata."""
    paths = [out / "weights" / f"part-{p.name}.parquet" for p in raw_pieces]
    metas: list[dict[str, Any] | None] = [sh.read_meta(p) if p.exists() else None for p in paths]
    todo = [i for i, m in enumerate(metas) if m is None or m.get("piece") != asdict(raw_pieces[i])]
    reused["weigh"] = len(raw_pieces) - len(todo)
    sizes = [max(p.size, 1) for p in raw_pieces]
    bar.stage("weigh raw documents", sum(sizes), sum(sizes) - sum(sizes[i] for i in todo))
    specs = [
        {
            **_task_common(settings),
            "piece": raw_pieces[i],
            "text_field": settings["text_field"],
            "domain_field": settings["domain_field"],
            "log_ratio": ratio,
            "path": str(paths[i]),
        }
        for i in todo
    ]

    def done(j: int, meta: dict[str, Any]) -> None:
        metas[todo[j]] = meta
        bar.advance(sizes[todo[j]])

    run.run(_weigh_task, specs, done)
    return metas  # type: ignore[return-value]


def _row_offsets(raw_pieces: list[sh.Piece], metas: list[dict[str, Any]]) -> dict[tuple[int, int], int]:
    """The file row of every piece's first row (JSON lines: the lines of the pieces before it)."""
    offsets: dict[tuple[int, int], int] = {}
    running: dict[int, int] = {}
    for piece, meta in zip(raw_pieces, metas):
        if piece.kind == "parquet":
            offsets[(piece.shard, piece.index)] = piece.row_offset
        else:
            offsets[(piece.shard, piece.index)] = running.get(piece.shard, 0)
            running[piece.shard] = running.get(piece.shard, 0) + meta["stats"]["rows"]
    return offsets


def _totals(raw_pieces: list[sh.Piece], metas: list[dict[str, Any]]) -> dict[str, Any]:
    stats = [(p, sh.PieceStats.from_dict(m["stats"])) for p, m in zip(raw_pieces, metas)]
    per_file: dict[str, int] = {}
    for piece, st in stats:
        per_file[piece.path] = per_file.get(piece.path, 0) + st.docs + st.bad
    return {
        "docs": sum(st.docs for _, st in stats),
        "bad": sum(st.bad for _, st in stats),
        "blank": sum(st.blank for _, st in stats),
        "examples": _examples(stats, _row_offsets(raw_pieces, metas)),
        "empty": [Path(p) for p, n in per_file.items() if n == 0],
    }


def _select(
    out: Path,
    raw_pieces: list[sh.Piece],
    k: int,
    seed: int,
    topk: bool,
    min_tokens: int,
    quotas: dict[str, int] | None,
    totals: dict[str, Any],
    offsets: dict[tuple[int, int], int],
    bar: _Progress,
) -> tuple[str, dict[str, np.ndarray]]:
    """The selection (``selection.parquet``): per-piece top candidates merged into the global top-k by key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings = {"k": k, "seed": seed, "topk": topk, "min_tokens": min_tokens, "quotas": quotas}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = out / "selection.parquet"
    meta = sh.read_meta(path) if path.exists() else None
    bar.stage("select", len(raw_pieces))
    if meta is not None and meta.get("key") == key:
        table = pq.read_table(path)
        bar.advance(len(raw_pieces))
        return key, {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    groups: dict[str | None, int] = dict(quotas) if quotas is not None else {None: k}
    candidates: dict[str | None, list[dict[str, np.ndarray]]] = {g: [] for g in groups}
    held = dict.fromkeys(groups, 0)
    eligible = dict.fromkeys(groups, 0)
    short = 0
    seen_domains: Counter = Counter()
    for piece in raw_pieces:
        table = pq.read_table(out / "weights" / f"part-{piece.name}.parquet")
        weights = table["log_weight"].to_numpy()
        rows = table["row"].to_numpy()
        tokens = table["tokens"].to_numpy()
        offset = offsets[(piece.shard, piece.index)]
        noise = 0.0 if topk else gumbel_noise(seed, piece.shard, rows + offset)
        keys = weights + noise
        ok = tokens >= min_tokens
        short += int((~ok).sum())
        domain = None
        if quotas is not None:
            domain = np.asarray(table["domain"].to_pylist(), dtype=object)
            seen_domains.update(domain.tolist())
        for group, q in groups.items():
            idx = np.flatnonzero(ok if group is None else ok & (domain == group))
            eligible[group] += len(idx)
            idx = idx[_top(keys[idx], q)]
            candidates[group].append(
                {
                    "shard": np.full(len(idx), piece.shard, np.int64),
                    "piece": np.full(len(idx), piece.index, np.int64),
                    "row": rows[idx],
                    "log_weight": weights[idx],
                    "key": keys[idx],
                }
            )
            held[group] += len(idx)
            if held[group] > 4 * q:  # keep memory at O(k): compact to the top q so far
                candidates[group] = [_compact(candidates[group], q)]
                held[group] = q
        bar.advance(1)
    for group, q in groups.items():
        if eligible[group] < q:
            raise InputError(_too_few(group, q, k, eligible[group], short, min_tokens, totals, seen_domains))
    parts = []
    for group, q in groups.items():
        top = _compact(candidates[group], q)
        if group is not None:
            top["domain"] = np.full(len(top["row"]), group, dtype=object)
        parts.append(top)
    selection = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.lexsort((selection["row"], selection["piece"], selection["shard"]))
    selection = {name: values[order] for name, values in selection.items()}
    table = pa.table({name: pa.array(values) for name, values in selection.items()})
    sh.write_table(table, path, {"key": key, "settings": settings})
    return key, selection


def _compact(parts: list[dict[str, np.ndarray]], q: int) -> dict[str, np.ndarray]:
    """The top ``q`` by key of concatenated candidates (ties: the earlier piece and row)."""
    merged = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    order = np.lexsort((merged["row"], merged["piece"], merged["shard"]))  # position order, for the ties
    merged = {name: values[order] for name, values in merged.items()}
    keep = _top(merged["key"], q)
    return {name: values[keep] for name, values in merged.items()}


def _too_few(group, q, k, eligible, short, min_tokens, totals, seen) -> str:
    if group is None:
        text = f"k={k} is larger than the raw pool: it has {eligible} documents to select from"
        if short:
            text += f" ({short} more are shorter than min_tokens={min_tokens})"
        return text + _bad_note(totals)
    domains = ", ".join(f"{d!r}: {n}" for d, n in seen.most_common(10)) or "none"
    return (
        f"the quota of domain {group!r} is {q} documents but the raw pool has only {eligible} of that domain to "
        f"select from (documents per domain: {domains})"
    )


def _write(
    out: Path,
    raw_pieces: list[sh.Piece],
    metas: list[dict[str, Any]],
    key: str,
    selection: dict[str, np.ndarray],
    run: Engine,
    bar: _Progress,
    reused: dict[str, int],
) -> list[Path]:
    """One Parquet file of selected documents per piece with a selected document (finished ones are kept)."""
    folder = out / "selected"
    offsets = _row_offsets(raw_pieces, metas)
    shard, piece_index = selection["shard"], selection["piece"]
    specs = []
    wanted = set()
    for piece in raw_pieces:
        mask = (shard == piece.shard) & (piece_index == piece.index)
        if not mask.any():
            continue
        path = folder / f"part-{piece.name}.parquet"
        wanted.add(path.name)
        specs.append(
            {
                "piece": piece,
                "rows": selection["row"][mask],
                "log_weight": selection["log_weight"][mask],
                "row_offset": offsets[(piece.shard, piece.index)],
                "key": key,
                "path": str(path),
            }
        )
    if folder.is_dir():  # parts of another selection, or damaged ones: gone before anything is written
        for path in folder.glob("part-*.parquet"):
            meta = sh.read_meta(path)
            if path.name not in wanted or meta is None or meta.get("selection") != key:
                path.unlink()
    todo = [s for s in specs if not Path(s["path"]).exists()]
    reused["write"] = len(specs) - len(todo)
    bar.stage("write selected documents", len(specs), len(specs) - len(todo))
    run.run(_write_task, todo, lambda i, r: bar.advance(1))
    return [Path(s["path"]) for s in specs]


def _unify_schemas(paths: list[Path]) -> None:
    """One schema for every selected file (a field missing from a file: null there): the folder reads as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(paths) < 2:
        return
    schemas = [pq.read_schema(p).remove_metadata() for p in paths]
    if all(s.equals(schemas[0]) for s in schemas[1:]):
        return
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowException, TypeError) as err:
        warnings.warn(f"the selected files keep their own schemas (no common one: {err})", UserWarning, stacklevel=3)
        return
    names = unified.names
    for path, schema in zip(paths, schemas):
        if schema.equals(unified) and schema.names == names:
            continue
        table = pq.read_table(path)
        try:
            columns = [
                table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
                for f in unified
            ]
        except (pa.ArrowException, TypeError) as err:
            warnings.warn(f"{path} keeps its own schema ({err})", UserWarning, stacklevel=3)
            continue
        sh.write_table(pa.table(columns, schema=unified), path, sh.read_meta(path))
