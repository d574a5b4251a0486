"""End to end: a tiny model evaluated on each task's fixture, in its documented layout; the reported scores equal the
official implementations run on the reported predictions; interrupted runs resume; RICES; the CLI."""

import dataclasses
import json

import pytest

from otter.cli import main
from otter.eval import TASKS, evaluate
from otter.eval.demos import ImageEmbedder, random_demos, rices_demos
from otter.eval.metrics import postprocess_vqa
from otter.tiny import build_tiny_otter

from .conftest import set_gates
from .eval_fixtures import CLASS_FOLDERS, VQA_NAMES, make_dataset
from .test_eval_metrics import nltk_data_installed

SHOTS = [0, 2]


@pytest.fixture(scope="module")
def tiny_model():
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    return model.eval(), processor


def run(tiny_model, task, data_dir, out, **kwargs):
    model, processor = tiny_model
    settings = dict(shots=SHOTS, trials=2, batch_size=2)
    return evaluate(model, processor, task, data_dir, out, **{**settings, **kwargs})


def check_report(report, out, task_name, num_test, pool_ids, trials=2):
    """Structure every task shares: per-shot scores over trials, one prediction per sample with its demonstrations."""
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["task"] == task_name and [r["shots"] for r in report["results"]] == SHOTS
    summary = out.with_suffix(".md").read_text()
    for result in report["results"]:
        assert len(result["trials"]) == trials
        scores = [trial["score"] for trial in result["trials"]]
        assert result["mean"] == pytest.approx(sum(scores) / len(scores))
        assert f"| {task_name} | {result['shots']} | {report['metric']} | {result['mean']:.2f} |" in summary
        for trial in result["trials"]:
            assert len(trial["predictions"]) == num_test
            for record in trial["predictions"]:
                assert len(record["demos"]) == 2  # 0-shot: two text-only demonstrations
                assert set(record["demos"]) <= pool_ids
    log_lines = out.with_suffix(".samples.jsonl").read_text().splitlines()
    assert len(log_lines) == 1 + len(SHOTS) * trials * num_test
    demos = {trial: [r["demos"] for r in report["results"][1]["trials"][trial]["predictions"]] for trial in range(trials)}
    if trials > 1:
        assert demos[0] != demos[1], "trials draw different demonstrations"


def biased_towards(task, processor, answer):
    """
    The task, its greedy decoding biased towards generating `answer` then `<|endofchunk|>`, so that a random tiny model
    scores above zero (greedy: beam search would add the biases up and favour repeating the answer).
    """
    ids = processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [processor.eoc_token_id]
    bias = [[ids[: i + 1], 20.0 * (i + 1)] for i in range(len(ids))]
    return dataclasses.replace(task, generation={**task.generation, "num_beams": 1, "sequence_bias": bias})


@pytest.mark.parametrize("task_name", ["vqav2", "ok_vqa", "textvqa", "vizwiz"])
def test_vqa_tasks_end_to_end(tmp_path, tiny_model, task_name):
    vqa_metric = pytest.importorskip("open_flamingo.eval.vqa_metric")
    data_dir = make_dataset(task_name, tmp_path / "data")
    task = biased_towards(TASKS[task_name], tiny_model[1], "red")
    if task_name == "ok_vqa" and not nltk_data_installed():
        task = dataclasses.replace(task, postprocess=postprocess_vqa)  # the stemmer needs NLTK data (tested apart)
    report = run(tiny_model, task, data_dir, tmp_path / "out" / "results.json")
    benchmark = task.load(data_dir)
    check_report(report, tmp_path / "out" / "results.json", task_name, len(benchmark.test),
                 {example.id for example in benchmark.pool})
    _, _, questions, annotations, _, split = VQA_NAMES[task_name]
    for result in report["results"]:
        for trial in result["trials"]:
            results_file = tmp_path / "predictions.json"
            results_file.write_text(json.dumps([{"question_id": r["id"], "answer": r["prediction"]}
                                                for r in trial["predictions"]]))
            official = vqa_metric.compute_vqa_accuracy(str(results_file), str(data_dir / questions.format(split)),
                                                       str(data_dir / annotations.format(split)))
            assert trial["score"] == official
            assert trial["score"] > 0, "the fixture's first test question accepts 'red'"
            for record in trial["predictions"]:
                assert record["prediction"] == task.postprocess(record["output"])


