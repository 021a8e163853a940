"""ERASER text metrics: equal a row-by-row reference, reward the known important token, refuse bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from text_toys import VOCAB, KeyClassifier, key_rows

import whatmatters as wm
from whatmatters.core.errors import InputError
from whatmatters.core.ranks import spearman
from whatmatters.evaluate.metrics import get_metric, metrics
from whatmatters.evaluate.text import disagreement, eraser, soft_eraser

LEVELS = (0.1, 0.3, 0.5)


@torch.no_grad()
def _prob(model, ids: list[int], target: int) -> float:
    logits = model(input_ids=torch.tensor([ids])).logits
    logits = logits[0, -1] if logits.ndim == 3 else logits[0]
    return float(logits.softmax(-1)[target])


def _reference(model, ids, mask, scores, target, removal):
    """ERASER one row and one level at a time: Python lists of the remaining tokens (delete) or swapped ids."""
    comp, suff = [], []
    for row, m, s, t in zip(ids.tolist(), mask.tolist(), scores.tolist(), target.tolist()):
        real = [i for i in range(len(row)) if m[i]]
        order = sorted(real, key=lambda i: -s[i])
        full = _prob(model, [row[i] for i in real], t)
        c_row, s_row = [], []
        for q in LEVELS:
            top = set(order[: min(max(1, math.ceil(q * len(real))), len(real) - 1)])
            if removal == "delete":
                without, only = [row[i] for i in real if i not in top], [row[i] for i in real if i in top]
            else:
                without = [0 if i in top else row[i] for i in real]
                only = [row[i] if i in top else 0 for i in real]
            c_row.append(full - _prob(model, without, t))
            s_row.append(full - _prob(model, only, t))
        comp.append(c_row)
        suff.append(s_row)
    return torch.tensor(comp, dtype=torch.float32), torch.tensor(suff, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("removal", ["delete", "replace"])
def test_eraser_equals_the_row_by_row_reference(kind, removal):
    model = tiny_model(kind, vocab=40)
    ids = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    scores = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 1, 0])
    res = eraser(model, ids, scores, target, attention_mask=mask, levels=LEVELS, removal=removal, replacement_id=0)
    comp, suff = _reference(model, ids, mask, scores, target, removal)
    torch.testing.assert_close(res.comprehensiveness.float(), comp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.sufficiency.float(), suff, atol=1e-5, rtol=1e-4)


def test_the_key_token_is_comprehensive_and_sufficient():
    model = KeyClassifier().eval()
    ids, where = key_rows(n=6, length=10)
    right = torch.nn.functional.one_hot(where, 10).double()
    res_right = eraser(model, ids, right, 1, levels=LEVELS)
    res_wrong = eraser(model, ids, -right, 1, levels=LEVELS)
    assert (res_right.aopc_comprehensiveness > res_wrong.aopc_comprehensiveness + 0.3).all()
    assert (res_right.aopc_sufficiency < res_wrong.aopc_sufficiency - 0.3).all()
    soft = soft_eraser(model, ids, right, 1)
    torch.testing.assert_close(soft["soft_nc"], torch.ones(6, dtype=soft["soft_nc"].dtype))
    torch.testing.assert_close(soft["soft_ns"], torch.ones(6, dtype=soft["soft_ns"].dtype))
    wrong = soft_eraser(model, ids, -right, 1)
    assert (wrong["soft_nc"] < 0.5).all() and (wrong["soft_ns"] < 0.5).all()


def test_metrics_are_registered_for_tokens_and_read_the_importance():
    assert {"comprehensiveness", "sufficiency", "soft_comprehensiveness", "soft_sufficiency"} <= set(metrics("token"))
    model = KeyClassifier().eval()
    ids, where = key_rows(n=4, length=8)
    imp = wm.Importance(torch.nn.functional.one_hot(where, 8).float(), unit="token", target=[1, 1, 1, 1])
    res = get_metric("comprehensiveness")(model, ids, imp, levels=LEVELS)
    x, y = res.curves["comprehensiveness"]
    assert res.scores.shape == (4,) and x.tolist() == pytest.approx(list(LEVELS)) and y.shape == (4, 3)
    assert get_metric("soft_nc")(model, ids, imp).value == pytest.approx(1.0)
    assert get_metric("sufficiency")(model, ids, imp, levels=LEVELS).value < 0.05


def test_disagreement_compares_only_real_tokens():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, :2] = 0
    out = disagreement({"a": a, "b": b, "minus_a": -a}, mask, k=2)
    expected = torch.stack([spearman(a[i, mask[i] == 1][None], b[i, mask[i] == 1][None])[0] for i in range(5)]).mean()
    assert out["methods"] == ["a", "b", "minus_a"]
    torch.testing.assert_close(out["spearman"][0, 1], expected)
    torch.testing.assert_close(out["spearman"][0, 2], torch.tensor(-1.0, dtype=torch.float64))
    assert out["top2_overlap"][0, 0] == 1 and out["top2_overlap"][0, 2] == 0


def test_bad_inputs_name_the_problem():
    model = KeyClassifier().eval()
    ids, _ = key_rows(n=2, length=6)
    scores = torch.rand(2, 6)
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(InputError, match="empty text"):
        eraser(model, ids, scores, attention_mask=mask)
    with pytest.raises(InputError, match="target ids must lie in"):
        eraser(model, ids, scores, 2)
    with pytest.raises(InputError, match="do not fit input_ids"):
        eraser(model, ids, scores[:, :3])
    with pytest.raises(InputError, match="NaN"):
        eraser(model, ids, scores.masked_fill(scores > 0.5, float("nan")))
    with pytest.raises(InputError, match="replacement_id"):
        eraser(model, ids, scores, removal="replace")
    with pytest.raises(InputError, match="unit 'token'"):
        eraser(model, ids, wm.Importance(scores, unit="feature"))
    with pytest.raises(InputError, match="input_ids must be token ids"):
        eraser(model, ids + VOCAB, scores)
    with pytest.raises(InputError, match="at least 2 methods"):
        disagreement({"a": scores})


@settings(max_examples=30, deadline=None)
@given(level=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(float("nan"))))
def test_levels_outside_zero_one_are_refused(level):
    ids, _ = key_rows(n=1, length=6)
    with pytest.raises(InputError, match="levels must be shares"):
        eraser(KeyClassifier().eval(), ids, torch.rand(1, 6), levels=(0.1, level))


@settings(max_examples=20, deadline=None)
@given(target=st.one_of(st.integers(min_value=-(2**70), max_value=-1), st.integers(min_value=2, max_value=2**70)))
def test_eraser_target_outside_the_outputs_is_refused(target):
    ids, _ = key_rows(n=1, length=6)
    with pytest.raises(InputError, match="target"):
        eraser(KeyClassifier().eval(), ids, torch.rand(1, 6), target)
