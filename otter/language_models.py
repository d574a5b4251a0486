"""
What Otter needs to know about each language-model family, in one table keyed by `model_type`.

A family is supported when its causal-LM class keeps its decoder layers in one `nn.ModuleList` whose layers take the
hidden states as their first argument. Other families work by naming that list in `OtterConfig.decoder_layers_attr`.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.mpt.modeling_mpt import MptAttention, MptForCausalLM

# model_type -> dotted path from the *ForCausalLM model to its decoder layers
DECODER_LAYERS = {
    "mpt": "transformer.blocks",
    "gpt_neox": "gpt_neox.layers",
    "llama": "model.layers",
}


def decoder_layers_path(model_type: str, override: str | None = None) -> str:
    if override:
        return override
    if model_type not in DECODER_LAYERS:
        raise ValueError(
            f"Otter does not know where a {model_type!r} language model keeps its decoder layers (known: "
            f"{', '.join(sorted(DECODER_LAYERS))}). Name the nn.ModuleList of decoder layers with "
            "OtterConfig(decoder_layers_attr='path.to.layers'), e.g. 'model.layers'."
        )
    return DECODER_LAYERS[model_type]


def max_positions(text_config: PretrainedConfig) -> int | None:
    """
    The most tokens the language model takes (prompt and generated tokens together): MPT's `max_seq_len` (its ALiBi
    bias has that many columns), else `max_position_embeddings` or `n_positions`; None when the config states none.
    """
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def get_decoder_layers(language_model: nn.Module, path: str) -> nn.ModuleList:
    module = language_model
    for name in path.split("."):
        if not hasattr(module, name):
            raise ValueError(
                f"{type(language_model).__name__} has no attribute path {path!r} (stopped at {name!r}); set "
                "OtterConfig(decoder_layers_attr=...) to the dotted path of its nn.ModuleList of decoder layers"
            )
        module = getattr(module, name)
    if not isinstance(module, nn.ModuleList):
        raise ValueError(f"{path!r} in {type(language_model).__name__} is a {type(module).__name__}, not an nn.ModuleList")
    return module


def set_decoder_layers(language_model: nn.Module, path: str, layers: nn.ModuleList) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = language_model
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    setattr(parent, name, layers)


class MptSdpaAttention(MptAttention):
    """
    `MptAttention` through torch's `scaled_dot_product_attention`: the same function, with ALiBi and the causal /
    padding mask as one additive bias, built once per forward and shared by every layer. transformers' MPT has only
    the eager attention, which keeps `(batch, heads, query, key)` scores and probabilities in fp32 in every layer for
    the backward pass: what makes fine-tuning on long sequences run out of memory.

    `eager = True` computes as `MptAttention` does, and returns the attention weights: the Otter model sets it for a
    forward call that asks for `output_attentions`, or when the model was loaded with `attn_implementation="eager"`.
    """

    eager = False

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values `(batch, length, hidden)` from `Wqkv` (clamped to `clip_qkv`)."""
        qkv = self.Wqkv(hidden_states)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        return qkv.chunk(3, dim=2)

    def forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        query, key, value = (t.reshape(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
                             for t in self.project(hidden_states))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        weights = None
        if self.eager:
            out, weights = self._eager_attention(query, key, value, position_bias, attention_mask)
        else:
            bias, attending = _attention_bias(position_bias, attention_mask, key.shape[-2], query.dtype)
            if attending is not None:
                query = query * attending
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.softmax_scale,
                                                 dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1)), weights

    def _eager_attention(self, query, key, value, position_bias, attention_mask):
        """`MptAttention.forward`'s computation, step for step: the output and the attention weights."""
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.softmax_scale
        if position_bias is not None:
            scores = scores + position_bias[:, :, max(0, position_bias.size(2) - key.shape[-2]):]
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, torch.finfo(query.dtype).min)
        weights = F.softmax(scores.float(), dim=-1).to(value.dtype)
        weights = F.dropout(weights, p=self.attn_dropout_p, training=self.training)
        return torch.matmul(weights, value), weights


