"""What ``whatmatters curate score`` and ``curate select`` do: embed labelled texts, train a small head on the
embeddings, score every example, and read and write the scores file (Parquet)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from whatmatters.core.errors import InputError
from whatmatters.core.task import progress_bar
from whatmatters.curate.labelled import LabelledTexts

MODELS = ("minilm",)
# Scores read the models of this epoch (1-based) by default: EL2N / GraNd early in training, as Paul et al.
EARLY = {"el2n": 2, "grand": 2}
EMBED_CHUNK = 256


@dataclass
class Scored:
    """The scores of the examples read, with their embeddings and the classes."""

    scores: np.ndarray
    embeddings: np.ndarray
    classes: list[str]
    index: np.ndarray
    epoch: int


def embed_texts(texts: list[str], model: str, max_length: int, progress: bool) -> torch.Tensor:
    """Sentence embeddings of ``texts`` with the offline ``model`` (``minilm``: all-MiniLM-L6-v2, 384-d)."""
    if model not in MODELS:
        raise InputError(f"unknown --model {model!r}; choose one of {', '.join(MODELS)}")
    from whatmatters.text.pretrained import embed, load_minilm

    encoder, tokenizer = load_minilm()
    chunks = [texts[i : i + EMBED_CHUNK] for i in range(0, len(texts), EMBED_CHUNK)]
    with torch.no_grad():
        parts = [
            embed(encoder, tokenizer, c, max_length=max_length)
            for c in progress_bar(chunks, len(chunks), "embedding", progress)
        ]
    return torch.cat(parts).float()


def score_examples(
    data: LabelledTexts,
    embeddings: torch.Tensor,
    method: str,
    *,
    epochs: int,
    seeds: int,
    lr: float,
    score_epoch: int | None,
    seed: int,
    progress: bool,
) -> Scored:
    """Train a linear head on the embeddings (``seeds`` runs, ``epochs`` each) and score every example."""
    from whatmatters.curate import score, train_models

    classes, y = data.classes()
    if len(classes) < 2:
        raise InputError(f"all {len(y):,} examples have the label {classes[0]!r}; scoring needs at least 2 classes")
    dim = embeddings.shape[1]
    run = train_models(
        lambda: torch.nn.Linear(dim, len(classes)),
        embeddings,
        torch.from_numpy(y),
        epochs=epochs,
        seeds=[seed + s for s in range(seeds)],
        lr=lr,
        progress=progress,
    )
    epoch = min(score_epoch or EARLY.get(method, epochs), epochs)
    model: Any = run if method in ("forgetting", "tracin") else run.models(epoch=epoch)
    imp = score(model, embeddings, method, y=torch.from_numpy(y), seed=seed, progress=progress)
    return Scored(imp.numpy().astype(np.float64), embeddings.numpy(), classes, y, epoch)


def write_scores(path: Path, data: LabelledTexts, scored: Scored, meta: dict[str, Any]) -> Path:
    """One row per example: ``example``, ``file``, ``row`` (0-based line or row in its file), ``label``,
    ``class`` (its index in ``classes``), ``score`` and the ``embedding`` (float32 list)."""
    import pyarrow as pa

    from whatmatters.curate.shards import write_table

    emb = scored.embeddings.astype(np.float32)
    table = pa.table(
        {
            "example": np.arange(len(data.texts), dtype=np.int64),
            "file": data.files,
            "row": data.rows,
            "label": data.labels,
            "class": scored.index,
            "score": scored.scores,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]),
        }
    )
    return write_table(table, Path(path), {**meta, "classes": scored.classes, "epoch": scored.epoch})


def read_scores(path: Path):
    """The scores file as a pandas DataFrame (a ``score`` column is required)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such scores file: {path}")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise InputError(f"cannot read the scores file {path} as Parquet: {' '.join(str(err).split())}") from None
    if "score" not in table.column_names:
        raise InputError(f"the scores file {path} has no 'score' column (its columns: {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise InputError(f"the scores file {path} is empty: score at least one example")
    return table


def read_embeddings(spec: Path | None, scores_table: Any) -> np.ndarray | None:
    """Embeddings from ``--embeddings`` (``.npy``, or Parquet with an ``embedding`` column), else the scores
    file's own ``embedding`` column, else None."""
    if spec is None:
        if "embedding" not in scores_table.column_names:
            return None
        return _column_matrix(scores_table, "scores file")
    spec = Path(spec)
    if not spec.is_file():
        raise InputError(f"no such embeddings file: {spec}")
    if spec.suffix.lower() == ".npy":
        return np.load(spec, allow_pickle=False)
    import pyarrow.parquet as pq

    table = pq.read_table(spec)
    if "embedding" not in table.column_names:
        raise InputError(f"the embeddings file {spec} has no 'embedding' column; give a .npy file or such a Parquet")
    return _column_matrix(table, str(spec))


def _column_matrix(table: Any, what: str) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    width = getattr(column.type, "list_size", None)
    values = column.flatten().to_numpy(zero_copy_only=False)
    if width is None:
        rows = {len(v) for v in column.to_pylist()}
        if len(rows) != 1:
            raise InputError(f"the embeddings of the {what} have different lengths ({sorted(rows)[:5]})")
        width = rows.pop()
    return values.reshape(len(column), width)
