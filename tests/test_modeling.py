import copy

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    GPT2Config,
    GPT2LMHeadModel,
    LogitsProcessor,
    LogitsProcessorList,
)

import otter
from transformers.integrations.accelerate import infer_auto_device_map

from otter import OtterConfig, OtterForConditionalGeneration, OtterModel
from otter.factory import add_special_tokens
from otter.tiny import TINY_OTTER, tiny_language_model, tiny_tokenizer, tiny_vision_model

from .conftest import set_gates

PROMPTS = ["a photo<image>Output:a red circle<|endofchunk|><image>Output:", "<image>Output:"]


def two_sample_batch(processor, images):
    return processor(text=PROMPTS, images=[images[:2], images[2:3]])


@pytest.mark.parametrize("every_n", [1, 2, 3, 4])
def test_cross_attention_placement_is_openflamingos(every_n):
    model, _ = otter.tiny.build_tiny_otter("llama", cross_attn_every_n_layers=every_n)
    placed = [i for i, layer in enumerate(model.decoder_layers()) if layer.gated_cross_attn_layer is not None]
    assert placed == [i for i in range(4) if (i + 1) % every_n == 0]


def test_from_parts_adds_tokens_in_openflamingo_order_and_matches_the_lm(family, images):
    tokenizer = tiny_tokenizer()
    base_vocab = len(tokenizer)
    torch.manual_seed(0)
    language_model = tiny_language_model(family, vocab_size=base_vocab)
    text = tokenizer(["a photo of a red circle next to a blue square"], return_tensors="pt")
    with torch.no_grad():
        lm_logits = copy.deepcopy(language_model)(**text).logits

    model, processor = otter.from_parts(tiny_vision_model(), language_model, tokenizer, 2, **TINY_OTTER)
    ids = processor.tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"])
    assert ids == [base_vocab, base_vocab + 1, base_vocab + 2]
    assert (model.config.eoc_token_id, model.config.media_token_id, model.config.pad_token_id) == tuple(ids)
    assert model.get_input_embeddings().weight.shape[0] == base_vocab + 3
    assert all(block.attn_gate.item() == 0 and block.ff_gate.item() == 0 for block in model.cross_attention_blocks())
    assert all(p.requires_grad for p in model.parameters()), "building must not freeze anything"
    model.eval()
    with torch.no_grad():
        logits = model(**text).logits
        # with closed gates, images change nothing either
        with_images = processor(text=["a photo of a red<image> circle"], images=[images[0]])
        text_only = processor(text=["a photo of a red<image> circle"], images=[images[1]])
        assert torch.equal(model(**with_images).logits, model(**text_only).logits)
    assert (logits[..., :base_vocab] - lm_logits).abs().max() < 1e-5


def test_from_parts_loads_folders(tmp_path):
    tokenizer = tiny_tokenizer()
    tiny_vision_model().save_pretrained(tmp_path / "clip")
    tiny_language_model("gpt_neox", len(tokenizer)).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    model, processor = otter.from_parts(tmp_path / "clip", tmp_path / "lm", tmp_path / "lm", 2, **TINY_OTTER)
    assert model.config.text_config.model_type == "gpt_neox"
    assert processor.tokenizer.padding_side == "left"


def test_from_parts_rejects_a_non_clip_vision_model():
    with pytest.raises(ValueError, match="CLIPVisionModel"):
        otter.from_parts(torch.nn.Linear(2, 2), tiny_language_model("mpt", 320), tiny_tokenizer())


def test_forward_returns_loss_logits_cache_and_image_features(tiny, images):
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels, use_cache=True)
    config = model.config
    assert out.loss.ndim == 0 and out.loss.isfinite()
    assert out.logits.shape == (*batch["input_ids"].shape, model.get_input_embeddings().weight.shape[0])
    assert out.cache.get_seq_length() == batch["input_ids"].shape[1]
    assert out.image_hidden_states.shape == (2, 2, config.perceiver_num_latents, config.vision_config.hidden_size)


def test_the_processors_images_in_marker_order_six_and_five_dim_pixel_values_agree(tiny, images):
    model, processor = tiny
    batch = two_sample_batch(processor, images)  # pixel_values (3, C, H, W): 2 images, then 1
    six = model.batched_pixel_values(batch["pixel_values"], batch["input_ids"])
    assert six.shape == (2, 2, 1, 3, 32, 32) and not six[1, 1].any()  # sample 1's second slot: padding
    assert torch.equal(six[0, :, 0], batch["pixel_values"][:2]) and torch.equal(six[1, 0, 0], batch["pixel_values"][2])
    with torch.no_grad():
        flat = model(**batch).logits
        as_six = model(**{**batch, "pixel_values": six}).logits
        five = model(**{**batch, "pixel_values": six[:, :, 0]}).logits
    assert torch.equal(flat, as_six) and torch.equal(as_six, five)


