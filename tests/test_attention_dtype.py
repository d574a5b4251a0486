"""`attn_implementation` on every language-model family, and the dtype a model and the commands load in (issue 18)."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor

import otter
from otter import OtterConfig, OtterForConditionalGeneration
from otter.tiny import build_tiny_otter

from .conftest import FAMILIES, set_gates

PROMPTS = ["a photo<image>Output:a red circle<|endofchunk|><image>Output:", "<image>Output:"]


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """A tiny Otter of each family (gates open, cross-attention every 2 layers), saved; and a padded batch."""
    from PIL import Image

    model, processor = build_tiny_otter(request.param, cross_attn_every_n_layers=2)
    set_gates(model)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = [Image.new("RGB", (48 + 8 * i, 40), colour)
              for i, colour in enumerate([(220, 30, 30), (30, 170, 60), (40, 70, 220)])]
    return folder, processor(text=PROMPTS, images=[images[:2], images[2:3]])


def sdpa_calls(module, *args, **kwargs) -> int:
    """How many times `module(*args, **kwargs)` calls torch's scaled_dot_product_attention."""
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    F.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        F.scaled_dot_product_attention = original
    return len(calls)


def runs(model, batch) -> dict[str, str]:
    """Which attention the language model and the vision tower compute: "sdpa" or "eager", told by what they call."""
    text = batch["input_ids"][:, :6]  # before any image: the language model alone
    layers = len(model.decoder_layers())
    lm_calls = sdpa_calls(model.language_model, input_ids=text)
    pixels = batch["pixel_values"][:1]
    vision_calls = sdpa_calls(model.vision_model, pixel_values=pixels)
    vision_layers = model.config.vision_config.num_hidden_layers
    assert lm_calls in (0, layers) and vision_calls in (0, vision_layers)
    return {"text_config": "sdpa" if lm_calls else "eager", "vision_config": "sdpa" if vision_calls else "eager"}


def reported(model) -> dict[str, str]:
    return {"text_config": model.config.text_config._attn_implementation,
            "vision_config": model.config.vision_config._attn_implementation}


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("load", ["auto", "otter"])
def test_sdpa_and_eager_load_for_every_family_run_what_the_configs_say_with_the_same_logits(saved, load):
    folder, batch = saved
    from_pretrained = (AutoModelForImageTextToText if load == "auto" else OtterForConditionalGeneration).from_pretrained
    results = {}
    for implementation in ("sdpa", "eager"):
        model = from_pretrained(folder, attn_implementation=implementation).eval()
        assert reported(model) == runs(model, batch) == {"text_config": implementation, "vision_config": implementation}
        assert model.language_model.config is model.config.text_config
        results[implementation] = logits(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(results["sdpa"][real], results["eager"][real], rtol=1e-5, atol=1e-5)
    default = from_pretrained(folder).eval()
    assert reported(default) == runs(default, batch) == {"text_config": "sdpa", "vision_config": "sdpa"}


def test_each_part_takes_its_own_implementation_and_set_attn_implementation_switches(saved):
    folder, batch = saved
    model = AutoModelForImageTextToText.from_pretrained(
        folder, attn_implementation={"text_config": "eager", "vision_config": "sdpa"}).eval()
    assert reported(model) == runs(model, batch) == {"text_config": "eager", "vision_config": "sdpa"}
    before = logits(model, batch)
    model.set_attn_implementation("sdpa")
    assert reported(model) == runs(model, batch) == {"text_config": "sdpa", "vision_config": "sdpa"}
    model.set_attn_implementation({"text_config": "eager"})
    assert reported(model) == runs(model, batch) == {"text_config": "eager", "vision_config": "sdpa"}
    model.set_attn_implementation("eager")
    assert reported(model) == runs(model, batch) == {"text_config": "eager", "vision_config": "eager"}
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits(model, batch)[real], before[real], rtol=1e-5, atol=1e-5)


def test_from_config_and_a_save_load_round_trip(saved, tmp_path):
    """
    As in transformers, the implementation is chosen when a model is built or loaded, not stored in the folder: an
    eager model saves a folder that loads with either implementation, to the same logits.
    """
    folder, batch = saved
    config = OtterConfig.from_pretrained(folder)
    built = OtterForConditionalGeneration._from_config(config, attn_implementation="eager")
    assert reported(built) == runs(built, batch) == {"text_config": "eager", "vision_config": "eager"}
    eager = OtterForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    eager.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert "attn_implementation" not in json.dumps(saved_config)
    real = batch["attention_mask"].bool()
    for implementation in ("sdpa", "eager"):
        again = OtterForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert reported(again) == runs(again, batch) == {"text_config": implementation, "vision_config": implementation}
        torch.testing.assert_close(logits(again, batch)[real], logits(eager, batch)[real], rtol=1e-5, atol=1e-5)


