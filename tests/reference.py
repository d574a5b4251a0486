"""
The reference implementation, open-flamingo 2.0.1, as a test oracle (never imported by the library).

`reference_twin(model)` builds an OpenFlamingo `Flamingo` around deep copies of an Otter model's own parts and
copies every perceiver and cross-attention weight over by name, so both compute from identical weights.
"""

import copy

import pytest
import torch
from torch import nn
from transformers.models.mpt.modeling_mpt import MptAttention

flamingo_module = pytest.importorskip("open_flamingo.src.flamingo", reason="pip install --no-deps open-flamingo==2.0.1 einops-exts")
from open_flamingo.src.flamingo_lm import FlamingoLMMixin  # noqa: E402
from open_flamingo.src.utils import extend_instance  # noqa: E402

from otter.language_models import (  # noqa: E402
    MptSdpaAttention,
    get_decoder_layers,
    sdpa_attentions,
    set_decoder_layers,
)


class ClipTokens(nn.Module):
    """Stands in for open_clip's `visual` with `output_tokens=True`: returns (pooled, patch tokens)."""

    def __init__(self, clip_vision_model):
        super().__init__()
        self.clip = clip_vision_model

    def forward(self, pixel_values):
        hidden = self.clip(pixel_values=pixel_values).last_hidden_state
        return hidden[:, 0], hidden[:, 1:]


class VisionEncoder(nn.Module):
    def __init__(self, clip_vision_model):
        super().__init__()
        self.visual = ClipTokens(clip_vision_model)


class FlamingoLMForTransformers5(FlamingoLMMixin):
    """transformers 5's generate() passes attention_mask by keyword or not at all (REFERENCE.md)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return super().forward(input_ids, attention_mask, **kwargs)


def unwrapped_language_model(model):
    """
    A deep copy of the Otter model's LM with its original decoder layers back in place, and MPT's attention back to
    transformers' `MptAttention`, what OpenFlamingo runs (QK-LayerNorm MPT: Otter's eager computation).
    """
    language_model = copy.deepcopy(model.language_model)
    path = model._decoder_layers_path
    layers = get_decoder_layers(language_model, path)
    set_decoder_layers(language_model, path, nn.ModuleList(layer.decoder_layer for layer in layers))
    for attention in sdpa_attentions(language_model, eager=True):
        if type(attention) is MptSdpaAttention:
            attention.__class__ = MptAttention
    return language_model


def reference_twin(model):
    config = model.config
    language_model = unwrapped_language_model(model)
    extend_instance(language_model, FlamingoLMForTransformers5)
    language_model.set_decoder_layers_attr_name(model._decoder_layers_path)
    reference = flamingo_module.Flamingo(
        VisionEncoder(copy.deepcopy(model.vision_model)),
        language_model,
        eoc_token_id=config.eoc_token_id,
        media_token_id=config.media_token_id,
        vis_dim=config.vision_config.hidden_size,
        cross_attn_every_n_layers=config.cross_attn_every_n_layers,
    )
    reference.perceiver.load_state_dict(model.perceiver.state_dict())
    ours = [layer.gated_cross_attn_layer for layer in model.decoder_layers()]
    for mine, theirs in zip(ours, reference.lang_encoder.gated_cross_attn_layers, strict=True):
        assert (mine is None) == (theirs is None), "cross-attention placement differs from OpenFlamingo's"
        if mine is not None:
            theirs.load_state_dict(mine.state_dict())
    return reference.eval()


def vision_x(model, batch):
    """OpenFlamingo's `vision_x` `(batch, media, 1, C, H, W)` for a batch of Otter's processor (images in order)."""
    return model.batched_pixel_values(batch["pixel_values"], batch["input_ids"])


def assert_greedy_generation_matches(model, reference, batch, new_tokens=6):
    """Same tokens, and every step's scores within 1e-4; special tokens suppressed in both models."""
    special = [model.config.eoc_token_id, model.config.media_token_id, model.config.pad_token_id]
    settings = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1, suppress_tokens=special,
                    pad_token_id=model.config.pad_token_id, output_scores=True, return_dict_in_generate=True)
    ours = model.generate(**batch, **settings)
    with torch.no_grad():
        theirs = reference.generate(vision_x(model, batch), batch["input_ids"], attention_mask=batch["attention_mask"],
                                    **settings)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step_ours, step_theirs in zip(ours.scores, theirs.scores, strict=True):
        finite = step_ours.isfinite()
        assert torch.equal(finite, step_theirs.isfinite())
        assert (step_ours[finite] - step_theirs[finite]).abs().max() <= 1e-4
