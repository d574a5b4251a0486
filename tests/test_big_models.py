"""
Big models in the commands: `--device-map` spreads a model over devices (accelerate's hooks), `--load-in-8bit` /
`--load-in-4bit` quantize the language model's linear layers through bitsandbytes. On a CPU the hooks are exercised by
a map that offloads part of the shipped model to disk; bitsandbytes' CPU backend quantizes where it is installed.
"""

import json
import types

import pytest
import torch
from torch import nn

from otter import SHAPESWORLD_MODEL, OtterProcessor
from otter.chat import answer, chat_prompt, load_otter
from otter.cli import main
from otter.cross_attention import CrossAttentionMedia, GatedCrossAttentionBlock, OtterDecoderLayer, \
    media_attention_mask
from otter.demo import Episode, episodes, run
from otter.shapesworld import ShapesWorld, render

# the shipped model split between the CPU and the disk: every part of it goes through accelerate's hooks, which load
# the offloaded weights for each call
SPLIT = {"vision_model": "cpu", "perceiver": "disk", "language_model.transformer.wte": "cpu",
         "language_model.transformer.blocks.0": "cpu", "language_model.transformer.blocks.1": "disk",
         "language_model.transformer.blocks.2": "cpu", "language_model.transformer.blocks.3": "disk",
         "language_model.transformer.norm_f": "disk", "language_model.lm_head": "cpu"}


def questions() -> list[Episode]:
    """A few ShapesWorld prompts: shape, colour and count questions, 4-shot fast binding, a two-image comparison."""
    world = ShapesWorld(7)
    vqa = [Episode("VQA", 0, [], {"scenes": [record["scene"]], "instruction": record["question"],
                                  "answer": record["answer"]})
           for record in (world.vqa(kind) for kind in ("shape", "colour", "count"))]
    few_shot = episodes(seed=7, count=1, shots=4)
    return vqa + [episode for episode in few_shot if episode.task in ("fast binding", "comparison") and episode.shots]


def answers(model, processor, todo: list[Episode] | None = None) -> list[str]:
    """The model's greedy answers to `todo` (default: `questions()`), as `otter demo` prompts them."""
    todo = questions() if todo is None else todo
    for episode in todo:
        run(model, processor, episode, max_new_tokens=12)
    return [episode.answer for episode in todo]


@pytest.fixture(scope="module")
def processor():
    return OtterProcessor.from_pretrained(SHAPESWORLD_MODEL)


@pytest.fixture(scope="module")
def plain(processor):
    """The shipped model loaded as the commands load it without options, and its answers."""
    model = load_otter(SHAPESWORLD_MODEL)
    return model, answers(model, processor)


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    """A shape question about one image, as `otter generate` takes it."""
    record = ShapesWorld(11).vqa("shape")
    path = tmp_path_factory.mktemp("big") / "scene.png"
    render(record["scene"]).save(path)
    return ["--model", str(SHAPESWORLD_MODEL), "--image", str(path), "--prompt", record["question"]]


@pytest.mark.parametrize("device_map", ["auto", json.dumps(SPLIT)])
def test_generate_with_a_device_map_answers_as_the_plain_load(query, device_map, tmp_path, capsys):
    main(["generate", *query])
    expected = capsys.readouterr().out
    main(["generate", *query, "--device-map", device_map, "--offload-folder", str(tmp_path)])
    assert capsys.readouterr().out == expected
    assert expected.strip()


def test_a_model_split_over_cpu_and_disk_runs_through_the_hooks(plain, processor, tmp_path):
    """generate() encodes the media keys/values before decoding, outside the blocks' forward: they still load."""
    model = load_otter(SHAPESWORLD_MODEL, device_map=SPLIT, offload_folder=str(tmp_path))
    assert model.hf_device_map == SPLIT
    offloaded = model.language_model.transformer.blocks[1]
    assert hasattr(offloaded, "_hf_hook") and offloaded.gated_cross_attn_layer.attn.to_kv.weight.device.type == "meta"
    assert answers(model, processor) == plain[1]
    # beam search runs the prompt once and shares its cache (OtterModel.forward, called past the root hook)
    episode = questions()[0]
    images = [render(scene) for scene in episode.query["scenes"]]
    prompt = chat_prompt([], episode.query["instruction"], len(images))
    beams = [answer(each, processor, prompt, images, max_new_tokens=8, num_beams=3, do_sample=False)
             for each in (plain[0], model)]
    assert beams[0] == beams[1]