@pytest.mark.parametrize("task_name", ["coco", "flickr30k"])
def test_captioning_tasks_end_to_end(tmp_path, tiny_model, monkeypatch, task_name):
    coco_metric = pytest.importorskip("open_flamingo.eval.coco_metric")
    import pycocoevalcap.eval

    class Skipped:  # OpenFlamingo's compute_cider runs every scorer; only CIDEr is compared
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "skipped"

    for scorer in ("Meteor", "Spice"):
        monkeypatch.setattr(pycocoevalcap.eval, scorer, lambda *args, **kwargs: Skipped())
    data_dir = make_dataset(task_name, tmp_path / "data")
    task = biased_towards(TASKS[task_name], tiny_model[1], "a red circle")
    report = run(tiny_model, task, data_dir, tmp_path / "out" / "results.json", trials=1)
    benchmark = TASKS[task_name].load(data_dir)
    assert len(benchmark.test) == 3 and len(benchmark.pool) == 4  # "val" and "restval" images are not used
    check_report(report, tmp_path / "out" / "results.json", task_name, 3, {e.id for e in benchmark.pool}, trials=1)
    # OpenFlamingo's own CIDEr, on a COCO-style reference file made from the Karpathy split (as its Flickr file is)
    references = {"images": [{"id": e.id} for e in benchmark.test], "type": "captions", "info": {}, "licenses": [],
                  "annotations": [{"image_id": e.id, "id": 10 * n + k, "caption": caption}
                                  for n, e in enumerate(benchmark.test) for k, caption in enumerate(e.target)]}
    (tmp_path / "references.json").write_text(json.dumps(references))
    for result in report["results"]:
        predictions = result["trials"][0]["predictions"]
        (tmp_path / "captions.json").write_text(json.dumps([{"image_id": r["id"], "caption": r["prediction"]}
                                                            for r in predictions]))
        official = coco_metric.compute_cider(str(tmp_path / "captions.json"), str(tmp_path / "references.json"))
        assert result["trials"][0]["score"] == 100 * official["CIDEr"] > 0
        assert all(r["prediction"] == "a red circle" for r in predictions)


def test_imagenet_style_classification_end_to_end(tmp_path, tiny_model):
    data_dir = make_dataset("imagenet", tmp_path / "data")
    report = run(tiny_model, "imagenet", data_dir, tmp_path / "out" / "results.json")
    benchmark = TASKS["imagenet"].load(data_dir)
    assert benchmark.class_names == ["red thing", "green thing", "blue thing"]  # from classnames.txt
    check_report(report, tmp_path / "out" / "results.json", "imagenet", 3, {e.id for e in benchmark.pool})
    for result in report["results"]:
        for trial in result["trials"]:
            records = trial["predictions"]
            for record, example in zip(records, benchmark.test):
                logprobs = [value for _, value in record["top"]]
                assert len(record["top"]) == 3 and logprobs == sorted(logprobs, reverse=True)
                assert record["prediction"] == record["top"][0][0]
                assert record["correct"] == (record["prediction"] == example.target)
            assert trial["score"] == pytest.approx(100 * sum(r["correct"] for r in records) / len(records))


