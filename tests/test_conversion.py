"""OpenFlamingo checkpoints convert to Otter folders that compute what OpenFlamingo computes (the reference is the
oracle), load offline through the Auto classes, and bad inputs fail loudly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

import otter  # noqa: F401  (registers the Auto classes)
from otter.conversion.openflamingo import convert_openflamingo

from .conftest import FAMILIES
from .conversion_fixtures import (
    reference_model,
    released_checkpoint,
    train_randomly,
    write_language_model,
    write_open_clip,
)
from .reference import assert_greedy_generation_matches, vision_x

TEXTS = [
    "a picture:<image>Output:a red circle<|endofchunk|>\n<image>Question:what is it? Short answer:",
    "<image>Output:",
    "some words first, then<image>Output:a green thing<|endofchunk|><image>Output:yes<|endofchunk|><image>Output:",
]


def pictures(count=5, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (33, 61), (64, 64), (45, 37), (100, 71)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 5], 3), dtype=np.uint8)) for i in range(count)]


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    return write_open_clip(tmp_path_factory.mktemp("open_clip"))


def release(tmp_path, vision, family, every_n, monkeypatch):
    """(reference model, its image transform, its tokenizer, checkpoint path, LM folder) of a tiny 'released' model."""
    lm_folder = write_language_model(tmp_path / "lm", family)
    reference, transform, tokenizer = reference_model(*vision, lm_folder, every_n, monkeypatch)
    train_randomly(reference)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(released_checkpoint(reference), checkpoint)
    return reference, transform, tokenizer, checkpoint, lm_folder


def convert(tmp_path, vision, checkpoint, lm_folder, every_n, **kwargs):
    out = tmp_path / "otter"
    convert_openflamingo(out, checkpoint=str(checkpoint), lang_encoder=str(lm_folder), vision_encoder=str(vision[0]),
                         vision_pretrained=str(vision[1]), cross_attn_every_n_layers=every_n, **kwargs)
    return out


def load(folder):
    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval(), AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("every_n", [1, 2, 4])
def test_converted_logits_match_reference(family, every_n, vision, tmp_path, monkeypatch):
    reference, _, _, checkpoint, lm_folder = release(tmp_path, vision, family, every_n, monkeypatch)
    model, processor = load(convert(tmp_path, vision, checkpoint, lm_folder, every_n))
    images = pictures()
    batch = processor(text=TEXTS, images=[images[:2], images[2:3], images[2:5]])  # 1-3 images, left padding
    assert batch["attention_mask"][:, 0].eq(0).any()
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = reference(vision_x(model, batch), batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4
    assert ours[real].std() > 0.1  # the comparison is not between two near-constant outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_generation_tokenizer_and_pixels_match_reference(family, vision, tmp_path, monkeypatch):
    reference, transform, tokenizer, checkpoint, lm_folder = release(tmp_path, vision, family, 2, monkeypatch)
    model, processor = load(convert(tmp_path, vision, checkpoint, lm_folder, 2))

    for text in TEXTS + ["<|endofchunk|><image> plain words <PAD>"]:
        assert processor.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    images = pictures()
    ours = processor(text=["<image>" * len(images)], images=[images])["pixel_values"]
    theirs = torch.stack([transform(image) for image in images])
    assert (ours - theirs).abs().max() <= 1e-6  # same PIL bicubic resize, same crop rounding

    batch = processor(text=TEXTS[:2], images=[images[:2], images[2:3]])
    assert_greedy_generation_matches(model, reference, batch)


def test_output_folder_is_complete_and_loads_offline(vision, tmp_path, monkeypatch):
    _, _, _, checkpoint, lm_folder = release(tmp_path, vision, "gpt_neox", 2, monkeypatch)
    out = convert(tmp_path, vision, checkpoint, lm_folder, 2, dtype="bfloat16", max_shard_size="200KB",
                  command="otter convert openflamingo ...")
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "processor_config.json", "README.md"} <= files
    shards = sorted(name for name in files if name.startswith("model-"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    with safe_open(out / shards[0], "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.bfloat16
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "otter" and config["vision_feature_post_layernorm"] is False
    assert config["vision_config"]["hidden_act"] == "quick_gelu"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eoc_token_id"] and generation["pad_token_id"] == config["pad_token_id"]
    card = (out / "README.md").read_text()
    assert str(checkpoint) in card and "otter convert openflamingo ..." in card
    assert not [path for path in tmp_path.iterdir() if ".partial-" in path.name]

    script = (f"import otter, torch; from transformers import AutoModelForImageTextToText, AutoProcessor; "
              f"m = AutoModelForImageTextToText.from_pretrained({str(out)!r}); p = AutoProcessor.from_pretrained({str(out)!r}); "
              "print(m.dtype, type(p).__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, check=True)
    assert "torch.bfloat16 OtterProcessor" in result.stdout


def test_vision_semantics_are_the_released_ones_by_default_and_configurable(vision, tmp_path, monkeypatch):
    _, _, _, checkpoint, lm_folder = release(tmp_path, vision, "mpt", 1, monkeypatch)
    variants = {}
    for name, kwargs in {"released": {}, "gelu": {"quick_gelu": False},
                         "post_ln": {"vision_feature_post_layernorm": True}}.items():
        model, processor = load(convert(tmp_path / name, vision, checkpoint, lm_folder, 1, **kwargs))
        pixels = processor(text=["<image>"], images=[pictures(1)])["pixel_values"][None, :, None]  # one sample
        with torch.no_grad():
            variants[name] = model.get_image_features(pixels)
    assert (variants["released"] - variants["gelu"]).abs().max() > 1e-3
    assert (variants["released"] - variants["post_ln"]).abs().max() > 1e-3


@pytest.mark.parametrize("wrapping", ["model_state_dict", "module."])
def test_training_checkpoints_and_ddp_prefix_are_accepted(wrapping, vision, tmp_path, monkeypatch):
    reference, _, _, checkpoint, lm_folder = release(tmp_path, vision, "llama", 2, monkeypatch)
    state = torch.load(checkpoint, weights_only=True)
    wrapped = ({"model_state_dict": state, "epoch": 3} if wrapping == "model_state_dict"
               else {f"module.{name}": tensor for name, tensor in state.items()})
    torch.save(wrapped, tmp_path / "wrapped.pt")
    model, processor = load(convert(tmp_path, vision, tmp_path / "wrapped.pt", lm_folder, 2))
    batch = processor(text=TEXTS[1:2], images=[pictures(1)])
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = reference(vision_x(model, batch), batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_every_n_is_read_off_the_checkpoint(vision, tmp_path, monkeypatch):
    _, _, _, checkpoint, lm_folder = release(tmp_path, vision, "mpt", 2, monkeypatch)
    model, _ = load(convert(tmp_path, vision, checkpoint, lm_folder, None))
    assert model.config.cross_attn_every_n_layers == 2


class TestStrictness:
    @pytest.fixture
    def released(self, vision, tmp_path, monkeypatch):
        _, _, _, checkpoint, lm_folder = release(tmp_path, vision, "gpt_neox", 2, monkeypatch)
        return torch.load(checkpoint, weights_only=True), lm_folder

    def convert_state(self, tmp_path, vision, state, lm_folder, every_n=2):
        torch.save(state, tmp_path / "edited.pt")
        convert(tmp_path, vision, tmp_path / "edited.pt", lm_folder, every_n)

    def assert_nothing_written(self, tmp_path):
        assert not (tmp_path / "otter").exists()
        assert not [path for path in tmp_path.iterdir() if ".partial-" in path.name]

    def test_wrong_every_n_names_the_right_one(self, released, vision, tmp_path):
        state, lm_folder = released
        with pytest.raises(ValueError, match=r"(?s)missing.*wrong --cross-attn-every-n-layers \(1\).*n=2"):
            self.convert_state(tmp_path, vision, state, lm_folder, every_n=1)
        self.assert_nothing_written(tmp_path)

    @pytest.mark.parametrize("key", ["perceiver.layers.0.0.to_q.weight",
                                     "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.ff_gate",
                                     "lang_encoder.embed_out.weight"])
    def test_a_missing_key_is_named(self, key, released, vision, tmp_path):
        state, lm_folder = released
        del state[key]
        with pytest.raises(ValueError, match=rf"missing from the checkpoint \(1\): {key}"):
            self.convert_state(tmp_path, vision, state, lm_folder)
        self.assert_nothing_written(tmp_path)

    def test_an_unexpected_key_is_named(self, released, vision, tmp_path):
        state, lm_folder = released
        state["lang_encoder.gpt_neox.layers.0.gated_cross_attn_layer.extra.weight"] = torch.zeros(2)
        with pytest.raises(ValueError, match=r"unexpected in the checkpoint \(1\): lang_encoder.gpt_neox.layers.0.gated_cross_attn_layer.extra.weight"):
            self.convert_state(tmp_path, vision, state, lm_folder)

    def test_a_shape_mismatch_is_named(self, released, vision, tmp_path):
        state, lm_folder = released
        key = "lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.attn.to_q.weight"
        state[key] = torch.zeros(512, 48)
        with pytest.raises(ValueError, match=r"(?s)shape mismatches.*to_q.*wrong --lang-encoder or --vision-encoder"):
            self.convert_state(tmp_path, vision, state, lm_folder)

    def test_wrong_vocabulary(self, released, vision, tmp_path):
        state, lm_folder = released
        state["lang_encoder.gpt_neox.embed_in.weight"] = state["lang_encoder.gpt_neox.embed_in.weight"][:-1]
        with pytest.raises(ValueError, match="has 322 rows, but the tokenizer has 323 tokens"):
            self.convert_state(tmp_path, vision, state, lm_folder)

    def test_wrong_language_model(self, released, vision, tmp_path):
        state, _ = released
        other = write_language_model(tmp_path / "mpt", "mpt")
        with pytest.raises(ValueError, match="has no lang_encoder.transformer.wte.weight"):
            self.convert_state(tmp_path, vision, state, other)

    def test_existing_output_is_never_overwritten(self, released, vision, tmp_path):
        state, lm_folder = released
        (tmp_path / "otter").mkdir()
        (tmp_path / "otter" / "keep.txt").write_text("mine")
        with pytest.raises(FileExistsError):
            self.convert_state(tmp_path, vision, state, lm_folder)
        assert (tmp_path / "otter" / "keep.txt").read_text() == "mine"

    def test_checkpoints_load_with_weights_only(self, released, vision, tmp_path):
        state, lm_folder = released
        torch.save({"model_state_dict": state, "sneaky": Image.new("RGB", (2, 2))}, tmp_path / "pickled.pt")
        with pytest.raises(ValueError, match="weights_only"):
            convert(tmp_path, vision, tmp_path / "pickled.pt", lm_folder, 2)


def test_a_converted_folder_works_in_the_image_text_to_text_pipeline(vision, tmp_path, monkeypatch):
    from transformers import pipeline

    _, _, _, checkpoint, lm_folder = release(tmp_path, vision, "mpt", 2, monkeypatch)
    pipe = pipeline("image-text-to-text", model=str(convert(tmp_path, vision, checkpoint, lm_folder, 2)))
    images = pictures(3)
    chats = [[{"role": "user", "content": [{"type": "image", "image": image} for image in shown]
               + [{"type": "text", "text": "What is it?"}]}] for shown in (images[:1], images[1:3])]
    # the converted tokenizer has no <answer>: OpenFlamingo's variant of the chat format
    assert pipe.processor.apply_chat_template(chats[0], add_generation_prompt=True) == "<image>User: What is it? GPT:"
    settings = dict(max_new_tokens=4, do_sample=False, return_full_text=False)
    alone = [pipe(text=conversation, **settings)[0]["generated_text"] for conversation in chats]
    batched = [output[0]["generated_text"] for output in pipe(text=chats, batch_size=2, **settings)]
    assert batched == alone
    raw = pipe(images=images[:1], text="<image>Output:", **settings)
    assert isinstance(raw[0]["generated_text"], str)
