"""Selection strategies and LexRank: exact results on constructed data, parity with naive / networkx, bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import whatmatters as wm
from whatmatters import curate
from whatmatters.curate import select, strategies


def blobs(sizes=(40, 40, 40, 40, 40), seed=0):
    """Tight clusters around orthogonal directions (distinct by distance and by cosine)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    centres = 10 * torch.eye(len(sizes), 8)
    return centres[labels] + 0.1 * torch.randn(len(labels), 8, generator=gen), labels


def test_registry_lists_the_strategies():
    assert {"top", "random", "ccs", "k_center", "facility_location", "cluster_sample"} <= set(strategies())
    assert "hard_cutoff=0.1" in curate.describe_strategy("ccs")
    with pytest.raises(wm.MethodError, match="Did you mean"):
        select(torch.arange(5.0), 2, strategy="k_centre")


def test_top_keeps_the_highest_and_lowest_scores():
    scores = torch.tensor([0.3, 2.0, -1.0, 5.0, 0.0])
    assert select(scores, 2).indices.tolist() == [1, 3]
    assert select(scores, 0.4, largest=False).indices.tolist() == [2, 4]
    imp = wm.Importance(scores, unit="example", per_sample=False)
    sel = select(imp, 3, strategy="top")
    assert sel.indices.tolist() == [0, 1, 3] and sel.report["kept"] == 3 and sel.report["of"] == 5


def test_ccs_drops_the_hardest_and_covers_every_score_bin():
    gen = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.rand(900, generator=gen), 9 + torch.rand(100, generator=gen)])  # a sparse hard tail
    sel = select(scores, 300, strategy="ccs", hard_cutoff=0.05, bins=10)
    kept = scores[sel.indices]
    assert len(sel.indices) == 300 == len(set(sel.indices.tolist()))
    assert float(kept.max()) <= float(scores.sort().values[949])  # the hardest 5 % are gone
    # the 50 remaining tail examples are a sparse bin range: CCS keeps them all, random 50 % would keep ~15
    assert int((kept > 5).sum()) == 50
    assert int((select(scores, 300, strategy="random").indices >= 900).sum()) < 50


def naive_k_center(x, k, first):
    chosen = [first]
    for _ in range(k - 1):
        d = torch.stack([((x - x[c]) ** 2).sum(1) for c in chosen]).min(0).values
        chosen.append(int(d.argmax()))
    return sorted(chosen)


def test_k_center_equals_the_naive_greedy_and_hits_every_cluster():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1)).double()
    scores = torch.rand(300, generator=torch.Generator().manual_seed(2))
    got = select(scores, 20, strategy="k_center", embeddings=x, chunk=64).indices.tolist()
    assert got == naive_k_center(x, 20, int(scores.argmax()))
    points, labels = blobs()
    sel = select(None, 5, strategy="k_center", embeddings=points)
    assert sorted(labels[sel.indices].tolist()) == [0, 1, 2, 3, 4]


def test_facility_location_covers_every_cluster_and_beats_random_coverage():
    points, labels = blobs()
    sel = select(None, 5, strategy="facility_location", embeddings=points, epsilon=1e-6)
    assert sorted(labels[sel.indices].tolist()) == [0, 1, 2, 3, 4]
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(3))
    z = x / x.norm(dim=1, keepdim=True)

    def coverage(idx):
        return float(((z @ z[idx].T + 1) / 2).max(1).values.sum())

    fl = select(None, 20, strategy="facility_location", embeddings=x).indices
    rnd = select(None, 20, strategy="random", embeddings=x).indices
    assert coverage(fl) > coverage(rnd)


def test_cluster_sample_gives_each_cluster_its_share_and_its_top_scores():
    points, labels = blobs(sizes=(100, 50, 50, 25, 25))
    scores = torch.arange(250.0)
    sel = select(scores, 25, strategy="cluster_sample", embeddings=points, clusters=5)
    counts = torch.bincount(labels[sel.indices], minlength=5).tolist()
    assert counts == [10, 5, 5, 3, 2] or counts == [10, 5, 5, 2, 3]
    for c in range(5):  # within a cluster, the highest-scoring examples
        members = (labels == c).nonzero().squeeze(1)
        assert set(sel.indices[labels[sel.indices] == c].tolist()) == set(members[-counts[c] :].tolist())


def test_lexrank_equals_networkx_pagerank_and_ranks_the_central_texts_first():
    nx = pytest.importorskip("networkx")
    from whatmatters.curate.salience import similarity_graph

    x = torch.randn(60, 10, generator=torch.Generator().manual_seed(0)).double()
    for threshold in (None, 0.1):
        imp = curate.score(data=x, method="lexrank", threshold=threshold)
        ref = nx.pagerank(nx.from_numpy_array(similarity_graph(x, threshold).numpy()), alpha=0.85, tol=1e-13)
        np.testing.assert_allclose(imp.numpy(), [ref[i] for i in range(60)], atol=1e-9)
        assert math.isclose(float(imp.values.sum()), 1.0, abs_tol=1e-9)
    # a summary sentence shares words with every other sentence, which share none with each other
    texts = ["cats purr softly", "dogs bark loudly", "birds sing early", "fish swim deep"]
    texts.insert(2, "cats purr, dogs bark, birds sing and fish swim")
    imp = curate.score(data=texts, method="lexrank")
    assert int(imp.values.argmax()) == 2 and imp.top(1)[0][0] == 2
    assert imp.unit == "example" and imp.method == "lexrank"


def test_selection_errors_name_the_problem():
    with pytest.raises(wm.InputError, match="larger than the pool"):
        select(torch.rand(5), 6)
    with pytest.raises(wm.InputError, match="NaN"):
        select(torch.tensor([0.1, float("nan"), 0.3]), 1)
    with pytest.raises(wm.InputError, match="empty"):
        select(torch.tensor([]), 1)
    with pytest.raises(wm.InputError, match="needs embeddings"):
        select(torch.rand(5), 2, strategy="k_center")
    with pytest.raises(wm.InputError, match="one row per example"):
        select(torch.rand(5), 2, strategy="k_center", embeddings=torch.rand(4, 3))
    with pytest.raises(wm.InputError, match="hard_cutoff"):
        select(torch.rand(5), 2, strategy="ccs", hard_cutoff=1.5)
    with pytest.raises(wm.InputError, match="empty"):
        curate.score(data=[], method="lexrank")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    keep=st.one_of(st.integers(-2, 40), st.floats(-0.5, 1.5), st.just(float("nan"))),
    name=st.sampled_from(["top", "random", "ccs", "k_center", "facility_location", "cluster_sample"]),
)
def test_any_keep_gives_a_valid_selection_or_an_input_error(n, keep, name):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    valid_int = isinstance(keep, int) and 1 <= keep <= n
    valid_share = isinstance(keep, float) and 0 < keep <= 1
    if not (valid_int or valid_share):
        with pytest.raises(wm.InputError):
            select(scores, keep, strategy=name, embeddings=x)
        return
    sel = select(scores, keep, strategy=name, embeddings=x)
    expected = keep if valid_int else max(1, round(keep * n))
    assert len(sel.indices) == expected == len(set(sel.indices.tolist()))
    assert bool((sel.indices >= 0).all() and (sel.indices < n).all())
