"""Two DDP processes (gloo, launched by `accelerate launch` with the shipped ddp.yaml) train as one process does, and stop
together when one of them must."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from otter.train.trainer import RunLock, train

from .train_fixtures import launch_two_processes as launch
from .train_fixtures import quick_config, read_metrics, save_tiny_model, write_jsonl

DDP_CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "ddp.yaml"


def launch_two_processes(model: Path, data: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """`otter train finetune` on two DDP processes (gloo, on the CPU: ddp.yaml targets GPUs; ACCELERATE_USE_CPU makes
    each process use gloo on the CPU instead), one example per process per micro-batch."""
    return launch(DDP_CONFIG, "otter.cli", model, data, out, *options, env={"ACCELERATE_USE_CPU": "true"})


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data")
    # an unreadable image: some micro-batches of a process hold nothing, and it must still join the all-reduce
    (tmp_path / "data" / "images" / "yellow.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    # the same global batch of 4: one process x 4 examples, or two processes x 1 example x 2 accumulated
    common = dict(max_steps=3, lr=1e-2, augment=True, train_embeddings=True)
    single = train(quick_config(model, [data], tmp_path / "single", batch_size=4, **common))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()

    ddp_out = tmp_path / "ddp"
    result = launch_two_processes(model, data, ddp_out, "--grad-accum", "2", "--max-steps", "3", "--lr", "1e-2",
                                  "--train-embeddings")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es) x batch 1 x 2 accumulation = 4 examples/step" in result.stderr

    single_metrics, ddp_metrics = read_metrics(single), read_metrics(ddp_out)
    # yellow is the query of one example and the demo of another: 2 of the 4 examples of every step are skipped
    assert [m["examples"] for m in single_metrics] == [m["examples"] for m in ddp_metrics] == [2, 2, 2]
    ddp_summary = json.loads((ddp_out / "training_summary.json").read_text())
    assert ddp_summary["skipped"] == {"unreadable image": 6}
    assert [m["tokens"] for m in ddp_metrics] == [m["tokens"] for m in single_metrics]
    assert [m["loss"] for m in ddp_metrics] == pytest.approx([m["loss"] for m in single_metrics], rel=1e-5)
    first, second = load_file(single / "model.safetensors"), load_file(ddp_out / "model.safetensors")
    assert first.keys() == second.keys()
    differences = {name: (first[name] - second[name]).abs().max().item() for name in first}
    # Adam moves each weight by up to lr (1e-2) per step whatever its gradient's size: reduction-order rounding
    # in the gradients shows as ~1e-5 here, while any real difference in the updates shows as ~1e-2
    assert max(differences.values()) < 1e-4, sorted(differences.items(), key=lambda item: -item[1])[:3]
    assert any(not torch.equal(first[name], load_file(model / "model.safetensors")[name]) for name in first)


def test_two_processes_stop_together_on_a_locked_out_and_on_data_that_trains_nothing(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "data")
    locked = tmp_path / "locked"
    lock = RunLock(locked)
    lock.acquire()  # another run holds the folder: only the main process looks, and the other must not wait for it
    try:
        result = launch_two_processes(model, data, locked, "--max-steps", "2")
    finally:
        lock.release()
    assert result.returncode != 0
    assert result.stderr.count(f"otter: output folder {locked} is in use by another training run") == 2, \
        result.stderr[-4000:]

    moved = tmp_path / "elsewhere" / data.name  # its images stay behind: every record is skipped, on both processes
    moved.parent.mkdir()
    shutil.move(data, moved)
    result = launch_two_processes(model, moved, tmp_path / "skipped", "--epochs", "3")
    assert result.returncode != 0
    assert result.stderr.count("otter: every record was skipped") == 2, result.stderr[-4000:]
    assert "unreadable image: 4" in result.stderr
    assert len(read_metrics(tmp_path / "skipped")) == 2, "stopped after the first epoch (2 steps of 2 x 1 examples)"
