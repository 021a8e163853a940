"""`whatmatters curate dsir`: a summary of what was read, skipped and selected; every error one line, exit 2."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from test_dsir import topic_corpus, write_jsonl
from typer.testing import CliRunner

from whatmatters.cli import app
from whatmatters.cli.curate import curate_app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(result, *words):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dsir_cli")
    target, _ = topic_corpus(100, topics=1, seed=1)
    raw, labels = topic_corpus(50, topics=4, seed=2)
    write_jsonl(folder / "target.jsonl", [{"text": t} for t in target])
    records = [{"text": t, "topic": int(y), "domain": f"d{y % 2}"} for t, y in zip(raw, labels)]
    write_jsonl(folder / "shards" / "0.jsonl", records[:100])
    lines = [json.dumps(r) for r in records[100:]]
    lines.insert(3, "{not json")
    (folder / "shards" / "1.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_dsir_command_selects_and_prints_a_summary(files, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "curate", "dsir", "--target", files / "target.jsonl", "--raw", f"{files}/shards/*.jsonl", "-k", 40, "--out", out
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "target: 100 documents" in text and "raw: 200 documents read from 2 files" in text
    assert "1 bad lines skipped" in text and "1.jsonl line 4: invalid JSON" in text
    assert f"selected: 40 documents -> {out / 'selected'}" in text and "documents/s" in text
    assert pq.read_table(out / "selected").num_rows == 40
    # the same command again: everything reused
    again = invoke(
        "curate", "dsir", "--target", files / "target.jsonl", "--raw", f"{files}/shards/*.jsonl", "-k", 40, "--out", out
    )
    assert again.exit_code == 0 and "reused from an earlier run" in again.stdout


def test_dsir_command_with_quotas(files, tmp_path):
    result = invoke(
        "curate", "dsir", "-t", files / "target.jsonl", "-r", files / "shards", "-k", 10, "-o", tmp_path / "q",
        "--domain-field", "domain", "--quota", "d0=0.6", "--quota", "d1=0.4", "--seed", 3, "--workers", 1,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "by domain: d0: 6, d1: 4" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--raw", "{f}/nope/*.jsonl", "-k", "5"], ["no files match the raw pattern"]),
        (["--raw", "{f}/missing.jsonl", "-k", "5"], ["no such raw file or folder"]),
        (["--raw", "{f}/shards", "-k", "5000"], ["k=5000 is larger than the raw pool", "200 documents"]),
        (["--raw", "{f}/shards", "-k", "5", "--text-field", "body"], ["no 'body' field", "--text-field"]),
        (["--raw", "{f}/shards", "-k", "5", "--engine", "spark"], ["unknown engine 'spark'"]),
        (["--raw", "{f}/shards", "-k", "5", "--quota", "x"], ["--quota 'x' is not DOMAIN=COUNT"]),
        (["--raw", "{f}/shards", "-k", "5", "--raw-sample-tokens", "lots"], ["--raw-sample-tokens must be"]),
        (["--raw", "{f}/shards", "-k", "0"], ["k must be an integer >= 1"]),
    ],
)
def test_dsir_command_errors_are_one_line(files, tmp_path, args, words):
    args = [a.format(f=files) for a in args]
    result = invoke("curate", "dsir", "--target", files / "target.jsonl", *args, "--out", tmp_path / "run")
    assert_one_error_line(result, *words)


def test_empty_files_are_errors_and_reported(files, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    empty = tmp_path / "empty.jsonl"
    result = invoke("curate", "dsir", "-t", empty, "-r", files / "shards", "-k", 5, "-o", tmp_path / "a")
    assert_one_error_line(result, "the target has no documents")
    result = invoke(
        "curate", "dsir", "-t", files / "target.jsonl", "-r", files / "shards", "-r", tmp_path / "empty.jsonl",
        "-k", 5, "-o", tmp_path / "b",
    )  # fmt: skip
    assert result.exit_code == 0 and "1 empty files (no document)" in result.stdout


def test_every_curate_command_turns_errors_into_one_line():
    commands = curate_app.registered_commands
    assert commands and all(getattr(cmd.callback, "clean_errors", False) for cmd in commands)
    assert "dsir" in invoke("curate", "--help").stdout
