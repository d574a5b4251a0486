"""
Tiny checkpoints in the layout of Luodian's Otter releases, built and run by Otter's OWN code (PyPI `otter-ai==0.0.0a8`,
module `otter_ai`), as the oracle of `otter convert otter` (issue 19). A test dependency only, like open-flamingo:
`pip install --no-deps otter-ai==0.0.0a8`; without it every test that imports this module is skipped.

API
---
`write_release(folder, kind, *, base=None, format="bin", dtype=None, lora_style="new", ...) -> Release`
    Builds Otter's model (`OtterForConditionalGeneration`, or `FlamingoForConditionalGeneration` for "flamingo") from
    the config it writes, gives every weight a seeded non-trivial value, and writes the folder as transformers 4.30's
    `save_pretrained` wrote the releases. Kinds:
      "mpt"       Otter-Image-MPT7B in miniature: Otter's vendored llm-foundry `MPTForCausalLM` (ALiBi, no biases,
                  low-precision LayerNorm, logits from `wte`, no lm_head), `wte` padded above the tokenizer (MPT-7B:
                  50432 rows for ~50280 tokens; here the Otter tokenizer's length rounded up past a multiple of 64).
      "llama"     OTTER-9B-LA-InContext style: transformers' `LlamaForCausalLM`, untied `lm_head`, vocab = the Otter
                  tokenizer's length (32004 = 32000 + 4 in the release), text_config `_name_or_path`
                  "luodian/llama-7b-hf" (the 0616 config had `architectures: null`: `text_overrides` gives that too).
      "mosaic"    OTTER-MPT1B-RPJama-Init style: Otter's vendored `MosaicGPT` (MPT-1B-RedPajama, `attn_qk_ln`).
      "video"     Otter-Video: `max_num_frames` in the config, so the perceiver has `frame_embs`; `base="llama"` (the
                  released video model's LM, default) or "mpt"/"mosaic".
      "lora"      a config with `lora_config` {"r", "lora_alpha", "lora_dropout"}: Otter wraps its LM with peft
                  (targets `Wqkv` for MPT, `q_proj`/`v_proj` for LLaMA); `lora_B` non-zero. `base="mpt"` (default, as
                  converting_otter_to_lora.py's OTTER-MPT7B-Instruct0705-LoRA) or "llama".
      "flamingo"  `FlamingoForConditionalGeneration` (model_type "flamingo": no `<answer>` token, no `frame_embs`),
                  MPT-based like Otter's flamingo-mpt-7B.json (`base="llama"` also works).
    Options: `format="bin"` (sharded `pytorch_model-0000i-of-0000N.bin`, plain `torch.save` of a state-dict chunk, +
    `pytorch_model.bin.index.json`, or one `pytorch_model.bin` when `max_shard_size` is large) or "safetensors"
    (`model.safetensors`, or `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`); `dtype=torch.bfloat16
    / float16` stores the floating tensors in that dtype while config.json keeps `"torch_dtype": "float32"`, as the
    releases do (the oracle model then holds exactly the stored values, upcast to float32); `max_shard_size` in bytes
    (default 100 MB: 4 shards of a float32 release); `lora_style` (below); `seed`; `use_media_placement_augmentation`
    (what config.json says; the releases say true); `config_overrides` (top-level config entries, e.g. Otter's training
    flags {"train_lang_encoder": True}); `text_overrides` (text_config entries, e.g. {"n_layers": 2}).
`save_release(release, folder, ...)` writes an existing Release's model in another layout (format, dtype, lora_style,
    shards) without rebuilding it; returns the new Release (the same model, or a copy rounded to `dtype` if given).
`write_trainable_checkpoint(release, path, *, prefix="", wrapped=False, steps=None, extra=None, lora_style="new",
    dtype=None, seed=1) -> Trained` (`path`, `model`, `state`: the stored dict, unwrapped, without the prefix)
    What Otter's training scripts save (pipeline/train/train_utils.py, `get_checkpoint`): `model.state_dict()` minus
    every parameter whose `requires_grad` is False after Otter's own `init_weights()` (called by `post_init`), so the
    persistent BUFFERS stay (4.30: CLIP's `position_ids`, LLaMA's `inv_freq`). Before saving, the trainable parameters
    of a deep copy are perturbed (the gates redrawn), so the result differs from the folder; `Trained.model` is that
    copy (the oracle of folder + checkpoint). `final_weights.pt` is the bare dict (`wrapped=False`); `checkpoint_N.pt`
    is {"model_state_dict": ...} (`wrapped=True`), plus "steps" for `checkpoint_steps_N.pt` (`steps=N`); DDP-era files
    carry a "module." prefix (`prefix="module."`); `extra` adds top-level entries (e.g. "epoch", an optimizer state).
`load_release(folder, tokenizer_folder=None, checkpoint=None) -> model`: Otter's class rebuilt from config.json and
    loaded from the files (names mapped back to transformers 5's, strict: every key accounted for), optionally with a
    training checkpoint laid over them; to check that a folder round-trips.
`read_release_weights(folder) -> dict[name, tensor]`: the state dict as stored (all shards, `weights_only=True`).
`read_trainable_checkpoint(path) -> dict`: a training checkpoint's state dict (unwrapped, "module." stripped).
`example_inputs(release, batch=2) -> (vision_x, input_ids, attention_mask)`: two-image chats (Otter's template;
    captions for Flamingo) of different lengths, left-padded with `<PAD>`, solid-colour images of several sizes.
Lower level: `release_config(kind, base, n_tokens=...)` (the config.json dict), `build_otter_ai_model(config,
    base_tokenizer)` (Otter's model from such a dict, shims applied), `randomise_(model, seed)`,
    `release_state_dict(model, names=None, lora_style=...)` (in-memory -> stored names), `write_weights(folder, state,
    format=..., max_shard_size=...)`, `trainable_names(model)` (what Otter's init_weights left trainable).
`reference_logits(release_or_model, vision_x, input_ids, attention_mask=None) -> logits (B, T, V)`
    Otter's `forward(vision_x, lang_x, attention_mask)`, float32, no cache. vision_x is `(B, T_img, F, C, H, W)`.
    Compare only where attention_mask is 1 (padded rows are garbage, and differ between SDPA and eager). With left
    padding, Otter's LLaMA positions count the pads (it passes no position_ids: arange, as in 4.30); ALiBi (MPT,
    MosaicGPT) is unaffected.
`reference_greedy(release_or_model, vision_x, input_ids, attention_mask=None, max_new_tokens=6, suppress=(),
    eos_token_id=None, pad_token_id=None, return_scores=False)`: greedy decoding by full forwards (no KV cache: the
    correct semantics; Otter's own LLaMA `generate` with a cache loses the images after the first token). Returns the
    sequences `(B, T + new)` (and the per-step last-position logits, after suppression, if `return_scores`).
`otter_pixel_values(images, image_size=32) -> (N, 3, S, S)`: Otter's inference preprocessing (its demos call
    `transformers.CLIPImageProcessor()`, i.e. the 4.30 PIL/numpy processor: shortest edge -> S bicubic, centre crop
    with floored offsets, rescale, CLIP mean/std). transformers 5's `CLIPImageProcessor` is the torchvision backend;
    this pins `CLIPImageProcessorPil`, the same pipeline as 4.30's. Stack as `[None, :, None]` for one sample.
`otter_ai_shims(tokenizer)`: the context manager every build runs in (see "Shims").
`Release`: `folder`, `kind`, `base`, `model` (Otter's, eval mode, float32), `tokenizer` (the one Otter built: base +
    `<|endofchunk|>`, `<image>`, `<answer>` (not for flamingo), then `<PAD>` only if the base has no pad token),
    `tokenizer_folder` (the BASE tokenizer, saved before Otter's additions: pass it to the converter as --tokenizer),
    `config` (config.json as a dict), `weight_names` (the stored names, in file order), token-id properties.

Exact key layouts (transformers 4.30 names, as stored; `<LM>` is `lang_encoder.` or, under LoRA,
`lang_encoder.base_model.model.`; cross-attention before layer i when (i + 1) % cross_attn_every_n_layers == 0)
-----------------------------------------------------------------------------------------------------------------
Vision (every kind):
    vision_encoder.vision_model.embeddings.{class_embedding, position_ids (int64 buffer (1, P)),
        patch_embedding.weight, position_embedding.weight}
    vision_encoder.vision_model.pre_layrnorm.{weight,bias}
    vision_encoder.vision_model.encoder.layers.{j}.self_attn.{k,v,q,out}_proj.{weight,bias},
        .layer_norm1.{weight,bias}, .mlp.fc1.{weight,bias}, .mlp.fc2.{weight,bias}, .layer_norm2.{weight,bias}
    vision_encoder.vision_model.post_layernorm.{weight,bias}   (stored; Otter's features skip it: tokens[:, 1:])
Perceiver (every kind; depth 6, 8 heads x 64, 64 latents, ff 4096, dim 1024, hard-coded by Otter):
    perceiver.latents (64, 1024); perceiver.frame_embs (max_num_frames, 1024) only for "video"
    perceiver.layers.{i}.{norm_media,norm_latents}.{weight,bias}, .to_q.weight (512,1024), .to_kv.weight (1024,1024),
        .to_out.weight (1024,512), .feed_forward.0.{weight,bias} (LayerNorm), .feed_forward.1.weight (4096,1024),
        .feed_forward.3.weight (1024,4096)
    perceiver.norm.{weight,bias}
Gated cross-attention (in the wrapped decoder layer n):
    <LM><layers>.{n}.gated_cross_attn_layer.{attn_gate, ff_gate} (shape (1,)),
        .attn.norm.{weight,bias}, .attn.to_q.weight (512,d), .attn.to_kv.weight (1024,1024),
        .attn.to_out.weight (d,512), .feed_forward.0.{weight,bias}, .feed_forward.1.weight (4d,d),
        .feed_forward.3.weight (d,4d)
    and every original decoder-layer weight under <LM><layers>.{n}.decoder_layer.*
"mpt" (vendored MPT): <layers> = transformer.blocks
    <LM>transformer.wte.weight (vocab_size, d); no lm_head, no wpe (ALiBi), no biases in the decoder layers
    <LM>transformer.blocks.{n}.decoder_layer.{norm_1.weight, attn.Wqkv.weight (3d,d), attn.out_proj.weight,
        norm_2.weight, ffn.up_proj.weight (4d,d), ffn.down_proj.weight}
    <LM>transformer.norm_f.weight
"mosaic" (vendored MosaicGPT): <layers> = transformer.blocks
    <LM>transformer.wte.weight, <LM>transformer.blocks.{n}.decoder_layer.{ln_1.weight, attn.Wqkv.weight,
        attn.q_ln.weight, attn.k_ln.weight, attn.out_proj.weight, ln_2.weight, mlp.mlp_up.weight, mlp.mlp_down.weight},
    <LM>transformer.ln_f.weight
"llama" (transformers' LlamaForCausalLM): <layers> = model.layers
    <LM>model.embed_tokens.weight, <LM>model.layers.{n}.decoder_layer.{self_attn.{q,k,v,o}_proj.weight,
        self_attn.rotary_emb.inv_freq (float buffer, 4.30), mlp.{gate,up,down}_proj.weight, input_layernorm.weight,
        post_attention_layernorm.weight}, <LM>model.norm.weight, <LM>lm_head.weight (untied)
LoRA on a target T (Wqkv, or q_proj/v_proj): the base weight and the adapters, by `lora_style`:
    "new"  (peft >= 0.7, what the installed peft writes): T.base_layer.weight, T.lora_A.default.weight (r, in),
           T.lora_B.default.weight (out, r)
    "old"  (peft 0.3-0.6, what Otter's full-model save_pretrained wrote in 2023): T.weight, T.lora_A.default.weight,
           T.lora_B.default.weight
    "bare" (peft <= 0.2, and the adapter-file naming of get_peft_model_state_dict): T.weight, T.lora_A.weight,
           T.lora_B.weight

Shims (the smallest changes that let otter_ai 0.0.0a8 build and run under transformers 5, offline)
------------------------------------------------------------------------------------------------
1. Tokenizer: `OtterForConditionalGeneration.__init__` / `FlamingoForConditionalGeneration.__init__` call
   `AutoTokenizer.from_pretrained("mosaicml/mpt-7b-instruct")` (MPT), "mosaicml/mosaic-llama-redpajama-final-candidate"
   (MosaicGPT) or `text_config._name_or_path` (LLaMA): the network. The shim replaces the module-level `AutoTokenizer`
   of both modeling modules with a stub that returns a deep copy of the given tokenizer (and records the name asked
   for); Otter then adds its special tokens to that copy exactly as it would to the downloaded one.
2. LoRA: otter_ai 0.0.0a8 calls `self.lang_encoder.master_print_trainable_parameters()` (a print -> master_print
   rename that hit a peft method), which no peft version has; the shim aliases it to peft's
   `print_trainable_parameters` for the build (it only prints). Otter also renames the peft class globally
   (`PeftModelForCausalLM.__name__ = "MPTForCausalLMLoRA"`); the shim restores the name when the build is done (its
   only use, init_weights' "LlamaForCausalLM" test, has run by then, in post_init).
3. Otter prints (master_print) every trainable parameter from init_weights: stdout is silenced during the build.
4. After the build (not inside Otter's code): the LM's `use_media_placement_augmentation` is set False. Otter's own
   class already forces False; Flamingo's class reads the config (true in the releases) and would then draw
   `attend_previous` at random at every forward (a training augmentation), so the oracle would not be deterministic.
   False gives attend_previous=True, the standard Flamingo masking.
5. Attention: CLIP and LLaMA are set to eager attention (`config._attn_implementation = "eager"`, which their
   attention reads at every forward; `set_attn_implementation` refuses the LLaMA class Otter builds at run time), the
   only attention transformers 4.30 had, which the releases ran with (transformers 5 defaults to SDPA; ~1e-6).
   The vendored MPT/MosaicGPT run `attn_impl: "torch"` (their torch path; triton needs a GPU), as the configs say.
Nothing else needed changing: the releases' MPT/MosaicGPT text_config carries `hidden_size` (init_otter reads it; the
vendored configs have no such attribute of their own), and transformers 5 still calls the model's own `init_weights()`
from `post_init()`, so Otter's freezing (which decides what training saved) runs as in 4.30. Otter's own
`from_pretrained` under transformers 5 (shim 1 applied) loads these folders with no missing or unexpected keys.

What does not run: Otter's `generate()` for the vendored MPT/MosaicGPT ('MPTForCausalLM' object has no attribute
'generate': they do not inherit transformers 5's GenerationMixin) -- not needed, the oracle decodes by full forwards
(Otter's LLaMA `generate()` runs, and departs from the full-forward greedy after the first token, as expected); LoRA
on MosaicGPT (peft passes `inputs_embeds=None`, which `MosaicGPT.forward` does not accept; peft 0.3 did the same, so
no such release exists: `write_release` refuses it); the triton/flash attention paths (GPU); xformers (not installed:
Otter falls back to its einsum attention, the path the oracle must take anyway).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("otter_ai", reason="pip install --no-deps otter-ai==0.0.0a8")
from otter_ai.models.flamingo import configuration_flamingo, modeling_flamingo  # noqa: E402
from otter_ai.models.otter import configuration_otter, modeling_otter  # noqa: E402
from safetensors.torch import load_file as load_safetensors  # noqa: E402
from safetensors.torch import save_file as save_safetensors  # noqa: E402

from otter.tiny import tiny_tokenizer  # noqa: E402

KINDS = ("mpt", "llama", "mosaic", "video", "lora", "flamingo")
BASES = ("mpt", "llama", "mosaic")
DEFAULT_BASE = {"mpt": "mpt", "llama": "llama", "mosaic": "mosaic", "video": "llama", "lora": "mpt", "flamingo": "mpt"}
LORA_STYLES = ("new", "old", "bare")
LORA_TARGETS = {"mpt": ("Wqkv",), "llama": ("q_proj", "v_proj")}  # otter_ai's model_to_lora_modules
IMAGE_SIZE = 32
VIS_DIM = 1024  # Otter hard-codes vis_dim 1024 (ViT-L/14), so the tiny CLIP keeps that width

# What transformers 4.30's PretrainedConfig.to_dict() wrote for every (sub)config: the releases carry all of it.
PRETRAINED_CONFIG_430 = {
    "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None, "bos_token_id": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "eos_token_id": None, "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False, "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "pad_token_id": None, "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
    "tie_encoder_decoder": False, "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0,
    "torch_dtype": None, "torchscript": False, "transformers_version": "4.30.1", "typical_p": 1.0,
    "use_bfloat16": False,
}

VISION_CONFIG = {
    **PRETRAINED_CONFIG_430, "_name_or_path": "openai/clip-vit-large-patch14", "architectures": None,
    "model_type": "clip_vision_model", "hidden_act": "quick_gelu", "hidden_size": VIS_DIM, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 16, "image_size": IMAGE_SIZE, "patch_size": 16, "num_channels": 3,
    "projection_dim": 512, "layer_norm_eps": 1e-05, "attention_dropout": 0.0, "initializer_factor": 1.0,
    "initializer_range": 0.02,
}

MPT_TEXT_CONFIG = {
    **PRETRAINED_CONFIG_430, "_name_or_path": "", "architectures": ["MPTForCausalLM"], "model_type": "mpt",
    "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                    "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                    "prefix_lm": False, "qk_ln": False, "softmax_scale": None},
    "d_model": 64, "hidden_size": 64, "n_heads": 4, "n_layers": 4, "expansion_ratio": 4, "max_seq_len": 2048,
    "emb_pdrop": 0, "resid_pdrop": 0, "embedding_fraction": 1.0, "learned_pos_emb": True, "logit_scale": None,
    "no_bias": True, "norm_type": "low_precision_layernorm", "init_device": "cpu", "use_cache": False, "verbose": 0,
    "init_config": {"emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in",
                    "init_div_is_residual": True, "init_gain": 0, "init_nonlinearity": "relu", "init_std": 0.02,
                    "name": "kaiming_normal_", "verbose": 0},
    "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16",
}

# OTTER-MPT1B-RPJama-Init's LM as Otter's flamingo-mpt-1B-redpajama.json has it (transformers 4.27 keys only).
MOSAIC_TEXT_CONFIG = {
    "_name_or_path": "", "architectures": ["MosaicGPT"], "model_type": "mosaic_gpt", "alibi": True,
    "alibi_bias_max": 8, "attn_clip_qkv": None, "attn_impl": "torch", "attn_pdrop": 0, "attn_qk_ln": True,
    "attn_uses_sequence_id": False, "d_model": 64, "hidden_size": 64, "emb_init_std": None,
    "emb_init_uniform_lim": None, "emb_pdrop": 0, "embedding_fraction": 1.0, "fan_mode": "fan_in",
    "init_device": "cpu", "init_div_is_residual": True, "init_gain": 0, "init_nonlinearity": "relu", "init_std": 0.02,
    "logit_scale": None, "low_precision_layernorm": True, "max_seq_len": 2048, "mlp_ratio": 4, "n_heads": 4,
    "n_layers": 4, "no_bias": True, "param_init_fn": "kaiming_normal_", "prefix_lm": False, "resid_pdrop": 0,
    "softmax_scale": None, "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "float32",
    "transformers_version": "4.27.4", "use_cache": False, "verbose": 0,
}

LLAMA_TEXT_CONFIG = {
    **PRETRAINED_CONFIG_430, "_name_or_path": "luodian/llama-7b-hf", "architectures": ["LlamaForCausalLM"],
    "model_type": "llama", "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
    "initializer_range": 0.02, "max_position_embeddings": 2048, "num_attention_heads": 4, "num_hidden_layers": 4,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0,
}

TEXT_CONFIGS = {"mpt": MPT_TEXT_CONFIG, "mosaic": MOSAIC_TEXT_CONFIG, "llama": LLAMA_TEXT_CONFIG}
LORA_CONFIG = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05}  # the release: r 16, alpha 32, dropout 0.05


# ----------------------------------------------------------------------------------------------------------- shims


class _TokenizerFromPretrained:
    """Stands in for `AutoTokenizer` inside otter_ai's modeling modules: a fresh copy of one tokenizer, offline."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requested = []

    def from_pretrained(self, name, *args, **kwargs):
        self.requested.append(name)
        return copy.deepcopy(self.tokenizer)


