"""`otter train shapesworld`: every stage of the shipped model's reproduction, run end to end at a tiny scale."""

import json

import pytest
import torch
from safetensors import safe_open

from otter import OtterForConditionalGeneration
from otter.cli import main
from otter.train.shapesworld import EVAL_SHOTS, Recipe, reproduce

SCALE = 0.003
STAGES = ["data", "clip", "language_model", "assemble", "pretrain", "finetune", "model", "eval_data", "eval"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapesworld")
    main(["train", "shapesworld", "--out", str(out), "--scale", str(SCALE)])
    return out


def test_every_stage_runs_and_the_model_is_float32_safetensors_of_fp16_values(run, capsys):
    assert list(json.loads((run / "timings.json").read_text())) == STAGES
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
