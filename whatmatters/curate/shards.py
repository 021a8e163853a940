"""Document shards on disk: find them, cut them into pieces, stream their texts, read back chosen rows.

A *shard* is one file of documents: JSON lines (``.jsonl``, ``.json``, ``.ndjson``, optionally ``.gz``) or
Parquet (``.parquet``, ``.pq``). A *piece* is the unit of work: a byte range of a JSON-lines file (each
line belongs to the piece its first byte lies in) or a run of row groups of a Parquet file, so one big
file still spreads over many workers. A document is named by its piece and its *row* in the piece
(the physical line, blank and bad lines counted, or the Parquet row), which a second read of the piece
finds again without any index.

Nothing here holds more than one batch of one piece in memory. Bad JSON lines, records without the
text field, null texts and blank lines are counted per piece (with the first few, by row and reason),
never dropped silently; a piece whose first 100 non-blank lines hold no usable document raises
:class:`~whatmatters.core.errors.InputError` at once (a wrong text field, a JSON array instead of JSON
lines, a binary file), so a wrong input fails in seconds instead of after a pass over the pool.
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whatmatters.core.errors import InputError
from whatmatters.core.storage import atomic_file

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
FORMATS = "JSON lines (.jsonl, .json, .ndjson, or any of them .gz) or Parquet (.parquet, .pq)"
EARLY_CHECK_LINES = 100  # non-blank lines without a usable document before a piece gives up
BAD_EXAMPLES = 5  # bad lines remembered per piece (all are counted)


# ------------------------------------------------------------------ finding files
def file_kind(path: Path) -> str | None:
    """``"jsonl"``, ``"jsonl.gz"``, ``"parquet"`` or None (not a document file)."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(tuple(s + ".gz" for s in JSONL_SUFFIXES)):
        return "jsonl.gz"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def resolve_files(spec: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[Path]:
    """The document files that ``spec`` names: paths, globs (``**`` recursive) or folders, in a fixed order.

    A glob's matches are sorted; a folder means the document files directly inside it. A missing path,
    a glob without a match, a folder without document files, a file of another format or anything that
    is not a regular file (a FIFO would block a reader forever) raises :class:`InputError` naming it.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise InputError(f"no {what} files given")
    found: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise InputError(f"{what} must be paths or glob patterns, got {type(item).__name__} {item!r}")
        text = os.fspath(item)
        if _has_magic(text):
            matches = sorted(Path(m) for m in globlib.glob(os.path.expanduser(text), recursive=True))
            matches = [m for m in matches if not m.is_dir()]
            if not matches:
                raise InputError(f"no files match the {what} pattern {text!r} (relative to {Path.cwd()})")
        else:
            path = Path(text).expanduser()
            if not path.exists():
                raise InputError(f"no such {what} file or folder: {text}")
            if path.is_dir():
                matches = sorted(p for p in path.iterdir() if file_kind(p) is not None and not p.name.startswith("."))
                if not matches:
                    raise InputError(f"the {what} folder {text} holds no {FORMATS} files")
            else:
                matches = [path]
        for m in matches:
            if not m.is_file():
                raise InputError(f"{what} {m} is not a regular file")
            if file_kind(m) is None:
                raise InputError(f"cannot read {what} file {m}: give {FORMATS}")
        found.extend(matches)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def identity(path: Path) -> dict[str, Any]:
    """What says a file is unchanged: its path, size and modification time."""
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ------------------------------------------------------------------ pieces
@dataclass(frozen=True)
class Piece:
    """A unit of work: ``[start, stop)`` bytes of a JSON-lines file, or row groups of a Parquet file.

    ``stop`` is -1 for a gzipped file (read to its end); ``row_offset`` is the file row of the piece's first
    row for Parquet (for JSON lines it is known only once the earlier pieces were read).
    """

    shard: int
    index: int
    path: str
    kind: str
    start: int
    stop: int
    size: int
    row_offset: int = 0

    @property
    def name(self) -> str:
        return f"{self.shard:05d}-{self.index:04d}"


def plan(
    paths: Sequence[Path], piece_bytes: int, text_field: str, domain_field: str | None = None, what: str = "raw"
) -> list[Piece]:
    """Cut every file into pieces of about ``piece_bytes`` bytes; Parquet files are checked for the columns here."""
    pieces: list[Piece] = []
    for shard, path in enumerate(paths):
        kind = file_kind(path)
        size = path.stat().st_size
        if kind == "jsonl":
            n = max(1, math.ceil(size / piece_bytes))
            for j in range(n):
                start, stop = j * piece_bytes, min((j + 1) * piece_bytes, size)
                pieces.append(Piece(shard, j, str(path), kind, start, stop, stop - start))
        elif kind == "jsonl.gz":
            pieces.append(Piece(shard, 0, str(path), kind, 0, -1, size))
        else:
            if size == 0:  # an empty file, not a damaged Parquet file: reported like an empty JSON-lines file
                pieces.append(Piece(shard, 0, str(path), kind, 0, 0, 0))
                continue
            meta = _parquet_metadata(path)
            _check_columns(path, meta.schema.to_arrow_schema(), text_field, domain_field, what)
            groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
            j, first, acc, rows, offset = 0, 0, 0, 0, 0
            for g, group in enumerate(groups):
                acc += group.total_byte_size
                rows += group.num_rows
                if acc >= piece_bytes or g == len(groups) - 1:
                    pieces.append(Piece(shard, j, str(path), kind, first, g + 1, max(acc, 1), offset))
                    j, first, offset, acc, rows = j + 1, g + 1, offset + rows, 0, 0
            if not groups:
                pieces.append(Piece(shard, 0, str(path), kind, 0, 0, 0))
    return pieces


def _parquet_metadata(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(path)
    except Exception as err:  # ArrowInvalid and friends: not Parquet, truncated, damaged
        raise InputError(f"cannot read {path}: not a Parquet file or damaged ({err})") from None


def _check_columns(path: Path, schema: Any, text_field: str, domain_field: str | None, what: str) -> None:
    import pyarrow as pa

    names = schema.names
    for name, role, option in ((text_field, "text", "text_field"), (domain_field, "domain", "domain_field")):
        if name is None:
            continue
        if name not in names:
            raise InputError(
                f"{what} file {path} has no {role} column {name!r}; its columns are {', '.join(names[:20])}"
                f"{' ...' if len(names) > 20 else ''}; name the {role} column with {option}= "
                f"(--{option.replace('_', '-')})"
            )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_string_view(kind)):
        raise InputError(f"{what} file {path}: column {text_field!r} holds {kind}, not text")


def _is_string_view(kind: Any) -> bool:
    import pyarrow as pa

    check = getattr(pa.types, "is_string_view", None)
    return bool(check and check(kind))


# ------------------------------------------------------------------ reading
@dataclass
class PieceStats:
    """What one read of a piece met: rows (lines), documents, bad rows (with the first few) and blank lines."""

    rows: int = 0
    docs: int = 0
    bad: int = 0
    blank: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)
    complete: bool = True  # False: the read stopped early (a token budget)

    def add_bad(self, row: int, reason: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < BAD_EXAMPLES:
            self.bad_examples.append((row, reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "docs": self.docs,
            "bad": self.bad,
            "blank": self.blank,
            "bad_examples": [list(e) for e in self.bad_examples],
            "complete": self.complete,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PieceStats:
        return cls(d["rows"], d["docs"], d["bad"], d["blank"], [tuple(e) for e in d["bad_examples"]], d["complete"])


@dataclass
class Batch:
    """Documents of one piece: their rows in the piece, texts and (optionally) domains."""

    rows: np.ndarray
    texts: list[str]
    domains: list[str] | None


def _lines(piece: Piece) -> Iterator[bytes]:
    """The lines that belong to ``piece`` (each ends with its newline, the file's last one maybe not)."""
    if piece.kind == "jsonl.gz":
        with gzip.open(piece.path, "rb") as f:
            try:
                yield from f
            except (OSError, EOFError) as err:  # gzip.BadGzipFile, a truncated stream
                raise InputError(f"cannot read {piece.path}: damaged gzip file ({err})") from None
        return
    with open(piece.path, "rb", buffering=1 << 20) as f:
        if piece.start > 0:  # skip the line that began in the previous piece
            f.seek(piece.start - 1)
            f.readline()
        pos = f.tell()
        while pos < piece.stop:
            line = f.readline()
            if not line:
                return
            pos += len(line)
            yield line


def _json_error(line: bytes) -> str:
    """Why ``line`` is not JSON (parsed without its line break, so the message is about the content)."""
    try:
        json.loads(line.rstrip(b"\r\n"))
    except ValueError as err:
        return f"invalid JSON ({getattr(err, 'msg', err)}, column {getattr(err, 'colno', '?')})"
    return "invalid JSON"


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def iter_batches(
    piece: Piece,
    text_field: str,
    domain_field: str | None,
    stats: PieceStats,
    *,
    batch_chars: int = 4_000_000,
    batch_docs: int = 8192,
    what: str = "raw",
) -> Iterator[Batch]:
    """Stream the documents of ``piece`` in batches of about ``batch_chars`` characters; ``stats`` fills up."""
    if piece.kind == "parquet":
        yield from _parquet_batches(piece, text_field, domain_field, stats, batch_docs, what)
        return
    loads = json.loads
    rows: list[int] = []
    texts: list[str] = []
    domains: list[str] | None = [] if domain_field is not None else None
    chars = 0
    nonblank = 0
    row = -1
    for row, line in enumerate(_lines(piece)):
        if nonblank == EARLY_CHECK_LINES and stats.docs == 0 and not texts:
            _give_up(piece, stats, text_field, what)
        if line.isspace() or not line:
            stats.blank += 1
            continue
        nonblank += 1
        try:
            record = loads(line)
        except UnicodeDecodeError:
            stats.add_bad(row, "not UTF-8 text")
            continue
        except ValueError:  # json.JSONDecodeError
            stats.add_bad(row, _json_error(line))
            continue
        if not isinstance(record, dict):
            stats.add_bad(row, f"a JSON {_type_name(record)}, not an object")
            continue
        text = record.get(text_field)
        if not isinstance(text, str):
            if text_field not in record:
                fields = ", ".join(map(str, list(record)[:10])) or "none"
                stats.add_bad(row, f"no {text_field!r} field (its fields: {fields})")
            else:
                stats.add_bad(row, f"{text_field!r} is a {_type_name(text)}, not a string")
            continue
        if domains is not None:
            domain = record.get(domain_field)
            if domain is None:
                stats.add_bad(row, f"no {domain_field!r} (the domain)" if domain_field not in record else "null domain")
                continue
            domains.append(str(domain))
        rows.append(row)
        texts.append(text)
        stats.docs += 1
        chars += len(text)
        if chars >= batch_chars or len(texts) >= batch_docs:
            yield Batch(np.asarray(rows, np.int64), texts, domains)
            rows, texts, chars = [], [], 0
            domains = [] if domain_field is not None else None
    stats.rows = row + 1
    if nonblank >= EARLY_CHECK_LINES and stats.docs == 0:
        _give_up(piece, stats, text_field, what)
    if texts:
        yield Batch(np.asarray(rows, np.int64), texts, domains)


def _give_up(piece: Piece, stats: PieceStats, text_field: str, what: str) -> None:
    where = "its first" if piece.start == 0 else f"the first from byte {piece.start} on, of its"
    row, reason = stats.bad_examples[0] if stats.bad_examples else (0, "")
    line = f"line {row + 1}" if piece.start == 0 else f"row {row} of that range"
    hint = (
        "; name the text field with text_field= (--text-field)"
        if "field (its fields" in reason
        else "; the file must hold one JSON object per line"
    )
    raise InputError(
        f"{what} file {piece.path}: none of {where} {EARLY_CHECK_LINES} non-blank lines is a document with a "
        f"{text_field!r} text ({line}: {reason}){hint}"
    )


def _parquet_batches(
    piece: Piece, text_field: str, domain_field: str | None, stats: PieceStats, batch_docs: int, what: str
) -> Iterator[Batch]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if piece.stop <= piece.start:
        return
    columns = [text_field] + ([domain_field] if domain_field is not None and domain_field != text_field else [])
    try:
        reader = pq.ParquetFile(piece.path)
        _check_columns(Path(piece.path), reader.schema_arrow, text_field, domain_field, what)
        batches = reader.iter_batches(
            batch_size=batch_docs, row_groups=range(piece.start, piece.stop), columns=columns, use_threads=False
        )
        offset = 0
        for batch in batches:
            n = batch.num_rows
            text = batch.column(text_field)
            valid = text.is_valid()
            if domain_field is not None:
                domain = batch.column(domain_field)
                valid = pc.and_(valid, domain.is_valid())
            valid_np = valid.to_numpy(zero_copy_only=False)
            rows = np.arange(offset, offset + n, dtype=np.int64)
            if not valid_np.all():
                for r in rows[~valid_np]:
                    null = "text" if not text[int(r - offset)].is_valid else "domain"
                    stats.add_bad(int(r), f"null {null} ({(text_field if null == 'text' else domain_field)!r})")
                text = text.filter(valid)
                rows = rows[valid_np]
                if domain_field is not None:
                    domain = domain.filter(valid)
            domains = [str(d) for d in domain.to_pylist()] if domain_field is not None else None
            offset += n
            stats.rows += n
            stats.docs += len(rows)
            if len(rows):
                yield Batch(rows, text.to_pylist(), domains)
    except InputError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"cannot read {piece.path}: not a Parquet file or damaged ({err})") from None


def read_rows(piece: Piece, rows: np.ndarray):
    """The full records of ``rows`` (sorted rows of the piece) as a pyarrow Table, in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = np.asarray(rows, np.int64)
    if piece.kind == "parquet":
        reader = pq.ParquetFile(piece.path)
        parts, offset, i = [], 0, 0
        for batch in reader.iter_batches(batch_size=65536, row_groups=range(piece.start, piece.stop)):
            j = int(np.searchsorted(rows, offset + batch.num_rows))
            if j > i:
                parts.append(batch.take(pa.array(rows[i:j] - offset)))
                i = j
            offset += batch.num_rows
            if i == len(rows):
                break
        if i != len(rows):
            raise InputError(f"{piece.path} changed during the run: row {rows[i]} of a piece is gone")
        return pa.Table.from_batches(parts, schema=reader.schema_arrow)
    records, i = [], 0
    for row, line in enumerate(_lines(piece)):
        if i == len(rows):
            break
        if row == rows[i]:
            records.append(json.loads(line))
            i += 1
    if i != len(rows):
        raise InputError(f"{piece.path} changed during the run: line {rows[i]} of a piece is gone")
    return records_to_table(records)


def records_to_table(records: list[dict[str, Any]]):
    """JSON records as a pyarrow Table: one column per field (first-seen order), missing fields null.

    A field whose values have no common Arrow type (a number here, a string there) is stored as JSON text.
    """
    import pyarrow as pa

    names = list(dict.fromkeys(key for record in records for key in record))
    columns = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            columns[name] = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string()
            )
    return pa.table(columns)


# ------------------------------------------------------------------ atomic files
def write_table(table: Any, path: Path, meta: dict[str, Any] | None = None) -> Path:
    """Write a pyarrow table as Parquet, atomically (a temporary file renamed onto ``path``)."""
    import pyarrow.parquet as pq

    if meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"whatmatters": json.dumps(meta)})
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_meta(path: Path) -> dict[str, Any] | None:
    """The ``whatmatters`` metadata of a Parquet file written by :func:`write_table` (None: unreadable)."""
    import pyarrow.parquet as pq

    try:
        raw = (pq.read_schema(path).metadata or {}).get(b"whatmatters")
        return json.loads(raw) if raw is not None else None
    except Exception:  # a damaged file counts as not written: it is written again
        return None


def write_bytes(data: bytes, path: Path) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return path


def write_json(obj: Any, path: Path) -> Path:
    return write_bytes(json.dumps(obj, indent=1, sort_keys=True).encode(), path)


def write_arrays(path: Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` to ``path``, atomically."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes(buffer.getvalue(), path)
