"""
What Otter needs to know about each language-model family, in one table keyed by `model_type`.

A family is supported when its causal-LM class keeps its decoder layers in one `nn.ModuleList` whose layers take the
hidden states as their first argument, and its forward passes its keyword arguments on to them (the media of a call
travel that way, as transformers' models do; `OtterMptModel` adds it to MPT). Other families work by naming that list
in `OtterConfig.decoder_layers_attr`.
"""

import os
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mpt.modeling_mpt import MptAttention, MptForCausalLM, MptModel, MptPreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg

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

    Which computation runs is the language model's `config._attn_implementation`: `"sdpa"` this one, `"eager"`
    `MptAttention`'s, step for step, which also returns the attention weights. `eager` (True / False) overrides the
    config for this module: `OtterMptModel` sets it for a forward call that asks for `output_attentions`.
    """

    eager: bool | None = None

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__(config, layer_idx)
        self.config = config

    def computes_eagerly(self) -> bool:
        if self.eager is not None:
            return self.eager
        config = getattr(self, "config", None)
        return config is not None and config._attn_implementation == "eager"

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
        if self.computes_eagerly():
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


MPT_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


class OtterMptPreTrainedModel(MptPreTrainedModel):
    """
    MPT as Otter runs it: `attn_implementation` `"sdpa"` (the default) is `MptSdpaAttention`'s fused computation,
    `"eager"` transformers' `MptAttention`'s; QK LayerNorm when `attn_config.qk_ln` asks for it. Same weight names as
    transformers' MPT (plus `attn.q_ln`, `attn.k_ln` with QK LayerNorm).
    """

    _supports_sdpa = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # the attention modules read the config on every call

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention is None:
            return "sdpa"
        if requested_attention not in MPT_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={requested_attention!r} is not available for MPT language models; expected "
                "'sdpa' (Otter's fused MptSdpaAttention, the default) or 'eager' (transformers' MptAttention)"
            )
        return requested_attention


class OtterMptModel(OtterMptPreTrainedModel, MptModel):
    """`MptModel` with `MptSdpaAttention` (or its QK LayerNorm variant) in every block."""

    def __init__(self, config):
        super().__init__(config)
        attention_class = MptAttentionWithQKLayerNorm if needs_qk_layernorm(config) else MptSdpaAttention
        for index, block in enumerate(self.blocks):
            block.attn = attention_class(config, layer_idx=index)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        """
        `MptModel.forward`, passing its keyword arguments on to the blocks as transformers' other models do
        (`MptModel` drops them; Otter's layers read the call's media from them). MPT's blocks read a boolean mask,
        True where a key is hidden, which `MptModel` makes from what transformers builds for eager attention. With
        another implementation in the config, the mask (2-D, or 4-D as `generate()` builds it for a static cache, in
        that implementation's convention) is turned into that one here.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        use_cache = config.use_cache if use_cache is None else use_cache
        return_dict = config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputed blocks would append to the cache again
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=config)
        if config._attn_implementation != "eager":
            causal_mask = _hidden_keys(config, inputs_embeds, attention_mask, cache)
        else:
            causal_mask = create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                             cache=cache).to(torch.bool)
        hidden_states = inputs_embeds
        alibi = self.build_mpt_alibi_tensor(self.num_heads, config.max_seq_len, device=hidden_states.device)
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        with _eager_attention(self) if output_attentions and config._attn_implementation != "eager" else nullcontext():
            for block in self.blocks:
                if output_hidden_states:
                    all_hidden_states += (hidden_states,)
                outputs = block(hidden_states, layer_past=cache, attention_mask=causal_mask, use_cache=use_cache,
                                output_attentions=output_attentions, position_bias=alibi, **kwargs)
                hidden_states = outputs[0]
                if output_attentions:
                    all_attentions += (outputs[1],)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache,
                                                         hidden_states=all_hidden_states, attentions=all_attentions)


def _hidden_keys(config, inputs, attention_mask, cache) -> torch.Tensor | None:
    """
    MPT's `(batch, 1, query, key)` boolean mask, True where a key is hidden (causal and padding), from a 2-D padding
    mask (or none) or from a 4-D mask in the convention of `config._attn_implementation` (boolean: True where
    visible; additive: 0 where visible). `inputs`: the input ids or embeddings, for their shape and device.
    """
    if inputs is None:
        return attention_mask  # MptModel says what is missing
    if attention_mask is None or attention_mask.ndim == 2:
        attention_mask = create_causal_mask(
            config=config, inputs_embeds=torch.empty(*inputs.shape[:2], 0, device=inputs.device),
            attention_mask=attention_mask, cache=cache, allow_is_causal_skip=False)
    return ~attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


@contextmanager
def _eager_attention(model: nn.Module):
    """For one call, every `MptSdpaAttention` of `model` computes eagerly."""
    attentions = [module for module in model.modules() if isinstance(module, MptSdpaAttention)]
    before = [attention.eager for attention in attentions]
    for attention in attentions:
        attention.eager = True
    try:
        yield
    finally:
        for attention, value in zip(attentions, before):
            attention.eager = value