def test_samples_with_fewer_images_see_only_their_own(tiny, images):
    """A sample's logits are the same alone and in a batch where another sample has more images (padded media)."""
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    alone = processor(text=PROMPTS[1:], images=[images[2:3]])
    with torch.no_grad():
        batched = model(**batch).logits[1, -alone["input_ids"].shape[1]:]
        single = model(**alone).logits[0]
        # padded media content must not matter
        noisy = dict(batch, pixel_values=model.batched_pixel_values(batch["pixel_values"], batch["input_ids"]))
        noisy["pixel_values"][1, 1] = torch.randn_like(noisy["pixel_values"][1, 1])
        batched_noise = model(**noisy).logits[1, -alone["input_ids"].shape[1]:]
    assert (batched - single).abs().max() < 1e-4
    assert torch.equal(batched, batched_noise)


def test_padded_media_are_not_encoded(tiny, images):
    model, processor = tiny
    batch = two_sample_batch(processor, images)  # 2 images and 1 image: one padded media item
    encoded = []
    hook = model.vision_model.register_forward_pre_hook(
        lambda _, args, kwargs: encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**batch)
            generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    assert encoded == [3, 3]
    assert out.image_hidden_states[1, 1].abs().max() == 0 and out.image_hidden_states[1, 0].abs().max() > 0
    assert generated.shape[0] == 2


def test_text_before_the_first_image_gets_the_feed_forward_branch_only(tiny, images):
    model, processor = tiny
    text = "words before the image<image>Output:"
    batch_a = processor(text=[text], images=[images[0]])
    batch_b = processor(text=[text], images=[images[1]])
    first_image = batch_a["input_ids"][0].tolist().index(model.config.media_token_id)
    with torch.no_grad():
        logits_a = model(**batch_a).logits[0]
        logits_b = model(**batch_b).logits[0]
        text_only = model(input_ids=batch_a["input_ids"][:, :first_image]).logits[0]
        set_gates(model, attn=0.8, ff=0.0)
        without_ff = model(**batch_a).logits[0]
    assert torch.equal(logits_a[:first_image], logits_b[:first_image])  # images invisible before the first <image>
    assert not torch.allclose(logits_a[first_image:], logits_b[first_image:])  # and visible from it on
    assert torch.allclose(logits_a[:first_image], text_only, atol=1e-5)  # text-only forward: FF branch runs too
    assert not torch.allclose(logits_a[:first_image], without_ff[:first_image])  # the FF branch is not masked


def test_only_attend_immediate_media_false_sees_all_previous_images(images):
    model, processor = otter.tiny.build_tiny_otter("gpt_neox", only_attend_immediate_media=False)
    set_gates(model)
    model.eval()
    text = "<image>a<image>b"
    base = processor(text=[text], images=[[images[0], images[1]]])
    changed = processor(text=[text], images=[[images[2], images[1]]])
    with torch.no_grad():
        # the last token follows image 2; with only_attend_immediate_media=False it also reads image 1
        delta = (model(**base).logits[0, -1] - model(**changed).logits[0, -1]).abs().max()
    assert delta > 1e-4


class CountCalls:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(num_beams=3, num_return_sequences=2),
                                      dict(do_sample=True, top_k=5)])
def test_generate_encodes_images_once(tiny, images, settings):
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    vision, perceiver = CountCalls(model.vision_model), CountCalls(model.perceiver)
    media_kv = [CountCalls(block.attn.to_kv) for block in model.cross_attention_blocks()]
    queries = [CountCalls(block.attn.to_q) for block in model.cross_attention_blocks()]
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, **settings)
    rows = 2 * settings.get("num_return_sequences", 1)
    assert out.shape == (rows, batch["input_ids"].shape[1] + 5)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]],
                       batch["input_ids"].repeat_interleave(rows // 2, dim=0))
    assert (vision.calls, perceiver.calls) == (1, 1)
    assert all(counter.calls == 1 for counter in media_kv)
    # the text side does run every step; with beams the prompt (but its last token) runs once per sample first
    assert all(counter.calls == (6 if "num_beams" in settings else 5) for counter in queries)


@pytest.mark.parametrize("settings", [dict(num_beams=3, length_penalty=0.0), dict(num_beams=2, num_return_sequences=2)])
def test_beams_share_one_run_of_the_prompt(tiny, images, settings, monkeypatch):
    """The prompt runs once per sample, not per beam; beams, sequences and scores are those of a run per beam."""
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    rows_per_call = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: rows_per_call.append(args[0].shape))
    settings = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, **settings)
    shared = model.generate(**batch, **settings)
    hook.remove()
    batch_size, length = batch["input_ids"].shape
    copies = max(settings["num_beams"], settings.get("num_return_sequences", 1))
    assert rows_per_call[:2] == [(batch_size, length - 1), (batch_size * copies, 1)]
    monkeypatch.setattr(type(model), "_prompt_copies", lambda *args: 1)  # the prompt once per beam
    per_beam = model.generate(**batch, **settings)
    assert torch.equal(shared.sequences, per_beam.sequences)
    for ours, theirs in zip(shared.scores, per_beam.scores, strict=True):
        finite = ours.isfinite()
        assert torch.equal(finite, theirs.isfinite())
        assert (ours[finite] - theirs[finite]).abs().max() <= 1e-5


