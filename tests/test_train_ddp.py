"""Two DDP processes (gloo, launched by `accelerate launch` with the shipped ddp.yaml) train as one process does."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from otter.train.trainer import train

from .train_fixtures import quick_config, read_metrics, save_tiny_model, write_jsonl

DDP_CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "ddp.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "otter.cli", "train", "finetune", "--model", str(model), "--data", str(data), "--out", str(ddp_out),
        "--batch-size", "1", "--grad-accum", "2", "--max-steps", "3", "--lr", "1e-2", "--schedule", "constant",
        "--train-embeddings", "--num-workers", "0", "--seed", "42",
    ]
    # ddp.yaml targets GPUs; ACCELERATE_USE_CPU makes each process use gloo on the CPU instead
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
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
