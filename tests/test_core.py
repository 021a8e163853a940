import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import whatmatters as wm
from whatmatters.core.state import capture, find_module, preserved


def make_importance(per_sample=True, names=("a", "b", "c")):
    values = torch.tensor([[0.1, -3.0, 2.0], [1.0, 0.5, -0.2]], dtype=torch.float64)
    if not per_sample:
        values = values[0]
    return wm.Importance(values, names=names, per_sample=per_sample, method="m", params={"k": (1, 2)}, seconds=0.5)


def test_top_rank_and_aggregate():
    imp = make_importance()
    assert imp.top(2) == [[("b", -3.0), ("c", 2.0)], [("a", 1.0), ("b", 0.5)]]
    assert imp.rank().tolist() == [[2, 0, 1], [0, 1, 2]]
    agg = imp.aggregate()
    assert not agg.per_sample and agg.unit_shape == (3,)
    assert torch.allclose(agg.values, torch.tensor([0.55, 1.75, 1.1], dtype=torch.float64))
    assert agg.top(1) == [("b", 1.75)]
    assert agg.aggregate() is agg


def test_normalize_keeps_zero_rows_finite():
    imp = wm.Importance(torch.zeros(2, 4), per_sample=True)
    for how in ("max_abs", "sum_abs", "minmax", "zscore"):
        assert torch.isfinite(imp.normalize(how).values).all()
    assert make_importance().normalize().values.abs().amax(1).tolist() == [1.0, 1.0]


def test_to_frame_uses_names():
    frame = make_importance().to_frame()
    assert list(frame.columns) == ["a", "b", "c"] and frame.shape == (2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3), (4,), (2, 3, 5, 5)])
def test_save_load_roundtrip_is_exact(tmp_path, dtype, shape):
    values = torch.randn(shape, dtype=dtype)
    values.view(-1)[0] = float("nan")
    names = tuple(f"f{i}" for i in range(shape[-1])) if len(shape) <= 2 else None
    imp = wm.Importance(
        values,
        unit="feature" if len(shape) <= 2 else "pixel",
        names=names,
        per_sample=len(shape) != 1,
        method="ablation",
        params={"baseline": "mean", "steps": 3, "arr": np.arange(3)},
        target=[0, 1],
        seed=7,
        seconds=1.25,
        extra={"stderr": np.ones(3)},
    )
    loaded = wm.Importance.load(imp.save(tmp_path / "x.parquet"))
    assert loaded == imp
    assert loaded.values.dtype == dtype and loaded.names == imp.names and loaded.seconds == 1.25


def test_importance_rejects_mismatched_names():
    with pytest.raises(wm.InputError, match="names"):
        wm.Importance(torch.zeros(2, 3), names=("a", "b"))
    with pytest.raises(wm.InputError, match="unit"):
        wm.Importance(torch.zeros(2, 3), unit="pixelz")


def test_agreement_identical_and_reversed():
    a = wm.Importance(torch.arange(10.0), per_sample=False)
    assert a.agreement(a) == {"spearman": 1.0, "kendall": 1.0, "top1_overlap": 1.0}
    rev = wm.Importance(torch.arange(10.0).flip(0), per_sample=False)
    out = a.agreement(rev, k=3)
    assert math.isclose(out["spearman"], -1.0) and out["top3_overlap"] == 0.0


def test_unknown_method_suggests_close_name(cancer):
    X, _, model = cancer
    with pytest.raises(wm.MethodError, match="ablation"):
        wm.explain(model, X.iloc[:2], method="ablaton")


def test_unknown_parameter_is_named(cancer):
    X, _, model = cancer
    with pytest.raises(wm.MethodError, match="bogus"):
        wm.explain(model, X.iloc[:2], method="ablation", bogus=1)


def test_preserved_restores_mode_flags_hooks_and_weights():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model.eval()
    model[0].weight.requires_grad_(False)
    existing = model[0].register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), preserved(model):
        model.train()
        model[0].weight.requires_grad_(True)
        model[2].register_forward_hook(lambda *a: None)
        with torch.no_grad():
            model[2].weight.mul_(0)
        raise RuntimeError("boom")
    assert not model.training and not model[0].weight.requires_grad
    assert len(model[2]._forward_hooks) == 0 and len(model[0]._forward_hooks) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    existing.remove()


