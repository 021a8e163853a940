"""Parquet files of whatmatters results: atomic writes, checksummed content, schema errors that name the file.

:func:`write_parquet` writes a pyarrow table with JSON metadata under one schema-metadata key, a file
format version and a SHA-256 of the content; it writes a temporary file in the target's folder and
renames it onto the target, so a crash never leaves a half-written or clobbered file.
:func:`read_parquet` checks all of it and hands the table and metadata to a ``decode`` function; every
problem (no file, a folder, not Parquet, damaged bytes, invalid metadata) raises
:class:`~whatmatters.core.errors.InputError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from whatmatters._version import __version__
from whatmatters.core.errors import InputError

T = TypeVar("T")

FORMAT_VERSION = 2
"""File format written by :func:`write_parquet`. 1: no ``format_version`` field, no checksum (whatmatters
0.1.0, still read); 2: ``format_version`` in the metadata and a SHA-256 under ``key + b".sha256"``."""

_DIGEST_SUFFIX = b".sha256"
_NONE = type(None)


# ------------------------------------------------------------------ writing
def write_parquet(table: Any, key: bytes, meta: dict[str, Any], path: str | Path) -> Path:
    """Write a pyarrow ``table`` to ``path`` with ``meta`` as JSON under the schema metadata ``key``.

    Atomic: the file is written in full to a temporary file next to ``path``, then renamed onto it;
    on any error the temporary file is removed and an existing ``path`` is left as it was. A folder,
    or a path below a file, raises :class:`InputError`; an OS error names ``path``.
    """
    path = Path(path)
    _check_target(path)
    raw = json.dumps({**meta, "format_version": FORMAT_VERSION}, allow_nan=True).encode()
    table = table.replace_schema_metadata({key: raw, key + _DIGEST_SUFFIX: content_digest(table, raw).encode()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(table, path)
    except OSError as err:  # name the target, not the temporary file
        if err.errno is None:
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err
    return path


def _check_target(path: Path) -> None:
    """Raise :class:`InputError` if ``path`` is a folder or lies below a file."""
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name to save to, e.g. {path / 'scores.parquet'}")
    ancestor = next((p for p in path.parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise InputError(f"cannot write {path}: {ancestor} is a file, not a folder")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` on success, removed on any error.

    A reader (or a parallel writer) never sees half a file, and a crash never clobbers the old one. An
    overwritten file keeps its permissions; missing folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomically(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp, tmp.open("xb") as file:  # created with the usual permissions (umask)
        pq.write_table(table, file)
        file.flush()
        os.fsync(file.fileno())


def content_digest(table: Any, raw_meta: bytes) -> str:
    """SHA-256 of the metadata bytes and of every column's lengths, missing values and values."""
    digest = hashlib.sha256(raw_meta)
    for name, column in zip(table.column_names, table.columns):
        digest.update(name.encode())
        _hash_array(digest, column.combine_chunks())
    return digest.hexdigest()


