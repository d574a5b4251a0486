"""
What Otter needs to know about each language-model family, in one table keyed by `model_type`.

A family is supported when its causal-LM class keeps its decoder layers in one `nn.ModuleList` whose layers take the
hidden states as their first argument. Other families work by naming that list in `OtterConfig.decoder_layers_attr`.
"""

import os

import torch
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


class MptAttentionWithQKLayerNorm(MptAttention):
    """
    `MptAttention` plus QK LayerNorm (`attn_config.qk_ln`), which transformers' MPT reads from its config but does not
    implement. As in mosaic_gpt (MPT-1B-RedPajama) and llm-foundry: LayerNorms over d_model (`q_ln`, `k_ln`, no bias,
    like every MPT norm) on the query and key thirds of `Wqkv`'s output, before the heads are split. Done as a hook on
    `Wqkv` so the parent's attention code runs unchanged.
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        if self.clip_qkv:
            # mosaic_gpt clamps before the LayerNorms; MptAttention clamps after Wqkv, i.e. after this hook
            raise ValueError(f"MPT with both qk_ln and clip_qkv={self.clip_qkv} is not supported")
        self.q_ln = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_epsilon, bias=False)
        self.k_ln = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_epsilon, bias=False)
        self.Wqkv.register_forward_hook(self._normalize_query_and_key)

    def _normalize_query_and_key(self, module, args, qkv: torch.Tensor) -> torch.Tensor:
        query, key, value = qkv.chunk(3, dim=-1)
        return torch.cat([self.q_ln(query), self.k_ln(key), value], dim=-1)


class MptForCausalLMWithQKLayerNorm(MptForCausalLM):
    """`MptForCausalLM` whose attention honours `attn_config.qk_ln`; same weight names plus `attn.q_ln`, `attn.k_ln`."""

    def __init__(self, config):
        super().__init__(config)
        for index, block in enumerate(self.transformer.blocks):
            block.attn = MptAttentionWithQKLayerNorm(config, layer_idx=index)
        self.post_init()


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
