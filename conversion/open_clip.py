"""
open_clip vision towers -> transformers `CLIPVisionModel`, exactly.

The map is a table: `visual.conv1` -> `embeddings.patch_embedding`, `visual.transformer.resblocks.{i}.attn.in_proj_*`
split into `q_proj`, `k_proj`, `v_proj`, and so on. `visual.proj` (the image-embedding projection) has no place in a
`CLIPVisionModel` and is left out; the text tower is not part of a vision tower.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from otter.factory import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_image_processor

from .folders import atomic_folder
from .weights import CheckpointFiles, Take, parse_dtype, write_model

logger = logging.getLogger(__name__)

# open_clip vision settings a CLIPVisionModel reproduces; every other setting must keep its open_clip default
SUPPORTED = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout", "output_tokens",
             "final_ln_after_pool"}
DEFAULTS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "timm_model_name": None,
}
UNUSED_VISION_KEYS = {"visual.proj"}


@dataclass
class OpenClipVision:
    """An open_clip vision tower resolved to files: its name, model config, weights file and pretrained-tag config."""

    name: str
    model_config: dict
    weights: Path
    tag_config: dict = field(default_factory=dict)

    @property
    def vision_config(self) -> dict:
        return self.model_config["vision_cfg"]


def resolve(vision_encoder: str, pretrained: str) -> OpenClipVision:
    """
    `vision_encoder`: an open_clip model name (`ViT-L-14`) or the path to an open_clip model-config JSON, whose file
    stem is the model name. `pretrained`: an open_clip pretrained tag (`openai`; resolved through open_clip's cache, so
    nothing is fetched when it is there) or a local weights file.
    """
    import open_clip

    config_path = Path(vision_encoder)
    if config_path.suffix == ".json":
        if not config_path.is_file():
            raise FileNotFoundError(f"open_clip model config not found: {config_path}")
        name, model_config = config_path.stem, json.loads(config_path.read_text())
    else:
        name, model_config = vision_encoder, open_clip.get_model_config(vision_encoder)
        if model_config is None:
            raise ValueError(f"unknown open_clip model {vision_encoder!r}: give a name from open_clip.list_models() "
                             "or the path to an open_clip model-config JSON")
    if "vision_cfg" not in model_config:
        raise ValueError(f"open_clip model config {vision_encoder} has no 'vision_cfg'")
    if Path(pretrained).is_file():
        return OpenClipVision(name, model_config, Path(pretrained))
    tag_config = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_config:
        raise ValueError(f"{pretrained!r} is neither a weights file nor a pretrained tag of open_clip's {name} "
                         f"(tags: {open_clip.list_pretrained_tags_by_model(name)})")
    return OpenClipVision(name, model_config, Path(open_clip.download_pretrained(tag_config)), tag_config)


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {what} {value} is not supported by CLIPVisionModel")
        value = value[0]
    return int(value)


def vision_config(vision: OpenClipVision, quick_gelu: bool | None = None) -> CLIPVisionConfig:
    """
    The `CLIPVisionConfig` of an open_clip vision tower. `quick_gelu=None` takes the activation the weights were
    trained with: QuickGELU when the pretrained tag says so (OpenAI's weights) or the model config asks for it.
    """
    settings = vision.vision_config
    for key, value in settings.items():
        if key not in SUPPORTED and not (key in DEFAULTS and value == DEFAULTS[key]):
            raise ValueError(f"open_clip vision setting {key}={value!r} of {vision.name} has no CLIPVisionModel equivalent")
    layers, width = settings.get("layers", 12), settings.get("width", 768)
    head_width = settings.get("head_width", 64)
    if not isinstance(layers, int):
        raise ValueError(f"{vision.name} is not a ViT (layers={layers!r}); only ViT towers convert to CLIPVisionModel")
    if width % head_width:
        raise ValueError(f"{vision.name}: width {width} is not a multiple of head_width {head_width}")
    if quick_gelu is None:
        quick_gelu = bool(vision.model_config.get("quick_gelu", False) or vision.tag_config.get("quick_gelu", False))
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * settings.get("mlp_ratio", 4.0)),
        num_hidden_layers=layers,
        num_attention_heads=width // head_width,
        image_size=_square(settings.get("image_size", 224), "image_size"),
        patch_size=_square(settings.get("patch_size", 16), "patch_size"),
        hidden_act="quick_gelu" if quick_gelu else "gelu",
        projection_dim=vision.model_config.get("embed_dim", 512),
        layer_norm_eps=1e-5,
    )


def preprocessing(vision: OpenClipVision) -> dict:
    """open_clip's inference transform settings: {size, mean, std, resample}."""
    settings = {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    for source in (vision.model_config.get("preprocess_cfg", {}), vision.tag_config):
        settings.update({key: source[key] for key in settings if key in source})
    if settings["resize_mode"] != "shortest":
        raise ValueError(f"{vision.name}: open_clip resize_mode {settings['resize_mode']!r} is not supported "
                         "(only 'shortest': resize the shortest side, then centre-crop)")
    size = _square(vision.vision_config.get("image_size", 224), "image_size")
    return {"image_size": size, "mean": tuple(settings["mean"]), "std": tuple(settings["std"]),
            "resample": settings["interpolation"]}


def vision_plan(source: CheckpointFiles, config: CLIPVisionConfig, prefix: str = "") -> dict[str, Take]:
    """
    {CLIPVisionModel parameter name (in memory, after `prefix`): Take from the open_clip state dict}. Every `visual.*`
    tensor is used except `visual.proj`; anything else under `visual.` is an error naming it.
    """
    width, layers = config.hidden_size, config.num_hidden_layers

    def third(index):
        return lambda tensor: tensor[index * width:(index + 1) * width]

    plan = {
        "embeddings.class_embedding": Take(source, "visual.class_embedding"),
        "embeddings.patch_embedding.weight": Take(source, "visual.conv1.weight"),
        "embeddings.position_embedding.weight": Take(source, "visual.positional_embedding"),
        "pre_layrnorm.weight": Take(source, "visual.ln_pre.weight"),
        "pre_layrnorm.bias": Take(source, "visual.ln_pre.bias"),
        "post_layernorm.weight": Take(source, "visual.ln_post.weight"),
        "post_layernorm.bias": Take(source, "visual.ln_post.bias"),
    }
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for layer in range(layers):
        ours, theirs = f"encoder.layers.{layer}.", f"visual.transformer.resblocks.{layer}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                plan[f"{ours}{new}.{kind}"] = Take(source, f"{theirs}{old}.{kind}")
        for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
            plan[f"{ours}self_attn.{projection}.weight"] = Take(source, f"{theirs}attn.in_proj_weight", third(index))
            plan[f"{ours}self_attn.{projection}.bias"] = Take(source, f"{theirs}attn.in_proj_bias", third(index))

    visual = {name for name in source.names() if name.startswith("visual.")}
    if not visual:
        raise ValueError(f"{source.paths[0]} holds no open_clip vision tower (no 'visual.*' tensors)")
    missing = sorted({take.name for take in plan.values()} - visual)
    unused = sorted(visual - {take.name for take in plan.values()} - UNUSED_VISION_KEYS)
    if missing or unused:
        raise ValueError(
            f"open_clip weights {source.paths[0]} do not match a {layers}-layer ViT of width {width}: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected {unused[:8]}"
            f"{' ...' if len(unused) > 8 else ''} (wrong --vision-encoder for these weights?)"
        )
    expected = {
        "visual.class_embedding": (width,),
        "visual.conv1.weight": (width, 3, config.patch_size, config.patch_size),
        "visual.positional_embedding": ((config.image_size // config.patch_size) ** 2 + 1, width),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (config.intermediate_size, width),
    }
    for name, shape in expected.items():
        if source.info[name].shape != shape:
            raise ValueError(f"open_clip weights: {name} has shape {source.info[name].shape}, the model config implies "
                             f"{shape} (wrong --vision-encoder for these weights?)")
    return {prefix + name: take for name, take in plan.items()}


def convert_open_clip(vision_encoder: str, pretrained: str, out, dtype: str = "float32", quick_gelu: bool | None = None,
                      max_shard_size: str = "2GB") -> None:
    """Writes an open_clip vision tower as a `CLIPVisionModel` folder (with its image processor), atomically."""
    torch_dtype = parse_dtype(dtype)
    vision = resolve(vision_encoder, pretrained)
    config = vision_config(vision, quick_gelu)
    source = CheckpointFiles([vision.weights])
    plan = vision_plan(source, config)
    with torch.device("meta"):
        meta = CLIPVisionModel(config)
    with atomic_folder(out) as folder:
        write_model(folder, meta, plan, torch_dtype, max_shard_size)
        clip_image_processor(**preprocessing(vision)).save_pretrained(folder)
    logger.info("open_clip %s (%s) -> CLIPVisionModel, %s", vision.name, vision.weights, config.hidden_act)

