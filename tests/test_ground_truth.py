"""Ground truth: on data whose informative features are known, do the methods find them?

``make_classification(shuffle=False)`` puts the informative features first; the others are pure
noise. Every registered feature method that applies is run through ``benchmark`` on a
scikit-learn model and a torch MLP; the table (precision@k for each) is printed, and the gradient
family, the Shapley methods and permutation importance must recover the informative features with
a precision that a random scorer reaches only rarely. A method not registered yet is skipped.
"""

import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

import whatmatters as wm
from whatmatters.core.registry import get_method
from whatmatters.evaluate import benchmark, precision_at_k

N_FEATURES, N_INFORMATIVE = 12, 4
RELEVANT = list(range(N_INFORMATIVE))
THRESHOLD = 0.75  # at least 3 of the 4 informative features among the 4 top-scored

GRADIENT = ["integrated_gradients", "saliency", "gradient_x_input", "smoothgrad"]
SHAPLEY = ["shapley_exact", "shapley_sampling", "kernel_shap"]
MUST_RECOVER = [*GRADIENT, *SHAPLEY, "permutation"]


@pytest.fixture(scope="module")
def dataset():
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=600,
        n_features=N_FEATURES,
        n_informative=N_INFORMATIVE,
        n_redundant=0,
        n_repeated=0,
        n_clusters_per_class=2,
        class_sep=1.5,
        shuffle=False,
        random_state=3,
    )
    rows = np.random.default_rng(0).permutation(len(x))  # the samples come sorted by class
    x, y = x[rows], y[rows]
    # the ground truth is sound: each informative feature alone separates the classes, no noise feature does
    # (an informative feature on which both classes' clusters share their coordinate would carry no signal)
    from sklearn.feature_selection import f_classif

    p_values = f_classif(x, y)[1]
    assert (p_values[:N_INFORMATIVE] < 1e-6).all() and (p_values[N_INFORMATIVE:] > 1e-3).all()
    return x[:500], y[:500], x[500:580], y[500:580]


@pytest.fixture(scope="module")
def sklearn_model(dataset):
    from sklearn.linear_model import LogisticRegression

    x, y, _, _ = dataset
    return LogisticRegression(max_iter=1000).fit(x, y)


@pytest.fixture(scope="module")
def torch_model(dataset):
    x, y, _, _ = dataset
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-3)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        for _ in range(150):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt), yt).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).double().mean() > 0.9  # the model has learned the task
    return model


def applies(name: str, is_torch: bool, has_y: bool) -> bool:
    """Whether a registered method can run on this model and data."""
    info = get_method(name)
    if info.verb != "explain":
        return False
    if info.needs in ("gradients", "module") and not is_torch:
        return False
    if info.needs == "fit" and not has_y:
        return False
    return all(importlib.util.find_spec(extra) is not None for extra in info.extras)


_results: dict[str, object] = {}


def results(kind, dataset, sklearn_model, torch_model):
    """The benchmark of every applicable method on one model (run once per module)."""
    if kind not in _results:
        x_train, _, x, y = dataset
        model = torch_model if kind == "torch" else sklearn_model
        methods = [m for m in wm.methods(unit="feature") if applies(m, kind == "torch", has_y=True)]
        res = benchmark(model, x, methods, y=y, relevant=RELEVANT, background=x_train[:32], seed=0)
        print(f"\n{kind} model, {len(x)} samples, informative features {RELEVANT} of {N_FEATURES}:\n{res}")
        _results[kind] = res
    return _results[kind]


def test_random_scorer_rarely_reaches_the_threshold():
    # a random order puts a hypergeometric number of the informative features among the top k
    k, d, r = N_INFORMATIVE, N_FEATURES, N_INFORMATIVE
    expected = r / d  # E[precision@k] of a random order
    hits_needed = math.ceil(THRESHOLD * k)
    p_pass = sum(math.comb(r, h) * math.comb(d - r, k - h) for h in range(hits_needed, k + 1)) / math.comb(d, k)
    assert expected < THRESHOLD and p_pass < 0.1
    # and so does precision_at_k on random scores
    scores = wm.Importance(torch.rand(4000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    precision = precision_at_k(scores, RELEVANT, aggregate=False)
    assert abs(float(precision.mean()) - expected) < 0.02
    assert abs(float((precision >= THRESHOLD).double().mean()) - p_pass) < 0.015


@pytest.mark.parametrize("kind", ["sklearn", "torch"])
def test_benchmark_reports_precision_for_every_applicable_method(kind, dataset, sklearn_model, torch_model):
    res = results(kind, dataset, sklearn_model, torch_model)
    assert "precision@k" in res.table.columns and res.reference == "random"
    done = res.table[res.table["error"].isna()]
    assert len(done) >= 2  # at least one method (ablation exists from the start) and the reference
    assert ((done["precision@k"] >= 0) & (done["precision@k"] <= 1)).all()


@pytest.mark.parametrize("kind", ["sklearn", "torch"])
@pytest.mark.parametrize("method", MUST_RECOVER)
def test_method_recovers_the_informative_features(method, kind, dataset, sklearn_model, torch_model):
    if method not in wm.methods():
        pytest.skip(f"{method} is not registered yet")
    if not applies(method, kind == "torch", has_y=True):
        pytest.skip(f"{method} does not apply to a {kind} model")
    res = results(kind, dataset, sklearn_model, torch_model)
    error = res.table.loc[method, "error"]
    assert error is None, f"{method} failed on a {kind} model: {error}"
    precision = res.table.loc[method, "precision@k"]
    assert precision >= THRESHOLD, f"{method} on the {kind} model: precision@{N_INFORMATIVE} = {precision:.3f}"


@pytest.mark.parametrize("kind", ["sklearn", "torch"])
def test_ablation_recovers_the_informative_features(kind, dataset, sklearn_model, torch_model):
    """Feature ablation exists from the start: the test above, made to run now."""
    res = results(kind, dataset, sklearn_model, torch_model)
    assert res.table.loc["ablation", "error"] is None
    assert res.table.loc["ablation", "precision@k"] >= THRESHOLD
    # and it is more faithful than random scores
    assert res.table.loc["ablation", "deletion_auc"] < res.table.loc["random", "deletion_auc"]
    assert res.table.loc["ablation", "insertion_auc"] > res.table.loc["random", "insertion_auc"]


def test_pixel_mask_is_repeated_over_channels():
    from whatmatters.evaluate.ground_truth import relevance_mass

    values = torch.zeros(2, 3, 4, 4)
    values[:, :, :2, :2] = 1.0  # all relevance in the top-left quadrant, every channel
    values[1, 0, 3, 3] = 4.0  # sample 1: as much again outside it
    imp = wm.Importance(values, unit="pixel")
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    per_sample = relevance_mass(imp, mask, aggregate=False)
    assert torch.allclose(per_sample, torch.tensor([1.0, 12 / 16], dtype=per_sample.dtype))
    channel_mask = mask[:, None].expand(2, 3, 4, 4)
    assert torch.equal(per_sample, relevance_mass(imp, channel_mask, aggregate=False))
    shared = relevance_mass(imp, mask[0], aggregate=False)
    assert torch.equal(shared, per_sample)
    with pytest.raises(wm.InputError, match="shape"):
        relevance_mass(imp, torch.ones(5, 5, dtype=torch.bool))