def _attention_bias(position_bias, attention_mask, key_length, dtype):
    """
    What `MptAttention` adds to the scores: the last `key_length` ALiBi columns, and the dtype's minimum where the
    boolean `attention_mask` is True (masked); and `attending`, `(batch, 1, query, 1)`, 0 for the queries masked from
    every key (left padding), 1 for the others.

    `MptAttention` gives a query masked from every key equal scores, so it reads all values alike, and no gradient
    reaches its query or the keys. Here its bias row is 0 and the query is multiplied by `attending`: the same output
    and gradients. (With a row of minimums instead, the fused kernels' backward pass is wrong for that row.)

    Both are kept on the mask, which transformers builds once per forward and hands every layer, so that the layers
    share one tensor (also in what autograd saves for backward).
    """
    cached = getattr(attention_mask, "_otter_attention_bias", None)
    if cached is not None and cached[0] is position_bias and cached[1] == (key_length, dtype):
        return cached[2]
    bias = None
    if position_bias is not None:  # (heads, 1, max_seq_len)
        bias = position_bias[:, :, max(0, position_bias.size(2) - key_length):].to(dtype)
    if attention_mask is None:
        return bias, None
    unattended = attention_mask.all(dim=-1, keepdim=True)
    bias = torch.where(attention_mask, torch.finfo(dtype).min, 0.0 if bias is None else bias)
    bias = bias.masked_fill(unattended, 0.0).to(dtype)
    if key_length % 8:  # CUDA's memory-efficient kernel would copy a bias whose rows are not 8-aligned, in every layer
        bias = F.pad(bias, (0, 8 - key_length % 8))[..., :key_length]
    result = bias, (~unattended).to(dtype)
    if not torch.compiler.is_compiling():  # a compiled graph computes it once anyway
        attention_mask._otter_attention_bias = (position_bias, (key_length, dtype), result)
    return result


class MptAttentionWithQKLayerNorm(MptSdpaAttention):
    """
    `MptAttention` plus QK LayerNorm (`attn_config.qk_ln`), which transformers' MPT reads from its config but does not
    implement. As in mosaic_gpt (MPT-1B-RedPajama) and llm-foundry: LayerNorms over d_model (`q_ln`, `k_ln`, no bias,
    like every MPT norm) on the query and key thirds of what `Wqkv` returns, before the heads are split; with LoRA
    on `Wqkv`, of its adapted output, so that merging the adapter gives the model that was trained.
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        if self.clip_qkv:
            raise ValueError(f"MPT with both qk_ln and clip_qkv={self.clip_qkv} is not supported")
        self.q_ln = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_epsilon, bias=False)
        self.k_ln = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_epsilon, bias=False)

    def project(self, hidden_states):
        query, key, value = super().project(hidden_states)
        return self.q_ln(query), self.k_ln(key), value


class MptForCausalLMWithQKLayerNorm(MptForCausalLM):
    """`MptForCausalLM` whose attention honours `attn_config.qk_ln`; same weight names plus `attn.q_ln`, `attn.k_ln`."""

    def __init__(self, config):
        super().__init__(config)
        for index, block in enumerate(self.transformer.blocks):
            block.attn = MptAttentionWithQKLayerNorm(config, layer_idx=index)
        self.post_init()


def sdpa_attentions(language_model: nn.Module, eager: bool = False) -> list[MptSdpaAttention]:
    """
    Every `MptSdpaAttention` of `language_model`, transformers' `MptAttention`s turned into one in place (same
    weights, same function); `eager` sets whether they compute eagerly (`MptSdpaAttention.eager`). Empty for other
    families, whose own attention implementations transformers selects.
    """
    attentions = []
    for module in language_model.modules():
        if type(module) is MptAttention:
            module.__class__ = MptSdpaAttention
        if isinstance(module, MptSdpaAttention):
            module.eager = eager
            attentions.append(module)
    return attentions


def needs_qk_layernorm(config: PretrainedConfig) -> bool:
    return config.model_type == "mpt" and bool(config.attn_config.qk_ln)


def build_language_model(config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised causal LM for `config` (weights come later, from a checkpoint)."""
    if needs_qk_layernorm(config):
        return MptForCausalLMWithQKLayerNorm._from_config(config)
    return AutoModelForCausalLM.from_config(config)


def load_language_model(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """
    A causal LM from a local folder (or a hub id), loaded strictly: a missing, unexpected or mis-shaped weight is a
    ValueError. Honours MPT's `qk_ln`, which `AutoModelForCausalLM` would silently drop.
    """
    config = AutoConfig.from_pretrained(path)
    model_class = MptForCausalLMWithQKLayerNorm if needs_qk_layernorm(config) else AutoModelForCausalLM
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {name: keys for name, keys in info.items() if name != "error_msgs" and keys}
    if problems or info.get("error_msgs"):
        raise ValueError(f"language model {path} does not match its config: {problems or info['error_msgs']}")
    return model
