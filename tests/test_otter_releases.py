"""
The Otter-release fixtures of tests/otter_releases.py work: the folders are laid out as transformers 4.30 wrote
Otter's releases, load back into Otter's own classes with identical logits, and the oracle is deterministic and
sensitive to what it must be sensitive to (images, frames, adapters, trained weights).
"""

import json
import re
import shutil

import pytest
import torch

from . import otter_releases as releases

KIND_BASES = [("mpt", "mpt"), ("llama", "llama"), ("mosaic", "mosaic"), ("video", "llama"), ("lora", "mpt"),
              ("lora", "llama"), ("flamingo", "mpt")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One release per (kind, base), built on first use and shared by the module's tests."""
    root = tmp_path_factory.mktemp("otter-releases")
    cache = {}

    def get(kind, base=None):
        base = base or releases.DEFAULT_BASE[kind]
        if (kind, base) not in cache:
            cache[kind, base] = releases.write_release(root / f"{kind}-{base}", kind, base=base)
        return cache[kind, base]

    yield get
    shutil.rmtree(root, ignore_errors=True)  # ~280 MB a release (Otter's perceiver is full size): not kept


@pytest.fixture
def scratch(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def stored_names(release):
    return list(releases.read_release_weights(release.folder))


def test_mpt_folder_is_laid_out_as_the_release(built):
    release = built("mpt")
    config = json.loads((release.folder / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert config["model_type"] == "otter" and config["torch_dtype"] == "float32"
    assert config["use_media_placement_augmentation"] is True and config["only_attend_previous"] is True
    assert text["architectures"] == ["MPTForCausalLM"] and text["hidden_size"] == text["d_model"]
    assert text["attn_config"]["alibi"] and text["attn_config"]["attn_impl"] == "torch" and text["no_bias"]
    assert text["vocab_size"] % 64 == 0 and text["vocab_size"] > len(release.tokenizer)
    assert vision["hidden_size"] == 1024 and vision["hidden_act"] == "quick_gelu"
    index = json.loads((release.folder / "pytorch_model.bin.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(release.weight_files)
    assert all(re.fullmatch(rf"pytorch_model-0000\d-of-0000{len(files)}\.bin", file) for file in files)
    state = {}
    for file in files:  # each shard is a plain state-dict chunk a weights_only load accepts
        shard = torch.load(release.folder / file, map_location="cpu", weights_only=True)
        assert set(shard) == {name for name, owner in index["weight_map"].items() if owner == file}
        state.update(shard)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert state["lang_encoder.transformer.wte.weight"].shape == (text["vocab_size"], text["d_model"])
    assert not any("lm_head" in name or "wpe" in name or name.endswith(".bias") and "decoder_layer" in name
                   for name in state)
    assert state["vision_encoder.vision_model.embeddings.position_ids"].dtype == torch.int64
    assert not any(name.startswith("vision_encoder.embeddings.") for name in state)
    assert "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.feed_forward.3.weight" in state
    assert "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn_gate" not in state  # every 2nd layer
    assert "perceiver.layers.5.feed_forward.1.weight" in state and "perceiver.frame_embs" not in state
    gates = [t for name, t in state.items() if name.endswith(("attn_gate", "ff_gate"))]
    assert len(gates) == 4 and all(0.5 <= float(g) <= 0.8 for g in gates)
    norms = [t for name, t in state.items() if re.search(r"norm.*\.(weight|bias)$", name)]
    assert all(not torch.equal(t, torch.ones_like(t)) and not torch.equal(t, torch.zeros_like(t)) for t in norms)


def test_tokenizer_is_otters_and_the_base_is_saved_apart(built):
    from transformers import AutoTokenizer

    for kind in ("mpt", "flamingo"):
        release = built(kind)
        base = AutoTokenizer.from_pretrained(release.tokenizer_folder)
        added = ["<|endofchunk|>", "<image>"] + (["<answer>"] if kind != "flamingo" else []) + ["<PAD>"]
        assert [release.tokenizer.convert_tokens_to_ids(t) for t in added] == list(range(len(base), len(base) + 4 - (
            kind == "flamingo")))
        assert not set(added) & set(base.get_vocab())
        assert release.media_token_id == release.token_id("<image>")
        assert release.eoc_token_id == release.token_id("<|endofchunk|>")
        assert release.pad_token_id == release.token_id("<PAD>")
        assert (release.answer_token_id is None) == (kind == "flamingo")


@pytest.mark.parametrize("kind, base", KIND_BASES, ids=[f"{k}-{b}" for k, b in KIND_BASES])
def test_folder_reloads_into_otters_class_with_identical_logits(built, kind, base):
    release = built(kind, base)
    vision_x, input_ids, attention_mask = releases.example_inputs(release)
    expected = releases.reference_logits(release, vision_x, input_ids, attention_mask)
    reloaded = releases.load_release(release.folder, release.tokenizer_folder)
    assert torch.equal(releases.reference_logits(reloaded, vision_x, input_ids, attention_mask), expected)
    assert torch.equal(releases.reference_logits(release, vision_x, input_ids, attention_mask), expected)  # no drift
    assert expected.shape == (*input_ids.shape, release.config["text_config"]["vocab_size"])
    other = releases.reference_logits(release, vision_x.flip(0), input_ids, attention_mask)  # images swapped
    assert (other - expected).abs().max() > 0.1


def test_otters_own_from_pretrained_reads_the_folder(built):
    """transformers 5 loading the folder into otter_ai's class: every key used, none missing."""
    release = built("mpt")
    with releases.otter_ai_shims(releases.tiny_tokenizer()):
        model, info = releases.modeling_otter.OtterForConditionalGeneration.from_pretrained(
            release.folder, output_loading_info=True)
    assert not any(info.values()), info
    vision_x, input_ids, attention_mask = releases.example_inputs(release)
    ours = releases.reference_logits(model.eval(), vision_x, input_ids, attention_mask)
    expected = releases.reference_logits(release, vision_x, input_ids, attention_mask)
    real = attention_mask.bool()  # padded positions are garbage, and differ between SDPA (there) and eager (here)
    assert (ours - expected)[real].abs().max() < 1e-4


def test_llama_release_has_its_head_and_430_buffers(built):
    release = built("llama")
    text = release.config["text_config"]
    assert "llama" in text["_name_or_path"] and text["architectures"] == ["LlamaForCausalLM"]
    assert text["vocab_size"] == len(release.tokenizer) and text["tie_word_embeddings"] is False
    state = releases.read_release_weights(release.folder)
    head, embeddings = state["lang_encoder.lm_head.weight"], state["lang_encoder.model.embed_tokens.weight"]
    assert head.shape == embeddings.shape and not torch.equal(head, embeddings)
    inv_freq = [name for name in state if name.endswith("rotary_emb.inv_freq")]
    assert inv_freq == [f"lang_encoder.model.layers.{i}.decoder_layer.self_attn.rotary_emb.inv_freq" for i in range(4)]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    expected = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert torch.equal(state[inv_freq[0]], expected)


def test_mosaic_release_has_qk_layernorm_and_no_biases(built):
    release = built("mosaic")
    assert release.config["text_config"]["architectures"] == ["MosaicGPT"]
    assert release.config["text_config"]["attn_qk_ln"] is True
    names = stored_names(release)
    assert "lang_encoder.transformer.blocks.3.decoder_layer.attn.q_ln.weight" in names
    assert "lang_encoder.transformer.blocks.3.decoder_layer.mlp.mlp_down.weight" in names
    assert not any(name.endswith(".bias") for name in names if ".decoder_layer." in name or "ln_f" in name)


def test_video_release_has_frame_embeddings_that_matter(built):
    release = built("video")
    frames = release.config["max_num_frames"]
    assert releases.read_release_weights(release.folder)["perceiver.frame_embs"].shape == (frames, 1024)
    _, input_ids, attention_mask = releases.example_inputs(release)
    vision_x = torch.randn(2, 2, frames, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    logits = releases.reference_logits(release, vision_x, input_ids, attention_mask)
    reordered = releases.reference_logits(release, vision_x.flip(2), input_ids, attention_mask)
    assert (logits - reordered).abs().max() > 1e-2


def test_lora_release_in_every_naming_style(built, scratch, base="mpt"):
    release = built("lora", base)
    assert release.config["lora_config"] == releases.LORA_CONFIG
    target = "attn.Wqkv" if base == "mpt" else "self_attn.q_proj"
    stem = (f"lang_encoder.base_model.model.transformer.blocks.0.decoder_layer.{target}" if base == "mpt"
            else f"lang_encoder.base_model.model.model.layers.0.decoder_layer.{target}")
    expected_names = {
        "new": [f"{stem}.base_layer.weight", f"{stem}.lora_A.default.weight", f"{stem}.lora_B.default.weight"],
        "old": [f"{stem}.weight", f"{stem}.lora_A.default.weight", f"{stem}.lora_B.default.weight"],
        "bare": [f"{stem}.weight", f"{stem}.lora_A.weight", f"{stem}.lora_B.weight"],
    }
    vision_x, input_ids, attention_mask = releases.example_inputs(release)
    expected = releases.reference_logits(release, vision_x, input_ids, attention_mask)
    for style, names in expected_names.items():  # "new" reloads in test_folder_reloads_into_otters_class...
        written = release if style == "new" else releases.save_release(release, scratch / style, lora_style=style)
        stored = releases.read_release_weights(written.folder)
        assert [name for name in stored if name.startswith(stem + ".")] == names
        assert stored[names[2]].abs().min() > 0  # lora_B non-zero: the adapters are live
        if style != "new":
            reloaded = releases.load_release(written.folder, release.tokenizer_folder)
            assert torch.equal(releases.reference_logits(reloaded, vision_x, input_ids, attention_mask), expected)
    with torch.no_grad():
        for name, parameter in reloaded.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    assert (releases.reference_logits(reloaded, vision_x, input_ids, attention_mask) - expected).abs().max() > 0.1


def test_half_precision_folders(built, scratch):
    release = built("llama")
    single = releases.save_release(release, scratch / "single", format="safetensors", dtype=torch.bfloat16,
                                   max_shard_size=10 ** 10)
    sharded = releases.save_release(release, scratch / "sharded", format="bin", dtype=torch.float16,
                                    max_shard_size=50_000_000)
    assert single.weight_files == ["model.safetensors"]
    assert len(sharded.weight_files) > 1 and (scratch / "sharded" / "pytorch_model.bin.index.json").exists()
    assert json.loads((scratch / "single" / "config.json").read_text())["torch_dtype"] == "float32"
    for written, dtype in ((single, torch.bfloat16), (sharded, torch.float16)):
        state = releases.read_release_weights(written.folder)
        assert {t.dtype for t in state.values()} == {dtype, torch.int64}  # position_ids stay int64
        assert written.model is not release.model
    assert release.model.perceiver.latents.dtype == torch.float32
    vision_x, input_ids, attention_mask = releases.example_inputs(release)
    expected = releases.reference_logits(single, vision_x, input_ids, attention_mask)
    reloaded = releases.load_release(single.folder, release.tokenizer_folder)
    assert torch.equal(releases.reference_logits(reloaded, vision_x, input_ids, attention_mask), expected)
    full = releases.reference_logits(release, vision_x, input_ids, attention_mask)
    assert 0 < (full - expected).abs().max() < 0.5  # rounded, not broken


@pytest.mark.parametrize("kind, base", [("mpt", "mpt"), ("lora", "llama")])
def test_trainable_checkpoint_is_what_otters_training_saves(built, scratch, kind, base):
    release = built(kind, base)
    final = releases.write_trainable_checkpoint(release, scratch / "final_weights.pt")
    ddp = releases.write_trainable_checkpoint(release, scratch / "checkpoint_0.pt", prefix="module.", wrapped=True,
                                              extra={"epoch": 0})
    raw = torch.load(final.path, map_location="cpu", weights_only=True)
    wrapped = torch.load(ddp.path, map_location="cpu", weights_only=True)
    assert set(wrapped) == {"model_state_dict", "epoch"}
    assert list(wrapped["model_state_dict"]) == ["module." + name for name in raw]
    assert list(raw) == list(final.state)
    names = set(raw)
    lm = "lang_encoder." if kind != "lora" else "lang_encoder.base_model.model."
    assert any(n.startswith("perceiver.layers.") for n in names) and "perceiver.latents" in names
    assert any(".gated_cross_attn_layer." in n for n in names)
    assert "vision_encoder.vision_model.embeddings.position_ids" in names  # a buffer: get_checkpoint keeps them
    assert not any(n.startswith("vision_encoder.") and not n.endswith("position_ids") for n in names)
    if base == "mpt":
        assert lm + "transformer.wte.weight" in names
        assert not any(".decoder_layer." in n for n in names)
    else:
        assert {lm + "model.embed_tokens.weight", lm + "lm_head.weight"} <= names
        decoder = {n for n in names if ".decoder_layer." in n}
        assert decoder and all("lora_" in n or n.endswith("inv_freq") for n in decoder)
    vision_x, input_ids, attention_mask = releases.example_inputs(release)
    folder_logits = releases.reference_logits(release, vision_x, input_ids, attention_mask)
    trained_logits = releases.reference_logits(final.model, vision_x, input_ids, attention_mask)
    assert (trained_logits - folder_logits).abs().max() > 1e-2
    assert all(torch.equal(ddp.state[name], tensor) for name, tensor in final.state.items())  # same seed
    loaded = releases.load_release(release.folder, release.tokenizer_folder, checkpoint=ddp.path)
    assert torch.equal(releases.reference_logits(loaded, vision_x, input_ids, attention_mask), trained_logits)


def test_training_flags_widen_the_checkpoint(scratch):
    release = releases.write_release(scratch / "decoder", "mpt", config_overrides={"train_lang_encoder": True},
                                     text_overrides={"n_layers": 2})
    names = set(releases.write_trainable_checkpoint(release, scratch / "final_weights.pt").state)
    assert "lang_encoder.transformer.blocks.0.decoder_layer.attn.Wqkv.weight" in names
    assert not any(n.startswith("vision_encoder.") and not n.endswith("position_ids") for n in names)


def test_flamingo_oracle_is_deterministic(built):
    release = built("flamingo")
    assert release.config["model_type"] == "flamingo" and release.config["use_media_placement_augmentation"] is True
    assert "only_attend_previous" not in release.config and "<answer>" not in release.tokenizer.get_vocab()
    vision_x, input_ids, attention_mask = releases.example_inputs(release)
    runs = [releases.reference_logits(release, vision_x, input_ids, attention_mask) for _ in range(3)]
    assert all(torch.equal(runs[0], run) for run in runs[1:])


def test_reference_greedy_is_a_loop_of_full_forwards(built):
    release = built("llama")
    vision_x, input_ids, attention_mask = releases.example_inputs(release)
    suppress = [release.media_token_id, release.pad_token_id]
    sequences, scores = releases.reference_greedy(release, vision_x, input_ids, attention_mask, max_new_tokens=3,
                                                  suppress=suppress, return_scores=True)
    assert sequences.shape == (2, input_ids.shape[1] + 3) and torch.equal(sequences[:, :-3], input_ids)
    first = releases.reference_logits(release, vision_x, input_ids, attention_mask)[:, -1]
    first[:, suppress] = -float("inf")
    assert torch.equal(scores[0], first) and torch.equal(sequences[:, -3], first.argmax(-1))
    assert not torch.isin(sequences[:, -3:], torch.tensor(suppress)).any()
    eos = int(sequences[0, -3])
    stopped = releases.reference_greedy(release, vision_x, input_ids, attention_mask, max_new_tokens=3,
                                        suppress=suppress, eos_token_id=eos, pad_token_id=release.pad_token_id)
    assert stopped[0, -1] == release.pad_token_id or stopped.shape[1] == input_ids.shape[1] + 1


def test_pixel_values_follow_the_430_clip_pipeline():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (45, 71, 3), dtype=np.uint8))  # odd crop offsets
    ours = releases.otter_pixel_values([image])
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(32 * long / short)
    resized = image.resize((new_long, 32) if width > height else (32, new_long), Image.BICUBIC)
    array = np.asarray(resized).astype(np.float32)
    top, left = (array.shape[0] - 32) // 2, (array.shape[1] - 32) // 2
    array = array[top:top + 32, left:left + 32] / 255.0
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = torch.from_numpy(((array - mean) / std).transpose(2, 0, 1)).float()
    assert ours.shape == (1, 3, 32, 32)
    assert (ours[0] - expected).abs().max() < 1e-5


def test_shims_leave_nothing_behind(built):
    import peft

    built("lora", "mpt")
    assert releases.modeling_otter.AutoTokenizer.__name__ == "AutoTokenizer"
    assert releases.modeling_flamingo.AutoTokenizer.__name__ == "AutoTokenizer"
    assert peft.PeftModelForCausalLM.__name__ == "PeftModelForCausalLM"
    assert not hasattr(peft.PeftModel, "master_print_trainable_parameters")
    with releases.otter_ai_shims(releases.tiny_tokenizer()) as stub:
        releases.modeling_otter.AutoTokenizer.from_pretrained("mosaicml/mpt-7b-instruct")
    assert stub.requested == ["mosaicml/mpt-7b-instruct"]
