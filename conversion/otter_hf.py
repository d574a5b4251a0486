"""
The Otter project's own checkpoints (Luodian's Otter: OTTER-Image-MPT7B, OTTER-Image-LLaMA7B-LA-InContext,
OTTER-Video-LLaMA7B-DenseCaption, OTTER-MPT1B-RPJama-Init, and `luodian/openflamingo-9b-hf` style Flamingo folders)
-> a self-contained folder of this library, exactly.

Such a folder holds `config.json` (`model_type` "otter" or "flamingo", the language model's config in `text_config`,
CLIP's in `vision_config`) and every weight (`pytorch_model-*.bin` + index, read with `weights_only=True`, or
safetensors), but no tokenizer: the Otter project rebuilds it from the language model's. A trainable-only checkpoint
(`final_weights.pt`, `checkpoint_N.pt`) goes over an init folder. The names map by a table (`otter_name`): the
perceiver's and the blocks' `feed_forward` become OpenFlamingo's layout, `lang_encoder.` becomes `language_model.`,
`vision_encoder.vision_model.` becomes `vision_model.`; a LoRA-wrapped language model (`base_model.model.`,
`lora_A`/`lora_B`, old or new peft names) is merged (W += alpha / r * B A, in fp32) or kept as a peft adapter. Every
tensor is accounted for: a missing, unexpected or mis-shaped one is an error naming it and the likely cause.

What differs from the Otter project's code, on purpose: generation keeps the images on every generated token with the
KV cache (the Otter project's LLaMA models lose them after the first token when caching); Flamingo folders attend as
OpenFlamingo v2 does (the project's Flamingo class picks a random text-to-image attention at every forward while its
config's `use_media_placement_augmentation` is on); generation never produces the embedding rows past the tokenizer,
`<PAD>` or `<image>`.
"""

import json
import logging
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPVisionConfig, GenerationConfig, LlamaConfig, MptConfig

from otter.configuration_otter import OtterConfig
from otter.factory import PAD_TOKEN, clip_image_processor, video_frames
from otter.language_models import build_language_model, lora_target_pattern
from otter.model_card import CHAT_PROMPT, CAPTION_PROMPT, describe, hub_id, model_card, usage
from otter.modeling_otter import OtterForConditionalGeneration
from otter.processing_otter import OtterProcessor
from otter.prompts import ANSWER_TOKEN, END_OF_CHUNK, IMAGE_TOKEN

from . import mosaic_gpt
from .folders import atomic_folder, known_license, limit_tokenizer_length, local_folder
from .weights import CheckpointFiles, Take, parse_dtype, saved_names, weight_files, write_model

logger = logging.getLogger(__name__)

# the tokenizers the Otter project's classes build their models with (a LLaMA model's is its `_name_or_path`)
DEFAULT_TOKENIZERS = {"mpt": "mosaicml/mpt-7b-instruct", "mosaic": "mosaicml/mosaic-llama-redpajama-final-candidate"}
# what the Otter project's demos ban in generation (its chat format's speaker labels)
BAD_WORDS = ("User:", "GPT1:", "GFT:", "GPT:")
LORA_MODES = ("merge", "adapter")
# the Otter project's hard-coded sizes (vis_dim, perceiver, cross-attention): this library's OtterConfig defaults
VISION_WIDTH = 1024
# llm-foundry's MPT attention defaults (Otter's vendored copy), for settings a config leaves out
MPT_ATTENTION_DEFAULTS = {"attn_type": "multihead_attention", "qk_ln": False, "clip_qkv": None, "softmax_scale": None,
                          "prefix_lm": False, "alibi": False, "alibi_bias_max": 8}
