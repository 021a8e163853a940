"""Importance / ModelImportance files: schema checks that name the file, atomic saves, damaged bytes."""

from __future__ import annotations

import functools
import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters.compress import ModelImportance
from whatmatters.core.storage import FORMAT_VERSION, content_digest

KEY, DIGEST = b"whatmatters", b"whatmatters.sha256"
FUZZ = settings(max_examples=40, deadline=None)


def importance() -> wm.Importance:
    values = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    return wm.Importance(values, names=tuple("abcd"), method="ablation", params={"baseline": "mean"}, seed=3)


def model_importance() -> ModelImportance:
    weights = {"fc1": torch.linspace(0, 1, 6).reshape(2, 3), "fc2": torch.ones(3, 2, dtype=torch.float16)}
    layers = {name: wm.Importance(w, unit="weight", per_sample=False) for name, w in weights.items()}
    return ModelImportance(layers, method="wanda", params={"sparsity": 0.5})


def write_raw(path, table, meta, digest: bool = False):
    """A file with ``meta`` as the stored JSON (no format_version added); a checksum only if ``digest``."""
    raw = json.dumps(meta).encode() if not isinstance(meta, bytes) else meta
    stored = {KEY: raw, **({DIGEST: content_digest(table, raw).encode()} if digest else {})}
    pq.write_table(table.replace_schema_metadata(stored), path)
    return path


def legacy(path, imp: wm.Importance | None = None, **changes):
    """A file as whatmatters 0.1.0 wrote it (no format_version, no checksum), with metadata ``changes``."""
    imp = imp or importance()
    saved = pq.read_table(imp.save(path))
    meta = {**imp.metadata(), **changes}
    return write_raw(path, saved.replace_schema_metadata(None), {k: v for k, v in meta.items() if v is not ...})


# ------------------------------------------------------------------ round trips and the format
def test_save_writes_format_version_and_checksum(tmp_path):
    stored = pq.read_table(importance().save(tmp_path / "s.parquet")).schema.metadata
    assert json.loads(stored[KEY])["format_version"] == FORMAT_VERSION == 2
    assert len(stored[DIGEST]) == 64


def test_files_without_format_version_still_load(tmp_path):
    imp = importance()
    assert wm.Importance.load(legacy(tmp_path / "old.parquet", imp)) == imp
    mi = model_importance()
    table = pq.read_table(mi.save(tmp_path / "mi.parquet"))
    meta = json.loads(table.schema.metadata[b"whatmatters.model_importance"])
    del meta["format_version"]
    raw = json.dumps(meta).encode()
    pq.write_table(table.replace_schema_metadata({b"whatmatters.model_importance": raw}), tmp_path / "old_mi.parquet")
    assert ModelImportance.load(tmp_path / "old_mi.parquet") == mi


def test_bfloat16_round_trip(tmp_path):
    imp = wm.Importance(torch.randn(2, 3).to(torch.bfloat16), method="saliency")
    loaded = wm.Importance.load(imp.save(tmp_path / "bf16.parquet"))
    assert loaded == imp and loaded.values.dtype == torch.bfloat16


