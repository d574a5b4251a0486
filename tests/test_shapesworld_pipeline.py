"""`otter train shapesworld`: every stage of the shipped model's reproduction, run end to end at a tiny scale."""

import json

import pytest
import torch
from safetensors import safe_open

from otter import OtterForConditionalGeneration
from otter.cli import main
from otter.train.shapesworld import EVAL_SHOTS, Recipe, Stages, reproduce

SCALE = 0.003
STAGES = ["clip", "data", "text", "language_model", "assemble", "pretrain", "finetune", "model", "eval_data", "eval"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapesworld")
    main(["train", "shapesworld", "--out", str(out), "--scale", str(SCALE)])
    return out


def test_every_stage_runs_and_the_model_is_float32_safetensors_of_fp16_values(run, capsys):
    timings = json.loads((run / "timings.json").read_text())
    assert list(timings["stages"]) == STAGES
    # CLIP and the image sets were made beside the text and the language model
    side_by_side = min(sum(timings["stages"][stage] for stage in pair) for pair in (STAGES[:2], STAGES[2:4]))
    assert timings["wall_seconds"] == pytest.approx(sum(timings["stages"].values()) - side_by_side)
    assert all((run / f"{stage}.done.json").is_file() for stage in STAGES)
    assert not list((run / "model").glob("*.done.json")), "the model folder holds only what ships"
    with safe_open(run / "model" / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}
        assert all(torch.equal(tensor, tensor.half().float()) for tensor in map(weights.get_tensor, weights.keys()))
    model = OtterForConditionalGeneration.from_pretrained(run / "model")  # float32, as saved
    assert model.dtype == torch.float32
    assert model.config.perceiver_num_latents == 16 and model.language_model.config.model_type == "mpt"
    tokenizer = json.loads((run / "language_model" / "tokenizer" / "tokenizer.json").read_text())
    assert tokenizer["model"]["type"] == "BPE"
    assert (run / "clip" / "vision" / "config.json").is_file()  # converted by our open_clip converter


def test_results_cover_every_task_and_shot_count(run):
    results = (run / "eval" / "results.md").read_text()
    for task, shots in EVAL_SHOTS.items():
        report = json.loads((run / "eval" / f"{task}.json").read_text())
        assert [result["shots"] for result in report["results"]] == shots
        for result in report["results"]:
            assert f"| {task} | {result['shots']} | {report['metric']} | {result['mean']:.1f} |" in results


def test_a_rerun_continues_and_another_recipe_is_refused(run, monkeypatch):
    before = json.loads((run / "timings.json").read_text())
    monkeypatch.setattr("otter.train.shapesworld.train_clip", lambda *a: pytest.fail("a finished stage reran"))
    assert reproduce(run, Recipe(scale=SCALE)) == run / "model"
    assert json.loads((run / "timings.json").read_text()) == before
    with pytest.raises(ValueError, match="another recipe"):
        reproduce(run, Recipe(scale=SCALE, seed=1))


def test_a_stage_failing_in_the_second_process_is_raised_and_the_others_are_kept(tmp_path):
    (tmp_path / "data").write_text("not a folder")  # the data stage cannot make its folder
    stages, here, threads = Stages(tmp_path), [], torch.get_num_threads()
    with pytest.raises(RuntimeError, match=r"\['clip', 'data'\] failed in their own process"):
        stages.run_side_by_side(["clip", "data"], Recipe(scale=SCALE),
                                [("here", lambda folder: here.append(torch.get_num_threads()))])
    assert (tmp_path / "clip.done.json").is_file() and (tmp_path / "clip" / "vision" / "config.json").is_file()
    assert (tmp_path / "here.done.json").is_file() and here == [threads - threads // 2]
    assert torch.get_num_threads() == threads
    assert not (tmp_path / "data.done.json").exists(), "a failed stage is not marked done: a rerun makes it again"


# -- the varied world's training data (otter train shapesworld --varied) -------------------------------------------
def test_varied_training_data_holds_video_episodes_of_clips_and_binding_of_many_ways(tmp_path):
    import dataclasses
    import re

    from otter.shapesworld import FRAMES, MOTION_INSTRUCTION, WORD_FORMS, word_form
    from otter.train.data import instruction_source
    from otter.train.shapesworld import VARIED_RECIPE, VIDEO_SET, training_words, write_mimicit, write_text_corpus

    recipe = dataclasses.replace(VARIED_RECIPE, scale=0.01)
    words = training_words(recipe)
    assert {word_form(word) for word in words} == set(WORD_FORMS)
    images, videos = write_mimicit(tmp_path / "instructions", recipe, words)
    assert videos.name == f"{VIDEO_SET}_instructions.json"
    video_source = instruction_source(str(videos), video_sets=[VIDEO_SET])
    image_source = instruction_source(str(images), video_sets=[VIDEO_SET])
    assert video_source.video and not image_source.video
    share = len(video_source) / (len(video_source) + len(image_source))
    assert 0.05 < share < 0.3  # video_share 0.15 of the episodes
    naming = 0
    for index in range(len(video_source)):
        example = video_source.example(index)
        assert example.images == [] and all(len(video) == FRAMES for video in example.videos)
        assert example.text.count("<video>") == len(example.videos) >= 1
        naming += MOTION_INSTRUCTION in example.text
    assert 0 < naming < len(video_source)
    ways = set()
    for index in range(len(image_source)):
        text = image_source.example(index).text
        if "What is it called?" in text:
            ways.add(len(set(re.findall(r"GPT:<answer> (\w+)", text))))
    assert max(ways) >= 4, ways  # binding beyond two ways
    write_text_corpus(tmp_path / "text.txt", recipe, words)
    corpus = (tmp_path / "text.txt").read_text()
    assert re.search(r"Video: an? \w+ \w+ moving (left|right|up|down)\. User: (Which way|What is this motion)", corpus)


def test_the_varied_clip_trains_the_patch_tokens_otter_reads_and_stays_a_plain_open_clip(tmp_path):
    import dataclasses

    import open_clip

    from otter.train.shapesworld import CLIP_CONFIG, VARIED_RECIPE, train_clip

    assert VARIED_RECIPE.clip_patch_loss
    trained = {}
    for patch_loss in (False, True):
        recipe = dataclasses.replace(VARIED_RECIPE, scale=0.002, clip_patch_loss=patch_loss, precision="fp32")
        _, weights = train_clip(tmp_path / str(patch_loss), recipe)
        trained[patch_loss] = torch.load(weights, weights_only=True)
    # the same keys and shapes as open_clip's own model: the converter and every CLIP loader read it as before
    plain = open_clip.model.CLIP(**CLIP_CONFIG).state_dict()
    assert {k: v.shape for k, v in trained[True].items()} == {k: v.shape for k, v in plain.items()}
    # the patch term changes what the last layer learns (its class-token-only gradient differs from it)
    last = "visual.transformer.resblocks.3.mlp.c_proj.weight"
    assert not torch.allclose(trained[False][last], trained[True][last])


def test_the_comparisons_stage_reads_two_image_comparisons_only_and_one_per_example(tmp_path):
    import dataclasses

    from otter.train.data import instruction_source
    from otter.train.shapesworld import COMPARISON_SET, VARIED_RECIPE, write_comparison_set

    recipe = dataclasses.replace(VARIED_RECIPE, scale=0.01)
    path = write_comparison_set(tmp_path, recipe)
    assert path.name == f"{COMPARISON_SET}_instructions.json"
    source = instruction_source(str(path))
    assert len(source) == recipe.scaled("comparison_steps") * recipe.finetune_batch
    turns = set()
    for index in range(len(source)):
        example = source.example(index)
        assert len(example.images) == 2 * example.text.count("What are the two shapes?")
        assert example.text.count("The first one is a") == example.text.count("<|endofchunk|>")
        turns.add(example.text.count("What are the two shapes?"))
    assert turns == {1, 2, 3}


def test_the_skills_stage_reads_position_questions_on_images_and_direction_questions_on_clips(tmp_path):
    import dataclasses

    from otter.shapesworld import CLIP_QUESTIONS, DIRECTIONS, FRAMES, QUESTIONS, REGIONS
    from otter.train.data import instruction_source
    from otter.train.shapesworld import SKILL_SET, VARIED_RECIPE, VIDEO_SET, write_skill_set

    recipe = dataclasses.replace(VARIED_RECIPE, scale=0.01)
    paths = write_skill_set(tmp_path, recipe)
    assert [path.name for path in paths] == [f"{SKILL_SET}_instructions.json", f"{VIDEO_SET}_instructions.json"]
    images, clips = (instruction_source(str(path), resample_frames=FRAMES, video_sets=[VIDEO_SET]) for path in paths)
    assert len(images) + len(clips) == recipe.scaled("skill_steps") * recipe.finetune_batch
    assert len(images) == len(clips)
    for source, question, answers in ((images, QUESTIONS["position"], REGIONS),
                                      (clips, CLIP_QUESTIONS["motion"], DIRECTIONS)):
        for index in range(len(source)):
            example = source.example(index)
            turns = example.text.split("<|endofchunk|>")[:-1]
            assert 1 <= len(turns) <= 3 and all(question in turn for turn in turns)
            assert all(turn.rsplit("<answer>", 1)[1].strip() in answers for turn in turns)
            media = example.videos if source is clips else example.images
            assert len(media) == len(turns)
            assert all(len(frames) == FRAMES for frames in example.videos)
