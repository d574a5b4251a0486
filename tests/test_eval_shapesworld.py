"""ShapesWorld evaluation: the held-out sets are deterministic and consistent; each sample's own demonstrations make
its prompts, which equal the training text token for token; candidates are ranked by the mean log-prob of their
tokens in the training text; `otter eval`."""

import dataclasses
import filecmp
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from otter.cli import main
from otter.eval import TASKS, build_prompt, evaluate
from otter.eval.shapesworld import FILES, load_shapesworld, write_eval_sets, write_set
from otter.prompts import END_OF_CHUNK
from otter.shapesworld import (
    CLIP_KINDS,
    MOTION_INSTRUCTION,
    SHAPES,
    VQA_KINDS,
    ShapesWorld,
    is_held_out,
    nonce_words,
    render,
)
from otter.tiny import build_tiny_otter
from otter.train.data import Turn, instruction_text

from .conftest import set_gates

SEED, COUNT, SHOTS = 5, 5, 4
IMAGE_SETS = ("vqa", "binding", "comparison")  # what write_eval_sets writes


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_eval_sets(tmp_path_factory.mktemp("shapesworld") / "eval", seed=SEED, count=COUNT, shots=SHOTS)


@pytest.fixture(scope="module")
def tiny_model():
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    return model.eval(), processor


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pixels(path: Path) -> bytes:
    return Image.open(path).convert("RGB").tobytes()


# -- the written sets ------------------------------------------------------------------------------------------------
def test_the_writer_is_deterministic_by_seed(tmp_path, data_dir):
    again = write_eval_sets(tmp_path / "again", seed=SEED, count=COUNT, shots=SHOTS)
    names = sorted(FILES[kind] for kind in IMAGE_SETS)
    names += sorted(f"images/{p.name}" for p in (data_dir / "images").iterdir())
    assert len(names) == 3 + COUNT * (1 + SHOTS) * 4  # comparisons show two images per turn
    match, mismatch, errors = filecmp.cmpfiles(data_dir, again, names, shallow=False)
    assert not mismatch and not errors
    other = write_eval_sets(tmp_path / "other", seed=SEED + 1, count=COUNT, shots=SHOTS)
    assert (other / "binding.jsonl").read_bytes() != (data_dir / "binding.jsonl").read_bytes()


def test_vqa_and_comparison_records(data_dir):
    vqa = read_jsonl(data_dir / "vqa.jsonl")
    assert [r["kind"] for r in vqa] == [VQA_KINDS[i % len(VQA_KINDS)] for i in range(COUNT)]
    world = ShapesWorld(SEED)  # each file is drawn from its own ShapesWorld(seed): query, then its demos
    for record in vqa:
        query = world.vqa(record["kind"])
        demos = [world.vqa() for _ in range(SHOTS)]
        assert (record["instruction"], record["answer"]) == (query["question"], query["answer"])
        assert pixels(data_dir / record["images"][0]) == render(query["scene"]).tobytes()
        assert [(d["instruction"], d["answer"]) for d in record["demos"]] == [(d["question"], d["answer"]) for d in demos]
    for record in read_jsonl(data_dir / "comparison.jsonl"):
        assert record["instruction"] == "What are the two shapes?" and len(record["images"]) == 2
        assert len(record["demos"]) == SHOTS and all(len(demo["images"]) == 2 for demo in record["demos"])
        for turn in [record, *record["demos"]]:
            words = turn["answer"].rstrip(".").split()
            assert turn["answer"].startswith("The first one is a ") and words[5] in SHAPES and words[-1] in SHAPES
            assert words[5] != words[-1]


def test_binding_answers_are_held_out_words_bound_by_the_demos(data_dir):
    words = nonce_words(200, SEED, held_out=True)
    world = ShapesWorld(SEED)
    for record in read_jsonl(data_dir / "binding.jsonl"):
        episode = world.binding_episode(SHOTS, words=words, ways=2)
        candidates = record["candidates"]
        assert candidates == sorted(episode["names"].values()) and len(set(candidates)) == 2
        assert all(is_held_out(word) and word in words for word in candidates)
        assert record["answer"] in candidates and record["instruction"] == "What is it called?"
        assert len(record["demos"]) == SHOTS
        assert {demo["answer"] for demo in record["demos"][:2]} == set(candidates)  # any first 2 demos show both
        # the query's shape is named by its answer, as every demo of that shape is
        query_shape = episode["query"]["scene"].objects[0].shape
        assert episode["names"][query_shape] == record["answer"]
        assert pixels(data_dir / record["images"][0]) == render(episode["query"]["scene"]).tobytes()
        for demo, truth in zip(record["demos"], episode["demos"]):
            assert demo["answer"] == truth["answer"] == episode["names"][truth["scene"].objects[0].shape]
            assert pixels(data_dir / demo["images"][0]) == render(truth["scene"]).tobytes()
        assert any(truth["scene"].objects[0].shape == query_shape for truth in episode["demos"])


