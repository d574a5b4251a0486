"""
mosaic_gpt (the custom-code MPT of MPT-1B-RedPajama, OpenFlamingo-3B's language model) -> transformers' native MPT.

The weights are renamed as llm-foundry renames them (`.ln_` -> `.norm_`, `.mlp.mlp_up.` -> `.ffn.up_proj.`,
`.mlp.mlp_down.` -> `.ffn.down_proj.`). Its QK LayerNorm, which `MptForCausalLM` reads from the config but ignores, is
honoured by `otter.language_models.OtterMptForCausalLM`: load the result with `otter.load_language_model`.
"""

import json
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, MptConfig

from otter.language_models import build_language_model
from otter.model_card import hub_id, language_model_usage, model_card

from .folders import atomic_folder, known_license, limit_tokenizer_length, local_folder
from .weights import CheckpointFiles, Take, parse_dtype, weight_files, write_model

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _setting(config: dict, name: str, default=None):
    """mosaic_gpt kept attention settings flat (`attn_qk_ln`), later versions nest them (`attn_config.qk_ln`)."""
    nested = config.get("attn_config") or {}
    if name in nested:
        return nested[name]
    for flat in (f"attn_{name}", name):
        if flat in config:
            return config[flat]
    return default


def mpt_config(mosaic: dict) -> MptConfig:
    """The native `MptConfig` computing what a mosaic_gpt config computes; a setting MPT cannot express is an error."""
    if mosaic.get("model_type") != "mosaic_gpt":
        raise ValueError(f"not a mosaic_gpt config (model_type={mosaic.get('model_type')!r})")
    unsupported = {
        "alibi": (_setting(mosaic, "alibi", False), True),
        "prefix_lm": (_setting(mosaic, "prefix_lm", False), False),
        "attn_uses_sequence_id": (_setting(mosaic, "uses_sequence_id", False), False),
        "no_bias": (mosaic.get("no_bias", False), True),
        "logit_scale": (mosaic.get("logit_scale"), None),
        "embedding_fraction": (mosaic.get("embedding_fraction", 1.0), 1.0),
    }
    for name, (value, needed) in unsupported.items():
        if value != needed:
            raise ValueError(f"mosaic_gpt with {name}={value!r} cannot be expressed as MptForCausalLM (needs {needed!r})")
    n_heads = mosaic["n_heads"]
    if n_heads & (n_heads - 1):
        # mosaic_gpt's slopes are 2^(-8i/n) for every n; transformers' interleave a power-of-two set when n is not one
        raise ValueError(f"n_heads={n_heads} is not a power of two: mosaic_gpt's and MPT's ALiBi slopes would differ")
    attn_pdrop = _setting(mosaic, "pdrop", 0)
    if attn_pdrop:
        # transformers' MptAttentionConfig types attn_pdrop as int; dropout only matters when training
        logger.warning("attention dropout %s is not carried over (transformers' MPT config takes none)", attn_pdrop)
    return MptConfig(
        d_model=mosaic["d_model"],
        n_heads=n_heads,
        n_layers=mosaic["n_layers"],
        expansion_ratio=mosaic.get("mlp_ratio", mosaic.get("expansion_ratio", 4)),
        max_seq_len=mosaic["max_seq_len"],
        vocab_size=mosaic["vocab_size"],
        resid_pdrop=mosaic.get("resid_pdrop", 0.0),
        emb_pdrop=mosaic.get("emb_pdrop", 0.0),
        no_bias=True,
        attn_config={
            "attn_pdrop": 0,
            "clip_qkv": _setting(mosaic, "clip_qkv"),
            "softmax_scale": _setting(mosaic, "softmax_scale"),
            "qk_ln": bool(_setting(mosaic, "qk_ln", False)),
            "alibi": True,
            "alibi_bias_max": _setting(mosaic, "alibi_bias_max", 8),
        },
        tie_word_embeddings=True,
    )


def mpt_name(name: str) -> str:
    """A mosaic_gpt weight name -> its native MPT name (llm-foundry's renaming)."""
    name = name.replace(".ln_", ".norm_")
    return name.replace(".mlp_up.", ".up_proj.").replace(".mlp_down.", ".down_proj.").replace(".mlp.", ".ffn.")


def is_mosaic_gpt(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "mosaic_gpt"


def mosaic_plan(folder: Path, config: MptConfig, source: CheckpointFiles | None = None) -> dict[str, Take]:
    """{native MPT parameter name: Take} for every tensor of a mosaic_gpt folder; an unknown tensor is an error."""
    source = source or CheckpointFiles(weight_files(folder))
    with torch.device("meta"):
        meta = build_language_model(config)
    known = set(meta.state_dict())
    plan = {mpt_name(name): Take(source, name) for name in source.names()}
    unexpected = sorted(name for name, take in plan.items() if name not in known)
    if unexpected:
        raise ValueError(f"{folder}: tensors with no place in MPT ({len(unexpected)}): "
                         f"{[plan[name].name for name in unexpected][:8]}")
    return plan


def convert_mosaic_gpt(source: str, out, dtype: str = "float32", max_shard_size: str = "2GB",
                       command: str | None = None) -> None:
    """Writes a mosaic_gpt folder (or hub id) as a native MPT folder with its tokenizer, atomically."""
    torch_dtype = parse_dtype(dtype)
    folder = local_folder(source, "mosaic_gpt model")
    config = mpt_config(json.loads((folder / "config.json").read_text()))
    plan = mosaic_plan(folder, config)
    with torch.device("meta"):
        meta = build_language_model(config)
    with atomic_folder(out) as partial:
        write_model(partial, meta, plan, torch_dtype, max_shard_size)
        has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
        if has_tokenizer:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            limit_tokenizer_length(tokenizer, config)
            tokenizer.save_pretrained(partial)
        else:
            logger.warning("%s has no tokenizer files: the output has none", folder)
        license = known_license(source, folder)
        model_card(
            f"{folder.name} as native MPT",
            f"The mosaic_gpt model {source} (MPT-1B-RedPajama's custom code) as a native transformers MPT folder, "
            f"converted by Otter (`otter convert mosaic-gpt`): {config.n_layers} layers, width {config.d_model}.",
            language_model_usage(Path(out).name),
            pipeline_tag="text-generation",
            base_model=hub_id(source),
            license=license,
            license_note=None if license else (f"Not stated: the license of {source} applies. Set `license` in the "
                                               "metadata above before publishing it."),
            sources={"mosaic_gpt model": str(source)},
            command=command,
            notes=["Weights renamed as llm-foundry does; no tensor changed except its dtype "
                   f"({dtype}).",
                   f"QK LayerNorm: {'yes' if config.attn_config.qk_ln else 'no'}. transformers' MptForCausalLM ignores "
                   "`attn_config.qk_ln`; load with `otter.load_language_model(path)`, which honours it.",
                   "tokenizer: " + ("copied" if has_tokenizer else "none in the source folder: load the source's")],
            tags=["mpt"],
        ).save(partial / "README.md")
    logger.info("mosaic_gpt %s -> MPT (%d layers, d_model %d, qk_ln=%s)", folder, config.n_layers, config.d_model,
                config.attn_config.qk_ln)
