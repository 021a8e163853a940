"""The three examples of docs/CONTRIBUTING.md ("Add a method, a metric or an action") run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import whatmatters as wm
from whatmatters.core.registry import SCORERS
from whatmatters.evaluate.metrics import METRICS

DOC = Path(__file__).resolve().parent.parent / "docs" / "CONTRIBUTING.md"


@pytest.fixture
def examples(monkeypatch):
    """The doc's code blocks executed in one namespace; their registrations are undone afterwards."""
    SCORERS.load(), METRICS.load()
    monkeypatch.setattr(SCORERS, "entries", dict(SCORERS.entries))
    monkeypatch.setattr(METRICS, "entries", dict(METRICS.entries))
    text = DOC.read_text().split("## Add a method, a metric or an action", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        assert len(block.strip().splitlines()) <= 15  # each path stays short
        exec(compile(block, str(DOC), "exec"), namespace)
    return namespace


def test_the_scorer_metric_and_action_examples_work(examples):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(6, 4)
    imp = wm.explain(model, x, "gradient_power", target=1)
    saliency = wm.explain(model, x, "saliency", target=1)
    torch.testing.assert_close(imp.values, saliency.values.abs() ** 2)
    assert "gradient_power" in wm.methods(unit="feature") and "power=2.0" in wm.describe("gradient_power")
    drop = wm.evaluate.measure(model, x, imp, "top_unit_drop")
    assert drop.scores.shape == (6,) and drop.higher_is_better
    result = wm.benchmark(model, x, ["gradient_power", "saliency"], metrics=["top_unit_drop"], target=1)
    assert not result.errors
    weights = wm.compress.score(model, "magnitude")
    new, report = examples["zero_weights"](model, weights, 0.25)
    assert new is not model and report == {"0": 8, "2": 6}
    assert int((new[0].weight == 0).sum()) == 8 and int((model[0].weight == 0).sum()) == 0
    with pytest.raises(wm.InputError, match=r"amount must be a number in \[0, 1\)"):
        examples["zero_weights"](model, weights, 1.5)