def test_hateful_memes_end_to_end(tmp_path, tiny_model):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    data_dir = make_dataset("hateful_memes", tmp_path / "data")
    report = run(tiny_model, "hateful_memes", data_dir, tmp_path / "out" / "results.json")
    benchmark = TASKS["hateful_memes"].load(data_dir)
    check_report(report, tmp_path / "out" / "results.json", "hateful_memes", 4, {e.id for e in benchmark.pool})
    labels = [example.target for example in benchmark.test]
    for result in report["results"]:
        for trial in result["trials"]:
            probabilities = [record["probability"] for record in trial["predictions"]]
            assert trial["score"] == 100 * sklearn_metrics.roc_auc_score(labels, probabilities)
            assert {record["prediction"] for record in trial["predictions"]} <= {"yes", "no"}


def count_generated_samples(monkeypatch, model):
    counter = {"samples": 0}
    generate = model.generate

    def counting_generate(*args, **kwargs):
        counter["samples"] += kwargs["input_ids"].shape[0]
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    return counter


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, tiny_model, monkeypatch):
    data_dir = make_dataset("vqav2", tmp_path / "data")
    complete = run(tiny_model, "vqav2", data_dir, tmp_path / "complete" / "results.json", trials=1)

    # the same run, interrupted after two samples of the first shot count, in the middle of writing a third
    log = tmp_path / "complete" / "results.samples.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    resumed_log = tmp_path / "resumed" / "results.samples.jsonl"
    resumed_log.parent.mkdir()
    resumed_log.write_text("".join(lines[:3]) + lines[3][:25])
    counter = count_generated_samples(monkeypatch, tiny_model[0])
    resumed = run(tiny_model, "vqav2", data_dir, tmp_path / "resumed" / "results.json", trials=1)
    assert counter["samples"] == len(lines) - 1 - 2  # every sample but the two logged ones
    assert resumed["results"] == complete["results"]
    assert resumed_log.read_text().count("\n") == len(lines)

    counter["samples"] = 0  # asking for more shots later runs only what is new
    more = run(tiny_model, "vqav2", data_dir, tmp_path / "resumed" / "results.json", trials=1, shots=[0, 2, 1])
    assert counter["samples"] == 3 and more["results"][:2] == complete["results"]

    stopped_at_once = tmp_path / "stopped" / "results.samples.jsonl"  # stopped while writing the settings line
    stopped_at_once.parent.mkdir()
    stopped_at_once.write_text(lines[0][:10])
    assert run(tiny_model, "vqav2", data_dir, stopped_at_once.with_suffix("").with_suffix(".json"),
               trials=1)["results"] == complete["results"]

    with pytest.raises(ValueError, match=r"another evaluation \(seed changed \(42 in the log, 7 now\)\)"):
        run(tiny_model, "vqav2", data_dir, tmp_path / "resumed" / "results.json", trials=1, seed=7)


def test_rices_retrieves_the_most_similar_images_and_caches_their_embeddings(tmp_path, tiny_model, monkeypatch):
    data_dir = make_dataset("imagenet", tmp_path / "data")  # a class's images share its colour
    report = run(tiny_model, "imagenet", data_dir, tmp_path / "out" / "results.json", rices=True, trials=1,
                 rices_cache=tmp_path / "cache")
    for result in report["results"]:
        assert result["trials"][0]["seed"] is None
        for record in result["trials"][0]["predictions"]:
            own_class = record["id"].split("/")[0]
            assert [demo.split("/")[0] for demo in record["demos"]] == [own_class, own_class]
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 2  # the demonstration pool's embeddings and the evaluated split's

    def no_embedding(self, paths):
        raise AssertionError("embeddings should come from the cache")

    monkeypatch.setattr(ImageEmbedder, "_embed", no_embedding)
    again = run(tiny_model, "imagenet", data_dir, tmp_path / "again" / "results.json", rices=True, trials=1,
                rices_cache=tmp_path / "cache")
    assert again["results"] == report["results"]
    with pytest.raises(ValueError, match="RICES picks the same demonstrations in every trial"):
        run(tiny_model, "imagenet", data_dir, tmp_path / "x" / "results.json", rices=True, trials=2)


