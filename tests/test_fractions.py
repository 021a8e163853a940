"""One fraction validator for every action: NumPy scalars accepted, bools, NaN and out-of-range refused alike."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from whatmatters.compress.kvcache.policies import _check_ratio
from whatmatters.compress.remove import check_amount
from whatmatters.compress.sparsity import check_sparsity
from whatmatters.core.errors import InputError
from whatmatters.core.fractions import kept_share, removed_share

REMOVED = [check_amount, check_sparsity, _check_ratio, removed_share]


@pytest.mark.parametrize("check", REMOVED)
@pytest.mark.parametrize("value", [0, 0.5, np.float32(0.25), np.float64(0.75), np.int64(0)])
def test_removed_shares_accept_numbers_and_numpy_scalars(check, value):
    assert check(value) == pytest.approx(float(value)) and isinstance(check(value), float)


@pytest.mark.parametrize("check", REMOVED)
@pytest.mark.parametrize("value", [1, 1.0, -0.1, True, float("nan"), "0.5", None, np.float32(1.5)])
def test_removed_shares_refuse_the_same_values(check, value):
    with pytest.raises(InputError, match=r"must be a number in \[0, 1\).*removed"):
        check(value)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_kept_and_removed_shares_are_complements(x):
    ok_removed = not math.isnan(x) and 0 <= x < 1
    ok_kept = not math.isnan(x) and 0 < x <= 1
    for check, ok in ((removed_share, ok_removed), (kept_share, ok_kept)):
        if ok:
            assert check(x) == x
        else:
            with pytest.raises(InputError):
                check(x)


@pytest.mark.parametrize("value", [4, np.int64(4), np.int32(4), np.uint8(4)])
def test_whole_numbers_accept_numpy_integers(value):
    from whatmatters.core.fractions import whole

    assert whole(value, "bits", minimum=2, maximum=16) == 4 and type(whole(value, "bits")) is int


@pytest.mark.parametrize("value", [True, 4.0, np.float32(4), "4", None, 1, 17])
def test_whole_numbers_refuse_bools_floats_and_out_of_range(value):
    from whatmatters.core.fractions import whole

    with pytest.raises(InputError, match=r"bits must be an integer in \[2, 16\]"):
        whole(value, "bits", minimum=2, maximum=16)


def test_compress_actions_take_numpy_scalars():
    import torch
    from helpers import tiny_model

    from whatmatters.compress import prune, prune_structured, quantize, score

    model = tiny_model("llama")
    ids = torch.randint(0, 60, (2, 8))
    assert quantize(model, np.int64(4)).report.average_bits == 4
    heads = score(model, "flap_head", data=ids, batch_size=np.int64(1), max_length=np.int64(8))
    assert prune_structured(model, heads, amount=np.float32(0.5)).report.n_removed > 0
    assert prune(model, "magnitude", sparsity=np.float32(0.5)).report.achieved == pytest.approx(0.5, abs=0.01)