@pytest.mark.parametrize("settings", [dict(num_beams=1), dict(num_beams=3, length_penalty=0.0)])
def test_a_static_cache_decodes_as_the_default_cache(tiny, images, settings):
    """`cache_implementation="static"` (what torch.compile'd decoding needs) gives the same tokens, beams included."""
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, **settings)
    assert torch.equal(model.generate(**batch, cache_implementation="static", **settings),
                       model.generate(**batch, **settings))


def test_cached_uncached_and_manual_greedy_decoding_agree(tiny, images):
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    eoc = model.config.eoc_token_id
    settings = dict(max_new_tokens=8, do_sample=False, suppress_tokens=[eoc])
    cached = model.generate(**batch, use_cache=True, **settings)
    uncached = model.generate(**batch, use_cache=False, **settings)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits[:, -1]
            logits[:, eoc] = -float("inf")
            next_token = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], 1)
            mask = torch.cat([mask, torch.ones_like(next_token)], 1)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ids)


def test_generation_decodes_with_the_cache_by_default(tiny, images, tmp_path):
    """MPT's config says use_cache=False; decoding must still feed one new token per step, saved folders included."""
    model, processor = tiny
    model.save_pretrained(tmp_path)
    model = type(model).from_pretrained(tmp_path).eval()
    lengths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    batch = two_sample_batch(processor, images)
    model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    hook.remove()
    assert lengths == [batch["input_ids"].shape[1], 1, 1, 1]


def test_batched_left_padded_generation_equals_one_by_one(tiny, images):
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    settings = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[model.config.eoc_token_id])
    batched = model.generate(**batch, **settings)[:, -6:]
    for row, (text, sample_images) in enumerate(zip(PROMPTS, [images[:2], images[2:3]])):
        alone = processor(text=[text], images=[sample_images])
        assert torch.equal(batched[row], model.generate(**alone, **settings)[0, -6:])


class ForceAtStep(LogitsProcessor):
    def __init__(self, token_id, step, prompt_length):
        self.token_id, self.step, self.prompt_length = token_id, step, prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.step:
            scores[:] = -float("inf")
            scores[:, self.token_id] = 0
        return scores


