"""Bad token ids get one clear InputError from every entry point that feeds a language model, never an
IndexError from the embedding; the model is left unchanged."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whatmatters.compress import evict_scores, evicting_kv, score
from whatmatters.core.errors import InputError
from whatmatters.explain import lrp

pytest.importorskip("transformers")
VOCAB = 60
MODEL = tiny_model("llama", vocab=VOCAB)
ENTRY_POINTS = {
    "score(wanda)": lambda ids: score(MODEL, "wanda", data=ids),
    "score(snapkv)": lambda ids: score(MODEL, "snapkv", data=ids),
    "evict_scores": lambda ids: evict_scores(MODEL, ids, "knorm"),
    "token_relevance": lambda ids: lrp.token_relevance(MODEL, ids),
}


def _generate(ids: torch.Tensor) -> None:
    with evicting_kv(MODEL, "knorm", 0.5):
        MODEL.generate(ids, max_new_tokens=2, do_sample=False)


ENTRY_POINTS["evicting_kv + generate"] = _generate

BAD = {
    "too-large": (torch.full((2, 6), VOCAB), "vocabulary"),
    "negative": (torch.full((2, 6), -3), "vocabulary"),
    "float": (torch.rand(2, 6), "integer"),
    "bool": (torch.ones(2, 6, dtype=torch.bool), "integer token ids"),
    "empty": (torch.zeros(2, 0, dtype=torch.long), "at least"),
    "1-D": (torch.zeros(6, dtype=torch.long), "2-D"),
}
# compress.score reads a 1-D id tensor as one sequence; generate checks shapes itself before any forward
VALID_THERE = {("1-D", "score(wanda)"), ("1-D", "score(snapkv)"), ("1-D", "evicting_kv + generate"),
               ("empty", "evicting_kv + generate")}  # fmt: skip
CASES = [(bad, entry) for bad in BAD for entry in ENTRY_POINTS if (bad, entry) not in VALID_THERE]


def _state():
    return {k: v.clone() for k, v in MODEL.state_dict().items()}, MODEL.training


@pytest.mark.parametrize(("bad", "entry"), CASES)
def test_bad_ids_name_the_problem(bad, entry):
    ids, match = BAD[bad]
    weights, mode = _state()
    with pytest.raises(InputError, match=match):
        ENTRY_POINTS[entry](ids)
    assert MODEL.training == mode and all(torch.equal(v, MODEL.state_dict()[k]) for k, v in weights.items())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entry=st.sampled_from(sorted(ENTRY_POINTS)),
    lo=st.integers(-5, VOCAB + 5),
    hi=st.integers(-5, VOCAB + 5),
    length=st.integers(2, 6),
)
def test_any_id_range_is_a_result_or_an_input_error(entry, lo, hi, length):
    ids = torch.linspace(min(lo, hi), max(lo, hi), 2 * length).round().long().reshape(2, length)
    valid = int(ids.min()) >= 0 and int(ids.max()) < VOCAB
    try:
        ENTRY_POINTS[entry](ids)
    except InputError as err:
        assert not valid, f"valid ids {ids.tolist()} refused: {err}"
    else:
        assert valid, f"ids {ids.tolist()} outside [0, {VOCAB}) were accepted"