EMBEDDINGS = {"mpt": "transformer.wte.weight", "mosaic": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}
SKIPPED = re.compile(r"(^|\.)position_ids$|rotary_emb\.inv_freq$")  # buffers 4.3x saved and today's classes compute
LORA_KEY = re.compile(r"^(?P<module>.*)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


def vendored_mpt_config(text: dict) -> MptConfig:
    """
    transformers' `MptConfig` computing what the Otter project's vendored (llm-foundry) MPT computes from `text`; a
    setting transformers' MPT cannot express is an error naming it.
    """
    attention = {**MPT_ATTENTION_DEFAULTS, **(text.get("attn_config") or {})}
    needed = {
        "attn_config.alibi": (attention["alibi"], True),  # without ALiBi llm-foundry adds learned positions (wpe)
        "attn_config.attn_type": (attention["attn_type"], "multihead_attention"),
        "attn_config.prefix_lm": (attention["prefix_lm"], False),
        "no_bias": (text.get("no_bias", False), True),
        "expansion_ratio": (text.get("expansion_ratio", 4), 4),
        "logit_scale": (text.get("logit_scale"), None),
        "norm_type": (text.get("norm_type", "low_precision_layernorm") in ("low_precision_layernorm", "layernorm"),
                      True),
    }
    for name, (value, expected) in needed.items():
        if value != expected:
            shown = text.get("norm_type") if name == "norm_type" else value
            raise ValueError(f"the language model's {name}={shown!r} cannot be expressed by transformers' MPT "
                             f"(it computes {name}={expected!r}): this checkpoint cannot be converted exactly")
    return MptConfig(
        d_model=text["d_model"], n_heads=text["n_heads"], n_layers=text["n_layers"], expansion_ratio=4,
        max_seq_len=text["max_seq_len"], vocab_size=text["vocab_size"], no_bias=True,
        embedding_fraction=text.get("embedding_fraction", 1.0),
        attn_config={"attn_pdrop": 0, "clip_qkv": attention["clip_qkv"], "softmax_scale": attention["softmax_scale"],
                     "qk_ln": bool(attention["qk_ln"]), "alibi": True, "alibi_bias_max": attention["alibi_bias_max"]},
        tie_word_embeddings=True,
    )


def llama_config(text: dict) -> LlamaConfig:
    """transformers' `LlamaConfig` from the Otter project's (transformers 4.3x) one; the defaults are LLaMA-7B's."""
    known = set(LlamaConfig().to_dict())
    return LlamaConfig(**{name: value for name, value in text.items() if name in known and name != "model_type"})


def language_model_config(release: dict) -> tuple[str, object]:
    """(family, transformers config) of the release's language model: "mpt", "mosaic" or "llama"."""
    text = release.get("text_config") or {}
    architecture = (text.get("architectures") or [None])[0]
    model_type = text.get("model_type")
    if architecture == "MPTForCausalLM" or architecture is None and model_type == "mpt":
        return "mpt", vendored_mpt_config(text)
    if architecture == "MosaicGPT" or model_type == "mosaic_gpt":
        return "mosaic", mosaic_gpt.mpt_config({**text, "model_type": "mosaic_gpt"})
    if architecture == "LlamaForCausalLM" or model_type == "llama" or "llama" in str(text.get("_name_or_path", "")):
        return "llama", llama_config(text)
    if architecture == "RWForCausalLM":
        raise ValueError("a Falcon (RWForCausalLM) language model: its Otter-project code has no counterpart here")
    raise ValueError(f"unknown language model in text_config (architectures {text.get('architectures')}, model_type "
                     f"{model_type!r}); expected MPTForCausalLM, MosaicGPT or LlamaForCausalLM")


def otter_name(key: str, family: str) -> str | None:
    """
    A tensor name of the Otter project's checkpoints -> its name in this library's model (in memory), None for a
    buffer today's classes compute. LoRA adapter tensors (`lora_A`/`lora_B`) are named as they stand: the caller
    takes them apart.
    """
    if SKIPPED.search(key):
        return None
    if key.startswith("vision_encoder.vision_model."):
        return "vision_model." + key[len("vision_encoder.vision_model."):]
    if key.startswith("perceiver."):
        key = re.sub(r"^perceiver\.layers\.(\d+)\.feed_forward\.", r"perceiver.layers.\1.1.", key)
        return re.sub(r"^perceiver\.layers\.(\d+)\.(?=norm_media|norm_latents|to_q|to_kv|to_out)",
                      r"perceiver.layers.\1.0.", key)
    if key.startswith("lang_encoder."):
        key = key[len("lang_encoder."):].removeprefix("base_model.model.").replace(".base_layer.", ".")
        key = key.replace(".gated_cross_attn_layer.feed_forward.", ".gated_cross_attn_layer.ff.")
        if family == "mosaic":  # mosaic_gpt's own names (ln_1, mlp.mlp_up, ...): the cross-attention has none of them
            key = mosaic_gpt.mpt_name(key)
        return "language_model." + key
    return key  # unexpected: named as it stands, and reported


def _read_release(folder: Path) -> dict:
    config_file = folder / "config.json"
    try:
        release = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder} is not an Otter-project model folder: cannot read {config_file} ({error})") from None
    if release.get("model_type") not in ("otter", "flamingo"):
        raise ValueError(f"{folder} is not an Otter-project model folder: its model_type is "
                         f"{release.get('model_type')!r}, expected 'otter' or 'flamingo'")
    if "perceiver_num_latents" in release:
        raise ValueError(f"{folder} is a folder of this library already: load it with from_pretrained")
    return release