def test_guard_reads_versions_and_reuses_one_copy_across_calls():
    from whatmatters.core import state

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with preserved(model):
        pass
    first = state._SNAPSHOTS[model].copies
    with preserved(model):
        pass
    assert all(a is b for a, b in zip(first, state._SNAPSHOTS[model].copies, strict=True))
    with torch.no_grad():  # the user trains between calls: the next call copies the new values
        model[0].weight.add_(1)
    changed = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError), preserved(model):
        with torch.no_grad():
            model[0].weight.mul_(0)
        raise RuntimeError("a bug after an in-place write")
    assert torch.equal(model[0].weight, changed)
    model.double()  # storage moved without a version bump: the copy is taken again, in the new dtype
    with preserved(model), torch.no_grad():
        model[2].bias.zero_()
    assert model[2].bias.dtype == torch.float64 and bool((model[2].bias != 0).all())


def test_guard_walks_modules_in_modules_order_and_copies_a_replaced_layer():
    from whatmatters.core import state

    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(shared, nn.ReLU()), shared, nn.BatchNorm1d(3))
    modules, params, buffers = state._walk(model)
    assert modules == list(model.modules()) and params == list(model.parameters())
    assert buffers == list(model.buffers())
    with preserved(model):
        pass
    model[0] = nn.Linear(3, 3)  # replaced between calls: its weights get a copy of their own
    before = model[0].weight.detach().clone()
    with preserved(model), torch.no_grad():
        model[0].weight.mul_(0)
    assert torch.equal(model[0].weight, before)
    assert state._SNAPSHOTS[model].params[0]() is model[0].weight


def test_the_snapshot_does_not_keep_a_model_alive_even_when_a_parameter_refers_to_it():
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    model[0].weight.register_hook(lambda g, m=model: g)  # the parameter holds its model
    wm.explain(model, torch.randn(5, 3), "saliency", target=0)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_scorer_that_writes_weights_by_mistake_is_caught_and_restored(monkeypatch):
    import dataclasses

    from whatmatters.core import registry

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = registry.get_method("saliency")

    def careless(task, **params):
        with torch.no_grad():
            model[0].weight.mul_(-3)
        return info.fn(task, **params)

    monkeypatch.setitem(registry.SCORERS.entries, "saliency", dataclasses.replace(info, fn=careless))
    wm.explain(model, torch.randn(4, 3), "saliency", target=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_large_models_are_checked_without_copies(monkeypatch):
    from whatmatters.core import state

    monkeypatch.setattr(state, "WEIGHT_SNAPSHOT_LIMIT", 0)
    model = nn.Linear(3, 2)
    with preserved(model):
        model(torch.randn(2, 3))
    assert model not in state._SNAPSHOTS
    with pytest.raises(wm.ModelError, match="changed the model's weights"), preserved(model), torch.no_grad():
        model.weight.add_(1)


def test_capture_and_find_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with capture(find_module(model, "1"), grads=True) as store:
        model(torch.randn(5, 3, requires_grad=True)).sum().backward()
    assert store["activations"].shape == (5, 4) and store["gradients"].shape == (5, 4)
    assert not model[1]._forward_hooks
    with pytest.raises(wm.ModelError, match="no layer named 'fc'"):
        find_module(model, "fc")


def test_explain_frame_names_and_provenance(cancer):
    X, _, model = cancer
    imp = wm.explain(model, X.iloc[:4], method="ablation", seed=3)
    assert imp.names == tuple(X.columns) and imp.unit == "feature"
    assert imp.method == "ablation" and imp.params == {"baseline": "mean"} and imp.seed == 3
    assert imp.seconds > 0 and imp.values.shape == (4, 30)


def test_describe_lists_defaults():
    text = wm.describe("ablation")
    assert "baseline='mean'" in text and "perturbation" in text


def test_torch_model_in_train_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(wm.ModelError, match="training mode"):
        wm.explain(model, torch.randn(2, 3), method="ablation")
    assert model.training


def test_frame_with_text_column_is_refused(cancer):
    _, _, model = cancer
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]})
    with pytest.raises(wm.InputError, match="non-numeric columns"):
        wm.explain(model, frame, method="ablation")