def _hash_array(digest: Any, array: Any) -> None:
    """Hash an array's content only (no type names: those print differently across pyarrow versions)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    digest.update(f"{len(array)}:{array.null_count}:".encode())
    if _is_list(array.type):
        lengths = pc.list_value_length(array).cast(pa.int64()).fill_null(-1).to_numpy()
        digest.update(np.ascontiguousarray(lengths))
        _hash_array(digest, array.flatten())
    elif pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        strings = array.cast(pa.large_binary()).to_pylist()  # raw bytes: damaged ones need not be UTF-8
        digest.update(np.array([len(b or b"") for b in strings], dtype=np.int64))
        digest.update(b"".join(b or b"" for b in strings))
    else:
        values = np.ascontiguousarray(array.to_numpy(zero_copy_only=False))
        digest.update(values.dtype.str.encode())
        digest.update(values if values.dtype != object else repr(values.tolist()).encode())


def _is_list(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


# ------------------------------------------------------------------ reading
def read_parquet(path: str | Path, key: bytes, writer: str, decode: Callable[[Any, dict[str, Any]], T]) -> T:
    """``decode(table, meta)`` of a file written by :func:`write_parquet` (``writer`` names the saving method).

    Raises :class:`InputError` naming ``path``, the problem and the fix for a missing file, a folder, a file
    that is not Parquet or is damaged, one not written by ``writer``, and for every ``InputError`` of
    ``decode`` (the metadata or values it refuses).
    """
    path = Path(path)
    try:
        table = _read_table(path, writer)
        meta = _metadata(table, key, writer)
        try:
            return decode(table, meta)
        except InputError as err:
            raise _damaged(str(err), writer) from None
    except InputError as err:
        raise InputError(f"cannot load {path}: {err}") from None


def _damaged(problem: str, writer: str) -> InputError:
    return InputError(f"{problem}; the file is damaged or was not written by {writer}: write it again with {writer}")


def _read_table(path: Path, writer: str) -> Any:
    import pyarrow.parquet as pq

    if path.is_dir():  # pyarrow would read a folder as a dataset of all the files in it
        raise InputError(f"it is a folder; give the file written by {writer}")
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise InputError("no such file; check the path") from None
    with file:
        try:
            table = pq.read_table(file)
            _ = table.column_names  # decoded lazily: UnicodeDecodeError on damaged bytes
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... on bytes that are not Parquet
            reason = re.sub(r"^Could not open Parquet input source '[^']*': ", "", " ".join(str(err).split()))
            reason = f"{type(err).__name__}: {reason}"
            raise InputError(
                f"not a Parquet file, or a damaged one ({reason}); give a file written by {writer}, or write it again"
            ) from None
    return table


def _metadata(table: Any, key: bytes, writer: str) -> dict[str, Any]:
    """The JSON metadata under ``key``, checked against the checksum, without its ``format_version``."""
    stored = table.schema.metadata or {}
    raw = stored.get(key)
    if raw is None:
        raise InputError(
            f"it is a Parquet file without the metadata of {writer} (not written by {writer}, or damaged); "
            f"give a file written by {writer}"
        )
    digest = stored.get(key + _DIGEST_SUFFIX)
    if digest is not None and digest != content_digest(table, raw).encode():
        raise _damaged("its content does not match its checksum", writer)
    try:
        meta = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise _damaged(f"its metadata is not valid JSON ({err})", writer) from None
    if not isinstance(meta, dict):
        raise _damaged("its metadata is not a JSON object", writer)
    version = meta.pop("format_version", 1)
    if not _has_type(version, (int,)) or version < 1:
        raise _damaged(f"its format_version {version!r} is not a file format number", writer)
    if version > FORMAT_VERSION:
        raise InputError(
            f"it is in file format {version}, written by a newer whatmatters; whatmatters {__version__} reads "
            f"formats 1 to {FORMAT_VERSION}: upgrade whatmatters"
        )
    if version >= 2 and digest is None:
        raise _damaged("its checksum is missing", writer)
    return meta


# ------------------------------------------------------------ schema checks
def check_fields(meta: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]]) -> None:
    """Raise :class:`InputError` unless ``meta`` has every key of ``fields`` with a value of its types."""
    missing = [name for name in fields if name not in meta]
    if missing:
        raise InputError(f"its metadata lacks {', '.join(missing)}")
    wrong = [
        f"{name} is a {type(meta[name]).__name__}, not {' or '.join(_type_name(t) for t in types)}"
        for name, types in fields.items()
        if not _has_type(meta[name], types)
    ]
    if wrong:
        raise InputError(f"in its metadata {'; '.join(wrong)}")


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    """``isinstance``, except that a bool is no int or float (JSON true is not a number)."""
    return isinstance(value, types) and (not isinstance(value, bool) or bool in types or object in types)


def _type_name(kind: type) -> str:
    return {_NONE: "null", dict: "object", list: "list", str: "string"}.get(kind, kind.__name__)


def list_column(table: Any, name: str) -> Any:
    """The list column ``name`` of ``table`` as one pyarrow array; :class:`InputError` if absent or with nulls."""
    if name not in table.column_names:
        raise InputError(f"it has no {name!r} column")
    column = table.column(name).combine_chunks()
    if not _is_list(column.type):
        raise InputError(f"its {name!r} column holds {column.type}, not lists of numbers")
    if column.null_count or column.flatten().null_count:
        raise InputError(f"its {name!r} column has missing values")
    return column


def string_column(table: Any, name: str) -> list[str]:
    """The string column ``name`` of ``table`` as a list; :class:`InputError` if absent, with nulls or not UTF-8."""
    import pyarrow as pa

    if name not in table.column_names:
        raise InputError(f"it has no {name!r} column")
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or column.null_count:
        raise InputError(f"its {name!r} column does not hold one string per row")
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        raise InputError(f"its {name!r} column holds bytes that are not UTF-8 text") from None
