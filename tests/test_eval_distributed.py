"""
`accelerate launch -m otter.cli eval` on two CPU processes (gloo): the samples shared between them, the same batches
and demonstrations as one process, one results file and one per-sample log in the end, with the score and every
prediction of the one-process run; a run resumes with another process count; RICES is computed once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from otter.cli import main
from otter.tiny import build_tiny_otter

from .conftest import set_gates
from .eval_fixtures import make_dataset
from .train_fixtures import free_port

DDP_CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "ddp.yaml"


def launch(processes: int, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
               "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
               "-m", "otter.cli", "eval", *arguments]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model, processor = build_tiny_otter("gpt_neox", cross_attn_every_n_layers=2)
    set_gates(model)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    data = make_dataset("vqav2", root / "vqav2")
    return root, data


def arguments(root, data, out, *more):
    return ["--model", str(root / "model"), "--task", "vqav2", "--data-dir", str(data), "--out", str(out),
            "--batch-size", "1", "--trials", "2", "--device", "cpu", *more]


def predictions(report):
    return [(result["shots"], trial["score"], [(p["id"], p["demos"], p["output"]) for p in trial["predictions"]])
            for result in report["results"] for trial in result["trials"]]


def test_two_processes_give_the_one_process_results_and_resume_with_any_count(setup, capsys):
    root, data = setup
    single = root / "single" / "vqav2.json"
    main(["eval", *arguments(root, data, single, "--shots", "0", "2")])
    capsys.readouterr()
    expected = json.loads(single.read_text())

    both = root / "two" / "vqav2.json"
    run = launch(2, *arguments(root, data, both, "--shots", "0", "2"))
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(both.read_text())
    assert predictions(report) == predictions(expected)
    assert [r["mean"] for r in report["results"]] == [r["mean"] for r in expected["results"]]
    assert run.stdout.count("| vqav2 | 0 |") == 1  # one summary, printed by the main process
    log = both.with_suffix(".samples.jsonl").read_text().splitlines()
    one_log = single.with_suffix(".samples.jsonl").read_text().splitlines()
    keys = lambda lines: [(r["shots"], r["trial"], r["id"]) for r in map(json.loads, lines[1:])]  # noqa: E731
    assert sorted(keys(log)) == sorted(keys(one_log))  # every record once
    assert keys(log) != keys(one_log)  # the second process's half, merged in at the end
    assert not list(both.parent.glob("*.rank*.jsonl"))  # its log was merged, then removed

    # a run of 2 processes stopped after its 0-shot pass, resumed by 1 process with more shots: nothing rerun
    resumed = root / "resumed" / "vqav2.json"
    run = launch(2, *arguments(root, data, resumed, "--shots", "0"))
    assert run.returncode == 0, run.stderr[-4000:]
    rank_log = resumed.parent / "vqav2.samples.rank1.jsonl"
    lines = resumed.with_suffix(".samples.jsonl").read_text().splitlines()
    rank_log.write_text("\n".join([lines[0], *lines[1:][::2]]) + "\n")  # as if the run had stopped before merging
    resumed.with_suffix(".samples.jsonl").write_text("\n".join([lines[0], *lines[1:][1::2]]) + "\n")
    main(["eval", *arguments(root, data, resumed, "--shots", "0", "2")])
    report = json.loads(resumed.read_text())
    assert predictions(report) == predictions(expected)
    assert not rank_log.exists()
    assert len(resumed.with_suffix(".samples.jsonl").read_text().splitlines()) == len(log)

    # and the other way: a one-process log, resumed by two processes with more trials
    run = launch(2, *arguments(root, data, single, "--shots", "0", "2", "--trials", "3"))
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(single.read_text())
    assert predictions(report)[:2] == predictions(expected)[:2] and len(report["results"][0]["trials"]) == 3


def test_rices_on_two_processes_is_computed_once_and_equals_one_process(setup, capsys):
    root, data = setup
    single, both = root / "rices1" / "vqav2.json", root / "rices2" / "vqav2.json"
    cache = root / "rices_cache"  # shared by the two processes
    main(["eval", *arguments(root, data, single, "--shots", "2", "--trials", "1", "--rices", "--rices-cache",
                             str(root / "own"))])
    run = launch(2, *arguments(root, data, both, "--shots", "2", "--trials", "1", "--rices", "--rices-cache",
                               str(cache)))
    assert run.returncode == 0, run.stderr[-4000:]
    assert predictions(json.loads(both.read_text())) == predictions(json.loads(single.read_text()))
    # the main process embeds the evaluated and the pool images once each; the other reads them from the cache
    assert run.stderr.count("image embeddings cached in") == 2, run.stderr[-3000:]
    assert run.stderr.count("cached image embeddings from") == 2


def test_eval_places_the_model_with_a_device_map_and_refuses_it_with_device(setup, capsys):
    root, data = setup
    plain, mapped = root / "plain" / "vqav2.json", root / "mapped" / "vqav2.json"
    main(["eval", *arguments(root, data, plain, "--shots", "2", "--trials", "1")])
    without_device = [item for item in arguments(root, data, mapped, "--shots", "2", "--trials", "1")
                      if item not in ("--device", "cpu")]
    main(["eval", *without_device, "--device-map", "auto"])
    assert predictions(json.loads(mapped.read_text())) == predictions(json.loads(plain.read_text()))
    with pytest.raises(SystemExit):
        main(["eval", *arguments(root, data, root / "both" / "vqav2.json", "--shots", "0"), "--device-map", "auto"])
    assert "--device and --device-map cannot be used together" in capsys.readouterr().err
