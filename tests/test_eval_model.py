"""The evaluator's model calls: class ranking on a reused KV cache equals scoring each class from scratch; demo images
shared by a batch, or shown again by later batches, are encoded once, and loaded once, ahead, in background threads;
batched generation equals the processor's path."""

import pytest
import torch
from PIL import Image

from otter.eval import encode_batch, rank_classes

from .conftest import FAMILIES, set_gates

PROMPTS = [  # three images each, the second prompt shorter (left-padded)
    "<image>Output:tench<|endofchunk|><image>Output:a green thing<|endofchunk|><image>Output:",
    "<image><image>hi<image>Answer:",
]
CLASSES = ["tench", "a green thing", "no", "yes", "great white shark"]


@pytest.fixture
def colour_images():
    return [Image.new("RGB", (40 + 4 * i, 36), colour)
            for i, colour in enumerate([(220, 30, 30), (30, 170, 60), (40, 70, 220), (240, 200, 20)])]


def scores_from_scratch(model, processor, prompt, images, class_token_ids):
    """Mean log-prob of each class after one unpadded prompt, a full forward per class, no cache."""
    prompt_ids = processor.tokenizer(prompt)["input_ids"]
    pixel_values = processor(text=[prompt], images=[images])["pixel_values"]
    scores = []
    for tokens in class_token_ids:
        input_ids = torch.tensor([prompt_ids + tokens])
        with torch.no_grad():
            logprobs = model(input_ids=input_ids, pixel_values=pixel_values).logits[0].log_softmax(-1)
        positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(tokens))
        scores.append(sum(logprobs[p, t].item() for p, t in zip(positions, tokens)) / len(tokens))
    return torch.tensor(scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_ranking_on_a_reused_cache_equals_scoring_each_class_from_scratch(tiny, colour_images):
    model, processor = tiny
    class_token_ids = processor.tokenizer(CLASSES, add_special_tokens=False)["input_ids"]
    assert len({len(tokens) for tokens in class_token_ids}) > 1, "classes of several token lengths"
    sample_images = [colour_images[:3], colour_images[1:]]
    inputs = encode_batch(model, processor, PROMPTS, sample_images)
    assert inputs["attention_mask"][:, 0].eq(0).any(), "the batch must be left-padded"
    ours = rank_classes(model, inputs, class_token_ids, classes_per_forward=2)  # 5 classes in groups of 2
    assert ours.shape == (2, len(CLASSES))
    for row, (prompt, imgs) in enumerate(zip(PROMPTS, sample_images)):
        expected = scores_from_scratch(model, processor, prompt, imgs, class_token_ids)
        assert torch.allclose(ours[row], expected, atol=1e-4), (ours[row], expected)
    everything_at_once = rank_classes(model, inputs, class_token_ids, classes_per_forward=len(CLASSES))
    assert torch.allclose(ours, everything_at_once, atol=1e-5)


def count_vision_images(model):
    counter = {"images": 0}

    def pre_hook(module, args, kwargs):
        counter["images"] += kwargs["pixel_values"].shape[0]

    handle = model.vision_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return counter, handle


def test_images_shared_by_a_batch_are_encoded_once(colour_images):
    from otter.tiny import build_tiny_otter

    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    model.eval()
    demo_a, demo_b, query_a, query_b = colour_images
    texts = ["<image>Output:a<|endofchunk|>\n<image>Output:b<|endofchunk|>\n<image>Output:",
             "<image>Output:b<|endofchunk|>\n<image>Output:a<|endofchunk|>\n<image>Output:",
             "<image>Output:a<|endofchunk|>\n<image>Output:a<|endofchunk|>\n<image>Output:"]
    images = [[demo_a, demo_b, query_a], [demo_b, demo_a, query_b], [demo_a, demo_a, query_a]]
    counter, handle = count_vision_images(model)
    ours = encode_batch(model, processor, texts, images)
    handle.remove()
    assert counter["images"] == 4  # 9 image slots, 4 distinct images

    reference = processor(text=texts, images=images)  # every slot encoded
    with torch.no_grad():
        features = model.get_image_features(model.batched_pixel_values(reference["pixel_values"],
                                                                       reference["input_ids"]))
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    assert torch.allclose(ours["media_key_values"], model.get_media_key_values(features), atol=1e-5)
    settings = dict(num_beams=3, max_new_tokens=4, length_penalty=0.0, do_sample=False)
    assert torch.equal(model.generate(**ours, **settings), model.generate(**reference, **settings))


def test_image_files_are_keyed_by_path(tmp_path, colour_images):
    from otter.tiny import build_tiny_otter

    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    paths = []
    for i, image in enumerate(colour_images[:2]):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    counter, handle = count_vision_images(model)
    encode_batch(model, processor, ["<image>Output:x<|endofchunk|><image>Output:"] * 2,
                 [[paths[0], paths[1]], [str(paths[0]), paths[1]]])  # a str and a Path of one file are one image
    handle.remove()
    assert counter["images"] == 2


def test_a_batch_needs_the_same_image_count_per_sample(colour_images):
    from otter.tiny import build_tiny_otter

    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    with pytest.raises(ValueError, match="same number of images"):
        encode_batch(model, processor, ["<image>a", "<image><image>b"], [colour_images[:1], colour_images[:2]])


def test_images_shown_again_by_later_batches_are_encoded_once_per_pass(tmp_path, monkeypatch):
    """A demonstration drawn for several batches runs through the vision tower once; the outputs do not change."""
    from otter.eval import evaluate, get_task
    from otter.eval.evaluator import ImageFeatureCache
    from otter.tiny import build_tiny_otter

    from .eval_fixtures import make_vqa

    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    model.eval()
    data_dir = make_vqa(tmp_path / "data", "vqav2", num_pool=3, num_test=6)  # 2 of 3 pool examples per sample

    def outputs_and_images(out):
        counter, handle = count_vision_images(model)
        report = evaluate(model, processor, "vqav2", data_dir, out, shots=[2], batch_size=2)
        handle.remove()
        predictions = report["results"][0]["trials"][0]["predictions"]
        return [(r["id"], r["demos"], r["output"]) for r in predictions], counter["images"]

    cached, cached_images = outputs_and_images(tmp_path / "cached.json")
    monkeypatch.setattr(ImageFeatureCache, "get", lambda self, key: None)  # every batch encodes its images
    uncached, uncached_images = outputs_and_images(tmp_path / "uncached.json")
    benchmark = get_task("vqav2").load(data_dir)
    pool_images = {example.id: str(example.image) for example in benchmark.pool}
    shown = {str(example.image) for example in benchmark.test} | {pool_images[demo] for _, demos, _ in cached
                                                                   for demo in demos}
    assert cached == uncached
    assert cached_images == len(shown) < uncached_images


def test_images_are_loaded_ahead_in_background_threads_once_per_pass(tmp_path, monkeypatch):
    """Every image an evaluation shows is loaded and preprocessed once, by the prefetching threads while the model
    runs, never by the loop itself; the outputs are those of loading each batch's images in the loop."""
    import threading
    from collections import Counter

    from otter.eval import evaluate, evaluator, get_task
    from otter.tiny import build_tiny_otter

    from .eval_fixtures import make_vqa

    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    model.eval()
    data_dir = make_vqa(tmp_path / "data", "vqav2", num_pool=3, num_test=6)
    loads, threads = Counter(), set()
    load = evaluator._pixel_values

    def counted(image_processor, image):
        loads[str(image)] += 1
        threads.add(threading.current_thread().name)
        return load(image_processor, image)

    monkeypatch.setattr(evaluator, "_pixel_values", counted)
    report = evaluate(model, processor, "vqav2", data_dir, tmp_path / "ahead.json", shots=[2], batch_size=2)
    predictions = report["results"][0]["trials"][0]["predictions"]
    benchmark = get_task("vqav2").load(data_dir)
    pool_images = {example.id: str(example.image) for example in benchmark.pool}
    shown = {str(example.image) for example in benchmark.test} | {pool_images[demo] for p in predictions
                                                                   for demo in p["demos"]}
    assert set(loads) == shown and set(loads.values()) == {1}
    assert threads and all(name.startswith("otter-images") for name in threads)

    monkeypatch.setattr(evaluator.ImagePrefetcher, "submit", lambda self, images, skip=None: {})  # load in the loop
    inline = evaluate(model, processor, "vqav2", data_dir, tmp_path / "inline.json", shots=[2], batch_size=2)
    assert [p["output"] for p in inline["results"][0]["trials"][0]["predictions"]] == [p["output"] for p in predictions]


def test_an_unreadable_image_in_a_later_batch_is_named_and_earlier_results_are_kept(tmp_path):
    import json

    from otter.eval import evaluate
    from otter.processing_otter import UnreadableImageError
    from otter.tiny import build_tiny_otter

    from .eval_fixtures import make_vqa

    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    model.eval()
    data_dir = make_vqa(tmp_path / "data", "vqav2", num_pool=3, num_test=6)
    last = sorted((data_dir / "val2014").iterdir())[-1]  # the query image of the last batch
    last.write_bytes(b"not an image")
    with pytest.raises(UnreadableImageError, match=last.name):
        evaluate(model, processor, "vqav2", data_dir, tmp_path / "out.json", shots=[0], batch_size=2)
    logged = [json.loads(line) for line in (tmp_path / "out.samples.jsonl").read_text().splitlines()]
    assert len([record for record in logged if "id" in record]) == 4  # the first two batches' samples
