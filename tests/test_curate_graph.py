"""GAIS-style instance selection: label consistency over a kNN graph finds flipped labels in tabular data."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters import curate
from whatmatters.core.errors import InputError, MethodError
from whatmatters.curate.graph import exact_knn, lsh_knn


@pytest.fixture(scope="module")
def noisy_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    rng = np.random.default_rng(0)
    flip = rng.random(len(y_train)) < 0.2
    noisy = y_train.copy()
    noisy[flip] = (y_train[flip] + rng.integers(1, 10, flip.sum())) % 10
    return x_train, noisy, flip, x_test, y_test


def test_gais_ranks_flipped_labels_first_and_its_half_trains_better_than_a_random_half(noisy_digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, flip, x_test, y_test = noisy_digits
    imp = curate.score(data=x, y=y, method="gais", k=10)
    assert "gais" in wm.methods(verb="curate") and imp.unit == "example" and imp.values.shape == (len(y),)
    suspects = np.argsort(-imp.numpy())[: flip.sum()]
    assert flip[suspects].mean() > max(0.8, 3 * flip.mean())  # precision at the noise rate; random gives ~0.2
    assert imp.extra["representative"].shape == imp.extra["borderline"].shape == (len(y),)

    def accuracy(rows):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return model.fit(x[rows], y[rows]).score(x_test, y_test)

    kept = curate.select(imp, 0.5, strategy="top", largest=False).indices.numpy()
    random = curate.select(imp, 0.5, strategy="random").indices.numpy()
    assert flip[kept].mean() < flip.mean() / 4
    assert accuracy(kept) > accuracy(random)
    again = curate.score(data=x, y=y, method="gais", k=10, graph="lsh")
    assert flip[np.argsort(-again.numpy())[: flip.sum()]].mean() > 0.8


def test_exact_knn_in_blocks_equals_sklearn_and_lsh_recalls_most_neighbours(noisy_digits):
    from sklearn.neighbors import NearestNeighbors

    x = torch.as_tensor(noisy_digits[0], dtype=torch.float64)
    distances, indices = NearestNeighbors(n_neighbors=6).fit(x.numpy()).kneighbors(x.numpy())
    blocked = exact_knn(x, 5, batch_size=100, block=100 * 300)  # 13 x 5 blocks
    assert torch.allclose(blocked.distances, torch.from_numpy(distances[:, 1:] ** 2), atol=1e-8)
    same = (blocked.indices.numpy() == indices[:, 1:]).mean()
    assert same > 0.95  # the rest are ties at equal distance (digits are integer pixels): distances agree above
    approx = lsh_knn(x, 5, seed=1)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(approx.indices.tolist(), blocked.indices.tolist())])
    assert recall > 0.6 and bool((approx.indices != torch.arange(len(x))[:, None]).all())
    assert torch.equal(lsh_knn(x, 5, seed=1).indices, approx.indices)


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(-1, 12),
    graph=st.sampled_from(["exact", "lsh", "ball"]),
    bad=st.sampled_from([None, "nan", "no labels", "short labels"]),
)
def test_gais_bad_inputs_raise_clear_errors(k, graph, bad):
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 2
    if bad == "nan":
        x[3, 1] = float("nan")
    labels = None if bad == "no labels" else (y[:-1] if bad == "short labels" else y)
    if 1 <= k < 10 and graph != "ball" and bad is None:
        imp = curate.score(data=x, y=labels, method="gais", k=k, graph=graph)
        assert bool(((imp.values >= 0) & (imp.values <= 1)).all())
    else:
        with pytest.raises((InputError, MethodError)):
            curate.score(data=x, y=labels, method="gais", k=k, graph=graph)
