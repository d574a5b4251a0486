"""The companion converters (open_clip -> CLIPVisionModel, mosaic_gpt -> MPT), mosaic_gpt inside an OpenFlamingo
conversion, untied heads, and the `otter convert` command line."""

import json
import logging

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionModel,
    MptForCausalLM,
)

import otter
from otter.cli import main
from otter.conversion.mosaic_gpt import convert_mosaic_gpt, mpt_config
from otter.conversion.open_clip import convert_open_clip
from otter.conversion.openflamingo import convert_openflamingo
from otter.tiny import TEXT_CONFIGS, tiny_tokenizer

from . import mosaic_gpt_reference as mosaic
from .conversion_fixtures import (
    TINY_VIT,
    factory,
    open_clip,
    reference_model,
    released_checkpoint,
    train_randomly,
    write_language_model,
    write_open_clip,
)
from .reference import vision_x
from .test_conversion import TEXTS, load, pictures


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    return write_open_clip(tmp_path_factory.mktemp("open_clip"))


def test_open_clip_tower_converts_exactly(vision, tmp_path):
    config_path, weights = vision
    convert_open_clip(str(config_path), str(weights), tmp_path / "clip")
    ours = CLIPVisionModel.from_pretrained(tmp_path / "clip").eval()
    assert ours.config.hidden_act == "quick_gelu"
    theirs = open_clip.create_model(config_path.stem, pretrained=str(weights)).visual.eval()
    theirs.output_tokens = True
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = ours(pixel_values=pixels).last_hidden_state
        _, after_ln_post = theirs(pixels)
        theirs.final_ln_after_pool = True
        _, before_ln_post = theirs(pixels)
    assert (hidden[:, 1:] - before_ln_post).abs().max() <= 1e-5
    assert (ours.post_layernorm(hidden)[:, 1:] - after_ln_post).abs().max() <= 1e-5


def test_open_clip_settings_without_an_equivalent_are_refused(tmp_path):
    config = json.loads(json.dumps(TINY_VIT))
    config["vision_cfg"]["ls_init_value"] = 1e-5
    (tmp_path / "scaled.json").write_text(json.dumps(config))
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="ls_init_value=1e-05 of scaled has no CLIPVisionModel equivalent"):
        convert_open_clip(str(tmp_path / "scaled.json"), str(tmp_path / "w.pt"), tmp_path / "out")
    with pytest.raises(ValueError, match="neither a weights file nor a pretrained tag"):
        convert_open_clip("ViT-L-14", "no-such-tag", tmp_path / "out")


@pytest.fixture
def mosaic_folder(tmp_path):
    tokenizer = tiny_tokenizer()
    config = dict(mosaic.TINY_MOSAIC, vocab_size=len(tokenizer) + 7)  # padded vocabulary, as MPT-1B's 50432 rows
    state = mosaic.random_state_dict(config)
    mosaic.write_folder(tmp_path / "mosaic", config, state, tokenizer)
    return tmp_path / "mosaic", config, state


def test_mosaic_gpt_converts_exactly_with_qk_layernorm(mosaic_folder, tmp_path):
    folder, config, state = mosaic_folder
    convert_mosaic_gpt(str(folder), tmp_path / "mpt")
    ours = otter.load_language_model(tmp_path / "mpt").eval()
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    real = mask.bool()
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        stock = MptForCausalLM.from_pretrained(tmp_path / "mpt").eval()(input_ids=ids, attention_mask=mask).logits
    reference = mosaic.forward(state, config, ids, mask)
    assert (logits[real] - reference[real]).abs().max() <= 1e-5
    assert (stock[real] - reference[real]).abs().max() > 0.1  # native MPT alone drops qk_ln: why the extension exists
    assert (tmp_path / "mpt" / "tokenizer.json").is_file()
    assert "otter.load_language_model" in (tmp_path / "mpt" / "README.md").read_text()


def test_lora_on_a_qk_layernorm_mpt_merges_into_the_model_it_trained(mosaic_folder, tmp_path):
    """
    LoRA on OpenFlamingo-3B's language model (peft adapts MPT's `Wqkv`): the QK LayerNorms normalise the adapted
    projection, so the model with its adapter and the merged one (`otter train --lora-output merged`) are the same
    function, in the fused attention and the eager one.
    """
    from peft import LoraConfig, get_peft_model

    folder, config, _ = mosaic_folder
    convert_mosaic_gpt(str(folder), tmp_path / "mpt")
    model = otter.load_language_model(tmp_path / "mpt").eval()
    torch.manual_seed(0)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["Wqkv"], init_lora_weights=False))
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapter = adapted(input_ids=ids).logits
        merged = adapted.merge_and_unload()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter, rtol=1e-5, atol=1e-5)
        otter.language_models.sdpa_attentions(merged, eager=True)
        torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting,value", [("alibi", False), ("n_heads", 6), ("no_bias", False)])
def test_mosaic_gpt_settings_mpt_cannot_express_are_refused(setting, value):
    with pytest.raises(ValueError, match=setting if setting != "n_heads" else "power of two"):
        mpt_config(dict(mosaic.TINY_MOSAIC, **{setting: value}))