def build_tokenizer(name: str, flamingo: bool):
    """The tokenizer the Otter project builds: the language model's, with `<|endofchunk|>`, `<image>`, `<answer>`
    (Otter) and then `<PAD>` when it has no pad token, in that order."""
    tokenizer = AutoTokenizer.from_pretrained(local_folder(name, "tokenizer"))
    added = [END_OF_CHUNK, IMAGE_TOKEN] + ([] if flamingo else [ANSWER_TOKEN])
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def convert_otter(out, model: str, checkpoint: str | None = None, tokenizer: str | None = None, lora: str = "merge",
                  dtype: str = "float32", max_shard_size: str = "2GB", command: str | None = None) -> None:
    """
    Writes an Otter-project model (a folder or hub id: `model`; with `checkpoint`, a trainable-only `.pt` over it) as
    a folder of this library, atomically: config, sharded safetensors, tokenizer and processor (Otter's preprocessing:
    transformers' CLIP crop), generation config (Otter's chat decoding), chat template and model card.

    tokenizer: the language model's tokenizer (a folder or hub id); default: what the Otter project's code loads
        for the family (mosaicml/mpt-7b-instruct for MPT; a LLaMA model's `text_config._name_or_path`).
    lora: "merge" folds LoRA adapters into the weights; "adapter" keeps them in `out/lora-adapter` (peft's format,
        `model.load_adapter(out + "/lora-adapter")`).
    """
    torch_dtype = parse_dtype(dtype)
    if lora not in LORA_MODES:
        raise ValueError(f"lora must be one of {LORA_MODES}, got {lora!r}")
    folder = local_folder(model, "Otter model")
    release = _read_release(folder)
    flamingo = release["model_type"] == "flamingo"
    family, text_config = language_model_config(release)

    sources = [CheckpointFiles(weight_files(folder))]
    if checkpoint is not None:
        sources.insert(0, CheckpointFiles([checkpoint]))  # a trainable-only checkpoint wins over its init folder
    names = {}  # this library's name (or a LoRA tensor's) -> (source, key)
    skipped = 0
    for source in reversed(sources):
        for key in source.names():
            name = otter_name(key, family)
            if name is None:
                skipped += 1
            else:
                names[name] = (source, key)
    if skipped:
        logger.info("%d stored buffers (position ids, rotary frequencies) that today's classes compute were skipped",
                    skipped)
    adapters = {name: names.pop(name) for name in [name for name in names if LORA_KEY.match(name)]}

    embedding = f"language_model.{EMBEDDINGS[family]}"
    if embedding not in names:
        raise ValueError(f"{model} has no {embedding.replace('language_model.', 'lang_encoder.')}: not an Otter-project "
                         f"checkpoint of a {family} language model?")
    source, key = names[embedding]
    rows = source.info[key].shape[0]
    text_config.vocab_size = rows
    if family == "llama" and text_config.hidden_size != source.info[key].shape[1]:
        raise ValueError(f"{key} has width {source.info[key].shape[1]}, but the LLaMA config says "
                         f"{text_config.hidden_size}: the text_config does not describe these weights")
    tokenizer_name = tokenizer or DEFAULT_TOKENIZERS.get(family) or release["text_config"].get("_name_or_path")
    if not tokenizer_name:
        raise ValueError("the language model's tokenizer is not named in the config: give --tokenizer")
    text_tokenizer = build_tokenizer(tokenizer_name, flamingo)
    if len(text_tokenizer) > rows:
        raise ValueError(f"the tokenizer {tokenizer_name} has {len(text_tokenizer)} tokens with Otter's, but the "
                         f"model's embeddings have {rows} rows: the wrong tokenizer (--tokenizer)")
    limit_tokenizer_length(text_tokenizer, text_config)

    vision = release.get("vision_config") or {}
    known = set(CLIPVisionConfig().to_dict())
    vision_config = CLIPVisionConfig(**{name: value for name, value in vision.items() if name in known})
    if vision_config.hidden_size != VISION_WIDTH:
        raise ValueError(f"the vision tower is {vision_config.hidden_size} wide; the Otter project's code takes "
                         f"{VISION_WIDTH} (ViT-L/14) only")
    config = OtterConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        cross_attn_every_n_layers=release.get("cross_attn_every_n_layers", 4),
        max_num_frames=release.get("max_num_frames") if not flamingo else None,
        media_token_id=text_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        eoc_token_id=text_tokenizer.convert_tokens_to_ids(END_OF_CHUNK),
        pad_token_id=text_tokenizer.pad_token_id,
    )
    with torch.device("meta"):
        meta = OtterForConditionalGeneration(config)
    plan = _plan(meta, names, adapters, release, lora)

    with atomic_folder(out) as partial:
        write_model(partial, meta, plan, torch_dtype, max_shard_size)
        if adapters and lora == "adapter":
            _write_adapter(partial / "lora-adapter", adapters, release, text_config.model_type, torch_dtype)
        generation = GenerationConfig(
            eos_token_id=config.eoc_token_id, pad_token_id=config.pad_token_id,
            bad_words_ids=None if flamingo else text_tokenizer(list(BAD_WORDS), add_special_tokens=False)["input_ids"],
            # never generated: the embedding rows past the tokenizer (never trained), <PAD> and <image>
            suppress_tokens=sorted({config.pad_token_id, config.media_token_id, *range(len(text_tokenizer), rows)}),
        )
        generation.save_pretrained(partial)
        image_processor = clip_image_processor(vision_config.image_size, crop_offset="floor")
        OtterProcessor(image_processor=image_processor, tokenizer=text_tokenizer,
                       num_frames=video_frames(config)).save_pretrained(partial)
        _card(out, model, checkpoint, tokenizer_name, folder, config, family, flamingo, adapters, lora, dtype,
              command).save(partial / "README.md")


