"""Damaged folders, inputs the model cannot answer faithfully, and the command line's error convention (issue 17)."""

import io
import json
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText

import otter
from otter import OtterForConditionalGeneration, OtterModel, OtterProcessor
from otter.chat import load_model
from otter.cli import main
from otter.modeling_otter import DamagedModelError
from otter.tiny import build_tiny_otter

from .conftest import set_gates


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny MPT Otter (cross-attention every 2 of 4 layers, gates open) and an image beside it."""
    root = tmp_path_factory.mktemp("reliability")
    model, processor = build_tiny_otter("mpt", cross_attn_every_n_layers=2)
    set_gates(model)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(root / "red.png")
    return root


def damaged_copy(saved, tmp_path, tensors=None, config=None):
    """A copy of the saved model with `tensors(state_dict)` and `config(dict)` edits applied to its files."""
    folder = tmp_path / "damaged"
    shutil.copytree(saved / "model", folder)
    if tensors is not None:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        values = json.loads((folder / "config.json").read_text())
        config(values)
        (folder / "config.json").write_text(json.dumps(values))
    return folder


def first_gate(state):
    return next(name for name in state if name.endswith("attn_gate"))


DAMAGE = {
    "latents missing": (dict(tensors=lambda state: state.pop("perceiver.latents")),
                        r"missing from the weights \(1\): perceiver\.latents"),
    "a gate missing": (dict(tensors=lambda state: state.pop(first_gate(state))),
                       r"missing from the weights \(1\): language_model\.transformer\.blocks\.1\.gated_cross_attn_layer"
                       r"\.attn_gate"),
    "an extra tensor": (dict(tensors=lambda state: state.update(extra=torch.zeros(2))),
                        r"in the weights but not in the model \(1\): extra"),
    "a mis-shaped tensor": (dict(tensors=lambda state: state.update({"perceiver.latents": torch.zeros(3, 5)})),
                            r"of another shape \(1\): perceiver\.latents \(3, 5\) where the model has"),
    "fewer layers in the config": (dict(config=lambda values: values["text_config"].update(n_layers=2)),
                                   r"in the weights but not in the model \(\d+\): "
                                   r"language_model\.transformer\.blocks\.2\."),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_folder_is_refused_naming_the_tensors(saved, tmp_path, damage):
    edits, message = DAMAGE[damage]
    folder = damaged_copy(saved, tmp_path, **edits)
    for load in (OtterForConditionalGeneration.from_pretrained, OtterModel.from_pretrained,
                 AutoModelForImageTextToText.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(DamagedModelError, match=message):
            load(folder)


def test_damaged_folders_are_refused_by_the_commands_and_training(saved, tmp_path, capsys):
    from otter.train.trainer import TrainingConfig, train

    folder = damaged_copy(saved, tmp_path, tensors=lambda state: state.pop("perceiver.latents"))
    with pytest.raises(SystemExit, match="otter: .*missing from the weights \\(1\\): perceiver.latents"):
        load_model(str(folder), "cpu", "float32")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "answer": "ho"}) + "\n")
    with pytest.raises(DamagedModelError, match="perceiver.latents"):
        train(TrainingConfig(model=folder, data=[data], out=tmp_path / "run", max_steps=1, num_workers=0))


def test_tied_output_embeddings_are_the_one_tensor_a_folder_may_lack(saved):
    model, info = OtterForConditionalGeneration.from_pretrained(saved / "model", output_loading_info=True)
    assert "language_model.lm_head.weight" not in load_file(saved / "model" / "model.safetensors")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("cut", ["truncated", "header"])
def test_an_unreadable_weights_file_is_named_by_the_api_and_the_commands(saved, tmp_path, capsys, cut):
    folder = damaged_copy(saved, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if cut == "truncated" else data[:8] + b"{garbage" + data[16:])
    with pytest.raises(DamagedModelError, match=f"{weights} is damaged or truncated"):
        OtterForConditionalGeneration.from_pretrained(folder)
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--model", str(folder)])
        assert str(exit_info.value.code).startswith(f"otter: {weights} is damaged or truncated")


def test_paths_that_are_not_otter_folders_are_refused_before_loading(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder ./nowhere/model does not exist"):
        OtterForConditionalGeneration.from_pretrained("./nowhere/model")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        OtterForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file"):
        OtterForConditionalGeneration.from_pretrained(saved / "red.png")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="is not an Otter model folder: .* has model_type 'llama'"):
        OtterForConditionalGeneration.from_pretrained(tmp_path)


# -- inputs the model cannot answer faithfully ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    return model.eval(), processor


def test_image_tokens_without_images_are_refused(tiny):
    model, processor = tiny
    with_image = processor(text=["hello", "<image>a red"], images=[[], [Image.new("RGB", (32, 32))]])
    text_only = {key: value for key, value in with_image.items() if key != "pixel_values"}
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] hold <image> tokens but no pixel_values"):
        model(**text_only)
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] hold <image> tokens but no pixel_values"):
        model.generate(**text_only, max_new_tokens=2)
    model(**with_image)  # with the images, or with text alone, the model runs
    model.generate(**processor(text="hello"), max_new_tokens=2)


def test_an_overlong_prompt_is_refused_naming_both_numbers(tiny):
    model, processor = tiny
    limit = model.config.text_config.max_position_embeddings
    assert processor.tokenizer.model_max_length == limit  # from_parts sets it; the shipped model's too
    assert OtterProcessor.from_pretrained(otter.SHAPESWORLD_MODEL).tokenizer.model_max_length == 512
    too_long = torch.full((1, limit + 1), processor.tokenizer.convert_tokens_to_ids("a"))
    with pytest.raises(ValueError, match=f"{limit + 1} tokens, but the language model takes at most {limit} positions"):
        model(input_ids=too_long)
    fits = too_long[:, : limit - 5]
    with pytest.raises(ValueError, match=f"{limit - 5} prompt tokens \\+ max_new_tokens 10 = {limit + 5}, but the "
                                         f"language model takes at most {limit}"):
        model.generate(input_ids=fits, max_new_tokens=10)
    assert model.generate(input_ids=fits, max_new_tokens=5, do_sample=False).shape[1] <= limit


def test_otter_chat_survives_an_overlong_message(saved, capsys, monkeypatch):
    limit = json.loads((saved / "model" / "config.json").read_text())["text_config"]["max_seq_len"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("a " * (limit + 10) + "\nhello\n"))
    main(["chat", "--model", str(saved / "model"), "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert "the input is too long" in captured.err and "the message was not sent" in captured.err
    assert len(captured.out.splitlines()) == 1  # the next message was answered


def test_empty_prompts_and_beam_counts_below_one_are_refused(tiny, saved):
    model, processor = tiny
    with pytest.raises(ValueError, match="text must be a string or a non-empty list of strings"):
        processor(text=[])
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] of the text tokenize to nothing"):
        processor(text=["hello", ""])
    with pytest.raises(ValueError, match="input_ids holds no tokens"):
        model.generate(input_ids=torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2)
    inputs = processor(text="hello")
    for beams in (0, -1):
        with pytest.raises(ValueError, match=f"num_beams must be a positive integer, got {beams}"):
            model.generate(**inputs, num_beams=beams, max_new_tokens=2)
        with pytest.raises(SystemExit, match=f"--num-beams must be at least 1, got {beams}"):
            main(["generate", "--model", str(saved / "model"), "--prompt", "hi", "--num-beams", str(beams)])


# -- the command line's error convention ------------------------------------------------------------------------
def finetune(tmp_path, *extra):
    return ["train", "finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"), "--out",
            str(tmp_path / "out"), *extra]


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(finetune(tmp_path, "--batch-size", "0"))
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "otter: batch_size must be >= 1, got 0\n"
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        main(finetune(tmp_path, "--batch-size", "0", "--debug"))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        main(["--debug", *finetune(tmp_path, "--batch-size", "0")])
    monkeypatch.setenv("OTTER_DEBUG", "1")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        main(finetune(tmp_path, "--batch-size", "0"))


def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    import otter.train.trainer as trainer

    monkeypatch.setattr(trainer, "train", lambda config: json.loads("{"))  # a ValueError raised outside Otter's code
    with pytest.raises(json.JSONDecodeError):
        main(finetune(tmp_path))
    monkeypatch.setattr(trainer, "train", lambda config: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(finetune(tmp_path))
