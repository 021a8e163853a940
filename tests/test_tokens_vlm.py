"""Prefill pruning of a LLaVA-style VLM's image tokens (FastV's setting) on a small randomly initialised
LlavaForConditionalGeneration: nothing changes at keep=1.0 (logits, padded batches, generate), only image
tokens are dropped, the pruned layers carry text + the kept share of the image, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

from whatmatters.compress import pruning_tokens
from whatmatters.core.errors import InputError, MethodError, ModelError

transformers = pytest.importorskip("transformers")

IMAGE, PATCHES = 100, 16  # image token id; 32 px / 8 px patches = 16 image tokens per image


def _llava() -> torch.nn.Module:
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    text = transformers.LlamaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
        vocab_size=120, max_position_embeddings=256, pad_token_id=0,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE, image_seq_length=PATCHES,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two prompts ``text, <image> x 16, text``; the second has 2 fewer text tokens (left padding)."""
    image = torch.full((PATCHES,), IMAGE)
    a = torch.cat([torch.tensor([1, 5, 6]), image, torch.tensor([7, 8, 9, 10])])
    b = torch.cat([torch.tensor([0, 0, 1]), image, torch.tensor([7, 8, 10, 11])])
    mask = torch.ones(2, len(a), dtype=torch.long)
    mask[1, :2] = 0
    return torch.stack([a, b]), mask, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_keep_one_is_exact_for_logits_padding_and_generate():
    model = _llava()
    ids, mask, pixels = _prompts()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, do_sample=False)
        with pruning_tokens(model, keep=1.0, at_layers=2) as report:
            assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, logits)
            again = model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, do_sample=False
            )
    assert torch.equal(again, gen)
    assert report.tokens == "image" and report.prefills == 2 and report.last_forward == [(i, 23) for i in range(4)]


@pytest.mark.parametrize("method", ["fastv", "random"])
def test_only_image_tokens_are_pruned_and_later_layers_carry_fewer(method):
    model = _llava()
    ids, mask, pixels = _prompts()
    with torch.no_grad(), pruning_tokens(model, keep=0.25, at_layers=2, method=method) as report:
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=2)
    assert out.shape == (2, ids.shape[1] + 2)
    text_real = ((ids != IMAGE) & mask.bool()).sum(1)  # 7 and 5 text tokens
    kept = report.kept_positions  # of the latest prefill (generate's), the same prompts
    carried = int(text_real.max()) + PATCHES // 4  # row 0: 7 text + 4 image; row 1 pads up to the same width
    assert logits.shape[1] == carried and report.last_forward == [(0, 23), (1, 23), (2, carried), (3, carried)]
    for row in range(2):
        text_positions = torch.nonzero((ids[row] != IMAGE) & mask[row].bool()).flatten()
        assert set(text_positions.tolist()) <= set(kept[row].tolist())  # every text token carried
        image_kept = (ids[row, kept[row]] == IMAGE) & mask[row, kept[row]].bool()
        assert int(image_kept.sum()) == PATCHES // 4  # keep=0.25 of the 16 image tokens


def test_tokens_all_prunes_text_too_and_bad_input_is_refused():
    model = _llava()
    ids, _, pixels = _prompts()
    with torch.no_grad(), pruning_tokens(model, keep=0.5, tokens="all") as report:
        model(input_ids=ids[:1], pixel_values=pixels[:1])
    assert report.tokens == "all" and report.last_forward[-1][1] == round(23 * 0.5)
    with pytest.raises(MethodError, match="tokens must be one of"), pruning_tokens(model, tokens="images"):
        pass
    text_only = ids[:1].masked_fill(ids[:1] == IMAGE, 3)
    with pytest.raises(InputError, match="no image token"), torch.no_grad(), pruning_tokens(model, keep=0.5):
        model(input_ids=text_only)
    with pytest.raises(InputError, match="pass input_ids"), torch.no_grad(), pruning_tokens(model, keep=0.5):
        model(inputs_embeds=torch.randn(1, 5, 48))
    lm = transformers.LlamaForCausalLM(model.config.text_config).eval()
    with pytest.raises(ModelError, match="image_token_id"), pruning_tokens(lm, tokens="image"):
        pass
    assert not model._forward_pre_hooks and not model._forward_hooks  # hooks gone after every error


def test_cls_method_keeps_the_patches_the_vision_cls_token_attends_to_most():
    model = _llava()
    ids, mask, pixels = _prompts()
    tower = model.model.vision_tower
    with torch.no_grad():  # the reference: CLIP's own eager attention weights of the feature layer
        tower.config._attn_implementation = "eager"
        out = tower(pixel_values=pixels, output_attentions=True)
        tower.config._attn_implementation = "sdpa"
    layer = model.config.vision_feature_layer % (len(out.attentions) + 1) - 1
    cls = out.attentions[layer][:, :, 0, 1:].mean(1)  # (images, patches)
    expected = cls.topk(PATCHES // 4, dim=1).indices.sort(dim=1).values
    for at in (0, 2):
        with torch.no_grad(), pruning_tokens(model, keep=0.25, method="cls", at_layers=at) as report:
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        carried = int(((ids != IMAGE) & mask.bool()).sum(1).max()) + PATCHES // 4  # text + 4 image tokens
        assert [t for _, t in report.last_forward] == [23] * at + [carried] * (4 - at)  # at=0: before the LM
        for row in range(2):
            kept = report.kept_positions[row]
            image_positions = torch.nonzero(ids[row] == IMAGE).flatten()
            picked = [int((image_positions == p).nonzero()) for p in kept if ids[row, p] == IMAGE]
            assert picked == expected[row].tolist(), (at, row)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        with pruning_tokens(model, keep=1.0, method="cls", at_layers=0):
            assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, full)
    with pytest.raises(MethodError, match="tokens='image'"), pruning_tokens(model, method="cls", tokens="all"):
        pass
    lm = transformers.LlamaForCausalLM(model.config.text_config).eval()
    with pytest.raises(ModelError, match="no image token"), pruning_tokens(lm, method="cls"):
        pass
    assert not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(ModelError, match="did not run"), torch.no_grad(), pruning_tokens(model, method="cls"):
        model(input_ids=ids)  # image tokens but no pixel_values: the vision tower never ran
