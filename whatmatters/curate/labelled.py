"""Labelled texts from JSON-lines, Parquet or CSV files, with every skipped line counted and shown.

JSON lines and Parquet are read with DSIR's reader (:mod:`whatmatters.curate.shards`: bad JSON, a missing or
non-string text field, a missing label are counted per file with the first few examples, never dropped
silently; a file whose first 100 lines hold no usable record is refused). CSV files are read with pandas;
rows with an empty text or label are counted the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whatmatters.core.errors import InputError
from whatmatters.curate.shards import BAD_EXAMPLES, FORMATS, PieceStats, iter_batches, plan, resolve_files

_WHOLE_FILE = 1 << 62  # one piece per file: rows are file rows


@dataclass
class LabelledTexts:
    """Texts and their labels (strings, as read), where each came from, and what was skipped."""

    texts: list[str]
    labels: list[str]
    files: list[str]
    rows: np.ndarray
    bad: int = 0
    blank: int = 0
    bad_examples: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)

    def classes(self) -> tuple[list[str], np.ndarray]:
        """The sorted distinct labels and each text's class index."""
        classes, index = np.unique(np.asarray(self.labels, dtype=object).astype(str), return_inverse=True)
        return [str(c) for c in classes], index.astype(np.int64)

    def summary(self) -> list[str]:
        """What was read and skipped, for a command's output."""
        lines = [
            f"read: {len(self.texts):,} labelled texts from {len(set(self.files)):,} files, "
            f"{self.bad:,} bad lines skipped, {self.blank:,} blank lines"
        ]
        lines.extend(f"  bad: {e}" for e in self.bad_examples[:BAD_EXAMPLES])
        if self.bad > len(self.bad_examples[:BAD_EXAMPLES]):
            lines.append(f"  ... {self.bad - len(self.bad_examples[:BAD_EXAMPLES]):,} more bad lines")
        if self.empty_files:
            lines.append(f"  {len(self.empty_files)} empty files (no record): {', '.join(self.empty_files[:3])}")
        return lines


def read_labelled(spec: str | Path | list[Any], text_field: str = "text", label_field: str = "label") -> LabelledTexts:
    """Every record's ``text_field`` and ``label_field`` of the files ``spec`` names (paths, folders, globs)."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    csv = [Path(i) for i in items if str(i).lower().endswith(".csv")]
    other = [i for i in items if not str(i).lower().endswith(".csv")]
    out = LabelledTexts([], [], [], np.empty(0, np.int64))
    rows: list[np.ndarray] = []
    if other:
        _read_documents(resolve_files(other, "data"), text_field, label_field, out, rows)
    for path in csv:
        _read_csv(path, text_field, label_field, out, rows)
    out.rows = np.concatenate(rows) if rows else np.empty(0, np.int64)
    if not out.texts:
        raise InputError(
            f"no labelled text found in {', '.join(map(str, items))} ({out.bad:,} bad lines"
            + (f", e.g. {out.bad_examples[0]}" if out.bad_examples else "")
            + f"); give {FORMATS} or CSV files whose records hold {text_field!r} and {label_field!r}"
        )
    return out


def _read_documents(paths: list[Path], text_field: str, label_field: str, out: LabelledTexts, rows: list) -> None:
    for piece in plan(paths, _WHOLE_FILE, text_field, label_field, what="data"):
        stats = PieceStats()
        for batch in iter_batches(piece, text_field, label_field, stats, what="data"):
            out.texts.extend(batch.texts)
            out.labels.extend(batch.domains or [])
            out.files.extend([piece.path] * len(batch.texts))
            rows.append(batch.rows)
        out.bad += stats.bad
        out.blank += stats.blank
        out.bad_examples.extend(f"{piece.path} line {r + 1}: {why}" for r, why in stats.bad_examples)
        if stats.docs == 0 and stats.bad == 0:
            out.empty_files.append(piece.path)


def _read_csv(path: Path, text_field: str, label_field: str, out: LabelledTexts, rows: list) -> None:
    import pandas as pd

    if not path.is_file():
        raise InputError(f"no such data file: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        out.empty_files.append(str(path))
        return
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the CSV file {path}: {' '.join(str(err).split())}") from None
    missing = [f for f in (text_field, label_field) if f not in frame.columns]
    if missing:
        raise InputError(
            f"CSV file {path} has no column {missing[0]!r} (its columns: {', '.join(map(str, frame.columns[:10]))}); "
            "name the fields with --text-field / --label-field"
        )
    if not len(frame):
        out.empty_files.append(str(path))
        return
    ok = frame[text_field].notna().to_numpy() & frame[label_field].notna().to_numpy()
    for r in np.flatnonzero(~ok)[:BAD_EXAMPLES]:
        what = text_field if pd.isna(frame[text_field].iloc[r]) else label_field
        out.bad_examples.append(f"{path} row {r + 1}: empty {what!r}")
    out.bad += int((~ok).sum())
    out.texts.extend(frame[text_field][ok].tolist())
    out.labels.extend(frame[label_field][ok].tolist())
    out.files.extend([str(path)] * int(ok.sum()))
    rows.append(np.flatnonzero(ok).astype(np.int64))
