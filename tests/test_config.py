import pytest
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPTNeoXConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    MODEL_MAPPING,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

import otter
from otter import OtterConfig, OtterForConditionalGeneration, OtterModel, OtterProcessor

TEXT = dict(model_type="gpt_neox", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            vocab_size=100)


def test_import_registers_the_auto_classes():
    assert isinstance(AutoConfig.for_model("otter"), OtterConfig)
    assert MODEL_MAPPING[OtterConfig] is OtterModel
    assert MODEL_FOR_CAUSAL_LM_MAPPING[OtterConfig] is OtterForConditionalGeneration
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[OtterConfig] is OtterForConditionalGeneration
    assert PROCESSOR_MAPPING[OtterConfig] is OtterProcessor
    assert {"OtterConfig", "OtterModel", "OtterForConditionalGeneration", "OtterProcessor"} <= set(otter.__all__)


def test_defaults_are_openflamingo_v2():
    config = OtterConfig(text_config=TEXT)
    assert (config.perceiver_depth, config.perceiver_heads, config.perceiver_dim_head) == (6, 8, 64)
    assert (config.perceiver_num_latents, config.perceiver_ff_mult) == (64, 4)
    assert (config.cross_attn_heads, config.cross_attn_dim_head, config.cross_attn_ff_mult) == (8, 64, 4)
    assert config.only_attend_immediate_media is True
    assert config.vision_feature_post_layernorm is False
    assert config.max_num_frames is None
    vision = config.vision_config
    assert isinstance(vision, CLIPVisionConfig)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (1024, 24, 14, 224)
    assert vision.hidden_act == "quick_gelu"


@pytest.mark.parametrize("as_object", [False, True])
def test_round_trip(tmp_path, as_object):
    text = GPTNeoXConfig(**{k: v for k, v in TEXT.items() if k != "model_type"}) if as_object else TEXT
    config = OtterConfig(text_config=text, cross_attn_every_n_layers=2, media_token_id=7, eoc_token_id=8,
                         pad_token_id=9, max_num_frames=3, perceiver_depth=2, only_attend_immediate_media=False,
                         vision_feature_post_layernorm=True, decoder_layers_attr="gpt_neox.layers")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, OtterConfig)
    assert isinstance(loaded.text_config, GPTNeoXConfig)
    assert loaded.text_config.hidden_size == 64
    for key in ("cross_attn_every_n_layers", "media_token_id", "eoc_token_id", "pad_token_id", "max_num_frames",
                "perceiver_depth", "only_attend_immediate_media", "vision_feature_post_layernorm",
                "decoder_layers_attr"):
        assert getattr(loaded, key) == getattr(config, key), key


def test_unknown_text_model_type_is_named():
    with pytest.raises(ValueError, match="text_config has model_type 'not-a-model'"):
        OtterConfig(text_config={"model_type": "not-a-model"})


@pytest.mark.parametrize("bad", [dict(cross_attn_every_n_layers=0), dict(max_num_frames=0)])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        OtterConfig(text_config=TEXT, **bad)