def test_each_layer_moves_the_media_to_its_device():
    """With a device map the media keys/values, mask and has_media come to the layer's device (here: meta)."""
    class Identity(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return hidden_states

    with torch.device("meta"):
        block = GatedCrossAttentionBlock(dim=16, dim_visual=8, heads=2, dim_head=4, ff_mult=2)
    layer = OtterDecoderLayer(Identity(), block, block_index=0)
    attn_mask, has_media = media_attention_mask(torch.tensor([[0, 1, 1]]), num_media=1, num_latents=3,
                                                only_attend_immediate_media=True)
    media = CrossAttentionMedia([torch.randn(1, 3, 16)], attn_mask, has_media.float())  # on the CPU
    with pytest.raises(RuntimeError, match="device"):
        block(torch.randn(1, 3, 16, device="meta"), *media.for_block(0))
    assert layer(torch.randn(1, 3, 16, device="meta"), otter_media=media).device.type == "meta"


def test_device_and_device_map_together_are_refused(query):
    with pytest.raises(SystemExit, match="--device and --device-map cannot be used together"):
        main(["generate", *query, "--device", "cpu", "--device-map", "auto"])
    with pytest.raises(SystemExit, match="--device-map 'everywhere' is not one of auto"):
        main(["generate", *query, "--device-map", "everywhere"])
    with pytest.raises(SystemExit, match="expected a JSON object of module names to devices"):
        main(["generate", *query, "--device-map", '{"vision_model": [0, 1]}'])
    with pytest.raises(SystemExit, match="--offload-folder holds what --device-map offloads"):
        main(["generate", *query, "--offload-folder", "somewhere"])


def test_serve_and_chat_take_the_same_options(query):
    pytest.importorskip("uvicorn")
    for command in (["serve", "--model", str(SHAPESWORLD_MODEL)], ["chat", "--model", str(SHAPESWORLD_MODEL)]):
        with pytest.raises(SystemExit, match="--device and --device-map cannot be used together"):
            main([*command, "--device", "cpu", "--device-map", "auto"])


# -- quantization -------------------------------------------------------------------------------------------------
def test_quantization_without_bitsandbytes_says_what_is_missing(query, monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version

    def version(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    for flag in ("--load-in-8bit", "--load-in-4bit"):
        with pytest.raises(SystemExit, match=f"{flag} needs bitsandbytes, which is not installed: pip install"):
            main(["generate", *query, flag])


def test_quantization_without_a_backend_for_the_device_says_so(query, monkeypatch):
    import importlib.metadata
    import sys

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.50.2" if name == "bitsandbytes" else real_version(name))
    monkeypatch.setitem(sys.modules, "bitsandbytes",
                        types.SimpleNamespace(__version__="0.50.2", supported_torch_devices={"cuda", "xpu"}))
    with pytest.raises(SystemExit, match="bitsandbytes 0.50.2 has no backend for cpu \\(it supports cuda, xpu\\)"):
        main(["generate", *query, "--load-in-8bit", "--device", "cpu"])


def _linears(model) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


@pytest.mark.parametrize("quantization, weight_dtype", [("8bit", torch.int8), ("4bit", torch.uint8)])
def test_quantization_keeps_vision_perceiver_and_cross_attention_and_answers(plain, processor, quantization,
                                                                            weight_dtype):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    model = load_otter(SHAPESWORLD_MODEL, quantization=quantization)
    plain_linears, linears = _linears(plain[0]), _linears(model)
    assert linears.keys() == plain_linears.keys()
    quantized = {name for name, module in linears.items()
                 if isinstance(module, (bitsandbytes.nn.Linear8bitLt, bitsandbytes.nn.Linear4bit))}
    # exactly the language model's own linear layers: attention and feed-forward of its decoder layers
    assert quantized == {name for name in linears if ".decoder_layer." in name} and len(quantized) == 16
    assert {linears[name].weight.dtype for name in quantized} == {weight_dtype}
    for name, module in linears.items():
        if name not in quantized:  # vision tower, perceiver, gated cross-attention, output embeddings
            assert type(module) is nn.Linear and torch.equal(module.weight, plain_linears[name].weight), name
    todo = questions()[:3] if quantization == "4bit" else questions()
    assert answers(model, processor, todo) == plain[1][:len(todo)]


def test_generate_load_in_8bit_answers_as_the_plain_load(query, capsys):
    pytest.importorskip("bitsandbytes")
    main(["generate", *query])
    expected = capsys.readouterr().out
    main(["generate", *query, "--load-in-8bit"])
    assert capsys.readouterr().out == expected
