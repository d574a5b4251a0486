"""Video QA evaluation (issue 20): MSVD-QA and MSRVTT-QA in their official layouts and common variants, accuracy by
exact match, VQA's few-shot protocol with a video in place of the image, each video decoded once per pass, videos of
different lengths batched through the frame mask, resuming, and what is checked before the model is loaded."""

import json
import threading
from collections import Counter

import pytest
import torch

from otter import OtterForConditionalGeneration, OtterProcessor
from otter.cli import main
from otter.eval import TASKS, Example, build_prompt, encode_batch, evaluate, evaluator
from otter.eval.metrics import exact_match, postprocess_vqa
from otter.eval.tasks import score_exact_match
from otter.tiny import build_tiny_otter
from otter.video import UnreadableVideoError

from .conftest import set_gates
from .eval_fixtures import make_hateful_memes, make_msrvtt_qa, make_msvd_qa, write_colour_video
from .test_eval_e2e import biased_towards, check_report, count_generated_samples

pytest.importorskip("av", reason="pip install 'otter-flamingo[video]'")

MAKERS = {"msvd_qa": make_msvd_qa, "msrvtt_qa": make_msrvtt_qa}
DATA_CHANGED = r"\(the data set changed \(its samples' annotations, or the sizes of their image or video files\)\)"


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny Otter video model: frame embeddings for up to 4 frames, and a processor that samples 4."""
    model, processor = build_tiny_otter("mpt", max_num_frames=4)
    set_gates(model)
    return model.eval(), processor


def run(tiny_model, task, data_dir, out, **kwargs):
    model, processor = tiny_model
    return evaluate(model, processor, task, data_dir, out, **{"shots": [0, 2], "batch_size": 2, **kwargs})


# -- the metric and the prompts ---------------------------------------------------------------------------------------
def test_accuracy_is_the_exact_match_of_the_lower_cased_stripped_answer():
    assert exact_match("Dog", "dog") and exact_match("  dog \n", "dog") and exact_match("DOG", " Dog ")
    for wrong in ("dogs", "a dog", "dog.", "", "do g"):
        assert not exact_match(wrong, "dog"), wrong
    # what a task scores: the generated text post-processed as VQA's, then matched against the one answer
    outputs = ["Man Question:who is", "two, three", " table", "cat"]
    examples = [Example(id=n, image=f"{n}.mp4", fields={}, target=answer)
                for n, answer in enumerate(["man", "two", "table", "dog"])]
    score, per_sample = score_exact_match(examples, [{"prediction": postprocess_vqa(output)} for output in outputs])
    assert score == 75.0 and [sample["correct"] for sample in per_sample] == [True, True, True, False]
    for name in MAKERS:
        task = TASKS[name]
        assert task.score is score_exact_match and task.postprocess is postprocess_vqa and task.media == "video"
        assert task.generation == TASKS["vqav2"].generation and task.zero_shot_demos == TASKS["vqav2"].zero_shot_demos


def test_prompts_are_openflamingos_vqa_prompts_with_a_video():
    demos = [Example(1, "a.mp4", {"question": "q1", "answer": "a1"}, "a1"),
             Example(2, "b.mp4", {"question": "q2", "answer": "a2"}, "a2")]
    query = Example(3, "c.mp4", {"question": "q3", "answer": "a3"}, "a3")
    text, videos = build_prompt(TASKS["msrvtt_qa"], query, demos, shots=2)
    assert text == ("<video>Question:q1 Short answer:a1<|endofchunk|>\n<video>Question:q2 Short answer:a2<|endofchunk|>\n"
                    "<video>Question:q3 Short answer:")
    assert videos == ["a.mp4", "b.mp4", "c.mp4"]
    text, videos = build_prompt(TASKS["msvd_qa"], query, demos, shots=0)  # text-only demonstrations, the query's video
    assert text == ("Question:q1 Short answer:a1<|endofchunk|>\nQuestion:q2 Short answer:a2<|endofchunk|>\n"
                    "<video>Question:q3 Short answer:")
    assert videos == ["c.mp4"]


# -- the layouts ------------------------------------------------------------------------------------------------------
def test_the_official_layouts_are_read(tmp_path):
    root = make_msvd_qa(tmp_path / "msvd")
    clips = dict(line.split()[::-1] for line in (root / "youtube_mapping.txt").read_text().splitlines())
    benchmark = TASKS["msvd_qa"].load(root)
    for examples, name in ((benchmark.pool, "train_qa.json"), (benchmark.test, "test_qa.json")):
        records = json.loads((root / name).read_text())
        assert [example.id for example in examples] == [record["id"] for record in records]
        assert [example.image for example in examples] == [root / "YouTubeClips" / (clips["vid%d" % r["video_id"]] + ".avi")
                                                           for r in records]
        assert [example.fields["question"] for example in examples] == [record["question"] for record in records]
        assert [example.target for example in examples] == [example.fields["answer"] for example in examples] == \
            [record["answer"] for record in records]
    assert [example.fields["type"] for example in benchmark.test] == ["what", "who", "how", "where"]

    root = make_msrvtt_qa(tmp_path / "msrvtt")
    benchmark = TASKS["msrvtt_qa"].load(root)
    records = json.loads((root / "test_qa.json").read_text())
    assert [example.image for example in benchmark.test] == [root / "video" / f"video{r['video_id']}.mp4" for r in records]
    assert [example.id for example in benchmark.test] == [record["id"] for record in records]
    assert len(benchmark.pool) == 4 and all(example.image.is_file() for example in benchmark.pool + benchmark.test)


def rewrite(path, change):
    path.write_text(json.dumps([change(record) for record in json.loads(path.read_text())]))


def test_the_common_variants_of_the_layouts_are_read(tmp_path):
    # MSVD-QA: clips converted to mp4 in videos/; records naming their clip ("video_name", with or without suffix),
    # or their id as "vidN"
    root = make_msvd_qa(tmp_path / "msvd")
    official = TASKS["msvd_qa"].load(root)
    clips = dict(line.split()[::-1] for line in (root / "youtube_mapping.txt").read_text().splitlines())
    (root / "YouTubeClips").rename(root / "videos")
    for clip in (root / "videos").iterdir():
        clip.rename(clip.with_suffix(".mp4"))
    rewrite(root / "train_qa.json", lambda r: {**r, "video_id": f"vid{r['video_id']}"})
    rewrite(root / "test_qa.json", lambda r: {key: value for key, value in r.items() if key != "video_id"} |
            {"video_name": clips[f"vid{r['video_id']}"] + (".avi" if r["id"] % 2 else "")})
    variant = TASKS["msvd_qa"].load(root)
    for ours, theirs in zip(variant.pool + variant.test, official.pool + official.test):
        assert ours.image == root / "videos" / (theirs.image.stem + ".mp4")
        assert (ours.id, ours.fields, ours.target) == (theirs.id, theirs.fields, theirs.target)

    # MSRVTT-QA: MSR-VTT's own TrainValVideo/ and TestVideo/; Video-ChatGPT's test_q.json and test_a.json
    root = make_msrvtt_qa(tmp_path / "msrvtt")
    official = TASKS["msrvtt_qa"].load(root)
    (root / "TrainValVideo").mkdir()
    (root / "TestVideo").mkdir()
    for video in (root / "video").iterdir():
        video.rename(root / ("TestVideo" if int(video.stem[5:]) >= 7010 else "TrainValVideo") / video.name)
    (root / "video").rmdir()
    records = json.loads((root / "test_qa.json").read_text())
    (root / "test_qa.json").unlink()
    (root / "test_q.json").write_text(json.dumps([{"video_name": f"video{r['video_id']}", "question_id": f"v_{r['id']}",
                                                   "question": r["question"]} for r in records]))
    (root / "test_a.json").write_text(json.dumps([{"answer": r["answer"], "type": 3, "question_id": f"v_{r['id']}"}
                                                  for r in reversed(records)]))
    variant = TASKS["msrvtt_qa"].load(root)
    assert [e.image for e in variant.pool] == [root / "TrainValVideo" / e.image.name for e in official.pool]
    assert [e.image for e in variant.test] == [root / "TestVideo" / e.image.name for e in official.test]
    assert [(e.id, e.fields, e.target) for e in variant.test] == [(f"v_{e.id}", e.fields, e.target) for e in official.test]
    (root / "TestVideo" / "video7010.mp4").unlink()  # a missing video keeps the path where the layout expects it
    assert TASKS["msrvtt_qa"].load(root).test[0].image == root / "TestVideo" / "video7010.mp4"


def test_what_is_missing_from_a_layout_is_named(tmp_path):
    root = make_msvd_qa(tmp_path / "msvd")
    rewrite(root / "test_qa.json", lambda r: {**r, "video_id": 99} if r["id"] == 1001 else r)
    with pytest.raises(ValueError, match=rf"test_qa.json: video_id 99 \(vid99\) is not in {root / 'youtube_mapping.txt'}"):
        TASKS["msvd_qa"].load(root)
    (root / "youtube_mapping.txt").unlink()
    with pytest.raises(ValueError, match=r"MSVD-QA youtube_mapping.txt \(video ids to clip names\) not found: expected "
                                         + str(root / "youtube_mapping.txt")):
        TASKS["msvd_qa"].load(root)
    (root / "YouTubeClips").rename(root / "clips")
    with pytest.raises(ValueError, match=f"MSVD-QA video folder not found: expected YouTubeClips/ or video/ or videos/ "
                                         f"under {root}"):
        TASKS["msvd_qa"].load(root)

    root = make_msrvtt_qa(tmp_path / "msrvtt")
    rewrite(root / "test_qa.json", lambda r: {key: value for key, value in r.items() if key != "video_id"})
    with pytest.raises(ValueError, match=r"test_qa.json: record 1000 names no video \(expected 'video_id' or 'video_name'\)"):
        TASKS["msrvtt_qa"].load(root)
    (root / "test_qa.json").write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match=r"test_qa.json holds a dict; expected a list of"):
        TASKS["msrvtt_qa"].load(root)
    (root / "train_qa.json").unlink()
    with pytest.raises(ValueError, match=r"MSRVTT-QA train questions and answers not found: expected "
                                         + str(root / "train_qa.json")):
        TASKS["msrvtt_qa"].load(root)


# -- evaluation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name", list(MAKERS))
def test_video_qa_end_to_end(tmp_path, tiny_model, task_name):
    data_dir = MAKERS[task_name](tmp_path / "data")
    task = biased_towards(TASKS[task_name], tiny_model[1], "red")  # every prediction "red": the first question's answer
    out = tmp_path / "out" / "results.json"
    report = run(tiny_model, task, data_dir, out, trials=2)
    benchmark = task.load(data_dir)
    check_report(report, out, task_name, len(benchmark.test), {example.id for example in benchmark.pool})
    assert report["settings"]["num_frames"] == 4 and report["settings"]["frame_sampling"] == "uniform"  # the processor's
    assert report["metric"] == "exact-match accuracy" and report["group_by"] == "type"
    for result in report["results"]:
        for trial in result["trials"]:
            records = trial["predictions"]
            for record, example in zip(records, benchmark.test):
                assert record["id"] == example.id and record["prediction"] == postprocess_vqa(record["output"])
                assert record["correct"] == (record["prediction"].strip().lower() == example.target)
            assert trial["score"] == 100 * sum(record["correct"] for record in records) / len(records) == 25.0
            assert trial["groups"] == {"what": 100.0, "who": 0.0, "how": 0.0, "where": 0.0}
    assert "| " + task_name + " | 2 | what | exact-match accuracy | 100.00 |" in out.with_suffix(".md").read_text()


def test_each_video_is_decoded_once_per_pass_in_background_threads(tmp_path, tiny_model, monkeypatch):
    model, _ = tiny_model
    data_dir = make_msrvtt_qa(tmp_path / "data", num_pool=4, num_test=6)  # 3 batches showing 2 test videos each
    read_video = evaluator.read_video
    decoded, threads = Counter(), set()

    def counted(video, **kwargs):
        decoded[str(video)] += 1
        threads.add(threading.current_thread().name)
        return read_video(video, **kwargs)

    monkeypatch.setattr(evaluator, "read_video", counted)
    frames_encoded = []
    hook = model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: frames_encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        report = run(tiny_model, "msrvtt_qa", data_dir, tmp_path / "out" / "results.json")
    finally:
        hook.remove()
    benchmark = TASKS["msrvtt_qa"].load(data_dir)
    pool = {example.id: str(example.image) for example in benchmark.pool}
    queries = {str(example.image) for example in benchmark.test}
    demos = {pool[demo] for record in report["results"][1]["trials"][0]["predictions"] for demo in record["demos"]}
    shown = Counter(queries) + Counter(queries | demos)  # the 0-shot pass, then the 2-shot pass
    assert decoded == shown
    assert threads and all(name.startswith("otter-images") for name in threads)
    # and each shown video's frames (4, or all of a shorter one) run through the vision tower once per pass
    frames = {video: len(read_video(video, num_frames=4)) for video in shown}
    assert sorted(set(frames.values())) == [3, 4]
    assert sum(frames_encoded) == sum(frames[video] * passes for video, passes in shown.items())


def test_videos_of_different_lengths_are_batched_as_the_processor_batches_them(tmp_path, tiny_model):
    model, processor = tiny_model
    long, short = write_colour_video(tmp_path / "long.mp4", 0, 7), write_colour_video(tmp_path / "short.avi", 1, 2)
    texts = ["<video>Question:what? Short answer:red<|endofchunk|>\n<video>Question:who? Short answer:",
             "<video>Question:how? Short answer:two<|endofchunk|>\n<video>Question:where? Short answer:"]
    videos = [[long, short], [short, short]]
    ours = encode_batch(model, processor, texts, videos, num_frames=4)
    reference = processor(text=texts, videos=videos, num_frames=4)
    assert reference["frame_mask"][:, :, -1].tolist() == [[1, 0], [0, 0]]  # 4 and 2 frames
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    assert torch.equal(ours["attention_mask"], reference["attention_mask"])
    with torch.no_grad():
        features = model.get_image_features(reference["pixel_values"], reference["frame_mask"])
    assert torch.allclose(ours["media_key_values"], model.get_media_key_values(features), atol=1e-5)
    settings = dict(num_beams=3, max_new_tokens=4, length_penalty=0.0, do_sample=False)
    assert torch.equal(model.generate(**ours, **settings), model.generate(**reference, **settings))


def test_the_command_evaluates_video_qa(tmp_path, tiny_model, capsys):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    data_dir = make_msvd_qa(tmp_path / "data")
    out = tmp_path / "out" / "results.json"
    main(["eval", "--model", str(tmp_path / "model"), "--task", "msvd_qa", "--data-dir", str(data_dir),
          "--shots", "0", "2", "--batch-size", "2", "--num-frames", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| msvd_qa | 0 | exact-match accuracy |" in printed and "| msvd_qa | 2 | what | exact-match accuracy |" in printed
    report = json.loads(out.read_text())
    assert report["settings"]["num_frames"] == 3
    in_memory = run(tiny_model, "msvd_qa", data_dir, tmp_path / "memory" / "results.json", num_frames=3)
    assert [[record["output"] for record in result["trials"][0]["predictions"]] for result in report["results"]] == \
        [[record["output"] for record in result["trials"][0]["predictions"]] for result in in_memory["results"]]


def test_an_interrupted_run_resumes_and_other_frames_or_videos_are_refused(tmp_path, tiny_model, monkeypatch):
    data_dir = make_msrvtt_qa(tmp_path / "data")
    complete = run(tiny_model, "msrvtt_qa", data_dir, tmp_path / "complete" / "results.json")
    lines = (tmp_path / "complete" / "results.samples.jsonl").read_text().splitlines(keepends=True)
    resumed_log = tmp_path / "resumed" / "results.samples.jsonl"
    resumed_log.parent.mkdir()
    resumed_log.write_text("".join(lines[:4]) + lines[4][:20])  # three samples, and a fourth cut short
    counter = count_generated_samples(monkeypatch, tiny_model[0])
    resumed = run(tiny_model, "msrvtt_qa", data_dir, tmp_path / "resumed" / "results.json")
    assert counter["samples"] == len(lines) - 1 - 3
    assert resumed["results"] == complete["results"]

    counter["samples"] = 0  # the processor's 4 frames, asked for by name: the same run
    assert run(tiny_model, "msrvtt_qa", data_dir, tmp_path / "resumed" / "results.json",
               num_frames=4)["results"] == complete["results"]
    assert counter["samples"] == 0
    with pytest.raises(ValueError, match=r"another evaluation \(num_frames changed \(4 in the log, 3 now\)\)"):
        run(tiny_model, "msrvtt_qa", data_dir, tmp_path / "resumed" / "results.json", num_frames=3)
    video = data_dir / "video" / "video7011.mp4"
    size = video.stat().st_size
    write_colour_video(video, 5, 2)  # another video in its place
    assert video.stat().st_size != size
    with pytest.raises(ValueError, match=DATA_CHANGED):
        run(tiny_model, "msrvtt_qa", data_dir, tmp_path / "resumed" / "results.json")


# -- checks -----------------------------------------------------------------------------------------------------------
def no_loading(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


def command_error(capsys, monkeypatch, *arguments) -> str:
    """The one line `otter eval ARGUMENTS` prints as it exits with status 1, the model never loaded."""
    monkeypatch.setattr(OtterForConditionalGeneration, "from_pretrained", no_loading)
    monkeypatch.setattr(OtterProcessor, "from_pretrained", no_loading)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "unused-model", "--shots", "0", "2", *arguments])
    error = capsys.readouterr().err.rstrip("\n").rsplit("\n", 1)[-1]
    assert exit_.value.code == 1 and error.startswith("otter: "), error
    return error


def test_missing_videos_and_bad_settings_are_named_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    data_dir = make_msvd_qa(tmp_path / "data")
    out = tmp_path / "out" / "results.json"
    arguments = ["--task", "msvd_qa", "--data-dir", str(data_dir), "--out", str(out)]
    missing = TASKS["msvd_qa"].load(data_dir).test[1].image
    missing.unlink()
    assert command_error(capsys, monkeypatch, *arguments) == (
        f"otter: 1 video file this run shows is missing (or not a file): {missing} (see the dataset layouts in "
        "eval/README.md)")
    assert "RICES retrieves demonstrations by image similarity, and msvd_qa shows videos" in \
        command_error(capsys, monkeypatch, *arguments, "--rices")
    assert "num_frames must be an integer >= 1, got 0" in command_error(capsys, monkeypatch, *arguments,
                                                                        "--num-frames", "0")
    images = make_hateful_memes(tmp_path / "memes")
    assert "num_frames is how many frames of a video are shown; hateful_memes shows images" in command_error(
        capsys, monkeypatch, "--task", "hateful_memes", "--data-dir", str(images), "--out", str(out), "--num-frames", "4")
    (data_dir / "YouTubeClips").rename(data_dir / "clips")
    assert f"MSVD-QA video folder not found: expected YouTubeClips/ or video/ or videos/ under {data_dir}" in \
        command_error(capsys, monkeypatch, *arguments)
    assert not out.with_suffix(".samples.jsonl").exists()


def test_frames_beyond_the_models_and_unreadable_videos_are_named(tmp_path, tiny_model):
    data_dir = make_msrvtt_qa(tmp_path / "data")
    out = tmp_path / "out" / "results.json"
    with pytest.raises(ValueError, match=r"num_frames is 6, but this model takes at most 4 frames per video"):
        run(tiny_model, "msrvtt_qa", data_dir, out, num_frames=6)
    assert not out.with_suffix(".samples.jsonl").exists()
    broken = data_dir / "video" / "video7011.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(UnreadableVideoError, match="video7011.mp4 could not be decoded"):
        run(tiny_model, "msrvtt_qa", data_dir, out, shots=[0])


def test_a_model_without_frame_embeddings_is_shown_8_frames(tmp_path):
    """OpenFlamingo-style models (no max_num_frames; the processor sets no num_frames) read a video's frames' tokens
    together; by default 8 frames."""
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    assert model.config.max_num_frames is None and processor.num_frames is None
    data_dir = make_msrvtt_qa(tmp_path / "data")
    report = evaluate(model.eval(), processor, "msrvtt_qa", data_dir, tmp_path / "out.json", shots=[0], batch_size=4)
    assert report["settings"]["num_frames"] == 8 and len(report["results"][0]["trials"][0]["predictions"]) == 4
