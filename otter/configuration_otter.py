"""OtterConfig: a CLIP vision tower, a Perceiver resampler and gated cross-attention in a causal LM."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .auto_module import CONFIG_AUTO_MAP, write_module


@strict
class OtterConfig(PreTrainedConfig):
    r"""
    Configuration of an Otter / OpenFlamingo model.

    The defaults of the perceiver and cross-attention sizes are OpenFlamingo v2's (depth 6, 8 heads of 64,
    64 latents, feed-forward x4); the vision defaults are CLIP ViT-L/14 at 224 px with QuickGELU.

    Args:
        vision_config (`CLIPVisionConfig` or `dict`): the CLIP vision tower.
        text_config (`PreTrainedConfig` or `dict`): any causal-LM config, dispatched on its `model_type`.
        cross_attn_every_n_layers (`int`): a gated cross-attention block runs before decoder layer `i`
            when `(i + 1) % cross_attn_every_n_layers == 0` (OpenFlamingo's placement).
        media_token_id / eoc_token_id / pad_token_id (`int`): ids of `<image>`, `<|endofchunk|>` and the pad token.
        only_attend_immediate_media (`bool`): a token sees only the latest image before it (True, OpenFlamingo)
            or every image before it (False).
        vision_feature_post_layernorm (`bool`): pass CLIP's patch tokens through `post_layernorm`. The released
            OpenFlamingo v2 models were trained without it (open_clip <= 2.22 semantics).
        max_num_frames (`int`, *optional*): enables learned frame embeddings in the perceiver (Otter's video
            models); without it a media item must have exactly one frame.
        decoder_layers_attr (`str`, *optional*): dotted path from the causal LM to its decoder layers, for
            language models outside the known families (see `otter.language_models`).
        vision_chunk_size (`int`, *optional*): the vision tower encodes at most this many frames at a time (a long
            video's activations stay bounded); None encodes a batch's frames at once.
    """

    model_type = "otter"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 14,
                "image_size": 224,
                "projection_dim": 768,
                "hidden_act": "quick_gelu",
            },
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="mpt"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    cross_attn_every_n_layers: int = 1
    media_token_id: int | None = None
    eoc_token_id: int | None = None
    pad_token_id: int | None = None
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    perceiver_num_latents: int = 64
    perceiver_ff_mult: int = 4
    max_num_frames: int | None = None
    cross_attn_heads: int = 8
    cross_attn_dim_head: int = 64
    cross_attn_ff_mult: int = 4
    only_attend_immediate_media: bool = True
    vision_feature_post_layernorm: bool = False
    decoder_layers_attr: str | None = None
    vision_chunk_size: int | None = None

    def __post_init__(self, **kwargs):
        text_type = self.text_config.get("model_type") if isinstance(self.text_config, dict) else None
        if text_type is not None and text_type not in CONFIG_MAPPING:
            raise ValueError(
                f"text_config has model_type {text_type!r}, which transformers does not know; "
                "expected a causal-LM model_type such as 'mpt', 'gpt_neox' or 'llama'"
            )
        super().__post_init__(**kwargs)
        if self.cross_attn_every_n_layers < 1:
            raise ValueError(f"cross_attn_every_n_layers must be >= 1, got {self.cross_attn_every_n_layers}")
        if self.max_num_frames is not None and self.max_num_frames < 1:
            raise ValueError(f"max_num_frames must be None or >= 1, got {self.max_num_frames}")
        if self.vision_chunk_size is not None and self.vision_chunk_size < 1:
            raise ValueError(f"vision_chunk_size must be None or >= 1, got {self.vision_chunk_size}")

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As transformers' configs, with an `auto_map` pointing at `otter_auto.py`, written beside it (see
        `otter.auto_module`): a folder loaded without `import otter` fails loudly, never half-loaded."""
        self.auto_map = dict(CONFIG_AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_module(save_directory)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing to register: the class lives in the installed package, and `auto_map` points there."""


__all__ = ["OtterConfig"]
