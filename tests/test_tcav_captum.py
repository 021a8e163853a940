"""TCAV parity with captum 0.9 (``captum.concept.TCAV``) given the same CAVs, on an MLP and a small CNN, float64.

captum is handed our CAVs through a ``Classifier`` that returns them instead of training
(``benchmarks/bench_tcav.py``), with the same inputs, target and layers. Tolerance: the sign-count scores
(share of inputs with a positive directional derivative) are equal; the magnitude scores (mean directional
derivative) agree to 1e-6 of the largest, because captum takes the product ``attributions . CAV`` in float32.
"""

import numpy as np
import pytest
from helpers import benchmark_script

pytest.importorskip("captum")
bench = benchmark_script("bench_tcav")


@pytest.mark.parametrize("label", ["mlp", "cnn"])
def test_same_cavs_give_captums_scores(label):
    model, x, concepts, pool, layers = bench.models()[label]
    (sign, magnitude), (their_sign, their_magnitude), imp = bench.parity(model, x, concepts, pool, layers, target=1)
    assert 0 < sign.mean() < 1  # not all runs at one extreme: the comparison can tell sign conventions apart
    np.testing.assert_array_equal(sign, their_sign)
    np.testing.assert_allclose(magnitude, their_magnitude, rtol=0, atol=1e-6 * np.abs(magnitude).max())
    assert np.allclose(imp.values.numpy(), sign.mean(2).ravel())  # the reported score is the mean over the runs
    for cav in imp.extra["cavs"]:
        np.testing.assert_allclose(np.linalg.norm(cav, axis=1), 1.0)