def _lora_scale(release: dict) -> float:
    settings = release.get("lora_config")
    if not isinstance(settings, dict) or not {"r", "lora_alpha"} <= set(settings):
        raise ValueError("the weights hold LoRA adapters but the config has no lora_config with r and lora_alpha")
    return settings["lora_alpha"] / settings["r"]


def _merged(sources: dict, scale: float):
    """W + scale * B A, in float32 (the adapters read when the weight is written)."""
    (a_source, a_key), (b_source, b_key) = sources["A"], sources["B"]

    def merge(weight: torch.Tensor) -> torch.Tensor:
        a = a_source.read([a_key])[a_key].float()
        b = b_source.read([b_key])[b_key].float()
        return weight.float() + scale * (b @ a)

    return merge


def _plan(meta, names: dict, adapters: dict, release: dict, lora: str) -> dict[str, Take]:
    """{parameter name in memory: Take} for every saved parameter; missing, unexpected and mis-shaped ones named."""
    state = meta.state_dict()
    by_saved = saved_names(meta)
    needed = set(by_saved.values())
    plan, unexpected, mismatched = {}, [], []
    for name, (source, key) in names.items():
        if name not in needed:
            unexpected.append(key)
        elif source.info[key].shape != tuple(state[name].shape):
            mismatched.append(f"{key} {source.info[key].shape} vs {tuple(state[name].shape)}")
        else:
            plan[name] = Take(source, key)
    by_module = {}
    for name, found in adapters.items():
        match = LORA_KEY.match(name)
        by_module.setdefault(match["module"] + ".weight", {})[match["which"]] = found
    if by_module and lora == "merge":
        scale = _lora_scale(release)
        for weight, pair in by_module.items():
            if weight not in plan or set(pair) != {"A", "B"}:
                unexpected.extend(key for _, key in pair.values())
            else:
                plan[weight] = Take(plan[weight].source, plan[weight].name, _merged(pair, scale))
    missing = sorted(needed - set(plan))
    if missing or unexpected or mismatched:
        lines = ["the Otter-project checkpoint does not fit the model its config describes:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:8])}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(sorted(unexpected)[:8])}")
        if mismatched:
            lines.append(f"  of another shape ({len(mismatched)}): {', '.join(mismatched[:4])}")
        if any("gated_cross_attn_layer" in entry for entry in missing + unexpected):
            lines.append(f"likely cause: cross_attn_every_n_layers ({meta.config.cross_attn_every_n_layers}) does not "
                         "match the checkpoint's blocks")
        if any("frame_embs" in entry for entry in missing + unexpected + mismatched):
            lines.append(f"likely cause: max_num_frames ({meta.config.max_num_frames}) does not match the perceiver's "
                         "frame embeddings")
        if len(missing) > len(needed) // 2:
            lines.append("likely cause: a trainable-only checkpoint: give the folder it was trained from as --model and "
                         "the file as --checkpoint")
        raise ValueError("\n".join(lines))
    return plan


