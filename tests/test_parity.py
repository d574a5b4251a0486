"""Otter computes what OpenFlamingo 2.0.1 computes, on identical weights (the reference is the oracle)."""

import pytest
import torch

from otter.tiny import build_tiny_otter

from .conftest import FAMILIES, set_gates
from .reference import assert_greedy_generation_matches, reference_twin, vision_x

# the reference hard-codes these sizes
OPENFLAMINGO_SIZES = dict(perceiver_depth=6, perceiver_heads=8, perceiver_dim_head=64, perceiver_num_latents=64,
                          cross_attn_heads=8, cross_attn_dim_head=64)

TEXTS = [
    "a picture:<image>Output:a red circle<|endofchunk|>\n<image>Question:what is it? Short answer:",
    "<image>Output:",
    "some words first, then<image>Output:a green thing<|endofchunk|><image>Output:yes<|endofchunk|><image>Output:",
]


def build_pair(family, every_n):
    model, processor = build_tiny_otter(family, cross_attn_every_n_layers=every_n, seed=1, **OPENFLAMINGO_SIZES)
    set_gates(model, attn=0.9, ff=-0.7)
    model.eval()
    return model, processor, reference_twin(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("every_n", [1, 2, 4])
def test_logits_match_reference(family, every_n, images):
    model, processor, reference = build_pair(family, every_n)
    per_sample = [images[:2], images[2:3], images[1:4]]
    batch = processor(text=TEXTS, images=per_sample)  # left padding, 1 to 3 images per sample
    assert batch["attention_mask"][:, 0].eq(0).any(), "the batch must be left-padded"
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = reference(vision_x(model, batch), batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_reference(family, images):
    model, processor, reference = build_pair(family, 2)
    batch = processor(text=TEXTS[:2], images=[images[:2], images[2:3]])
    assert_greedy_generation_matches(model, reference, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_matches_reference(family, images):
    """OpenFlamingo's evaluation decoding (3 beams, length penalty 0), on a left-padded batch."""
    model, processor, reference = build_pair(family, 2)
    batch = processor(text=TEXTS, images=[images[:2], images[2:3], images[1:4]])
    special = [model.config.eoc_token_id, model.config.media_token_id, model.config.pad_token_id]
    settings = dict(max_new_tokens=5, num_beams=3, length_penalty=0.0, do_sample=False, suppress_tokens=special,
                    pad_token_id=model.config.pad_token_id)
    ours = model.generate(**batch, **settings)
    with torch.no_grad():
        theirs = reference.generate(vision_x(model, batch), batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=True, **settings)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_gradients_match_reference(family, images):
    """One perceiver + cross-attention training step: the same loss, and the same gradient for every trained weight."""
    model, processor, reference = build_pair(family, 2)
    batch = processor(text=TEXTS, images=[images[:2], images[2:3], images[1:4]])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    ours_blocks = model.cross_attention_blocks()
    theirs_blocks = [block for block in reference.lang_encoder.gated_cross_attn_layers if block is not None]
    ours_trained = {"perceiver": model.perceiver, **{f"block{i}": block for i, block in enumerate(ours_blocks)}}
    theirs_trained = {"perceiver": reference.perceiver, **{f"block{i}": block for i, block in enumerate(theirs_blocks)}}
    losses = []
    for net, trained, run in ((model, ours_trained, lambda: model(**batch, labels=labels).loss),
                              (reference, theirs_trained, lambda: reference(vision_x(model, batch), batch["input_ids"],
                                                                            attention_mask=batch["attention_mask"],
                                                                            labels=labels).loss)):
        net.train()
        net.requires_grad_(False)
        for module in trained.values():
            module.requires_grad_(True)
        loss = run()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for name in ours_trained:
        ours = dict(ours_trained[name].named_parameters())
        theirs = dict(theirs_trained[name].named_parameters())
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key].grad, theirs[key].grad, rtol=1e-3, atol=1e-6, msg=f"{name}.{key}")
