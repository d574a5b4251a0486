"""`otter convert otter`: the Otter project's checkpoints, converted, compute what the Otter project's own code computes
(otter-ai 0.0.0a8 run in the test, tests/otter_releases.py) (issue 19)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("otter_ai", reason="pip install --no-deps otter-ai==0.0.0a8")

from otter import OtterForConditionalGeneration, OtterProcessor  # noqa: E402
from otter.cli import main  # noqa: E402
from otter.conversion.otter_hf import convert_otter  # noqa: E402

from .otter_releases import (  # noqa: E402
    example_inputs,
    otter_pixel_values,
    reference_greedy,
    reference_logits,
    save_release,
    write_release,
    write_trainable_checkpoint,
)


def convert(release, out, **kwargs):
    convert_otter(out, model=str(release.folder), tokenizer=str(release.tokenizer_folder), **kwargs)
    return OtterForConditionalGeneration.from_pretrained(out).eval(), OtterProcessor.from_pretrained(out)


def assert_same_logits(model, release_or_model, inputs, atol=1e-4):
    vision_x, input_ids, attention_mask = inputs
    with torch.no_grad():
        ours = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=vision_x).logits
    theirs = reference_logits(release_or_model, vision_x, input_ids, attention_mask)
    real = attention_mask.bool()  # padded positions differ between attention implementations: nobody reads them
    assert ours.shape == theirs.shape
    assert (ours[real] - theirs[real]).abs().max() <= atol
    assert ours[real].std() > 0.05  # not two near-constant outputs


@pytest.mark.parametrize("kind", ["mpt", "llama", "mosaic", "video", "flamingo"])
def test_converted_releases_compute_what_otters_code_computes(kind, tmp_path):
    release = write_release(tmp_path / "release", kind)
    model, processor = convert(release, tmp_path / "converted")
    assert_same_logits(model, release, example_inputs(release))
    assert processor.num_frames == (min(release.config["max_num_frames"], 16) if kind == "video" else None)
    # the tokenizer is Otter's, token for token (<answer> on the id OpenFlamingo gave <PAD>; Flamingo has none)
    assert processor.tokenizer.get_vocab() == release.tokenizer.get_vocab()
    for token in ("<image>", "<|endofchunk|>"):
        assert processor.tokenizer.convert_tokens_to_ids(token) == release.token_id(token)
    assert model.config.media_token_id == release.media_token_id and model.config.eoc_token_id == release.eoc_token_id
    # every embedding row is kept (MPT's padded vocabulary) and never generated, nor are <PAD> and <image>
    rows = model.get_input_embeddings().weight.shape[0]
    suppressed = set(model.generation_config.suppress_tokens)
    assert set(range(len(processor.tokenizer), rows)) | {release.pad_token_id, release.media_token_id} == suppressed
    # Otter's preprocessing: transformers' CLIP crop, floored
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (37, 51, 3), dtype=np.uint8)) for i in range(2)]
    assert torch.allclose(processor(images=images, text="<image><image>")["pixel_values"], otter_pixel_values(images),
                          atol=1e-6)


@pytest.mark.parametrize("kind", ["mpt", "llama"])
def test_greedy_generation_with_the_cache_matches_otters_full_forwards(kind, tmp_path):
    release = write_release(tmp_path / "release", kind)
    model, _ = convert(release, tmp_path / "converted")
    vision_x, input_ids, attention_mask = example_inputs(release)  # two chats, left-padded
    suppress = model.generation_config.suppress_tokens
    ours = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=vision_x, max_new_tokens=6,
                          min_new_tokens=6, do_sample=False, bad_words_ids=None)
    theirs = reference_greedy(release, vision_x, input_ids, attention_mask, max_new_tokens=6, suppress=suppress)
    assert torch.equal(ours, theirs)  # the images are read on every generated token, with the KV cache


@pytest.mark.parametrize("style", ["new", "old", "bare"])
def test_lora_releases_merge_exactly_in_every_peft_naming(style, tmp_path):
    release = write_release(tmp_path / "release", "lora", lora_style=style)
    model, _ = convert(release, tmp_path / "converted")
    assert not any("lora" in name for name in model.state_dict())
    assert_same_logits(model, release, example_inputs(release))


def test_lora_kept_as_an_adapter_loads_onto_the_converted_base(tmp_path):
    release = write_release(tmp_path / "release", "lora", base="llama")
    inputs = example_inputs(release)
    model, _ = convert(release, tmp_path / "converted", lora="adapter")
    assert (tmp_path / "converted" / "lora-adapter" / "adapter_config.json").is_file()
    vision_x, input_ids, attention_mask = inputs
    with torch.no_grad():
        base = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=vision_x).logits
    model.load_adapter(str(tmp_path / "converted" / "lora-adapter"))
    assert_same_logits(model, release, inputs)
    real = attention_mask.bool()
    with torch.no_grad():
        adapted = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=vision_x).logits
    assert (adapted[real] - base[real]).abs().max() > 1e-3  # the adapter does something


def test_a_trainable_only_checkpoint_over_its_init_folder_in_bf16_shards(tmp_path):
    release = write_release(tmp_path / "release", "llama")
    sharded = save_release(release, tmp_path / "bf16", format="bin", dtype=torch.bfloat16, max_shard_size=30_000_000)
    trained = write_trainable_checkpoint(sharded, tmp_path / "checkpoint_3.pt", prefix="module.", wrapped=True)
    assert len(list((tmp_path / "bf16").glob("pytorch_model-*.bin"))) > 1
    model, _ = convert(sharded, tmp_path / "converted", checkpoint=str(trained.path))
    assert_same_logits(model, trained.model, example_inputs(sharded))


def test_the_command_line_and_named_errors(tmp_path, capsys):
    release = write_release(tmp_path / "release", "mpt")
    out = tmp_path / "converted"
    main(["convert", "otter", "--model", str(release.folder), "--tokenizer", str(release.tokenizer_folder),
          "--dtype", "bfloat16", "--out", str(out)])
    assert OtterForConditionalGeneration.from_pretrained(out).dtype == torch.bfloat16
    card = (out / "README.md").read_text()
    assert "otter convert otter" in card and "library_name: otter" in card
    assert (out / "chat_template.jinja").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == release.eoc_token_id and generation["bad_words_ids"]

    # an unconverted release is refused by from_pretrained, with the command that converts it
    with pytest.raises(ValueError, match="convert it with `otter convert otter"):
        OtterForConditionalGeneration.from_pretrained(release.folder)
    # a missing tensor, a wrong cross_attn_every_n_layers, a setting transformers' MPT cannot express, a wrong tokenizer
    config = json.loads((release.folder / "config.json").read_text())
    for name, edit, message in (
            ("every-n", {"cross_attn_every_n_layers": 1}, "missing .*gated_cross_attn_layer.*likely cause: "
                                                          "cross_attn_every_n_layers"),
            ("no-alibi", {"text_config": {**config["text_config"], "attn_config": {
                **config["text_config"]["attn_config"], "alibi": False}}}, r"attn_config\.alibi=False cannot be "
                                                                          "expressed by transformers' MPT")):
        (release.folder / "config.json").write_text(json.dumps({**config, **edit}))
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", "otter", "--model", str(release.folder), "--tokenizer", str(release.tokenizer_folder),
                  "--out", str(tmp_path / name)])
        assert exit_info.value.code == 1
        assert __import__("re").search(message, capsys.readouterr().err.replace("\n", " ")), message
        assert not (tmp_path / name).exists()
    (release.folder / "config.json").write_text(json.dumps(config))