def _write_adapter(folder: Path, adapters: dict, release: dict, model_type: str, dtype: torch.dtype) -> None:
    """The LoRA adapters as a peft adapter folder for this library's module names (`model.load_adapter(folder)`)."""
    from peft import LoraConfig

    settings = release["lora_config"]
    modules = sorted({LORA_KEY.match(name)["module"].rsplit(".", 1)[-1] for name in adapters})
    LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings.get("lora_dropout", 0.0),
               target_modules=lora_target_pattern(model_type, modules)).save_pretrained(folder)
    tensors = {}
    for name, (source, key) in adapters.items():
        match = LORA_KEY.match(name)
        tensors[f"base_model.model.{match['module']}.lora_{match['which']}.weight"] = \
            source.read([key])[key].to(dtype).contiguous()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def _card(out, model, checkpoint, tokenizer_name, folder, config, family, flamingo, adapters, lora, dtype, command):
    license = known_license(model, folder)
    notes = [f"Language model: {family} ({config.text_config.model_type} here); cross_attn_every_n_layers="
             f"{config.cross_attn_every_n_layers}; max_num_frames={config.max_num_frames}; dtype {dtype}.",
             "Images are preprocessed as the Otter project's demos do (transformers' CLIPImageProcessor: shortest side "
             f"to {config.vision_config.image_size}, bicubic, centre crop with a floored offset).",
             "Generation stops at <|endofchunk|> and never produces <PAD>, <image> or the embedding rows past the "
             "tokenizer" + ("" if flamingo else f"; it bans {', '.join(BAD_WORDS)} as Otter's demos do (they also "
                                                 "decode with num_beams=3, no_repeat_ngram_size=3)") + ".",
             "Cached generation keeps the images on every generated token (the Otter project's LLaMA models lose "
             "them after the first one when caching)."]
    if adapters:
        notes.append("LoRA adapters: " + ("merged into the weights (W += alpha / r * B A, in float32)." if lora == "merge"
                                          else "in lora-adapter/: `model.load_adapter(path + '/lora-adapter')`."))
    return model_card(
        f"{Path(str(model)).name}: an Otter-project model as an Otter folder",
        describe(config) + " Converted from the Otter project's format by `otter convert otter`: it computes what "
        "the Otter project's code computes.",
        usage(Path(out).name, CAPTION_PROMPT if flamingo else CHAT_PROMPT),
        base_model=hub_id(model),
        license=license,
        license_note=None if license else (f"Not stated: the license of {model} (and of its language model) applies. "
                                           "Set `license` in the metadata above before publishing it."),
        sources={"Otter-project model": str(model), **({"trainable-only checkpoint": str(checkpoint)}
                                                         if checkpoint else {}), "tokenizer": tokenizer_name},
        command=command,
        notes=notes,
        tags=["otter-ai", "flamingo" if flamingo else "mimic-it"],
    )


__all__ = ["convert_otter", "otter_name", "vendored_mpt_config", "language_model_config"]