def test_generation_stops_at_end_of_chunk_by_default(tiny, images, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert loaded.generation_config.eos_token_id == model.config.eoc_token_id
    assert loaded.generation_config.pad_token_id == model.config.pad_token_id
    batch = processor(text=PROMPTS[1:], images=[images[:1]])
    length = batch["input_ids"].shape[1]
    force = LogitsProcessorList([ForceAtStep(model.config.eoc_token_id, 2, length)])
    out = loaded.generate(**batch, max_new_tokens=10, do_sample=False, logits_processor=force)
    assert out.shape[1] == length + 3 and out[0, -1] == model.config.eoc_token_id
    assert processor.decode_answers(out, length) == [processor.decode_answers(out[:, :-1], length)[0]]


def test_save_and_load_with_every_auto_class(tiny, images, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    batch = two_sample_batch(processor, images)
    with torch.no_grad():
        expected = model(**batch).logits
        for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
            loaded = auto.from_pretrained(tmp_path)
            assert isinstance(loaded, OtterForConditionalGeneration)
            assert torch.equal(loaded(**batch).logits, expected)
        base = AutoModel.from_pretrained(tmp_path)
        assert type(base) is OtterModel
        hidden = base(**batch).last_hidden_state
    assert hidden.shape == (*batch["input_ids"].shape, model.config.text_config.hidden_size)
    assert all(p.requires_grad for p in loaded.parameters()), "loading must not freeze anything"
    assert isinstance(AutoProcessor.from_pretrained(tmp_path), otter.OtterProcessor)


def test_bfloat16_and_device_map_auto(tiny, images, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    batch = two_sample_batch(processor, images)
    half = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    mapped = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto")
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(mapped(**batch).logits, expected)
        assert (half(**batch).logits.float() - expected).abs().max() < 0.25


def test_device_map_never_splits_a_decoder_layer_from_its_cross_attention(tiny):
    model, _ = tiny
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(model, max_memory={0: size // 3, 1: size // 3, "cpu": 2 * size},
                                       no_split_module_classes=model._no_split_modules)
    assert len(set(device_map.values())) == 3, "the budget must force a split for this test to mean anything"
    layers_path = "language_model." + model._decoder_layers_path + "."
    for name in device_map:
        if name.startswith(layers_path):
            assert name[len(layers_path):].isdigit(), f"{name} splits a decoder layer"


def test_gradient_checkpointing_gives_the_same_gradients(tiny, images):
    model, processor = tiny
    model.freeze_backbones(train_embeddings=True)
    batch = two_sample_batch(processor, images)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def gradients():
        model.zero_grad()
        model(**batch, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    model.train()
    plain = gradients()
    model.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.cross_attention_blocks())
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_freeze_backbones_trains_perceiver_and_cross_attention(tiny):
    model, _ = tiny
    model.freeze_backbones()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("perceiver.") or ".gated_cross_attn_layer." in name for name in trainable)
    assert len(trainable) == len(list(model.perceiver.parameters())) + sum(
        len(list(block.parameters())) for block in model.cross_attention_blocks())
    model.freeze_backbones(train_embeddings=True)
    assert model.get_input_embeddings().weight.requires_grad


def test_frames_with_and_without_frame_embeddings(images):
    model, processor = otter.tiny.build_tiny_otter("mpt", max_num_frames=3)
    set_gates(model)
    batch = processor(text=["<image>a video"], images=[images[:1]])
    video = batch["pixel_values"][None, :, None].repeat(1, 1, 3, 1, 1, 1)  # (1, 1, 3, C, H, W)
    video[0, 0, 1:] = torch.randn_like(video[0, 0, 1:])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], pixel_values=video)
        one_frame = model(**batch)
    assert not torch.allclose(out.logits, one_frame.logits)
    with pytest.raises(ValueError, match="at most 3"):
        model(input_ids=batch["input_ids"], pixel_values=video.repeat(1, 1, 2, 1, 1, 1))
    # without frame embeddings a medium of several frames is their tokens together (Otter's packed multi-image media)
    plain, _ = otter.tiny.build_tiny_otter("mpt")
    set_gates(plain)
    with torch.no_grad():
        packed = plain(input_ids=batch["input_ids"], pixel_values=video).logits
        features = plain.get_image_features(video)
        tokens = plain.vision_model(pixel_values=video[0, 0]).last_hidden_state[:, 1:]  # (frames, patches, dim)
        flattened = plain.perceiver(tokens.reshape(1, 1, 1, -1, tokens.shape[-1]))  # one frame of all the tokens
    assert torch.allclose(features, flattened, atol=1e-6)
    assert not torch.allclose(packed, plain(**batch).logits)


def test_bad_inputs_get_clear_errors(tiny, images):
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    with pytest.raises(ValueError, match=r"pixel_values holds 2 images but input_ids hold 3 <image> tokens \(\[2, 1\]"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:2])
    six = model.batched_pixel_values(batch["pixel_values"], batch["input_ids"])
    with pytest.raises(ValueError, match=r"pixel_values must be .* shape \(2, 3, 32\)"):
        model(input_ids=batch["input_ids"], pixel_values=six[:, 0, 0, :, 0])
    with pytest.raises(ValueError, match=r"sample\(s\) \[0\] hold more <image> tokens than the 1 media"):
        model(input_ids=batch["input_ids"], pixel_values=six[:, :1])
    with pytest.raises(ValueError, match="batch of 1 but input_ids has 2 rows"):
        model(input_ids=batch["input_ids"], pixel_values=six[:1])


