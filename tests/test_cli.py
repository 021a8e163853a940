"""The `whatmatters` command line through typer's CliRunner."""

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import whatmatters as wm
from whatmatters.cli import app, parse_params

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A fitted scikit-learn pipeline (joblib), a torch model (.pt) and a CSV / Parquet of 20 rows with labels."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folder = tmp_path_factory.mktemp("cli")
    data = load_breast_cancer(as_frame=True)
    x, y = data.data.iloc[:, :6], data.target
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    joblib.dump(model, folder / "model.joblib")
    rows = pd.concat([x, y.rename("label")], axis=1).iloc[::28].reset_index(drop=True)  # 21 rows, both classes
    rows.to_csv(folder / "data.csv", index=False)
    rows.to_parquet(folder / "data.parquet")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    torch.save(net, folder / "net.pt")
    torch.save(net.state_dict(), folder / "state.pt")
    return folder, model, rows


def test_methods_lists_registered_methods():
    result = invoke("methods")
    assert result.exit_code == 0
    for name in wm.methods():
        assert name in result.stdout
    assert "family" in result.stdout and "summary" in result.stdout
    filtered = invoke("methods", "--unit", "feature", "--verb", "explain")
    assert filtered.exit_code == 0 and "ablation" in filtered.stdout


def test_methods_without_match_is_a_clean_error():
    result = invoke("methods", "--unit", "nothing-has-this-unit")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no method matches") and "Traceback" not in result.output


def test_describe_prints_parameters():
    result = invoke("describe", "ablation")
    assert result.exit_code == 0
    assert "ablation" in result.stdout and "baseline='mean'" in result.stdout


def test_unknown_method_is_a_clean_error():
    result = invoke("describe", "ablaton")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown method 'ablaton'") and "ablation" in result.stderr
    assert "Traceback" not in result.output


def test_explain_csv_with_sklearn_model_matches_python_api(files, tmp_path):
    folder, model, rows = files
    out = tmp_path / "scores.parquet"
    result = invoke(
        "explain", folder / "model.joblib", folder / "data.csv", "--method", "ablation", "--label-column", "label",
        "--target", "1", "--param", "baseline=median", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "ablation: top" in result.stdout and str(out) in result.stdout.replace("\n", "")
    saved = wm.Importance.load(out)
    expected = wm.explain(model, rows.drop(columns="label"), "ablation", 1, baseline="median")
    assert saved.names == tuple(rows.columns[:-1]) and saved.target == 1
    assert saved.params["baseline"] == "median"
    torch.testing.assert_close(saved.values, expected.values)
    assert saved.aggregate().top(1)[0][0] in result.stdout


def test_explain_parquet_with_torch_model(files, tmp_path):
    folder, _, rows = files
    out = tmp_path / "net.parquet"
    result = invoke("explain", folder / "net.pt", folder / "data.parquet", "-m", "ablation", "-y", "label", "-o", out)
    assert result.exit_code == 0, result.output
    net = torch.load(folder / "net.pt", weights_only=False)
    expected = wm.explain(net.eval(), rows.drop(columns="label"), "ablation")
    torch.testing.assert_close(wm.Importance.load(out).values, expected.values)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("missing.joblib", "{f}/data.csv", "-m", "ablation"), "error: no such file: missing.joblib"),
        (("{f}/model.joblib", "{f}/nope.csv", "-m", "ablation"), "error: no such file:"),
        (("{f}/model.joblib", "{f}/data.csv", "-m", "ablation"), "error: data has 7 columns"),
        (("{f}/model.joblib", "{f}/data.csv", "-m", "ablation", "-y", "lbl"), "error: no column 'lbl'"),
        (("{f}/model.joblib", "{f}/data.csv", "-m", "ablation", "-y", "label", "-p", "steps"), "key=value"),
        (("{f}/model.joblib", "{f}/data.csv", "-m", "ablation", "-y", "label", "-p", "steps=3"), "unknown parameter"),
        (("{f}/model.joblib", "{f}/data.csv", "-m", "ablation", "-y", "label", "-t", "5"), "out of range"),
        (("{f}/state.pt", "{f}/data.csv", "-m", "ablation", "-y", "label"), "state dict"),
        (("{f}/data.csv", "{f}/data.csv", "-m", "ablation", "-y", "label"), "could not load a model"),
        (("{f}/model.joblib", "{f}/model.joblib", "-m", "ablation"), "data must be a .csv"),
    ],
)
def test_explain_errors_are_one_clean_line(files, args, message):
    folder = files[0]
    result = invoke("explain", *(a.format(f=folder) for a in args))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.output and result.stdout == ""


