"""`whatmatters curate score` and `curate select` on tiny files: scores, selection, bad lines, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dsir_cli import assert_one_error_line, invoke

TOPICS = {
    "space": ["the rocket reached orbit", "astronauts aboard the station", "a telescope saw the galaxy"],
    "food": ["bake the bread with butter", "a soup of tomato and garlic", "fresh pasta with basil sauce"],
}


def _records(n_per_topic: int = 8, flipped: int = 2):
    rows = []
    for label, phrases in TOPICS.items():
        for i in range(n_per_topic):
            rows.append({"text": f"{phrases[i % 3]} number {i}", "label": label})
    for r in rows[:flipped]:  # mislabelled: space texts called food
        r["label"] = "food"
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curate_cli")
    lines = [json.dumps(r) for r in _records()]
    lines.insert(4, "{broken json")
    lines.insert(6, json.dumps({"text": "no label here"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    import pandas as pd

    pd.DataFrame(_records()).to_csv(folder / "train.csv", index=False)
    (folder / "empty.jsonl").write_text("")
    return folder


@pytest.fixture(scope="module")
def scores(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "scores.parquet"
    args = ["--method", "el2n", "--seeds", 2, "--epochs", 20, "--score-epoch", 20]  # 16 rows: 1 step per epoch
    result = invoke("curate", "score", "--data", files / "train.jsonl", "-o", out, *args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_score_writes_one_row_per_example_and_reports_bad_lines(scores):
    out, output = scores
    table = pq.read_table(out).to_pandas()
    assert len(table) == 16
    assert {"example", "file", "row", "label", "class", "score", "embedding"} <= set(table.columns)
    assert "2 bad lines skipped" in output and "invalid JSON" in output and "no 'label'" in output
    assert np.isfinite(table["score"]).all() and len(table["embedding"][0]) == 384
    assert table["row"].tolist()[:5] == [0, 1, 2, 3, 5]  # file lines (0-based), the broken one skipped
    flipped = table["example"] < 2
    assert table.loc[flipped, "score"].mean() > table.loc[~flipped, "score"].mean()  # mislabelled score high


def test_score_reads_csv_like_json_lines(files, tmp_path):
    out = tmp_path / "s.parquet"
    result = invoke("curate", "score", "--data", files / "train.csv", "-m", "loss", "-o", out, "--seeds", 1)
    assert result.exit_code == 0, result.output
    assert len(pq.read_table(out)) == 16 and "0 bad lines" in result.output


@pytest.mark.parametrize("strategy", ["ccs", "top", "k_center"])
def test_select_keeps_k_examples(scores, tmp_path, strategy):
    out = tmp_path / strategy
    result = invoke("curate", "select", "--scores", scores[0], "-k", 6, "--strategy", strategy, "--out", out)
    assert result.exit_code == 0, result.output
    kept = pq.read_table(out / "selected.parquet").to_pandas()
    assert len(kept) == 6 and kept["example"].is_unique and "embedding" not in kept.columns
    report = json.loads((out / "selection.json").read_text())
    assert report["strategy"] == strategy and report["kept"] == 6
    if strategy == "top":
        all_scores = pq.read_table(scores[0]).to_pandas()["score"]
        assert kept["score"].min() >= all_scores.nlargest(6).min()


def test_clear_errors(files, scores, tmp_path):
    out = tmp_path / "x.parquet"
    assert_one_error_line(invoke("curate", "score", "--data", files / "empty.jsonl", "-o", out), "no labelled text")
    assert_one_error_line(
        invoke("curate", "score", "--data", files / "train.csv", "--label-field", "topic", "-o", out),
        "no column 'topic'",
    )
    result = invoke("curate", "score", "--data", files / "train.jsonl", "--text-field", "body", "-o", out)
    assert_one_error_line(result, "no labelled text", "'body'")
    assert_one_error_line(
        invoke("curate", "score", "--data", files / "train.jsonl", "-m", "lexrank", "-o", out), "lexrank"
    )
    result = invoke("curate", "select", "--scores", scores[0], "-k", 100, "--out", tmp_path / "sel")
    assert_one_error_line(result, "larger than the pool", "16")
    assert_one_error_line(
        invoke("curate", "select", "--scores", files / "nope.parquet", "-k", 1, "-o", tmp_path), "no such"
    )
    assert not out.exists()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.one_of(st.integers(max_value=0), st.integers(min_value=17, max_value=10**9)))
def test_select_refuses_any_k_outside_the_pool(scores, tmp_path, k):
    result = invoke("curate", "select", "--scores", scores[0], "-k", k, "--out", tmp_path / "sel")
    assert_one_error_line(result, f"-k {k}", "16 examples")
