"""One task per call: the benchmark checks the data and resolves the target once for every method and metric."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

import whatmatters as wm
from whatmatters.core import task as task_module
from whatmatters.core.task import Task, make_task


@pytest.fixture
def counted(monkeypatch):
    calls = {"probe": 0, "predicted_target": 0}
    probe, resolve = task_module.probe, task_module.resolve_target

    def counting_probe(model, inputs):
        calls["probe"] += 1
        return probe(model, inputs)

    def counting_resolve(target, model, inputs, *, n_outputs=None):
        if target is None:
            calls["predicted_target"] += 1
        return resolve(target, model, inputs, n_outputs=n_outputs)

    monkeypatch.setattr(task_module, "probe", counting_probe)
    monkeypatch.setattr(task_module, "resolve_target", counting_resolve)
    return calls


def _data():
    x, y = make_classification(n_samples=60, n_features=5, n_informative=3, random_state=0)
    return LogisticRegression().fit(x, y), x[:12], y[:12]


def test_benchmark_predicts_the_target_once(counted):
    """One prediction of all rows resolves the target and gives the output count: no probe row."""
    model, x, y = _data()
    methods, metrics = ["ablation", "permutation", "kernel_shap"], ["deletion_auc", "insertion_auc"]
    result = wm.benchmark(model, x, methods, metrics=metrics, y=y, seed=0)
    assert not result.errors and result.table.shape[0] == len(methods) + 1  # + the random reference row
    assert counted == {"probe": 0, "predicted_target": 1}


def test_explain_and_metrics_accept_the_task(counted):
    model, x, y = _data()
    task = make_task(model, x, y=y)
    assert isinstance(task, Task) and task.n_outputs == 2 and counted == {"probe": 0, "predicted_target": 1}
    imp = wm.explain(model, task, "ablation")
    score = wm.evaluate.measure(model, task, imp, "deletion_auc")
    assert counted == {"probe": 0, "predicted_target": 1}
    # the same numbers as the separate calls, which check and predict on their own
    again = wm.explain(model, x, "ablation")
    np.testing.assert_allclose(imp.numpy(), again.numpy())
    assert score.value == pytest.approx(wm.evaluate.measure(model, x, again, "deletion_auc").value)
    assert counted["predicted_target"] == 2


def test_make_task_is_the_one_input_check():
    model, x, y = _data()
    with pytest.raises(wm.InputError, match="3 labels for 12 samples"):
        make_task(model, x, y=y[:3])
    with pytest.raises(wm.InputError, match="background has samples of shape"):
        make_task(model, x, background=np.ones((4, 3)))
    with pytest.raises(wm.InputError, match="seed must be an int"):
        make_task(model, x, seed=1.5)
    with pytest.raises(wm.TargetError, match="out of range"):
        make_task(model, x, 7)


def test_keywords_are_one_vocabulary_for_explain_and_compress_score():
    import torch

    from whatmatters import compress

    model, x, _ = _data()
    by_position = wm.explain(model, x, "ablation")
    np.testing.assert_allclose(wm.explain(model, data=x, method="ablation").numpy(), by_position.numpy())
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    rows = torch.randn(8, 5)
    a = compress.score(net, "wanda", rows)
    b = compress.score(net, data=rows, method="wanda")
    assert all(torch.equal(a[k].values, b[k].values) for k in a)
    with pytest.raises(TypeError):  # options after data are keyword-only
        compress.score(net, "wanda", rows, None)
