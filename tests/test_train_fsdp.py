"""
Two FSDP2 processes (gloo, on the CPU; `accelerate launch` with the shipped train/configs/fsdp.yaml) train as one
process does at the same global batch, write an Otter folder, and resume a run as if it had never stopped.

accelerate (1.16) runs FSDP on accelerators only: on the CPU (`use_cpu`, ACCELERATE_USE_CPU, what a machine without
GPUs needs) its `AcceleratorState` keeps DistributedType.MULTI_CPU, i.e. DDP, and drops the FSDP plugin (its FSDP
branch is taken for MULTI_GPU, MULTI_XPU, ... only), although torch's FSDP2 (`fully_shard`) runs on the CPU over
gloo. So the processes run this module (`python -m tests.test_train_fsdp train finetune ...`), which makes
`AcceleratorState` take the FSDP plugin on the CPU as that branch does on GPUs, then runs the `otter` command.
Everything after that is what runs on GPUs: accelerate's FSDP2 preparation (`fully_shard` on the units fsdp.yaml
names), its sharded checkpoints (torch.distributed.checkpoint), the full state dict the output folder is written
from, and the trainer.
"""

import functools
import logging
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from otter import OtterConfig, OtterForConditionalGeneration
from otter.train.trainer import TrainingConfig, _check_sharded_model, _configure_backend, train

from .train_fixtures import (REPO, largest, launch_two_processes, quick_config, read_metrics, save_tiny_model,
                             weight_differences, write_mixed_jsonl)

FSDP_CONFIG = REPO / "train" / "configs" / "fsdp.yaml"
STEPS = 3
GATE = "language_model.gpt_neox.layers.1.gated_cross_attn_layer.attn_gate"
# the same global batch of 4: one process x 4 examples, or two processes x 1 example x 2 accumulated
OPTIONS = ("--grad-accum", "2", "--lr", "1e-2")


def take_fsdp_on_the_cpu() -> None:
    """Makes `AcceleratorState` on the CPU take the FSDP plugin, as its own FSDP branch does on GPUs."""
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def launch_fsdp(model, data, out, *options):
    return launch_two_processes(FSDP_CONFIG, "tests.test_train_fsdp", model, data, out, *OPTIONS, *options,
                                env={"ACCELERATE_USE_CPU": "true"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, and two FSDP processes, each 3 steps from the same tiny model on the same data."""
    root = tmp_path_factory.mktemp("fsdp")
    model = save_tiny_model(root / "model")
    data = write_mixed_jsonl(root / "data")
    single = train(quick_config(model, [data], root / "single", batch_size=4, max_steps=STEPS, lr=1e-2))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    fsdp = root / "fsdp"
    result = launch_fsdp(model, data, fsdp, "--max-steps", str(STEPS), "--save-every", str(STEPS))
    assert result.returncode == 0, result.stderr[-4000:]
    return {"model": model, "data": data, "single": single, "fsdp": fsdp, "stderr": result.stderr}


def test_two_fsdp_processes_train_as_one_process_does(runs):
    assert "2 process(es) x batch 1 x 2 accumulation = 4 examples/step" in runs["stderr"]
    assert "but accelerate runs" not in runs["stderr"]  # the trainer's warning when a launch fell back to DDP
    shards = runs["fsdp"] / "checkpoints" / f"step-{STEPS}" / "pytorch_model_fsdp_0"
    assert sorted(path.name for path in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], \
        "each process saves its own shard of the model"

    single, fsdp = read_metrics(runs["single"]), read_metrics(runs["fsdp"])
    # green's example is text only and yellow's image is unreadable (yellow's and blue's examples are skipped): the
    # micro-batches of the two processes hold images and text only, or images and nothing, and the processes still
    # run the same modules (the trainer shows the vision tower an image no token reads)
    assert [m["examples"] for m in single] == [m["examples"] for m in fsdp] == [2, 2, 2]
    assert [m["tokens"] for m in fsdp] == [m["tokens"] for m in single]
    assert [m["loss"] for m in fsdp] == pytest.approx([m["loss"] for m in single], rel=1e-5)
    assert [m["grad_norm"] for m in fsdp] == pytest.approx([m["grad_norm"] for m in single], rel=1e-4)

    # the output folder is written from the full state dict the processes gather: an Otter folder that loads
    loaded, reference = (OtterForConditionalGeneration.from_pretrained(runs[name]) for name in ("fsdp", "single"))
    for block, expected in zip(loaded.cross_attention_blocks(), reference.cross_attention_blocks()):
        torch.testing.assert_close(block.attn.to_kv.weight, expected.attn.to_kv.weight, rtol=0, atol=1e-4)
    differences = weight_differences(runs["single"], runs["fsdp"])
    # Adam moves each weight by up to lr (1e-2) per step whatever its gradient's size: reduction-order rounding in
    # the gradients shows as ~1e-5 here, while any real difference in the updates shows as ~1e-2
    assert max(differences.values()) < 1e-4, largest(differences)
    initial, trained = (load_file(runs[name] / "model.safetensors") for name in ("model", "fsdp"))
    assert not torch.equal(initial[GATE], trained[GATE]), "training moved the gates"


def test_an_fsdp_run_resumes_as_if_it_had_never_stopped(runs, tmp_path):
    out = tmp_path / "resumed"
    result = launch_fsdp(runs["model"], runs["data"], out, "--max-steps", "2", "--save-every", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((out / "checkpoints" / "step-2" / "optimizer_0").glob("*.distcp"))) == 2

    result = launch_fsdp(runs["model"], runs["data"], out, "--max-steps", str(STEPS), "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in result.stderr
    resumed, uninterrupted = read_metrics(out), read_metrics(runs["fsdp"])
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("lr", "examples", "tokens"):
        assert [m[key] for m in resumed] == [m[key] for m in uninterrupted]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in uninterrupted], rel=1e-6)
    OtterForConditionalGeneration.from_pretrained(out)
    differences = weight_differences(runs["fsdp"], out)
    # the same processes run the same operations as the uninterrupted run: a resumption that lost the optimizer's
    # moments, the RNG states or the data position moves weights by ~lr (1e-2), not by rounding
    assert max(differences.values()) < 1e-6, largest(differences)


def test_fsdp_refuses_what_it_cannot_train_and_a_fallback_to_ddp_is_told(monkeypatch, caplog):
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=True)
    for option in ("lora", "train_embeddings"):
        with pytest.raises(ValueError, match="need whole parameters on each process"):
            _configure_backend(fsdp, TrainingConfig(model="m", data=["d"], out="o", **{option: True}))
    # processes whose micro-batches hold different numbers of frames would run the vision tower unlike each other
    _check_sharded_model(OtterConfig())
    with pytest.raises(ValueError, match="vision_chunk_size=2"):
        _check_sharded_model(OtterConfig(vision_chunk_size=2))
    # accelerate runs DDP instead of FSDP on the CPU, without a word: the trainer says so
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level(logging.WARNING, logger="otter.train.trainer"):
        _configure_backend(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_main_process=True),
                           TrainingConfig(model="m", data=["d"], out="o"))
    assert "asks for FSDP, but accelerate runs DistributedType.MULTI_CPU" in caplog.text


if __name__ == "__main__":  # a process of `launch_fsdp`
    take_fsdp_on_the_cpu()
    from otter.cli import main

    main()
