"""The Perceiver resampler: a fixed number of latents read each image's patch tokens (Flamingo, sec. 2.1)."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """`[LayerNorm, Linear(d, mult*d), GELU, Linear(mult*d, d)]`, no biases on the linears (OpenFlamingo's layout)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to `concat(media, latents)`."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        media `(N, tokens, dim)`, latents `(N, num_latents, dim)` -> `(N, num_latents, dim)`. Latents `(1, num_latents,
        dim)` are the same for every media item (the first layer's): their query, keys and values are computed once.
        `key_mask` `(N, tokens)`: False for the media tokens no latent may read (padded frames).
        """
        count = media.shape[0]
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents).expand(count, -1, -1)
        # to_kv(cat(media, latents)), the latents' part once when they are shared
        kv = torch.cat((self.to_kv(media), self.to_kv(latents).expand(count, -1, -1)), dim=1)
        k, v = kv.chunk(2, dim=-1)
        q, k, v = (rearrange(t, "n s (h d) -> n h s d", h=self.heads) for t in (q, k, v))
        mask = None
        if key_mask is not None:  # the latents' own keys are always read
            mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], kv.shape[1] - key_mask.shape[1])], 1)
            mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(rearrange(out, "n h s d -> n s (h d)"))


class PerceiverResampler(nn.Module):
    """
    Resamples each media item's tokens to `num_latents` latents.

    Input `(batch, media, frames, tokens, dim)`; output `(batch, media, num_latents, dim)`. Frames are flattened
    with the tokens after adding a learned frame embedding (only when `max_num_frames` is set). `frame_mask`
    `(batch, media, frames)` marks the real frames of media padded to the batch's frame count: the latents never read
    the others, so a medium gives the same latents alone and in any batch.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, num_latents: int, ff_mult: int,
                 max_num_frames: int | None = None):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, media, frames, tokens = features.shape[:4]
        if self.frame_embs is not None:
            features = features + self.frame_embs[:frames, None]
        media_tokens = rearrange(features, "b m f t d -> (b m) (f t) d")
        key_mask = None
        if frame_mask is not None:
            key_mask = frame_mask.bool().reshape(batch * media, frames).repeat_interleave(tokens, dim=1)
        latents = self.latents[None]  # (1, num_latents, dim): broadcast over the media items by the first layer
        for attn, ff in self.layers:
            latents = attn(media_tokens, latents, key_mask) + latents
            latents = ff(latents) + latents
        return rearrange(self.norm(latents), "(b m) n d -> b m n d", b=batch, m=media)
