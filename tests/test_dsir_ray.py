"""DSIR on Ray (engine="ray"): a local Ray with 2 CPUs gives the same weights and selection as the local engine."""

from __future__ import annotations

import json

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

import whatmatters as wm  # noqa: E402
from whatmatters.curate import dsir  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from test_dsir import topic_corpus, write_jsonl

    folder = tmp_path_factory.mktemp("dsir_ray")
    target, _ = topic_corpus(100, topics=1, seed=1)
    raw, labels = topic_corpus(60, topics=4, seed=2)
    write_jsonl(folder / "target.jsonl", [{"text": t} for t in target])
    records = [{"text": t, "topic": int(y), "id": i} for i, (t, y) in enumerate(zip(raw, labels))]
    for s in range(3):
        write_jsonl(folder / "raw" / f"{s}.jsonl", records[s::3])
    return folder


def test_ray_engine_selects_exactly_what_the_local_engine_selects(corpus, local_ray, tmp_path):
    args = (corpus / "target.jsonl", str(corpus / "raw" / "*.jsonl"), 50)
    options = {"piece_bytes": 8192, "seed": 7}
    on_ray = dsir(*args, tmp_path / "ray", engine="ray", **options)
    local = dsir(*args, tmp_path / "local", workers=2, **options)
    assert on_ray.engine == "ray" and on_ray.pieces > 3 and on_ray.selected == 50
    pd.testing.assert_frame_equal(on_ray.weights(), local.weights())
    key = ["dsir_source", "dsir_row"]
    a = on_ray.read().sort_values(key).reset_index(drop=True)
    b = local.read().sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert (a["topic"] == 0).mean() > 0.8  # random: 0.25
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["engine"] == "ray" and summary["selected"] == 50


def test_errors_in_ray_tasks_arrive_as_whatmatters_errors(corpus, local_ray, tmp_path):
    with pytest.raises(wm.InputError, match=r"no 'body' field \(its fields: text"):
        dsir(corpus / "target.jsonl", corpus / "raw", 5, tmp_path / "run", engine="ray", text_field="body")
