"""Gated cross-attention from text to the perceiver's image latents, and the text->image mask."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .perceiver import feed_forward


def media_attention_mask(
    media_index: torch.Tensor, num_media: int, num_latents: int, only_attend_immediate_media: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Which image latents each text token may read.

    Args:
        media_index: `(batch, text_len)`, the 1-based index of the latest `<image>` at or before each token
            (`cumsum(input_ids == <image>)` over the whole sequence); 0 before the first image.
        num_media, num_latents: the media axis and latents per media item of the image features.
        only_attend_immediate_media: see `OtterConfig`.

    Returns:
        `attn_mask` `(batch, 1, text_len, num_media * num_latents)` boolean, True where attention is allowed, and
        `has_media` `(batch, 1, text_len, 1)` in {0, 1}: tokens before the first image get a zero attention
        output (OpenFlamingo), and their mask rows are left open only to keep the softmax finite.
    """
    media_time = torch.arange(1, num_media + 1, device=media_index.device).repeat_interleave(num_latents)
    text_time = media_index[:, None, :, None]
    allowed = text_time == media_time if only_attend_immediate_media else text_time >= media_time
    has_media = text_time > 0
    return allowed | ~has_media, has_media


class MaskedCrossAttention(nn.Module):
    """Text queries attend to image latents: `norm -> to_q`, `to_kv` on the media, `to_out`; no biases."""

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def media_key_values(self, image_features: torch.Tensor) -> torch.Tensor:
        """`(batch, media, latents, dim_visual)` -> keys and values `(batch, media * latents, 2 * heads * dim_head)`."""
        return self.to_kv(image_features.flatten(1, 2))

    def forward(self, hidden_states, media_key_values, attn_mask, has_media):
        q = self.to_q(self.norm(hidden_states))
        k, v = media_key_values.chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b s (h d) -> b h s d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask) * has_media
        return self.to_out(rearrange(out, "b h s d -> b s (h d)"))


class GatedCrossAttentionBlock(GradientCheckpointingLayer):
    """
    `x = attn(x, media) * tanh(attn_gate) + x; x = ff(x) * tanh(ff_gate) + x`, gates starting at 0 so a new model is
    exactly its language model. The feed-forward branch runs on every token, with or without media.
    """

    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, heads, dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states, media_key_values=None, attn_mask=None, has_media=None):
        if media_key_values is not None:
            attended = self.attn(hidden_states, media_key_values, attn_mask, has_media)
            hidden_states = attended * self.attn_gate.tanh() + hidden_states
        return self.ff(hidden_states) * self.ff_gate.tanh() + hidden_states


class CrossAttentionMedia:
    """
    The media of one forward call, handed down the language model's forward to every `OtterDecoderLayer` as the
    keyword argument `otter_media` (transformers' models pass their keyword arguments on to their decoder layers), and
    never stored on a module: calls running at once, in threads or in a server, never see each other's images.

    `per_block`: each cross-attention block's media keys/values `(batch, media * latents, 2 * heads * dim_head)`, in
    block order; `attn_mask`, `has_media`: from `media_attention_mask`. `reads` counts the blocks that took their media,
    so the caller can tell a language model that dropped the keyword argument (its images would be silently ignored).
    """

    def __init__(self, per_block, attn_mask: torch.Tensor, has_media: torch.Tensor):
        self.per_block, self.attn_mask, self.has_media = tuple(per_block), attn_mask, has_media
        self.reads = 0

    def for_block(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.reads += 1
        return self.per_block[index], self.attn_mask, self.has_media


class OtterDecoderLayer(nn.Module):
    """
    A language-model decoder layer with an optional gated cross-attention block before it (`block_index`: its place
    among the blocks).

    The media come with the call (`otter_media`, a `CrossAttentionMedia`); the wrapped layer is called with the other
    arguments untouched. With no media, only the block's feed-forward branch runs, as for text without images.
    """

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: GatedCrossAttentionBlock | None,
                 block_index: int | None = None):
        super().__init__()
        if (gated_cross_attn_layer is None) != (block_index is None):
            raise ValueError("a layer with a cross-attention block needs its block_index, and only such a layer")
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.block_index = block_index

    def forward(self, hidden_states, *args, otter_media: CrossAttentionMedia | None = None, **kwargs):
        if self.gated_cross_attn_layer is not None:
            # with a device map, layers sit on different devices: the media come to this one (no-op on one device)
            media = () if otter_media is None else tuple(
                tensor.to(hidden_states.device) for tensor in otter_media.for_block(self.block_index))
            hidden_states = self.gated_cross_attn_layer(hidden_states, *media)
        return self.decoder_layer(hidden_states, *args, **kwargs)