# ------------------------------------------------------------------ files that are not scores
def test_missing_file_folder_and_foreign_files(tmp_path):
    cases = {
        tmp_path / "none.parquet": "no such file; check the path",
        tmp_path: "is a folder",
        tmp_path / "data.csv": "not a Parquet file",
        tmp_path / "frame.parquet": "not written by Importance.save",
        tmp_path / "half.parquet": "not a Parquet file, or a damaged one",
        tmp_path / "empty.parquet": "not a Parquet file",
    }
    importance().save(tmp_path / "inside.parquet")  # a folder of Parquet files: pyarrow would read it as a dataset
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    pd.DataFrame({"a": [1.0]}).to_parquet(tmp_path / "frame.parquet")
    whole = importance().save(tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "half.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "empty.parquet").write_bytes(b"")
    for path, message in cases.items():
        with pytest.raises(wm.InputError, match="cannot load") as info:
            wm.Importance.load(path)
        assert str(path) in str(info.value) and message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dtype": ...}, "lacks dtype"),
        ({"dtype": "float99"}, "dtype 'float99' is not one of"),
        ({"dtype": "Tensor"}, "dtype 'Tensor' is not one of"),
        ({"dtype": 5}, "dtype is a int, not string"),
        ({"shape": [3, 5]}, "gives shape [3, 5] (15 values) but it holds 12 values"),
        ({"shape": [3, -4]}, "is not a list of sizes"),
        ({"shape": "3x4"}, "shape is a str, not list"),
        ({"names": ["a", "b"]}, "2 unit names given for unit shape (4,)"),
        ({"names": [1, 2, 3, 4]}, "unit names are not all strings"),
        ({"unit": "pixelz"}, "unknown unit 'pixelz'"),
        ({"per_sample": "yes"}, "per_sample is a str, not bool"),
        ({"seed": True}, "seed is a bool, not int or null"),
        ({"method": ..., "params": ...}, "lacks method, params"),
    ],
)
def test_invalid_metadata_names_the_problem(tmp_path, changes, message):
    path = legacy(tmp_path / "bad.parquet", **changes)
    with pytest.raises(wm.InputError) as info:
        wm.Importance.load(path)
    text = str(info.value)
    assert text.startswith(f"cannot load {path}: ") and message in text, text
    assert text.endswith("write it again with Importance.save")


def test_metadata_that_is_not_json_or_not_an_object(tmp_path):
    table = pq.read_table(importance().save(tmp_path / "s.parquet")).replace_schema_metadata(None)
    for raw, message in ((b'{"unit": "feat', "not valid JSON"), (b"\xff\xfe", "not valid JSON"), (b"[1, 2]", "object")):
        with pytest.raises(wm.InputError, match=message):
            wm.Importance.load(write_raw(tmp_path / "bad.parquet", table, raw))


def test_values_column_must_hold_numbers(tmp_path):
    meta = importance().metadata()
    tables = {
        "no 'values' column": pa.table({"other": [1.0]}),
        "not lists of numbers": pa.table({"values": pa.array(np.arange(12.0))}),
        "missing values": pa.table({"values": pa.array([[0.0] * 4] * 2 + [None], pa.list_(pa.float64()))}),
        "not one of": pa.table({"values": pa.array([["x"] * 4] * 3)}),
    }
    for message, table in tables.items():
        with pytest.raises(wm.InputError, match=message):
            wm.Importance.load(write_raw(tmp_path / "bad.parquet", table, meta))


def test_checksum_catches_changed_values_and_metadata(tmp_path):
    path = importance().save(tmp_path / "s.parquet")
    table = pq.read_table(path)
    stored = table.schema.metadata
    changed = pa.table({"values": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(12, np.float32)), 4)})
    pq.write_table(changed.replace_schema_metadata(stored), tmp_path / "values.parquet")
    meta = {**stored, KEY: stored[KEY].replace(b"ablation", b"ablatiox")}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "meta.parquet")
    for name in ("values", "meta"):
        with pytest.raises(wm.InputError, match="does not match its checksum"):
            wm.Importance.load(tmp_path / f"{name}.parquet")


def test_format_version_checks(tmp_path):
    table = pq.read_table(importance().save(tmp_path / "s.parquet")).replace_schema_metadata(None)
    meta = importance().metadata()
    cases = [
        ({**meta, "format_version": 3}, True, "file format 3, written by a newer whatmatters"),
        ({**meta, "format_version": "2"}, True, "format_version '2' is not a file format number"),
        ({**meta, "format_version": 2}, False, "its checksum is missing"),
    ]
    for stored, digest, message in cases:
        with pytest.raises(wm.InputError, match=message):
            wm.Importance.load(write_raw(tmp_path / "v.parquet", table, stored, digest=digest))


