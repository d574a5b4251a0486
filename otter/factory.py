"""Build a new Otter model from a CLIP vision tower, a causal LM and its tokenizer (OpenFlamingo's recipe)."""

import os

from PIL import Image
from transformers import AutoTokenizer, CLIPVisionModel, PreTrainedModel

from .configuration_otter import OtterConfig
from .language_models import load_language_model, max_positions
from .modeling_otter import OtterForConditionalGeneration
from .processing_otter import DEFAULT_VIDEO_FRAMES, OtterImageProcessor, OtterProcessor
from .prompts import END_OF_CHUNK, IMAGE_TOKEN

PAD_TOKEN = "<PAD>"


def add_special_tokens(tokenizer) -> None:
    """Adds `<|endofchunk|>`, `<image>` and, if the tokenizer has no pad token, `<PAD>`, in OpenFlamingo's order."""
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_processor(image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, resample: str = "bicubic",
                         crop_offset: str = "round") -> OtterImageProcessor:
    """
    open_clip's inference transform: shortest side to `image_size` (bicubic), centre crop, CLIP mean/std;
    `crop_offset="floor"`: transformers' CLIPImageProcessor's crop (see `OtterImageProcessor`).
    """
    resamplers = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    if resample not in resamplers:
        raise ValueError(f"resample must be one of {sorted(resamplers)}, got {resample!r}")
    return OtterImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                               image_mean=list(mean), image_std=list(std), resample=resamplers[resample],
                               crop_offset=crop_offset)


def video_frames(config: OtterConfig) -> int | None:
    """The frames a video is sampled to by default: the model's `max_num_frames`, capped at `DEFAULT_VIDEO_FRAMES`
    (None, for a model without frame embeddings: the processor's default)."""
    return min(config.max_num_frames, DEFAULT_VIDEO_FRAMES) if config.max_num_frames else None


def from_parts(
    vision_model: CLIPVisionModel | str | os.PathLike,
    language_model: PreTrainedModel | str | os.PathLike,
    tokenizer,
    cross_attn_every_n_layers: int = 1,
    **config_kwargs,
) -> tuple[OtterForConditionalGeneration, OtterProcessor]:
    """
    A new Otter model and its processor, from parts given as objects or local folders.

    The tokenizer gains `<|endofchunk|>`, `<image>` (and `<PAD>` when it has none); the language
    model's embeddings are resized to match; the perceiver and cross-attention blocks are new, their gates at 0, so
    the model's logits on text equal the language model's. `config_kwargs` go to `OtterConfig` (perceiver and
    cross-attention sizes, `only_attend_immediate_media`, ...). No parameter's `requires_grad` is changed: call
    `model.freeze_backbones()` to train OpenFlamingo's way.
    """
    if isinstance(vision_model, (str, os.PathLike)):
        vision_model = CLIPVisionModel.from_pretrained(vision_model)
    if not isinstance(vision_model, CLIPVisionModel):
        raise ValueError(f"vision_model must be a transformers CLIPVisionModel or its folder, got {type(vision_model).__name__}")
    if isinstance(language_model, (str, os.PathLike)):
        language_model = load_language_model(language_model)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    add_special_tokens(tokenizer)
    limit = max_positions(language_model.config)
    if limit is not None:  # what the tokenizer warns about, and what the model refuses
        tokenizer.model_max_length = limit
    language_model.resize_token_embeddings(len(tokenizer))
    config = OtterConfig(
        vision_config=vision_model.config.to_dict(),
        text_config=language_model.config.to_dict(),
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        media_token_id=tokenizer.encode(IMAGE_TOKEN)[-1],
        eoc_token_id=tokenizer.encode(END_OF_CHUNK)[-1],
        pad_token_id=tokenizer.pad_token_id,
        **config_kwargs,
    )
    model = OtterForConditionalGeneration(config, vision_model=vision_model, language_model=language_model)
    processor = OtterProcessor(image_processor=clip_image_processor(vision_model.config.image_size), tokenizer=tokenizer,
                               num_frames=video_frames(config))
    return model, processor