def test_unknown_language_model_family_says_how_to_name_its_layers(images):
    tokenizer = tiny_tokenizer()
    add_special_tokens(tokenizer)
    gpt2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tokenizer))
    config = OtterConfig(vision_config=tiny_vision_model().config.to_dict(), text_config=gpt2.to_dict(), **TINY_OTTER)
    with pytest.raises(ValueError, match=r"decoder_layers_attr='path.to.layers'"):
        OtterForConditionalGeneration(config)
    with pytest.raises(ValueError, match="has no attribute path 'transformer.layers'"):
        OtterForConditionalGeneration(OtterConfig(**{**config.to_dict(), "decoder_layers_attr": "transformer.layers"}))
    # naming the layers is all another family needs
    model, processor = otter.from_parts(tiny_vision_model(), GPT2LMHeadModel(gpt2), tokenizer,
                                        decoder_layers_attr="transformer.h", **TINY_OTTER)
    set_gates(model)
    batch = processor(text=["<image>Output:"], images=[images[:1]])
    assert model.generate(**batch, max_new_tokens=3, min_new_tokens=3).shape[1] == batch["input_ids"].shape[1] + 3
    assert AutoConfig.for_model("otter", decoder_layers_attr="transformer.h").decoder_layers_attr == "transformer.h"


def test_a_generated_image_token_keeps_reading_the_prompts_last_image(tiny, images):
    model, processor = tiny
    batch = two_sample_batch(processor, images)
    length = batch["input_ids"].shape[1]
    force = LogitsProcessorList([ForceAtStep(model.config.media_token_id, 1, length)])
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, logits_processor=force,
                         output_logits=True, return_dict_in_generate=True)
    assert (out.sequences[:, length + 1] == model.config.media_token_id).all()
    # the token after the generated <image> is scored as if it followed the prompt's last image
    prompt_index = model.media_index(batch["input_ids"])
    media_index = torch.cat([prompt_index, prompt_index[:, -1:].expand(-1, 2)], dim=1)
    attention_mask = torch.cat([batch["attention_mask"], torch.ones(2, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=out.sequences[:, : length + 2], attention_mask=attention_mask,
                       pixel_values=model.batched_pixel_values(batch["pixel_values"], batch["input_ids"]),
                       media_index=media_index).logits[:, -1]
    assert out.logits[2].isfinite().all()
    assert torch.allclose(logits, out.logits[2], atol=1e-4)


def _saved_for_backward(step):
    """The sizes in bytes of the distinct storages autograd keeps for the backward pass of `step()`."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return list(saved.values())


def test_mpt_attention_is_fused_and_its_memory_does_not_grow_with_the_square_of_the_length(images, tmp_path):
    """
    MPT's attention runs through scaled_dot_product_attention: on a long left-padded batch it gives transformers'
    eager attention's (attn_implementation="eager") loss and gradients, without keeping a (batch, heads, length,
    length) attention matrix per layer for the backward pass.
    """
    model, processor = otter.tiny.build_tiny_otter("mpt", cross_attn_every_n_layers=2)
    set_gates(model)
    model.save_pretrained(tmp_path)
    eager = OtterForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    long_text = " ".join(["a photo of a red circle next to a blue square"] * 12)
    batch = processor(text=[f"<image>{long_text}", f"<image>{long_text[:200]}"], images=[images[:1], images[1:2]])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = []
    for net in (model, eager):
        net.train()
        net.freeze_backbones()
        net.zero_grad()
        loss = []
        saved = _saved_for_backward(lambda: loss.append(net(**batch, labels=labels).loss))
        loss[0].backward()
        grads = {name: p.grad for name, p in net.named_parameters() if p.requires_grad}
        results.append((loss[0].item(), grads, saved))
    (loss, grads, saved), (eager_loss, eager_grads, eager_saved) = results
    assert loss == pytest.approx(eager_loss, abs=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    batch_size, length = batch["input_ids"].shape
    assert length > 300
    attention_matrix = batch_size * model.config.text_config.n_heads * length * length * 4  # fp32

    def matrices(sizes):
        return sum(size >= attention_matrix for size in sizes)

    # the backward pass runs through the layers from the first cross-attention block (the second layer) on
    assert matrices(eager_saved) == 3
    assert matrices(saved) == 1  # the ALiBi + mask bias, shared by all layers
    assert sum(saved) < sum(eager_saved)


def test_mpt_output_attentions_returns_the_attention_weights(images):
    model, processor = otter.tiny.build_tiny_otter("mpt", cross_attn_every_n_layers=2)
    set_gates(model)
    model.eval()
    batch = two_sample_batch(processor, images)
    with torch.no_grad():
        plain = model(**batch)
        with_weights = model(**batch, output_attentions=True)
        again = model(**batch)
    assert plain.attentions is None and again.attentions is None
    torch.testing.assert_close(with_weights.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.logits, plain.logits, rtol=0, atol=0)
    batch_size, length = batch["input_ids"].shape
    assert len(with_weights.attentions) == model.config.text_config.n_layers
    for weights in with_weights.attentions:
        assert weights.shape == (batch_size, model.config.text_config.n_heads, length, length)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