def test_model_importance_files_get_the_same_checks(tmp_path):
    path = model_importance().save(tmp_path / "mi.parquet")
    (tmp_path / "half.parquet").write_bytes(path.read_bytes()[:100])
    with pytest.raises(wm.InputError, match=r"cannot load .*half\.parquet: not a Parquet file"):
        ModelImportance.load(tmp_path / "half.parquet")
    with pytest.raises(wm.InputError, match=r"not written by ModelImportance\.save"):
        ModelImportance.load(importance().save(tmp_path / "s.parquet"))
    with pytest.raises(wm.InputError, match="is a folder"):
        ModelImportance.load(tmp_path)
    table = pq.read_table(path)
    key = b"whatmatters.model_importance"
    meta = json.loads(table.schema.metadata[key])
    del meta["format_version"]

    def load_legacy(table, meta):
        pq.write_table(table.replace_schema_metadata({key: json.dumps(meta).encode()}), tmp_path / "old.parquet")
        return ModelImportance.load(tmp_path / "old.parquet")

    with pytest.raises(wm.InputError, match=r"names a layer twice.*write it again with ModelImportance\.save"):
        load_legacy(table.set_column(0, "layer", pa.array(["fc1", "fc1"])), meta)
    with pytest.raises(wm.InputError, match="lacks layers"):
        load_legacy(table, {k: v for k, v in meta.items() if k != "layers"})
    with pytest.raises(wm.InputError, match="2 value rows, 2 layer names and metadata of 1 layers"):
        load_legacy(table, {**meta, "layers": meta["layers"][:1]})


# ------------------------------------------------------------------ atomic saves
@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_failing_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failure):
    old = importance()
    target = old.save(tmp_path / "s.parquet")
    before = target.read_bytes()
    real_write = pq.write_table

    def crash_midway(table, where, **kwargs):
        real_write(table, where, **kwargs)
        where.seek(10)
        where.truncate()
        raise failure("crash while writing")

    monkeypatch.setattr(pq, "write_table", crash_midway)
    new = wm.Importance(torch.zeros(2, 2), method="saliency")
    for path in (target, tmp_path / "new.parquet"):
        with pytest.raises(failure, match="crash while writing"):
            new.save(path)
    monkeypatch.undo()
    assert target.read_bytes() == before and wm.Importance.load(target) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet"]


def test_save_to_a_folder_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(wm.InputError, match="is a folder; give a file name"):
        importance().save(tmp_path)
    with pytest.raises(wm.InputError, match="is a folder"):
        model_importance().save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_save_below_a_file_is_refused_and_os_errors_name_the_target(tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(wm.InputError, match=r"file\.txt is a file, not a folder"):
        importance().save(tmp_path / "file.txt" / "sub" / "s.parquet")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(os, "replace", refuse)
    target = tmp_path / "s.parquet"
    with pytest.raises(PermissionError, match=re.escape(f"cannot write {target}: Permission denied")):
        importance().save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_save_keeps_permissions(tmp_path):
    reference = tmp_path / "reference"
    reference.touch()  # the permissions a new file gets here (umask)
    path = importance().save(tmp_path / "s.parquet")
    assert path.stat().st_mode == reference.stat().st_mode
    os.chmod(path, 0o640)
    importance().save(path)
    assert path.stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------ damaged bytes (property)
@functools.cache
def saved_bytes(kind: str, folder: str) -> bytes:
    obj = importance() if kind == "importance" else model_importance()
    return obj.save(os.path.join(folder, f"{kind}.parquet")).read_bytes()


@pytest.mark.parametrize("kind", ["importance", "model_importance"])
@FUZZ
@given(data=st.data())
def test_damaged_bytes_load_equal_or_raise_input_error(tmp_path_factory, kind, data):
    original = saved_bytes(kind, str(tmp_path_factory.getbasetemp()))
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    damaged = damaged[: data.draw(st.integers(0, len(damaged)), label="kept bytes")]
    path = tmp_path_factory.getbasetemp() / f"damaged_{kind}.parquet"
    path.write_bytes(bytes(damaged))
    cls = wm.Importance if kind == "importance" else ModelImportance
    try:
        loaded = cls.load(path)
    except wm.InputError as err:
        assert str(path) in str(err)
    else:
        assert loaded == (importance() if kind == "importance" else model_importance())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 20) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(field=st.sampled_from(sorted(importance().metadata())), value=JSON)
def test_random_metadata_values_load_or_raise_input_error(tmp_path_factory, field, value):
    path = legacy(tmp_path_factory.getbasetemp() / "random_meta.parquet", **{field: value})
    try:
        loaded = wm.Importance.load(path)
    except wm.InputError as err:
        assert str(err).startswith(f"cannot load {path}: ")
    else:
        assert loaded.metadata()[field] == value