def test_a_static_cache_decodes_as_the_default_cache_with_either_implementation(saved):
    """generate() builds a static cache's mask in the configured implementation's convention: MPT reads both."""
    folder, batch = saved
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=3, length_penalty=0.0)
    for implementation in ("sdpa", "eager"):
        model = OtterForConditionalGeneration.from_pretrained(folder, attn_implementation=implementation).eval()
        assert torch.equal(model.generate(**batch, cache_implementation="static", **settings),
                           model.generate(**batch, **settings))


def test_mpt_refuses_an_implementation_it_does_not_have(tmp_path):
    model, _ = build_tiny_otter("mpt")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'flex_attention'.*'sdpa'.*'eager'"):
        OtterForConditionalGeneration.from_pretrained(tmp_path, attn_implementation={"text_config": "flex_attention"})


def test_the_shipped_model_loads_with_either_implementation():
    processor = AutoProcessor.from_pretrained(otter.SHAPESWORLD_MODEL)
    from otter.shapesworld import ShapesWorld, render

    world = ShapesWorld(3)
    scenes = [world.vqa("colour")["scene"] for _ in range(2)]
    batch = processor(text=["<image>User: What colour is it? GPT:<answer>", "<image>User: Describe it. GPT:<answer>"],
                      images=[[render(scenes[0])], [render(scenes[1])]])
    results = {}
    for implementation in ("sdpa", "eager"):
        model = AutoModelForImageTextToText.from_pretrained(otter.SHAPESWORLD_MODEL, dtype=torch.float32,
                                                            attn_implementation=implementation).eval()
        assert reported(model) == runs(model, batch) == {"text_config": implementation, "vision_config": implementation}
        results[implementation] = logits(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(results["sdpa"][real], results["eager"][real], rtol=1e-5, atol=1e-5)


# -- dtype ------------------------------------------------------------------------------------------------------------
def test_the_shipped_model_loads_in_float32_without_a_dtype():
    """transformers' convention: a model loads in the dtype it was saved in; the shipped one is saved in float32."""
    for load in (AutoModelForImageTextToText.from_pretrained, OtterForConditionalGeneration.from_pretrained):
        model = load(otter.SHAPESWORLD_MODEL)
        assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
        assert model.config.dtype == model.config.text_config.dtype == model.config.vision_config.dtype == torch.float32


@pytest.mark.parametrize("device,bf16,expected", [("cpu", True, "float32"), ("cuda", True, "bfloat16"),
                                                  ("cuda:1", True, "bfloat16"), ("cuda", False, "float16"),
                                                  ("mps", True, "float32")])
def test_the_commands_default_dtype_follows_the_device(device, bf16, expected, monkeypatch):
    from otter.chat import default_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: bf16 and not including_emulation)  # native bfloat16 only
    assert default_dtype(device) == expected
    assert default_dtype(torch.device(device)) == expected


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_the_commands_load_in_the_dtype_of_the_device_unless_told(command, tmp_path, monkeypatch):
    """Without --dtype a command loads in `default_dtype(device)` (here as on a GPU: bfloat16), whatever is saved."""
    from otter import chat, demo
    from otter.cli import main

    model, processor = build_tiny_otter("gpt_neox")
    model.to(torch.float16).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    used = []
    monkeypatch.setattr(chat, "default_dtype", lambda device: "bfloat16")
    monkeypatch.setattr(chat, "answer", lambda model, *args, **kwargs: used.append(model.dtype) or "an answer")
    monkeypatch.setattr(demo, "run", lambda model, processor, episode, max_new_tokens: used.append(model.dtype))
    arguments = ["generate", "--prompt", "What is it?"] if command == "generate" else [
        "demo", "--episodes", "1", "--out", str(tmp_path / "demo.html")]
    for given, expected in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        used.clear()
        main([*arguments, "--model", str(tmp_path), "--device", "cpu", *given])
        assert used and set(used) == {expected}
