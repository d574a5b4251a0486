"""
OpenFlamingo v2 `checkpoint.pt` + the parts it was trained with -> a self-contained Otter folder, exactly.

A released checkpoint holds only what OpenFlamingo trained (perceiver, gated cross-attention) plus every parameter
whose name contains `embed`. The rest comes from the open_clip vision tower and the language-model folder. The
checkpoint's names map onto Otter's by one prefix (`lang_encoder.` -> `language_model.`); the language model's own
names by that prefix plus `.decoder_layer` inside each wrapped decoder layer. Every tensor of the checkpoint is
accounted for: a missing, unexpected or mis-shaped one is an error that names it and the likely cause.
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from otter.configuration_otter import OtterConfig
from otter.factory import add_special_tokens, clip_image_processor
from otter.language_models import build_language_model, decoder_layers_path
from otter.model_card import CAPTION_PROMPT, describe, hub_id, model_card, usage
from otter.modeling_otter import OtterForConditionalGeneration
from otter.processing_otter import OtterProcessor
from otter.prompts import END_OF_CHUNK, IMAGE_TOKEN

from . import mosaic_gpt, open_clip
from .folders import atomic_folder, known_license, limit_tokenizer_length, local_file, local_folder
from .weights import CheckpointFiles, Take, parse_dtype, saved_names, weight_files, write_model

logger = logging.getLogger(__name__)

ALIASES = ("lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")
# buffers that older checkpoints persisted and today's classes recompute (as transformers' loader ignores them)
RECOMPUTED_BUFFERS = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")


@dataclass(frozen=True)
class Preset:
    """A released OpenFlamingo v2 model: where its checkpoint lives, what it was trained with."""

    repo: str
    lang_encoder: str
    cross_attn_every_n_layers: int
    num_layers: int
    hidden_size: int
    vision_encoder: str = "ViT-L-14"
    vision_pretrained: str = "openai"


PRESETS = {
    "OpenFlamingo-3B-vitl-mpt1b": Preset("openflamingo/OpenFlamingo-3B-vitl-mpt1b",
                                         "anas-awadalla/mpt-1b-redpajama-200b", 1, 24, 2048),
    "OpenFlamingo-3B-vitl-mpt1b-langinstruct": Preset("openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
                                                      "anas-awadalla/mpt-1b-redpajama-200b-dolly", 1, 24, 2048),
    "OpenFlamingo-4B-vitl-rpj3b": Preset("openflamingo/OpenFlamingo-4B-vitl-rpj3b",
                                         "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, 32, 2560),
    "OpenFlamingo-4B-vitl-rpj3b-langinstruct": Preset("openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
                                                      "togethercomputer/RedPajama-INCITE-Instruct-3B-v1", 2, 32, 2560),
    "OpenFlamingo-9B-vitl-mpt7b": Preset("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "anas-awadalla/mpt-7b", 4, 32, 4096),
}


def _listed(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _memory_name(name: str, by_saved_name: dict[str, str], memory_names) -> str | None:
    """A tensor name as saved (transformers 4 naming) or as in memory -> its name in memory, or None."""
    return by_saved_name.get(name, name if name in memory_names else None)


def language_model_plan(folder: Path):
    """
    (config, {parameter name in the LM: Take}) for a language-model folder: native transformers, or mosaic_gpt
    (converted on the fly). A tensor the LM has no place for is an error, except buffers today's classes recompute.
    """
    if mosaic_gpt.is_mosaic_gpt(folder):
        config = mosaic_gpt.mpt_config(json.loads((folder / "config.json").read_text()))
        return config, mosaic_gpt.mosaic_plan(folder, config)
    config = AutoConfig.from_pretrained(folder)
    source = CheckpointFiles(weight_files(folder))
    with torch.device("meta"):
        meta = build_language_model(config)
    memory_names = set(meta.state_dict())
    by_saved_name = saved_names(meta)
    ignored = re.compile("|".join([*RECOMPUTED_BUFFERS, *(meta._keys_to_ignore_on_load_unexpected or [])]))
    plan, unexpected, skipped = {}, [], []
    for name in source.names():
        memory = _memory_name(name, by_saved_name, memory_names)
        if memory is not None:
            plan[memory] = Take(source, name)
        elif ignored.search(name):
            skipped.append(name)
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"language model {folder}: tensors with no place in {type(meta).__name__}: {_listed(unexpected)}")
    if skipped:
        logger.info("language model: %d stored buffers that %s recomputes were skipped", len(skipped), type(meta).__name__)
    return config, plan


def _resize_rows(rows: int):
    """Resize an output embedding to `rows`: cut (as resize_token_embeddings does) or add rows equal to the mean."""

    def resize(tensor):
        if tensor.shape[0] >= rows:
            return tensor[:rows]
        return torch.cat([tensor, tensor.mean(0, keepdim=True).expand(rows - tensor.shape[0], -1)])

    return resize


def _cross_attention_layers(names, layers_path: str) -> list[int]:
    pattern = re.compile(rf"^lang_encoder\.{re.escape(layers_path)}\.(\d+)\.gated_cross_attn_layer\.")
    return sorted({int(match.group(1)) for name in names if (match := pattern.match(name))})


def infer_every_n_layers(layers: list[int], num_layers: int) -> int | None:
    """n such that the blocks sit before layers i with (i + 1) % n == 0, or None when no n fits."""
    if not layers:
        return None
    every_n = layers[0] + 1
    return every_n if layers == [i for i in range(num_layers) if (i + 1) % every_n == 0] else None


def convert_openflamingo(
    out,
    checkpoint: str | None = None,
    lang_encoder: str | None = None,
    vision_encoder: str | None = None,
    vision_pretrained: str | None = None,
    tokenizer: str | None = None,
    cross_attn_every_n_layers: int | None = None,
    preset: str | None = None,
    dtype: str = "float32",
    max_shard_size: str = "2GB",
    quick_gelu: bool | None = None,
    vision_feature_post_layernorm: bool = False,
    command: str | None = None,
) -> None:
    """
    Writes an OpenFlamingo checkpoint and its parts as an Otter folder (config, sharded safetensors, tokenizer and
    processor, generation config, model card), atomically.

    checkpoint: OpenFlamingo's `checkpoint.pt` (a state dict, possibly under `model_state_dict` or with `module.`).
    lang_encoder, tokenizer: local folders or hub ids already in the Hugging Face cache; the tokenizer defaults to the
        language model's folder. A mosaic_gpt folder (MPT-1B-RedPajama) is converted on the fly.
    vision_encoder, vision_pretrained: an open_clip model name or model-config JSON; a pretrained tag or weights file.
    cross_attn_every_n_layers: checked against the checkpoint; inferred from it when not given.
    preset: a released model (PRESETS): fills in n, the vision encoder, the LM (checked) and the checkpoint.
    quick_gelu: None takes what the vision weights were trained with. vision_feature_post_layernorm=False keeps the
        released models' pre-`ln_post` vision tokens.
    """
    torch_dtype = parse_dtype(dtype)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        release = PRESETS[preset]
        for name, given, expected in (("cross_attn_every_n_layers", cross_attn_every_n_layers,
                                       release.cross_attn_every_n_layers),
                                      ("vision_encoder", vision_encoder, release.vision_encoder),
                                      ("vision_pretrained", vision_pretrained, release.vision_pretrained)):
            if given is not None and given != expected:
                raise ValueError(f"{preset} was trained with {name}={expected!r}, not {given!r}")
        cross_attn_every_n_layers = release.cross_attn_every_n_layers
        vision_encoder, vision_pretrained = release.vision_encoder, release.vision_pretrained
        lang_encoder = lang_encoder or release.lang_encoder
        checkpoint = checkpoint or str(local_file(release.repo, "checkpoint.pt"))
    for name, value in (("checkpoint", checkpoint), ("lang_encoder", lang_encoder), ("vision_encoder", vision_encoder),
                        ("vision_pretrained", vision_pretrained)):
        if value is None:
            raise ValueError(f"{name} is required (or name a preset: {', '.join(PRESETS)})")

    lm_folder = local_folder(lang_encoder, "language model")
    text_config, lm_plan = language_model_plan(lm_folder)
    if preset is not None:
        release = PRESETS[preset]
        found = (text_config.num_hidden_layers, text_config.hidden_size)
        if found != (release.num_layers, release.hidden_size) or text_config.model_type not in ("mpt", "gpt_neox"):
            raise ValueError(f"{lang_encoder} ({text_config.model_type}, {found[0]} layers, width {found[1]}) is not "
                             f"{preset}'s language model {release.lang_encoder} ({release.num_layers} layers, width "
                             f"{release.hidden_size})")
    text_tokenizer = AutoTokenizer.from_pretrained(local_folder(tokenizer, "tokenizer") if tokenizer else lm_folder)
    add_special_tokens(text_tokenizer)
    limit_tokenizer_length(text_tokenizer, text_config)

    weights = CheckpointFiles([checkpoint])
    layers_path = decoder_layers_path(text_config.model_type)
    with torch.device("meta"):
        meta_lm = build_language_model(text_config)
    embedding_name = next(name for name, parameter in meta_lm.named_parameters()
                          if parameter is meta_lm.get_input_embeddings().weight)
    embedding_key = f"lang_encoder.{embedding_name}"
    if embedding_key not in weights:
        raise ValueError(f"{checkpoint} has no {embedding_key}: OpenFlamingo checkpoints hold the LM's input "
                         f"embeddings (wrong --lang-encoder, or not an OpenFlamingo checkpoint?)")
    vocab_rows = weights.info[embedding_key].shape[0]
    if vocab_rows != len(text_tokenizer):
        raise ValueError(
            f"the checkpoint's {embedding_key} has {vocab_rows} rows, but the tokenizer has {len(text_tokenizer)} "
            f"tokens after adding {END_OF_CHUNK}, {IMAGE_TOKEN} (and <PAD>): wrong vocabulary (--tokenizer or "
            "--lang-encoder?)"
        )

    num_layers = text_config.num_hidden_layers
    checkpoint_layers = _cross_attention_layers(weights.names(), layers_path)
    inferred = infer_every_n_layers(checkpoint_layers, num_layers)
    if cross_attn_every_n_layers is None:
        if inferred is None:
            raise ValueError(f"cannot infer cross_attn_every_n_layers: the checkpoint has cross-attention before "
                             f"layers {checkpoint_layers} of a {num_layers}-layer language model (wrong --lang-encoder?)")
        cross_attn_every_n_layers = inferred
        logger.info("cross_attn_every_n_layers=%d, read off the checkpoint", inferred)

    vision = open_clip.resolve(vision_encoder, vision_pretrained)
    vision_config = open_clip.vision_config(vision, quick_gelu)
    text_config.vocab_size = vocab_rows
    config = OtterConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        media_token_id=text_tokenizer.encode(IMAGE_TOKEN)[-1],
        eoc_token_id=text_tokenizer.encode(END_OF_CHUNK)[-1],
        pad_token_id=text_tokenizer.pad_token_id,
        vision_feature_post_layernorm=vision_feature_post_layernorm,
    )
    with torch.device("meta"):
        model = OtterForConditionalGeneration(config)
    plan = _plan(model, weights, lm_plan, layers_path, checkpoint_layers, inferred)
    plan.update(open_clip.vision_plan(CheckpointFiles([vision.weights]), vision_config, prefix="vision_model."))

    with atomic_folder(out) as folder:
        write_model(folder, model, plan, torch_dtype, max_shard_size)
        model.generation_config.save_pretrained(folder)
        processor = OtterProcessor(image_processor=clip_image_processor(**open_clip.preprocessing(vision)),
                                   tokenizer=text_tokenizer)
        processor.save_pretrained(folder)
        _model_card(out, preset, checkpoint, lang_encoder, lm_folder, tokenizer, vision_encoder, vision_pretrained,
                    config, dtype, command).save(folder / "README.md")


def _model_card(out, preset, checkpoint, lang_encoder, lm_folder, tokenizer, vision_encoder, vision_pretrained,
                config: OtterConfig, dtype: str, command: str | None):
    """
    The converted folder's card: what it is, its sources, the exact command, and its license. A release's is its
    language model's (OpenFlamingo's weights and OpenAI's CLIP are MIT); another checkpoint's is not known here.
    """
    lm_license = known_license(lang_encoder, lm_folder)
    if preset is not None:
        lm_license = lm_license or known_license(PRESETS[preset].lang_encoder)
    if preset is not None and lm_license:
        license = lm_license
        license_note = (f"`{lm_license}`, the license of the language model {lang_encoder}. The other weights are "
                        f"MIT-licensed: OpenFlamingo's release ({PRESETS[preset].repo}) and OpenAI's CLIP "
                        f"{vision_encoder}.")
    else:
        license = None
        lm_terms = f"`{lm_license}`" if lm_license else "its own license"
        license_note = (f"Not stated: this folder holds the weights of {checkpoint}, of the language model "
                        f"{lang_encoder} ({lm_terms}) and of the vision encoder (open_clip {vision_encoder}, "
                        f"{vision_pretrained}); their licenses apply. Set `license` in the metadata above before "
                        "publishing it.")
    vision_tokens = "after" if config.vision_feature_post_layernorm else "before"
    return model_card(
        f"{preset or Path(checkpoint).parent.name}: OpenFlamingo as an Otter model",
        describe(config) + " Converted from OpenFlamingo by Otter (`otter convert openflamingo`): it computes what "
        "OpenFlamingo computes, and takes OpenFlamingo's prompts (`<image>Output:` asks for a caption).",
        usage(Path(out).name, CAPTION_PROMPT),
        base_model=PRESETS[preset].repo if preset is not None else hub_id(lang_encoder),
        license=license,
        license_note=license_note,
        sources={"OpenFlamingo checkpoint": checkpoint, "language model": lang_encoder,
                 "tokenizer": tokenizer or lang_encoder,
                 "vision encoder": f"open_clip {vision_encoder}, {vision_pretrained}"},
        command=command,
        notes=[f"cross_attn_every_n_layers={config.cross_attn_every_n_layers}; dtype {dtype}; vision activation "
               f"{config.vision_config.hidden_act}; vision tokens {vision_tokens} ln_post.",
               "Generation stops at <|endofchunk|>."],
        tags=["openflamingo"],
    )


def _plan(model, weights: CheckpointFiles, lm_plan: dict[str, Take], layers_path: str, checkpoint_layers: list[int],
          inferred_every_n: int | None) -> dict[str, Take]:
    """{Otter parameter name in memory: Take} for the language model, perceiver and cross-attention."""
    state = model.state_dict()
    by_saved_name = saved_names(model)
    saved_name = {memory: saved for saved, memory in by_saved_name.items()}
    tied = model.all_tied_weights_keys
    layer_pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.")

    plan = {}
    for name, take in lm_plan.items():
        plan["language_model." + layer_pattern.sub(rf"{layers_path}.\1.decoder_layer.", name)] = take

    unexpected, mismatched, aliases, tied_copies = [], [], 0, {}
    for key in weights.names():
        if key.startswith(ALIASES):
            aliases += 1  # the same modules again, under OpenFlamingo's alias lists
            continue
        name = "language_model." + key[len("lang_encoder."):] if key.startswith("lang_encoder.") else key
        memory = _memory_name(name, by_saved_name, state)
        if memory is None or not memory.startswith(("perceiver.", "language_model.")):
            unexpected.append(key)
        elif memory in tied and memory not in saved_name:
            tied_copies[key] = tied[memory]  # e.g. MPT's lm_head, tied to wte: must equal what it is tied to
        elif weights.info[key].shape != tuple(state[memory].shape):
            mismatched.append(f"{key} {weights.info[key].shape} vs {tuple(state[memory].shape)}")
        else:
            plan[memory] = Take(weights, key)
    if aliases:
        logger.info("%d alias entries (old_decoder_blocks, gated_cross_attn_layers) skipped", aliases)

    from_checkpoint = {memory for memory, take in plan.items() if take.source is weights}
    required = {memory for saved, memory in by_saved_name.items()
                if memory.startswith("perceiver.") or ".gated_cross_attn_layer." in memory
                or (memory.startswith("language_model.") and "embed" in saved)}
    missing = sorted("lang_encoder." + saved_name[memory][len("language_model."):]
                     if memory.startswith("language_model.") else memory for memory in required - from_checkpoint)

    output_embeddings = model.get_output_embeddings()
    head = next((name for name, parameter in model.named_parameters() if parameter is output_embeddings.weight), None)
    if head is not None and head in plan and head not in from_checkpoint:
        rows = state[head].shape[0]
        if plan[head].source.info[plan[head].name].shape[0] != rows:
            logger.warning("%s is untied from the input embeddings and not in the checkpoint: its rows are resized "
                           "to %d, new rows set to the mean row (OpenFlamingo left them random)", head, rows)
            plan[head] = Take(plan[head].source, plan[head].name, _resize_rows(rows))
    for memory, take in plan.items():  # the language model's own tensors
        if take.source is not weights and take.transform is None:
            if take.source.info[take.name].shape != tuple(state[memory].shape):
                mismatched.append(f"{take.name} {take.source.info[take.name].shape} vs {tuple(state[memory].shape)}")

    if missing or unexpected or mismatched:
        raise ValueError(_mismatch_report(missing, unexpected, mismatched, model, checkpoint_layers, inferred_every_n))
    for key, source in tied_copies.items():
        take = plan[source]
        if not torch.equal(weights.read([key])[key], take.source.read([take.name])[take.name]):
            raise ValueError(f"{key} differs from {take.name}, to which the model ties it: this checkpoint was trained "
                             "with untied embeddings, which this language model's config cannot express")
    return plan


def _mismatch_report(missing, unexpected, mismatched, model, checkpoint_layers, inferred_every_n) -> str:
    config = model.config
    lines = ["the OpenFlamingo checkpoint does not fit the model built from the given parts:"]
    if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {_listed(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(unexpected)}): {_listed(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {_listed(mismatched, 4)}")
    ours = [i for i, layer in enumerate(model.decoder_layers()) if layer.gated_cross_attn_layer is not None]
    if checkpoint_layers and checkpoint_layers != ours:
        if inferred_every_n is not None:
            lines.append(f"likely cause: wrong --cross-attn-every-n-layers ({config.cross_attn_every_n_layers}): the "
                         f"checkpoint's cross-attention sits before layers {checkpoint_layers[:6]}..., i.e. "
                         f"n={inferred_every_n}")
        else:
            lines.append(f"likely cause: wrong --lang-encoder: the checkpoint has cross-attention before layers "
                         f"{checkpoint_layers[:6]}... which no n fits for {len(model.decoder_layers())} layers")
    if any("gated_cross_attn_layer" in entry or "perceiver" in entry for entry in mismatched):
        lines.append(f"likely cause: wrong --lang-encoder or --vision-encoder: widths differ (LM hidden size "
                     f"{config.text_config.hidden_size}, vision width {config.vision_config.hidden_size})")
    if any("embed" in entry or "wte" in entry for entry in mismatched):
        lines.append("likely cause: wrong vocabulary (--tokenizer / --lang-encoder)")
    if any(key.startswith("lang_encoder.") and "gated_cross_attn_layer" not in key for key in unexpected):
        lines.append("likely cause: wrong --lang-encoder (its layers are named differently)")
    return "\n".join(lines)