class OtterMptForCausalLM(OtterMptPreTrainedModel, MptForCausalLM):
    """`MptForCausalLM` on `OtterMptModel`: Otter's SDPA attention (or the eager one), QK LayerNorm when asked for."""

    def __init__(self, config):
        MptPreTrainedModel.__init__(self, config)  # MptForCausalLM.__init__, on OtterMptModel
        self.transformer = OtterMptModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, cache=None, attention_mask=None, inputs_embeds=None, labels=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, otter_media=None, **kwargs):
        """`MptForCausalLM.forward`, handing the call's media (`otter_media`) down to the blocks."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.transformer(input_ids, cache=cache, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, output_attentions=output_attentions,
                                   output_hidden_states=output_hidden_states, return_dict=True,
                                   **({} if otter_media is None else {"otter_media": otter_media}))
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = (logits, outputs.cache, outputs.hidden_states, outputs.attentions)
            output = tuple(v for v in output if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, cache=outputs.cache,
                                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def sdpa_attentions(language_model: nn.Module, eager: bool | None = None) -> list[MptSdpaAttention]:
    """
    Every `MptSdpaAttention` of `language_model`, transformers' `MptAttention`s turned into one in place (same
    weights, same function, reading `language_model.config`). `eager` True / False forces their computation
    (`MptSdpaAttention.eager`); None leaves it to the config. Empty for other families, whose own attention
    implementations transformers selects.
    """
    config = getattr(language_model, "config", None)
    attentions = []
    for module in language_model.modules():
        if type(module) is MptAttention:
            module.__class__ = MptSdpaAttention
            module.config = config
        if isinstance(module, MptSdpaAttention):
            module.eager = eager
            attentions.append(module)
    return attentions


def adopt_language_model(language_model: PreTrainedModel, attn_implementation: str | None) -> None:
    """
    A causal LM that Otter runs, as Otter runs it. transformers' `MptForCausalLM` becomes `OtterMptForCausalLM` in
    place (the same modules and weights; its classes, which add no state, and its attention modules swapped), with
    `attn_implementation` (None: "sdpa"): transformers' MPT knows only eager attention, so what its config says is
    not a choice. Other families keep theirs, which transformers selects.
    """
    if needs_qk_layernorm(language_model.config) and not isinstance(language_model, OtterMptForCausalLM):
        raise ValueError(
            "the language model's config asks for QK LayerNorm (attn_config.qk_ln) but "
            f"{type(language_model).__name__} ignores it; load it with otter.load_language_model(path)"
        )
    if type(language_model) is not MptForCausalLM:
        return
    language_model.__class__ = OtterMptForCausalLM
    if type(language_model.transformer) is MptModel:
        language_model.transformer.__class__ = OtterMptModel
    sdpa_attentions(language_model)
    language_model.config._attn_implementation_internal = language_model.get_correct_attn_implementation(
        attn_implementation)


def lora_target_pattern(model_type: str, module_names: list[str] | None = None) -> str:
    """
    A regex (peft full-matches it against module names) for the language model's own layers named `module_names`
    (default: peft's choice for the `model_type` family), inside Otter's decoder layers, never in the cross-attention
    blocks or CLIP.
    """
    if module_names is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        if model_type not in DEFAULTS:
            raise ValueError(f"peft has no default LoRA modules for {model_type!r}: set lora_target_modules")
        module_names = DEFAULTS[model_type]
    names = "|".join(map(str, module_names))
    return rf"language_model\..*\.decoder_layer\.(?:.*\.)?(?:{names})"


def needs_qk_layernorm(config: PretrainedConfig) -> bool:
    return config.model_type == "mpt" and bool(config.attn_config.qk_ln)


def build_language_model(config: PretrainedConfig) -> PreTrainedModel:
    """
    A randomly initialised causal LM for `config` (weights come later, from a checkpoint), with the attention
    implementation `config._attn_implementation` names. MPT is `OtterMptForCausalLM`.
    """
    if config.model_type == "mpt":
        return OtterMptForCausalLM._from_config(config)
    return AutoModelForCausalLM.from_config(config)


def load_language_model(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """
    A causal LM from a local folder (or a hub id), loaded strictly: a missing, unexpected or mis-shaped weight is a
    ValueError. MPT loads as `OtterMptForCausalLM`: it honours `qk_ln`, which `AutoModelForCausalLM` would silently
    drop, and takes `attn_implementation` "sdpa" (the default) or "eager".
    """
    config = AutoConfig.from_pretrained(path)
    model_class = OtterMptForCausalLM if config.model_type == "mpt" else AutoModelForCausalLM
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    problems = {name: keys for name, keys in info.items() if name != "error_msgs" and keys}
    if problems or info.get("error_msgs"):
        raise ValueError(f"language model {path} does not match its config: {problems or info['error_msgs']}")
    return model