def test_report_command_writes_self_contained_html(files, tmp_path):
    folder = files[0]
    paths = []
    for baseline in ("mean", "zero"):
        paths.append(tmp_path / f"{baseline}.parquet")
        args = ("explain", folder / "model.joblib", folder / "data.csv", "-m", "ablation", "-y", "label")
        assert invoke(*args, "-p", f"baseline={baseline}", "-o", paths[-1]).exit_code == 0
    out = tmp_path / "r" / "report.html"
    result = invoke("report", *paths, "-o", out, "--title", "two baselines")
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "two baselines" in text and text.count('src="data:image/png;base64,') == 5  # 2 x (bars, heatmap) + agreement
    assert "http://" not in text and "https://" not in text
    missing = invoke("report", tmp_path / "none.parquet")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: no such file")
    not_scores = invoke("report", folder / "data.parquet")
    assert not_scores.exit_code == 2 and "not written by Importance.save" in not_scores.stderr


def test_evaluate_prints_metrics_table(files, tmp_path):
    folder = files[0]
    scores = tmp_path / "s.parquet"
    args = ("explain", folder / "model.joblib", folder / "data.csv", "-m", "ablation", "-y", "label", "-o", scores)
    assert invoke(*args).exit_code == 0
    report = tmp_path / "eval.html"
    result = invoke(
        "evaluate", folder / "model.joblib", folder / "data.csv", "-s", scores, "-y", "label",
        "--metric", "deletion_auc", "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "deletion_auc" in result.stdout and "ablation" in result.stdout and "↓" in result.stdout
    assert report.exists() and "deletion_auc" in report.read_text()
    wrong_rows = invoke("evaluate", folder / "model.joblib", folder / "data.csv", "-s", scores, "-y", "label", "-n", 5)
    assert wrong_rows.exit_code == 2 and "--rows 21" in wrong_rows.stderr
    unknown = invoke(
        "evaluate", folder / "model.joblib", folder / "data.csv", "-s", scores, "-y", "label", "--metric", "nope"
    )
    assert unknown.exit_code == 2 and unknown.stderr.startswith("error: unknown metric 'nope'")


def test_compare_matches_the_metrics(files, tmp_path):
    from whatmatters.evaluate import compare, deletion_auc

    _, model, rows = files
    x, y = rows.drop(columns="label"), rows["label"].to_numpy()
    imp = wm.explain(model, x, "ablation", 1)
    result = compare(model, x, {"ablation": imp}, ["deletion_auc"], y=y)
    assert list(result.table.index) == ["ablation", "random"] and result.reference == "random"
    assert result.table.loc["ablation", "deletion_auc"] == pytest.approx(deletion_auc(model, x, imp).value)
    assert result.table.loc["ablation", "seconds"] == imp.seconds
    assert result.metric_info["deletion_auc"] == ("faithfulness", False)
    fractions, outputs = result.curves["ablation"]["deletion"]
    assert fractions[0] == 0 and fractions[-1] == 1 and len(outputs) == len(fractions)


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    result = invoke("demo", "--quick", "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "report.html").exists() and (out / "model.pt").exists() and (out / "data.csv").exists()
    parquets = sorted(out.glob("*.parquet"))
    assert len(parquets) >= 2
    assert "report:" in result.stdout and "deletion" in result.stdout
    # the saved model and data work with the explain command
    again = invoke(
        "explain", out / "model.pt", out / "data.csv", "-m", "ablation", "-y", "target", "-o", tmp_path / "a.pq"
    )
    assert again.exit_code == 0, again.output


def test_parse_params_literals_and_strings():
    assert parse_params(["steps=50", "baseline=zero", "w=[1, 2]", "x=1e-3", "flag=True", "s='a=b'"]) == {
        "steps": 50,
        "baseline": "zero",
        "w": [1, 2],
        "x": 1e-3,
        "flag": True,
        "s": "a=b",
    }
    with pytest.raises(wm.InputError):
        parse_params(["=3"])


def test_version_and_help():
    assert invoke("--version").stdout.strip() == f"whatmatters {wm.__version__}"
    help_text = invoke("explain", "--help").stdout
    assert "runs code" in " ".join(help_text.split())
    assert np.all([cmd in invoke("--help").stdout for cmd in ("methods", "describe", "explain", "evaluate", "report")])


# ------------------------------------------------------------------ every error: one line, exit 2, --debug
def test_every_command_turns_errors_into_one_line():
    commands = app.registered_commands
    assert len(commands) >= 6 and all(getattr(cmd.callback, "clean_errors", False) for cmd in commands)


def scores_file(files):
    """A valid scores file of the `files` model and data, written (once) by `whatmatters explain`."""
    f = files[0]
    path = f / "scores.parquet"
    if not path.exists():
        result = invoke("explain", f / "model.joblib", f / "data.csv", "-m", "ablation", "-y", "label", "-o", path)
        assert result.exit_code == 0, result.output
    return path


def assert_one_error_line(result, message=""):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


def test_io_errors_are_one_clean_line(files, tmp_path):
    folder = files[0]
    scores = scores_file(files)
    whole = scores.read_bytes()
    (tmp_path / "half.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "out").mkdir()
    explain = ("explain", folder / "model.joblib", folder / "data.csv", "-m", "ablation", "-y", "label", "-o")
    evaluate = ("evaluate", folder / "model.joblib", folder / "data.csv", "-y", "label", "-s")
    cases = [
        ((*explain, tmp_path / "out"), "out is a folder; give a file name to save to"),
        ((*explain, folder / "data.csv" / "s.parquet"), "data.csv is a file, not a folder"),
        (("report", tmp_path / "half.parquet"), "half.parquet: not a Parquet file, or a damaged one"),
        ((*evaluate, tmp_path / "half.parquet"), "half.parquet: not a Parquet file, or a damaged one"),
        (("report", folder / "data.csv"), "data.csv: not a Parquet file"),
        ((*evaluate, folder / "data.csv"), "data.csv: not a Parquet file"),
        (("report", tmp_path / "out"), "is a folder; give the scores file"),
        (("report", scores, "-o", tmp_path / "out"), "out: Is a directory (check the path and its permissions)"),
    ]
    for args, message in cases:
        assert_one_error_line(invoke(*args), message)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_damaged_metadata_is_one_clean_line(files, tmp_path):
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(scores_file(files))
    meta = json.loads(table.schema.metadata[b"whatmatters"])
    meta.pop("format_version")
    meta["shape"] = [3, 4]
    pq.write_table(table.replace_schema_metadata({b"whatmatters": json.dumps(meta).encode()}), tmp_path / "bad.pq")
    assert_one_error_line(invoke("report", tmp_path / "bad.pq"), "gives shape [3, 4] (12 values) but it holds 126")


def test_permission_error_is_one_clean_line(files, tmp_path, monkeypatch):
    def refuse(self, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(wm.Importance, "save", refuse)
    folder, out = files[0], tmp_path / "s.parquet"
    result = invoke("explain", folder / "model.joblib", folder / "data.csv", "-m", "ablation", "-y", "label", "-o", out)
    assert_one_error_line(result, f"error: {out}: Permission denied (check the path and its permissions)")


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch):
    import whatmatters.core.registry as registry

    def broken(name):
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(registry, "describe", broken)
    result = invoke("describe", "ablation")
    assert_one_error_line(result, "error: internal error: ZeroDivisionError: boom second line (rerun with --debug")
    with pytest.raises(ZeroDivisionError, match="boom"):
        invoke("--debug", "describe", "ablation")
    debug = runner.invoke(app, ["--debug", "methods", "--unit", "nothing-has-this-unit"])  # whatmatters errors too
    assert isinstance(debug.exception, wm.InputError) and debug.exit_code == 1 and "error:" not in debug.output
    assert_one_error_line(invoke("describe", "ablation"), "internal error")  # --debug does not stick


# a damaged copy of a valid file, or random bytes
def damaged(data, original: bytes) -> bytes:
    if data.draw(st.booleans(), label="random bytes"):
        return data.draw(st.binary(max_size=300))
    edited = bytearray(original)
    for _ in range(data.draw(st.integers(0, 3), label="edits")):
        edited[data.draw(st.integers(0, len(edited) - 1))] = data.draw(st.integers(0, 255))
    return bytes(edited[: data.draw(st.integers(0, len(edited)), label="kept bytes")])


def bad_arguments(data, folder, work, scores):
    """Arguments of one bad (or edge-case) command line; the files they name are written to ``work``."""
    explain = ["explain", folder / "model.joblib", folder / "data.csv", "-m", "ablation", "-y", "label"]
    kind = data.draw(st.sampled_from(["scores", "data", "method", "param", "rows", "target", "out"]), label="kind")
    text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
    if kind == "scores":
        (work / "s.parquet").write_bytes(damaged(data, scores.read_bytes()))
        return [
            "evaluate",
            folder / "model.joblib",
            folder / "data.csv",
            "-y",
            "label",
            "-n",
            5,
            "-s",
            work / "s.parquet",
        ]
    if kind == "data":
        path = work / f"d{data.draw(st.sampled_from(['.csv', '.parquet']))}"
        original = (folder / f"data{path.suffix}").read_bytes()
        path.write_bytes(damaged(data, original))
        return ["explain", folder / "model.joblib", path, "-m", "ablation", "-y", "label", "-o", work / "o.parquet"]
    if kind == "out":
        out = data.draw(st.sampled_from([work, folder / "data.csv" / "x.parquet", work / "new" / "x.parquet"]))
        return [*explain, "-o", out]
    value = data.draw({"rows": st.integers(-3, 40).map(str)}.get(kind, text), label="value")
    option = {"method": "--method", "param": "--param", "rows": "--rows", "target": "--target"}[kind]
    if kind == "method":
        explain = explain[:3]
    return [*explain, f"{option}={value}", "-o", work / "o.parquet"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_bad_input_gives_one_error_line_never_a_traceback(files, tmp_path, data):
    args = bad_arguments(data, files[0], tmp_path, scores_file(files))
    result = runner.invoke(app, [str(a) for a in args])
    event(f"{args[0]}: exit {result.exit_code}")
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    if result.exit_code == 2:
        assert_one_error_line(result)
        assert "internal error" not in result.stderr, result.stderr