def test_loaders_read_every_set_and_name_bad_files(tmp_path, data_dir):
    for kind in IMAGE_SETS:
        benchmark = load_shapesworld(kind, data_dir)
        assert benchmark.pool == [] and len(benchmark.test) == COUNT
        example = benchmark.test[0]
        assert len(example.demos) == SHOTS and all(demo.demos is None for demo in example.demos)
        assert len(example.images) == (2 if kind == "comparison" else 1)
        assert all(path.is_file() for path in example.images)
        assert (example.candidates is not None) == (kind == "binding")
    with pytest.raises(ValueError, match="vqa.jsonl"):
        load_shapesworld("vqa", tmp_path)
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    lines = (data_dir / "binding.jsonl").read_text().splitlines()
    (broken / "binding.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"binding.jsonl line 1 .*image 'images/binding-0000-demo0.png' not found"):
        load_shapesworld("binding", broken)
    (broken / "binding.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"binding.jsonl line 1 is not valid JSON"):
        load_shapesworld("binding", broken)
    record = json.loads(lines[0])
    record["candidates"] = ["zzz", "yyy"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "images").symlink_to(data_dir / "images")
    (bad / "binding.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="sample 'binding-0000'.*hold the answer"):
        load_shapesworld("binding", bad)
    del record["candidates"]
    (bad / "binding.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="needs 'candidates'"):
        load_shapesworld("binding", bad)


# -- prompts ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vqa", "binding", "comparison"])
@pytest.mark.parametrize("shots", [1, 3])
def test_evaluation_prompts_equal_the_training_text(data_dir, tiny_model, kind, shots):
    """The k-shot prompt is `instruction_text` of the same turns, cut before the query's answer: same tokens."""
    task = TASKS[f"shapesworld_{kind}"]
    example = load_shapesworld(kind, data_dir).test[1]
    demos = list(example.demos[:shots])
    text, images = build_prompt(task, example, demos, shots)
    turns = [Turn(turn.fields["instruction"], turn.fields["answer"], list(turn.images)) for turn in [*demos, example]]
    training_text = instruction_text(turns)
    answer = " " + example.fields["answer"] + END_OF_CHUNK
    assert training_text.endswith(answer) and text == training_text[: -len(answer)]
    assert images == [path for turn in turns for path in turn.images]
    tokenizer = tiny_model[1].tokenizer
    prompt_ids, training_ids = tokenizer(text)["input_ids"], tokenizer(training_text)["input_ids"]
    assert training_ids[: len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(training_ids[len(prompt_ids):]) == answer


def test_zero_shot_prompts_hold_only_the_query(data_dir):
    binding = load_shapesworld("binding", data_dir).test[0]
    text, images = build_prompt(TASKS["shapesworld_binding"], binding, [], 0)
    assert text == "<image>User: What is it called? GPT:<answer>" and images == [binding.image]
    comparison = load_shapesworld("comparison", data_dir).test[0]
    text, images = build_prompt(TASKS["shapesworld_comparison"], comparison, [], 0)
    assert text == "<image>Image 1. <image>Image 2. User: What are the two shapes? GPT:<answer>"
    assert images == list(comparison.image)
    assert all(TASKS[f"shapesworld_{kind}"].zero_shot_demos == 0 for kind in FILES)


# -- varied and video sets -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapesworld_video")
    write_set(folder, "video", seed=SEED, count=3, shots=2)
    return write_set(folder, "naming", seed=SEED, count=4, shots=4, ways=2)


def test_varied_sets_are_held_out_and_deterministic(tmp_path):
    words = nonce_words(50, SEED, held_out=True, form="V..C")
    first = write_set(tmp_path / "a", "binding", seed=SEED, count=3, shots=10, ways=5, words=words)
    again = write_set(tmp_path / "b", "binding", seed=SEED, count=3, shots=10, ways=5, words=words)
    assert (first / "binding.jsonl").read_bytes() == (again / "binding.jsonl").read_bytes()
    world = ShapesWorld(SEED, varied=True, held_out=True)  # the set's episodes, from the held-out bands
    for record in read_jsonl(first / "binding.jsonl"):
        episode = world.binding_episode(10, words=words, ways=5)
        assert record["candidates"] == sorted(episode["names"].values()) and len(record["candidates"]) == 5
        assert {demo["answer"] for demo in record["demos"][:5]} == set(record["candidates"])
        assert pixels(first / record["images"][0]) == render(episode["query"]["scene"]).tobytes()
    small = write_set(tmp_path / "small", "vqa", seed=SEED, count=4, shots=0, vqa_kinds=("count",), objects=1,
                      radius=0.1)
    assert [r["answer"] for r in read_jsonl(small / "vqa.jsonl")] == ["one"] * 4
    with pytest.raises(ValueError, match="options of VQA sets"):
        write_set(tmp_path / "c", "binding", seed=SEED, objects=1)


def test_video_sets_hold_mp4_clips_and_prompt_as_training_does(video_dir):
    video = load_shapesworld("video", video_dir)
    assert [example.fields["kind"] for example in video.test] == list(CLIP_KINDS)
    for example in video.test:
        assert example.image.suffix == ".mp4" and example.image.is_file() and len(example.demos) == 2
    naming = load_shapesworld("naming", video_dir)
    for example in naming.test:
        assert example.fields["instruction"] == MOTION_INSTRUCTION and len(example.candidates) == 2
        assert {demo.target for demo in example.demos[:2]} == set(example.candidates)
        assert all(is_held_out(name) for name in example.candidates)
    task = TASKS["shapesworld_naming"]
    example = naming.test[0]
    text, videos = build_prompt(task, example, list(example.demos[:2]), 2)
    turns = [Turn(t.fields["instruction"], t.fields["answer"], videos=[t.image]) for t in [*example.demos[:2], example]]
    training_text = instruction_text(turns)
    assert text.startswith("<video>User: What is this motion called? GPT:<answer> ")
    assert training_text == text + " " + example.target + END_OF_CHUNK and videos == [t.videos[0] for t in turns]


def test_video_tasks_evaluate_decoded_clips(tmp_path, video_dir, tiny_model):
    model, processor = tiny_model
    report = evaluate(model, processor, "shapesworld_video", video_dir, tmp_path / "video.json", shots=[0, 2],
                      batch_size=3)
    assert set(report["results"][1]["groups"]) == set(CLIP_KINDS)
    ranked = evaluate(model, processor, "shapesworld_naming", video_dir, tmp_path / "naming.json", shots=[2],
                      batch_size=4)
    test = load_shapesworld("naming", video_dir).test
    for example, record in zip(test, ranked["results"][0]["trials"][0]["predictions"]):
        assert record["prediction"] in example.candidates and len(record["demos"]) == 2
    broken = tmp_path / "broken"
    (broken / "videos").mkdir(parents=True)
    (broken / "naming.jsonl").write_text((video_dir / "naming.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"video 'videos/naming-0000-demo0.mp4' not found"):
        load_shapesworld("naming", broken)


# -- the evaluator ---------------------------------------------------------------------------------------------------
def scores_from_scratch(model, processor, prompt, images, names):
    """
    Mean log-prob of each name's tokens in the training text `prompt + " " + name` (tokenized whole), after one
    unpadded prompt: a full forward per name, no cache.
    """
    prompt_ids = processor.tokenizer(prompt)["input_ids"]
    pixel_values = processor(text=[prompt], images=[[Image.open(path) for path in images]])["pixel_values"]
    scores = []
    for name in names:
        text_ids = processor.tokenizer(prompt + " " + name)["input_ids"]
        assert text_ids[:len(prompt_ids)] == prompt_ids
        tokens = text_ids[len(prompt_ids):]
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([text_ids]), pixel_values=pixel_values).logits[0]
        logprobs = logprobs.log_softmax(-1)
        positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(tokens))
        scores.append(sum(logprobs[p, t].item() for p, t in zip(positions, tokens)) / len(tokens))
    return scores


def test_binding_uses_each_samples_first_demos_and_ranks_its_candidates(tmp_path, data_dir, tiny_model):
    model, processor = tiny_model
    task = TASKS["shapesworld_binding"]
    report = evaluate(model, processor, task, data_dir, tmp_path / "binding.json", shots=[0, 2], batch_size=3)
    test = load_shapesworld("binding", data_dir).test
    assert len({example.candidates for example in test[:3]}) > 1, "a batch mixing candidate sets"
    for result, shots in zip(report["results"], [0, 2]):
        predictions = result["trials"][0]["predictions"]
        correct = []
        for example, record in zip(test, predictions):
            assert record["id"] == example.id
            assert record["demos"] == [f"{example.id}/demo{j}" for j in range(shots)]
            text, images = build_prompt(task, example, list(example.demos[:shots]), shots)
            expected = dict(zip(example.candidates, scores_from_scratch(model, processor, text, images,
                                                                        list(example.candidates))))
            assert {name for name, _ in record["top"]} == set(example.candidates)
            for name, score in record["top"]:
                assert score == pytest.approx(expected[name], abs=1e-4)
            assert record["prediction"] == max(expected, key=expected.get)
            correct.append(record["prediction"] == example.target)
        assert result["mean"] == pytest.approx(100 * sum(correct) / len(correct))


def test_too_few_demos_for_the_shots_is_an_error_naming_the_sample(tmp_path, data_dir, tiny_model):
    with pytest.raises(ValueError, match=r"sample 'binding-0000' has 4 demonstrations .* 5-shot"):
        evaluate(*tiny_model, "shapesworld_binding", data_dir, tmp_path / "r.json", shots=[5])
    with pytest.raises(ValueError, match="trials=1"):
        evaluate(*tiny_model, "shapesworld_binding", data_dir, tmp_path / "r.json", shots=[0], trials=2)


def biased_towards(task, processor, answer):
    """Greedy decoding biased towards `answer` then `<|endofchunk|>`, so that a random tiny model can score."""
    ids = processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [processor.eoc_token_id]
    bias = [[ids[: i + 1], 30.0 * (i + 1)] for i in range(len(ids))]
    return dataclasses.replace(task, generation={**task.generation, "sequence_bias": bias})


def test_vqa_scores_exact_matches_per_kind(tmp_path, data_dir, tiny_model):
    model, processor = tiny_model
    task = biased_towards(TASKS["shapesworld_vqa"], processor, "Yes")
    assert task.generation["num_beams"] == 1
    out = tmp_path / "vqa.json"
    report = evaluate(model, processor, task, data_dir, out, shots=[1], batch_size=5)
    test = load_shapesworld("vqa", data_dir).test
    predictions = report["results"][0]["trials"][0]["predictions"]
    assert [record["prediction"] for record in predictions] == [record["output"].strip().lower()
                                                                for record in predictions]
    assert all(record["output"] == "Yes" for record in predictions), "the bias decides the output"
    correct = {example.id: example.target == "yes" for example in test}
    assert [record["correct"] for record in predictions] == [correct[example.id] for example in test]
    assert report["results"][0]["mean"] == pytest.approx(100 * sum(correct.values()) / COUNT)
    groups = report["results"][0]["groups"]
    assert set(groups) == set(VQA_KINDS)  # COUNT == 5: one sample of each kind
    for example in test:
        assert groups[example.fields["kind"]] == (100.0 if correct[example.id] else 0.0)
    assert "| shapesworld_vqa | 1 | yes/no | exact-match accuracy |" in out.with_suffix(".md").read_text()


def test_comparison_generates_whole_sentences(tmp_path, data_dir, tiny_model):
    model, processor = tiny_model
    test = load_shapesworld("comparison", data_dir).test
    task = biased_towards(TASKS["shapesworld_comparison"], processor, test[0].target)
    report = evaluate(model, processor, task, data_dir, tmp_path / "comparison.json", shots=[0, 1], batch_size=5)
    for result in report["results"]:
        predictions = result["trials"][0]["predictions"]
        assert predictions[0]["prediction"] == test[0].target.lower() and predictions[0]["correct"]
        assert [p["correct"] for p in predictions] == [example.target == test[0].target for example in test]


def test_cli_evaluates_binding(tmp_path, data_dir, tiny_model, capsys):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "out" / "binding.json"
    main(["eval", "--model", str(tmp_path / "model"), "--task", "shapesworld_binding", "--data-dir", str(data_dir),
          "--shots", "0", "4", "--batch-size", "4", "--out", str(out)])
    assert "| shapesworld_binding | 4 | top-1 accuracy |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [result["shots"] for result in report["results"]] == [0, 4]
    test = {example.id: example for example in load_shapesworld("binding", data_dir).test}
    for result in report["results"]:
        predictions = result["trials"][0]["predictions"]
        assert len(predictions) == COUNT
        assert all(record["prediction"] in test[record["id"]].candidates for record in predictions)
        assert all(len(record["demos"]) == result["shots"] for record in predictions)
    assert len(out.with_suffix(".samples.jsonl").read_text().splitlines()) == 1 + 2 * COUNT