def test_rices_with_a_clip_encoder_with_projection(tmp_path, tiny_model):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=16)).eval()
    data_dir = make_dataset("imagenet", tmp_path / "data")
    report = run(tiny_model, "imagenet", data_dir, tmp_path / "out" / "results.json", rices=True, trials=1,
                 rices_encoder=(encoder, tiny_model[1].image_processor), shots=[2])
    for record in report["results"][0]["trials"][0]["predictions"]:
        assert {demo.split("/")[0] for demo in record["demos"]} == {record["id"].split("/")[0]}


def test_random_demonstrations_are_seeded_and_drawn_from_the_query_set():
    plan = random_demos(pool_size=100, num_samples=50, shots=4, seed=3, query_set_size=10)
    assert plan == random_demos(100, 50, 4, 3, 10)
    assert plan != random_demos(100, 50, 4, 4, 10)
    assert len({index for demos in plan for index in demos}) <= 10
    assert all(len(set(demos)) == 4 for demos in plan)
    with pytest.raises(ValueError, match="query set holds only 3"):
        random_demos(3, 1, 4, 0, 2048)


def test_rices_orders_the_most_similar_last():
    import torch

    pool = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]]), dim=-1)
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert rices_demos(queries, pool, 3) == [[3, 1, 0], [1, 3, 2]]
    assert rices_demos(queries, pool, 3, chunk_size=1) == [[3, 1, 0], [1, 3, 2]]
    with pytest.raises(ValueError, match="pool holds 4"):
        rices_demos(queries, pool, 5)


def test_bad_arguments_are_named(tmp_path, tiny_model):
    data_dir = make_dataset("hateful_memes", tmp_path / "data")
    out = tmp_path / "out" / "results.json"
    with pytest.raises(ValueError, match="unknown task 'vqa3'"):
        run(tiny_model, "vqa3", data_dir, out)
    with pytest.raises(ValueError, match=r"shots must be .* got \[-1\]"):
        run(tiny_model, "hateful_memes", data_dir, out, shots=[-1])
    with pytest.raises(ValueError, match=r"num_samples must be in \[1, 4\]"):
        run(tiny_model, "hateful_memes", data_dir, out, num_samples=9)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match=r"HatefulMemes annotations not found: expected .*elsewhere/train.jsonl"):
        run(tiny_model, "hateful_memes", tmp_path / "elsewhere", out)


def test_num_samples_evaluates_a_seeded_subset(tmp_path, tiny_model):
    data_dir = make_dataset("hateful_memes", tmp_path / "data")
    first = run(tiny_model, "hateful_memes", data_dir, tmp_path / "a" / "results.json", num_samples=3, trials=1)
    second = run(tiny_model, "hateful_memes", data_dir, tmp_path / "b" / "results.json", num_samples=3, trials=1)
    ids = [[r["id"] for r in result["trials"][0]["predictions"]] for result in first["results"]]
    assert len(ids[0]) == 3 and ids[0] == ids[1]  # the same subset for every shot count
    assert first["results"] == second["results"]


def test_cli_evaluates_a_saved_model(tmp_path, tiny_model, capsys):
    model, processor = tiny_model
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    data_dir = make_dataset("imagenet", tmp_path / "data")
    out = tmp_path / "out" / "results.json"
    main(["eval", "--model", str(tmp_path / "model"), "--task", "imagenet", "--data-dir", str(data_dir),
          "--shots", "0", "2", "--batch-size", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| imagenet | 0 | top-1 accuracy |" in printed and "| imagenet | 2 | top-1 accuracy |" in printed
    report = json.loads(out.read_text())
    in_memory = run(tiny_model, "imagenet", data_dir, tmp_path / "mem" / "results.json", trials=1)
    assert [r["mean"] for r in report["results"]] == pytest.approx([r["mean"] for r in in_memory["results"]])
    assert CLASS_FOLDERS[0] in report["results"][0]["trials"][0]["predictions"][0]["id"]