@contextlib.contextmanager
def _quiet():
    """otter_ai prints (master_print) and transformers 5 warns about its old-style classes: noise, not results."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def otter_ai_shims(tokenizer):
    """Build otter_ai's models under transformers 5, offline (shims 1-3 of the module docstring)."""
    import peft

    stub = _TokenizerFromPretrained(tokenizer)
    saved = {module: module.AutoTokenizer for module in (modeling_otter, modeling_flamingo)}
    peft_classes = [cls for cls in vars(peft).values() if isinstance(cls, type) and issubclass(cls, peft.PeftModel)]
    names = {cls: cls.__name__ for cls in peft_classes}
    had_alias = hasattr(peft.PeftModel, "master_print_trainable_parameters")
    try:
        for module in saved:
            module.AutoTokenizer = stub
        if not had_alias:
            peft.PeftModel.master_print_trainable_parameters = peft.PeftModel.print_trainable_parameters
        with _quiet():
            yield stub
    finally:
        for module, auto_tokenizer in saved.items():
            module.AutoTokenizer = auto_tokenizer
        if not had_alias:
            del peft.PeftModel.master_print_trainable_parameters
        for cls, name in names.items():
            cls.__name__ = name


# ---------------------------------------------------------------------------------------------------------- configs


def _padded_vocab(n_tokens: int) -> int:
    """MPT-7B-style embedding rows: past the tokenizer, to the next multiple of 64 (always some untrained rows)."""
    return (n_tokens // 64 + 1) * 64


def otter_tokenizer_length(base_tokenizer, answer: bool = True) -> int:
    added = ["<|endofchunk|>", "<image>"] + (["<answer>"] if answer else [])
    vocab = base_tokenizer.get_vocab()
    length = len(base_tokenizer) + sum(token not in vocab for token in added)
    return length + (base_tokenizer.pad_token is None)


def release_config(kind: str, base: str | None = None, *, n_tokens: int, use_media_placement_augmentation=True,
                   max_num_frames: int = 4, lora_config: dict | None = None, config_overrides: dict | None = None,
                   text_overrides: dict | None = None) -> dict:
    """config.json of a tiny release of `kind` (`n_tokens`: the length of the tokenizer Otter builds)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    base = base or DEFAULT_BASE[kind]
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; expected one of {BASES}")
    if kind == "lora" and base not in LORA_TARGETS:
        raise ValueError(f"LoRA runs on {sorted(LORA_TARGETS)} in otter_ai, not on {base!r} (see the module docstring)")
    text = copy.deepcopy(TEXT_CONFIGS[base])
    text["vocab_size"] = n_tokens if base == "llama" else _padded_vocab(n_tokens)
    text.update(text_overrides or {})
    flamingo = kind == "flamingo"
    config = {
        "_commit_hash": None,
        "_name_or_path": f"/checkpoints/tiny-{'flamingo' if flamingo else 'otter'}-{base}",
        "architectures": ["FlamingoForConditionalGeneration" if flamingo else "OtterForConditionalGeneration"],
        "cross_attn_every_n_layers": 2,
        "model_type": "flamingo" if flamingo else "otter",
        "text_config": text,
        "torch_dtype": "float32",
        "transformers_version": None,
        "use_media_placement_augmentation": use_media_placement_augmentation,
        "vision_config": copy.deepcopy(VISION_CONFIG),
    }
    if not flamingo:
        config["only_attend_previous"] = True
    if base == "llama":
        config["tie_word_embeddings"] = False
    if kind == "video":
        config["max_num_frames"] = max_num_frames
    if kind == "lora":
        config["lora_config"] = dict(lora_config or LORA_CONFIG)
    config.update(config_overrides or {})
    return config


# ------------------------------------------------------------------------------------------------------ the model


def build_otter_ai_model(config: dict, tokenizer):
    """otter_ai's Otter (or Flamingo, by model_type) built from a config.json dict, in eval mode, float32."""
    config = copy.deepcopy(config)
    flamingo = config.get("model_type") == "flamingo"
    config_class = configuration_flamingo.FlamingoConfig if flamingo else configuration_otter.OtterConfig
    model_class = (modeling_flamingo.FlamingoForConditionalGeneration if flamingo
                   else modeling_otter.OtterForConditionalGeneration)
    with otter_ai_shims(tokenizer):
        model = model_class(config_class.from_dict(config))
    language_model = _base_language_model(model)
    language_model.use_media_placement_augmentation = False  # shim 4
    for part in (model.vision_encoder, language_model):  # shim 5 (set_attn_implementation refuses Otter's LLaMA
        if part.config.model_type in ("clip_vision_model", "llama"):  # class, made at run time by extend_instance)
            part.config._attn_implementation = "eager"
    return model.eval()


def _base_language_model(model):
    """The (mixin-extended) causal LM inside Otter, under peft's wrappers if any."""
    language_model = model.lang_encoder
    return language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def randomise_(model, seed: int = 0) -> None:
    """
    A seeded, non-trivial value in every parameter: gates open (0.5-0.8, Otter inits them at 0), norms' weights 1 +/-
    0.2 and biases +/- 0.2, matrices normal with std 1/sqrt(fan_in), lora_B non-zero, frame embeddings of unit scale
    (so frames matter), 1-D vectors (biases, CLIP's class embedding) 0.1-scale noise.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, module in model.named_modules() if _is_norm(module)}
    for name, parameter in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        shape = parameter.shape
        if leaf in ("attn_gate", "ff_gate"):
            value = 0.5 + 0.3 * torch.rand(shape, generator=generator)
        elif owner in norms:
            value = (1.0 if leaf == "weight" else 0.0) + 0.2 * torch.randn(shape, generator=generator)
        elif leaf in ("frame_embs", "media_time_embs"):
            value = torch.randn(shape, generator=generator)
        elif parameter.ndim == 1:
            value = 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:])
            scale = 0.5 if "lora_B" in name else 1.0
            value = scale * fan_in ** -0.5 * torch.randn(shape, generator=generator)
        parameter.copy_(value.to(parameter.dtype))


@torch.no_grad()
def round_to_(model, dtype: torch.dtype) -> None:
    """Make the float32 model hold exactly what a `dtype` file stores (the oracle then computes on those values)."""
    for parameter in model.parameters():
        parameter.copy_(parameter.to(dtype).to(parameter.dtype))


# ----------------------------------------------------------------------------------- release names (4.30 layout)

_VISION = "vision_encoder."
_VISION_430 = "vision_encoder.vision_model."
_O_PROJ = re.compile(r"^(.*\.layers\.\d+\.decoder_layer\.self_attn\.)o_proj\.weight$")
_CLASS_EMBEDDING = _VISION + "embeddings.class_embedding"


def _lora_name(name: str, style: str) -> str:
    """peft >= 0.7's in-memory name -> the name `style` stores."""
    if style == "new":
        return name
    name = name.replace(".base_layer.", ".")
    if style == "bare":
        name = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", name)
    return name


def _memory_name(name: str, memory_names) -> str:
    """A stored name (any LoRA style, 4.30 vision prefix) -> its transformers 5 / peft >= 0.7 in-memory name."""
    if name.startswith(_VISION_430):
        name = _VISION + name[len(_VISION_430):]
    match = re.match(r"^(.*\.)(lora_[AB])\.(default\.)?weight$", name)
    if match:
        return f"{match.group(1)}{match.group(2)}.default.weight"
    wrapped = re.sub(r"\.(weight|bias)$", r".base_layer.\1", name)
    return wrapped if name not in memory_names and wrapped in memory_names else name


def _is_430_buffer(name: str) -> bool:
    return name.endswith(("embeddings.position_ids", "rotary_emb.inv_freq"))


def release_state_dict(model, names=None, *, lora_style: str = "new") -> dict[str, torch.Tensor]:
    """
    The state dict transformers 4.30's save_pretrained wrote for `model` (in its order), restricted to the in-memory
    `names` (default: all): `vision_model.` level, LoRA names in `lora_style`, and always the buffers 4.30 kept
    persistent (CLIP's `position_ids`, LLaMA's per-layer `inv_freq`: transformers 5 computes them, so they have no
    in-memory name). The tensors share the model's storage: write them before changing the model.
    """
    if lora_style not in LORA_STYLES:
        raise ValueError(f"unknown lora_style {lora_style!r}; expected one of {LORA_STYLES}")
    state = model.state_dict()
    keep = set(state) if names is None else set(names)
    out = {}
    for name, tensor in state.items():
        stored = _VISION_430 + name[len(_VISION):] if name.startswith(_VISION) else _lora_name(name, lora_style)
        if name in keep:
            out[stored] = tensor.detach()
        if name == _CLASS_EMBEDDING:  # 4.30 CLIPVisionEmbeddings: the persistent buffer right after its parameter
            positions = model.config.vision_config
            count = (positions.image_size // positions.patch_size) ** 2 + 1
            out[_VISION_430 + "embeddings.position_ids"] = torch.arange(count).expand((1, -1)).clone()
        match = _O_PROJ.match(stored)
        if match:  # 4.30 LlamaAttention: rotary_emb (persistent inv_freq) registered after o_proj
            text = model.config.text_config
            head_dim = text.hidden_size // text.num_attention_heads
            inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
            out[match.group(1) + "rotary_emb.inv_freq"] = inv_freq
    return out


def _cast(state: dict, dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return state
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}


def _shards(state: dict, max_shard_size: int) -> list[dict]:
    """transformers 4.30's shard_checkpoint: greedy, in order, a new shard when the next tensor would tip it over."""
    shards, size = [{}], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > max_shard_size and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_weights(folder: Path, state: dict, *, format: str = "bin", max_shard_size: int = 100_000_000) -> list[str]:
    """Write `state` as 4.30's save_pretrained did; returns the weight files written."""
    if format not in ("bin", "safetensors"):
        raise ValueError(f"unknown format {format!r}; expected 'bin' or 'safetensors'")
    folder.mkdir(parents=True, exist_ok=True)
    single = "pytorch_model.bin" if format == "bin" else "model.safetensors"
    shards = _shards(state, max_shard_size)

    def save(shard, path):
        if format == "bin":
            torch.save(shard, path)
        else:
            save_safetensors({k: v.contiguous() for k, v in shard.items()}, str(path), metadata={"format": "pt"})

    if len(shards) == 1:
        save(shards[0], folder / single)
        return [single]
    stem, suffix = single.rsplit(".", 1)
    files, weight_map = [], {}
    for index, shard in enumerate(shards, start=1):
        file = f"{stem}-{index:05d}-of-{len(shards):05d}.{suffix}"
        save(shard, folder / file)
        files.append(file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{single}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def read_release_weights(folder) -> dict[str, torch.Tensor]:
    """Every stored tensor of a release folder, in file order (shards in turn, `weights_only=True`)."""
    folder = Path(folder)
    for single, index in (("pytorch_model.bin", "pytorch_model.bin.index.json"),
                          ("model.safetensors", "model.safetensors.index.json")):
        if (folder / index).exists():
            files = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        elif (folder / single).exists():
            files = [single]
        else:
            continue
        state = {}
        for file in files:
            path = folder / file
            state.update(load_safetensors(str(path)) if file.endswith(".safetensors")
                         else torch.load(path, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"no weights in {folder}")


# --------------------------------------------------------------------------------------------------- the releases


@dataclass
class Release:
    folder: Path
    kind: str
    base: str
    model: nn.Module
    tokenizer: object
    tokenizer_folder: Path
    config: dict
    weight_names: list[str] = field(default_factory=list)
    weight_files: list[str] = field(default_factory=list)

    def token_id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def media_token_id(self) -> int:
        return self.model.media_token_id

    @property
    def eoc_token_id(self) -> int:
        return self.model.eoc_token_id

    @property
    def answer_token_id(self) -> int | None:
        return self.token_id("<answer>") if "<answer>" in self.tokenizer.get_vocab() else None

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id


def save_release(release: Release, folder, *, format: str = "bin", dtype: torch.dtype | None = None,
                 lora_style: str = "new", max_shard_size: int = 100_000_000, config: dict | None = None,
                 tokenizer_in_folder: bool = False) -> Release:
    """
    Write `release.model` as a release folder (config.json + weights). With a `dtype` other than float32 the returned
    Release holds a copy of the model rounded to it (the values the files hold); `release` itself is left alone.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = release.model
    if dtype is not None and dtype != torch.float32:
        model = copy.deepcopy(model)
        round_to_(model, dtype)
    config = config or release.config
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = _cast(release_state_dict(model, lora_style=lora_style), dtype)
    files = write_weights(folder, state, format=format, max_shard_size=max_shard_size)
    if tokenizer_in_folder:
        release.tokenizer.save_pretrained(folder)
    return Release(folder, release.kind, release.base, model, release.tokenizer, release.tokenizer_folder, config,
                   list(state), files)


def write_release(folder, kind: str = "mpt", *, base: str | None = None, format: str = "bin",
                  dtype: torch.dtype | None = None, lora_style: str = "new", max_shard_size: int = 100_000_000,
                  seed: int = 0, use_media_placement_augmentation: bool = True, max_num_frames: int = 4,
                  lora_config: dict | None = None, config_overrides: dict | None = None,
                  text_overrides: dict | None = None, tokenizer_in_folder: bool = False) -> Release:
    """A tiny release of `kind` in `folder` (and its base tokenizer in `folder`-tokenizer), built by Otter's code."""
    folder = Path(folder)
    base = base or DEFAULT_BASE.get(kind)
    base_tokenizer = tiny_tokenizer()
    tokenizer_folder = folder.with_name(folder.name + "-tokenizer")
    base_tokenizer.save_pretrained(tokenizer_folder)
    config = release_config(kind, base, n_tokens=otter_tokenizer_length(base_tokenizer, answer=kind != "flamingo"),
                            use_media_placement_augmentation=use_media_placement_augmentation,
                            max_num_frames=max_num_frames, lora_config=lora_config,
                            config_overrides=config_overrides, text_overrides=text_overrides)
    torch.manual_seed(seed)
    model = build_otter_ai_model(config, base_tokenizer)
    randomise_(model, seed)
    release = Release(folder, kind, base, model, model.text_tokenizer, tokenizer_folder, config)
    return save_release(release, folder, format=format, dtype=dtype, lora_style=lora_style,
                        max_shard_size=max_shard_size, tokenizer_in_folder=tokenizer_in_folder)


def read_trainable_checkpoint(path) -> dict[str, torch.Tensor]:
    """A training checkpoint's state dict (`weights_only=True`; `model_state_dict` unwrapped, `module.` stripped)."""
    content = torch.load(path, map_location="cpu", weights_only=True)
    state = content.get("model_state_dict", content)
    return {name.removeprefix("module."): tensor for name, tensor in state.items()}


def load_release(folder, tokenizer_folder=None, checkpoint=None) -> nn.Module:
    """
    Otter's class rebuilt from `folder`'s config.json and strictly loaded from its files (float32): every stored key
    is used and every model key is stored (the 4.30 buffers aside, which transformers 5 computes). `checkpoint`: a
    training checkpoint laid over the folder's weights, as Otter's converting_otter_pt_to_hf.py does.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    tokenizer_folder = tokenizer_folder or folder.with_name(folder.name + "-tokenizer")
    config = json.loads((folder / "config.json").read_text())
    model = build_otter_ai_model(config, AutoTokenizer.from_pretrained(tokenizer_folder))
    stored = read_release_weights(folder)
    if checkpoint is not None:
        overlay = read_trainable_checkpoint(checkpoint)
        unknown = sorted(set(overlay) - set(stored))
        if unknown:
            raise KeyError(f"checkpoint keys the folder does not have: {unknown[:5]}")
        stored.update(overlay)
    memory_names = set(model.state_dict())
    state = {_memory_name(name, memory_names): tensor.float() if tensor.is_floating_point() else tensor
             for name, tensor in stored.items() if not _is_430_buffer(name)}
    model.load_state_dict(state, strict=True)
    return model.eval()


def example_inputs(release, batch: int = 2, seed: int = 0):
    """
    (vision_x (B, 2, F, 3, 32, 32), input_ids, attention_mask): two-image Otter chats of different lengths, left
    padded with the pad token (Flamingo: captions), images of solid colours through otter_pixel_values.
    """
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    if release.kind == "flamingo":
        prompts = ["<image>Output:a red circle<|endofchunk|><image>Output:", "<image>Output:a photo<|endofchunk|>"
                   "<image>Output:a yellow star above a purple hexagon"]
    else:
        prompts = ["<image>User: what colour is it? GPT:<answer> red<|endofchunk|><image>User: and this? GPT:<answer>",
                   "<image>User: describe the image GPT:<answer> there is a circle<|endofchunk|>"
                   "<image>User: how many shapes are there? GPT:<answer> three"]
    prompts = [prompts[i % 2] for i in range(batch)]
    tokenizer = copy.deepcopy(release.tokenizer)
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    frames = release.config.get("max_num_frames", 1) if release.kind == "video" else 1
    colours = torch.randint(0, 256, (batch * 2 * frames, 3), generator=generator).tolist()
    sizes = [(40 + 8 * (i % 3), 48 - 4 * (i % 2)) for i in range(len(colours))]
    images = [Image.new("RGB", size, tuple(colour)) for size, colour in zip(sizes, colours)]
    vision_x = otter_pixel_values(images).reshape(batch, 2, frames, 3, IMAGE_SIZE, IMAGE_SIZE)
    return vision_x, encoded["input_ids"], encoded["attention_mask"]


# ----------------------------------------------------------------------------------------- trainable checkpoints


@dataclass
class Trained:
    path: Path
    model: nn.Module  # the release's model with the perturbed trainable parameters: the oracle of folder + checkpoint
    state: dict  # what the file holds (after unwrapping), names as stored


def trainable_names(model) -> list[str]:
    """In-memory names of the parameters Otter's init_weights() left trainable (post_init ran it)."""
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def write_trainable_checkpoint(release: Release, path, *, prefix: str = "", wrapped: bool = False,
                               steps: int | None = None, extra: dict | None = None, lora_style: str = "new",
                               dtype: torch.dtype | None = None, seed: int = 1) -> Trained:
    """What Otter's training saves (`get_checkpoint`: trainable parameters + all persistent buffers), perturbed."""
    if prefix not in ("", "module."):
        raise ValueError(f"prefix must be '' or 'module.', not {prefix!r}")
    model = copy.deepcopy(release.model)
    trainable = trainable_names(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name not in trainable:
                continue
            if name.endswith(("attn_gate", "ff_gate")):
                parameter.copy_(0.5 + 0.3 * torch.rand(parameter.shape, generator=generator))
            else:
                parameter.add_(0.05 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    if dtype is not None and dtype != torch.float32:
        round_to_(model, dtype)
    buffers = [name for name, _ in model.named_buffers()]
    state = _cast(release_state_dict(model, trainable + buffers, lora_style=lora_style), dtype)
    content = {prefix + name: tensor for name, tensor in state.items()}
    if wrapped or steps is not None:
        content = {"model_state_dict": content} if steps is None else {"steps": steps, "model_state_dict": content}
    content.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return Trained(path, model.eval(), state)


# ------------------------------------------------------------------------------------------------------ the oracle


def _model(release_or_model):
    return release_or_model.model if isinstance(release_or_model, Release) else release_or_model


@torch.no_grad()
def reference_logits(release_or_model, vision_x, input_ids, attention_mask=None) -> torch.Tensor:
    """
    Otter's forward(vision_x (B, T_img, F, C, H, W), lang_x, attention_mask): logits (B, T, V), float32, no cache.
    Rows at padded positions are garbage (they differ between attention implementations): compare where the mask is 1.
    """
    model = _model(release_or_model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with _quiet():
        output = model(vision_x=vision_x.float(), lang_x=input_ids, attention_mask=attention_mask)
    return output.logits.float()


@torch.no_grad()
def reference_greedy(release_or_model, vision_x, input_ids, attention_mask=None, max_new_tokens: int = 6,
                     suppress=(), eos_token_id: int | None = None, pad_token_id: int | None = None,
                     return_scores: bool = False):
    """Greedy decoding by full forwards (no KV cache); finished rows (after `eos_token_id`) get `pad_token_id`."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    sequences, mask = input_ids, attention_mask
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    scores = []
    for _ in range(max_new_tokens):
        logits = reference_logits(release_or_model, vision_x, sequences, mask)[:, -1]
        if len(suppress):
            logits[:, list(suppress)] = -float("inf")
        scores.append(logits)
        next_tokens = logits.argmax(-1)
        if eos_token_id is not None:
            if pad_token_id is not None:
                next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
            finished |= next_tokens == eos_token_id
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if eos_token_id is not None and bool(finished.all()):
            break
    return (sequences, scores) if return_scores else sequences


def otter_pixel_values(images, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Otter's inference preprocessing (4.30's PIL CLIPImageProcessor at `image_size`): (N, 3, S, S) float32."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    return processor(images=list(images), return_tensors="pt")["pixel_values"]
