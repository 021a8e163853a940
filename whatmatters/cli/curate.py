"""``whatmatters curate ...``: decide which training data to keep (``dsir``: select documents like a target)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import typer

from whatmatters.cli.commands import _clean_errors, _console, escape_markup
from whatmatters.core.errors import InputError

curate_app = typer.Typer(
    name="curate",
    help=(
        "Decide which training data matter: select documents that resemble a target corpus (dsir), score labelled "
        "examples (score) and keep a subset by their scores (select)."
    ),
    no_args_is_help=True,
)


def _quotas(items: list[str] | None) -> dict[str, float] | None:
    """``["wiki=0.3", "web=0.7"]`` -> ``{"wiki": 0.3, "web": 0.7}`` (whole numbers stay counts)."""
    if not items:
        return None
    quotas: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            number = int(value) if value.strip().isdigit() else float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise InputError(f"--quota {item!r} is not DOMAIN=COUNT or DOMAIN=FRACTION (e.g. --quota wiki=0.3)")
        quotas[name] = number
    return quotas


def _sample_tokens(value: str) -> int | str:
    if value in ("auto", "all"):
        return value
    try:
        return int(value.replace("_", ""))
    except ValueError:
        raise InputError(f"--raw-sample-tokens must be 'auto', 'all' or a number of tokens, got {value!r}") from None


@curate_app.command("dsir")
@_clean_errors
def dsir_cmd(
    target: list[str] = typer.Option(
        ...,
        "--target",
        "-t",
        help="Target documents: JSON-lines / Parquet files, a folder or a quoted glob (repeatable).",
    ),
    raw: list[str] = typer.Option(
        ..., "--raw", "-r", help="The raw pool: files, folders or quoted globs such as 'shards/*.jsonl' (repeatable)."
    ),
    k: int = typer.Option(..., "-k", "--k", help="How many documents to select."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: selected/*.parquet, weights/, manifest."),
    text_field: str = typer.Option("text", "--text-field", help="The field (column) holding the text."),
    target_text_field: str | None = typer.Option(None, "--target-text-field", help="The target's, if it differs."),
    engine: str = typer.Option("local", "--engine", help="local (processes on this machine) or ray."),
    workers: int | None = typer.Option(
        None, "--workers", "-w", help="Processes (local) or local Ray CPUs; default all."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local Ray)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the Gumbel noise of the resampling."),
    topk: bool = typer.Option(False, "--topk", help="Take the k largest weights instead of resampling."),
    buckets: int = typer.Option(10_000, "--buckets", help="Hash buckets of the n-gram features."),
    ngrams: int = typer.Option(2, "--ngrams", help="Longest n-gram (2: unigrams and bigrams)."),
    hash_: str = typer.Option("fast", "--hash", help="fast, or sha256: the data-selection package's exact buckets."),
    raw_sample_tokens: str = typer.Option(
        "auto", "--raw-sample-tokens", help="Raw tokens to fit the raw model on: auto (100,000 x buckets), all, or N."
    ),
    min_tokens: int = typer.Option(0, "--min-tokens", help="Never select documents with fewer tokens."),
    domain_field: str | None = typer.Option(None, "--domain-field", help="The field naming each document's domain."),
    quota: list[str] | None = typer.Option(
        None,
        "--quota",
        help="DOMAIN=FRACTION or DOMAIN=COUNT documents of a domain (repeatable, needs --domain-field).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an OUT folder of another run."),
) -> None:
    """Select K documents of the raw pool that resemble the target (DSIR: importance resampling on hashed n-grams).

    Streams the shards, writes the selected documents with all their fields plus dsir_log_weight to
    OUT/selected/*.parquet, and resumes: rerun the same command after a crash to go on.
    """
    from whatmatters.curate.dsir import dsir

    console = _console()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the summary below reports bad lines and empty files
        result = dsir(
            target,
            raw,
            k,
            out,
            text_field=text_field,
            target_text_field=target_text_field,
            buckets=buckets,
            ngrams=ngrams,
            hash=hash_,
            raw_sample_tokens=_sample_tokens(raw_sample_tokens),
            min_tokens=min_tokens,
            seed=seed,
            topk=topk,
            domain_field=domain_field,
            quotas=_quotas(quota),
            engine=engine,
            workers=workers,
            ray_address=ray_address,
            overwrite=overwrite,
            progress=sys.stderr.isatty(),
        )
    for line in summary_lines(result):
        console.print(escape_markup(line), soft_wrap=True)


@curate_app.command("score")
@_clean_errors
def score_cmd(
    data: list[str] = typer.Option(
        ..., "--data", "-d", help="Labelled texts: JSON-lines / Parquet / CSV files, folders or quoted globs."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The scores file (Parquet): one row per example."),
    text_field: str = typer.Option("text", "--text-field", help="The field (column) holding the text."),
    label_field: str = typer.Option("label", "--label-field", help="The field (column) holding the label."),
    model: str = typer.Option("minilm", "--model", help="Embeddings: minilm (all-MiniLM-L6-v2, offline)."),
    method: str = typer.Option("el2n", "--method", "-m", help="loss, el2n, grand, forgetting, tracin or trak."),
    epochs: int = typer.Option(5, "--epochs", help="Epochs of the linear head trained on the embeddings."),
    seeds: int = typer.Option(3, "--seeds", help="Heads trained (seeds); scores are averaged over them."),
    lr: float = typer.Option(0.5, "--lr", help="SGD learning rate of the head (embeddings have unit norm)."),
    score_epoch: int | None = typer.Option(
        None, "--score-epoch", help="Score the heads after this epoch (default: 2 for el2n/grand, else the last)."
    ),
    max_length: int = typer.Option(256, "--max-length", help="Tokens per text embedded (longer texts truncated)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first head (the others: seed+1, ...)."),
) -> None:
    """Score every labelled example: embed the texts, train a small linear head, score with METHOD.

    High scores mean hard, atypical or mislabelled examples. Bad lines (invalid JSON, no text or label)
    are skipped, counted and shown. OUT holds example, file, row, label, class, score and the embedding.
    """
    from whatmatters.cli.curate_examples import embed_texts, score_examples, write_scores
    from whatmatters.core.registry import get_method
    from whatmatters.curate.labelled import read_labelled

    if get_method(method).verb != "curate" or method == "lexrank":
        raise InputError(
            f"--method {method!r} does not score labelled examples; use loss, el2n, grand, forgetting, tracin or trak"
        )
    console, progress = _console(), sys.stderr.isatty()
    texts = read_labelled(data, text_field, label_field)
    for line in texts.summary():
        console.print(escape_markup(line), soft_wrap=True)
    embeddings = embed_texts(texts.texts, model, max_length, progress)
    scored = score_examples(
        texts, embeddings, method, epochs=epochs, seeds=seeds, lr=lr, score_epoch=score_epoch, seed=seed,
        progress=progress,
    )  # fmt: skip
    meta = {"method": method, "model": model, "epochs": epochs, "seeds": seeds, "lr": lr, "bad_lines": texts.bad}
    path = write_scores(out, texts, scored, meta)
    top = np.argsort(-scored.scores, kind="stable")[:3]
    console.print(
        escape_markup(
            f"scored: {len(scored.scores):,} examples, {len(scored.classes)} classes, {method} after epoch "
            f"{scored.epoch} -> {path}; highest: "
            + ", ".join(f"{texts.files[i]}:{texts.rows[i] + 1} ({scored.scores[i]:.3g})" for i in top)
        ),
        soft_wrap=True,
    )


@curate_app.command("select")
@_clean_errors
def select_cmd(
    scores: Path = typer.Option(..., "--scores", "-s", help="A scores file from 'whatmatters curate score'."),
    k: int = typer.Option(..., "-k", "--k", help="How many examples to keep."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder: selected.parquet and selection.json."),
    strategy: str = typer.Option(
        "ccs", "--strategy", help="top, random, ccs, k_center, facility_location, cluster_sample."
    ),
    embeddings: Path | None = typer.Option(
        None, "--embeddings", help="Embeddings (.npy or Parquet with 'embedding'); default: the scores file's."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the strategy's random draws."),
) -> None:
    """Keep K examples of a scores file by STRATEGY (ccs: coverage-centric coreset; k_center, facility_location,
    cluster_sample: diverse embeddings); writes the kept rows (without embeddings) and the report to OUT."""
    from whatmatters.cli.curate_examples import read_embeddings, read_scores
    from whatmatters.curate import select
    from whatmatters.curate.shards import write_json, write_table

    table = read_scores(scores)
    n = table.num_rows
    if k < 1 or k > n:
        problem = "larger than the pool" if k > n else "not a positive count"
        raise InputError(f"-k {k} is {problem}: {scores} holds {n:,} examples; give 1 <= k <= {n:,}")
    x = read_embeddings(embeddings, table)
    values = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    selection = select(values, keep=k, strategy=strategy, embeddings=x, seed=seed)
    kept = table.drop_columns([c for c in ("embedding",) if c in table.column_names]).take(selection.indices.numpy())
    out.mkdir(parents=True, exist_ok=True)
    write_table(kept, out / "selected.parquet")
    report = {**selection.report, "scores": str(scores), "mean_score_kept": float(values[selection.indices].mean())}
    write_json(report, out / "selection.json")
    _console().print(
        escape_markup(
            f"selected: {k:,} of {n:,} examples by {selection.report['strategy']} -> {out / 'selected.parquet'} "
            f"(mean score kept {report['mean_score_kept']:.4g}, all {values.mean():.4g}); report: "
            f"{out / 'selection.json'}"
        ),
        soft_wrap=True,
    )


def summary_lines(result) -> list[str]:
    """The summary of a DSIR run: what was read, what was skipped, what was selected, how long it took."""
    target = f"target: {result.target_documents:,} documents"
    if result.target_bad_lines:
        target += f", {result.target_bad_lines:,} bad lines skipped"
    lines = [target]
    raw = (
        f"raw: {result.documents:,} documents read from {result.raw_files:,} files ({result.pieces:,} pieces), "
        f"{result.bad_lines:,} bad lines skipped, {result.blank_lines:,} blank lines"
    )
    lines.append(raw)
    lines.extend(f"  bad: {example}" for example in result.bad_examples[:5])
    if result.bad_lines > len(result.bad_examples[:5]):
        lines.append(f"  ... {result.bad_lines - len(result.bad_examples[:5]):,} more bad lines")
    if result.empty_files:
        shown = ", ".join(map(str, result.empty_files[:3])) + (" ..." if len(result.empty_files) > 3 else "")
        lines.append(f"  {len(result.empty_files)} empty files (no document): {shown}")
    files = len(result.selected_files)
    selected = f"selected: {result.selected:,} documents -> {result.out / 'selected'} ({files} files)"
    if result.selected_by_domain:
        selected += "; by domain: " + ", ".join(f"{d}: {n:,}" for d, n in result.selected_by_domain.items())
    lines.append(selected)
    stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.stage_seconds.items())
    timing = f"time: {result.seconds:.2f} s ({result.documents_per_second:,.0f} documents/s; {stages})"
    reused = {stage: n for stage, n in result.reused.items() if n}
    if reused:
        timing += "; reused from an earlier run: " + ", ".join(f"{stage} {n} pieces" for stage, n in reused.items())
    lines.append(timing)
    return lines