def test_openflamingo_with_a_mosaic_gpt_language_model(mosaic_folder, vision, tmp_path, monkeypatch):
    """OpenFlamingo-3B's shape: the LM folder is mosaic_gpt, converted on the fly; its padded vocabulary is cut."""
    folder, _, _ = mosaic_folder
    convert_mosaic_gpt(str(folder), tmp_path / "mpt")
    monkeypatch.setattr(factory.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kwargs: otter.load_language_model(path))
    reference, _, _ = reference_model(*vision, tmp_path / "mpt", 1, monkeypatch)
    train_randomly(reference)
    torch.save(released_checkpoint(reference), tmp_path / "checkpoint.pt")
    convert_openflamingo(tmp_path / "otter", checkpoint=str(tmp_path / "checkpoint.pt"), lang_encoder=str(folder),
                         vision_encoder=str(vision[0]), vision_pretrained=str(vision[1]), cross_attn_every_n_layers=1)
    model, processor = load(tmp_path / "otter")
    assert model.config.text_config.attn_config.qk_ln
    images = pictures()
    batch = processor(text=TEXTS, images=[images[:2], images[2:3], images[2:5]])
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = reference(vision_x(model, batch), batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4


def test_an_untied_head_absent_from_the_checkpoint_gets_mean_rows(vision, tmp_path, monkeypatch, caplog):
    """OpenFlamingo never trains or saves an untied LLaMA head, so its rows for the new tokens are not in any file."""
    lm_folder = tmp_path / "lm"
    tokenizer = tiny_tokenizer()
    settings = dict(TEXT_CONFIGS["llama"], tie_word_embeddings=False)
    language_model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(settings.pop("model_type"), vocab_size=len(tokenizer), **settings))
    language_model.save_pretrained(lm_folder)
    tokenizer.save_pretrained(lm_folder)
    reference, _, _ = reference_model(*vision, lm_folder, 2, monkeypatch)
    torch.save(released_checkpoint(reference), tmp_path / "checkpoint.pt")
    with caplog.at_level(logging.WARNING):
        convert_openflamingo(tmp_path / "otter", checkpoint=str(tmp_path / "checkpoint.pt"), lang_encoder=str(lm_folder),
                             vision_encoder=str(vision[0]), vision_pretrained=str(vision[1]))
    assert "new rows set to the mean row" in caplog.text
    head = AutoModelForImageTextToText.from_pretrained(tmp_path / "otter").get_output_embeddings().weight
    original = language_model.lm_head.weight
    assert torch.equal(head[:len(tokenizer)], original)
    assert torch.allclose(head[len(tokenizer):], original.mean(0).expand(head.shape[0] - len(tokenizer), -1))


def test_command_line(vision, tmp_path, monkeypatch, capsys):
    lm_folder = write_language_model(tmp_path / "lm", "gpt_neox")
    reference, _, _ = reference_model(*vision, lm_folder, 2, monkeypatch)
    train_randomly(reference)
    torch.save(released_checkpoint(reference), tmp_path / "checkpoint.pt")
    main(["convert", "openflamingo", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--lang-encoder", str(lm_folder),
          "--vision-encoder", str(vision[0]), "--vision-pretrained", str(vision[1]),
          "--cross-attn-every-n-layers", "2", "--out", str(tmp_path / "otter"), "--dtype", "float16"])
    assert f"wrote {tmp_path / 'otter'}" in capsys.readouterr().out
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "otter")
    assert model.dtype == torch.float16
    assert isinstance(AutoProcessor.from_pretrained(tmp_path / "otter"), otter.OtterProcessor)
    assert "otter convert openflamingo" in (tmp_path / "otter" / "README.md").read_text()

    main(["convert", "open-clip", "--vision-encoder", str(vision[0]), "--vision-pretrained", str(vision[1]),
          "--no-quick-gelu", "--out", str(tmp_path / "clip")])
    assert CLIPVisionModel.from_pretrained(tmp_path / "clip").config.hidden_act == "gelu"

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["convert", "openflamingo", "--preset", "OpenFlamingo-4B-vitl-rpj3b", "--cross-attn-every-n-layers", "1",
              "--out", str(tmp_path / "x")])
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip() == ("otter: OpenFlamingo-4B-vitl-rpj3b was trained with "
                                               "cross_attn_every_n_layers=2, not 1")


def test_hub_ids_resolve_through_the_local_cache_offline(vision, tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--tiny--neox" / "snapshots" / "0123abcd"
    write_language_model(snapshot, "gpt_neox")
    (tmp_path / "hub" / "models--tiny--neox" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--neox" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reference, _, _ = reference_model(*vision, snapshot, 2, monkeypatch)
    torch.save(released_checkpoint(reference), tmp_path / "checkpoint.pt")
    convert_openflamingo(tmp_path / "otter", checkpoint=str(tmp_path / "checkpoint.pt"), lang_encoder="tiny/neox",
                         tokenizer="tiny/neox", vision_encoder=str(vision[0]), vision_pretrained=str(vision[1]))
    load(tmp_path / "otter")
    with pytest.raises(FileNotFoundError, match="not-a-folder: no such folder"):
        convert_openflamingo(tmp_path / "other", checkpoint=str(tmp_path / "checkpoint.pt"),
                             lang_encoder="./not-a-folder", vision_encoder=str(vision[0]),
                             vision_pretrained=str(vision[1]))
