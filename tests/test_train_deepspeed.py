"""
The DeepSpeed launch configurations (train/configs/deepspeed_zero2.yaml, deepspeed_zero3.yaml).

Everywhere: each file becomes, through accelerate's own `launch` and `DeepSpeedPlugin`, the DeepSpeed config the
trainer completes (micro-batch, clipping; the accumulation left to --grad-accum). Where DeepSpeed is installed (it
is not a requirement of otter), two processes on the CPU (DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu, over
gloo) run ZeRO-2 and ZeRO-3 for real: they train as one process does at the same global batch, write an Otter folder,
and a ZeRO-3 run resumes from its checkpoint.

accelerate (1.16) chooses no torch.distributed backend on a machine without an accelerator unless told to use the
CPU, and on the CPU (ACCELERATE_USE_CPU) it ignores the DeepSpeed configuration and runs DDP. Without a backend,
DeepSpeed sets up its own process group of two, but accelerate's state says one process of one: both processes act as
the main one (the second stops with "output folder ... is in use by another training run"). So the processes run this
module (`python -m tests.test_train_deepspeed train finetune ...`), which gives accelerate the gloo backend it would
not choose; DeepSpeed's engine, its ZeRO partitioning and checkpoints, and the trainer run as on GPUs.
"""

import functools
import os
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType
from safetensors.torch import load_file

from otter import OtterForConditionalGeneration, OtterProcessor
from otter.train.trainer import TrainingConfig, _configure_backend, train

from .train_fixtures import (REPO, largest, launch_two_processes, quick_config, read_metrics, save_tiny_model,
                             weight_differences, write_mixed_jsonl)

CONFIGS = REPO / "train" / "configs"
STEPS = 3
# the same global batch of 4: one process x 4 examples, or two processes x 1 example x 2 accumulated
OPTIONS = ("--grad-accum", "2", "--lr", "1e-2")


def launch_environment(launch_config, monkeypatch) -> dict:
    """The ACCELERATE_* variables `accelerate launch --config_file launch_config` gives its processes (accelerate's
    own `launch_command`, up to starting them, which needs DeepSpeed)."""
    import accelerate.commands.launch as launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    given = {}
    monkeypatch.setattr(launch, "deepspeed_launcher", lambda args: given.update(prepare_deepspeed_cmd_env(args)[1]))
    launch.launch_command(launch.launch_command_parser().parse_args(
        ["--config_file", str(launch_config), "--num_processes", "2", "-m", "otter.cli"]))
    return {name: value for name, value in given.items() if name.startswith("ACCELERATE_")}


@pytest.mark.parametrize("stage", [2, 3])
def test_each_deepspeed_configuration_becomes_the_deepspeed_config_the_trainer_completes(stage, monkeypatch):
    for name, value in launch_environment(CONFIGS / f"deepspeed_zero{stage}.yaml", monkeypatch).items():
        monkeypatch.setenv(name, value)
    plugin = DeepSpeedPlugin()  # as each process makes it, from those variables
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, is_main_process=True,
                                  state=SimpleNamespace(deepspeed_plugin=plugin))
    _configure_backend(accelerator, TrainingConfig(model="m", data=["d"], out="o", batch_size=3, grad_accum=4,
                                                   max_grad_norm=0.5))
    config = plugin.deepspeed_config
    assert plugin.zero_stage == config["zero_optimization"]["stage"] == stage
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert config["zero_optimization"]["offload_param"]["device"] == "none"
    # our DataLoaders are not accelerate's: the trainer tells DeepSpeed the micro-batch and the clipping
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_clipping"] == 0.5
    # left to the Accelerator, which the trainer gives --grad-accum (and checks it kept)
    assert config["gradient_accumulation_steps"] == "auto"
    if stage == 3:
        # accelerate refuses to gather the weights for the output folder without it
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        for option in ("lora", "train_embeddings"):
            with pytest.raises(ValueError, match="need whole parameters on each process"):
                _configure_backend(accelerator, TrainingConfig(model="m", data=["d"], out="o", **{option: True}))
    else:  # ZeRO-2 keeps whole parameters on each process
        _configure_backend(accelerator, TrainingConfig(model="m", data=["d"], out="o", lora=True))
        _configure_backend(accelerator, TrainingConfig(model="m", data=["d"], out="o", train_embeddings=True))


# -- DeepSpeed's engine, where DeepSpeed is installed ----------------------------------------------------------
def gloo_for_deepspeed_on_the_cpu() -> None:
    """Gives accelerate the gloo backend where it finds no accelerator (see the module's docstring)."""
    original = PartialState._prepare_backend

    @functools.wraps(original)
    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if backend is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            backend = "gloo"
        return backend, distributed_type

    PartialState._prepare_backend = prepare_backend


def launch_deepspeed(stage, model, data, out, *options):
    return launch_two_processes(CONFIGS / f"deepspeed_zero{stage}.yaml", "tests.test_train_deepspeed", model, data,
                                out, *OPTIONS, *options, env={"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": "false"})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny model, the data, and one process's 3 steps on them, with and without the new tokens' embeddings."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("deepspeed")
    model = save_tiny_model(root / "model")
    data = write_mixed_jsonl(root / "data")
    single = {}
    for train_embeddings in (False, True):
        single[train_embeddings] = train(quick_config(model, [data], root / f"single-{train_embeddings}", batch_size=4,
                                                      max_steps=STEPS, lr=1e-2, train_embeddings=train_embeddings))
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return {"model": model, "data": data, "single": single}


def check_as_one_process(reference: dict, out, train_embeddings: bool) -> None:
    single, deepspeed = read_metrics(reference["single"][train_embeddings]), read_metrics(out)
    # a micro-batch with images meets one with text only, or one with nothing to train on (see write_mixed_jsonl):
    # ZeRO fills its gradient buckets as parameters get gradients, so every process still runs the same modules
    assert [m["examples"] for m in single] == [m["examples"] for m in deepspeed] == [2, 2, 2]
    assert [m["tokens"] for m in deepspeed] == [m["tokens"] for m in single]
    assert [m["loss"] for m in deepspeed] == pytest.approx([m["loss"] for m in single], rel=1e-5)
    assert [m["grad_norm"] for m in deepspeed] == pytest.approx([m["grad_norm"] for m in single], rel=1e-4)
    OtterForConditionalGeneration.from_pretrained(out)
    differences = weight_differences(reference["single"][train_embeddings], out)  # the same tensor names, too
    # Adam moves each weight by up to lr (1e-2) per step whatever its gradient's size: reduction-order rounding in
    # the gradients shows as ~1e-5 here, while any real difference in the updates shows as ~1e-2
    assert max(differences.values()) < 1e-4, largest(differences)


def test_two_zero2_processes_train_as_one_process_does(reference, tmp_path):
    out = tmp_path / "zero2"
    result = launch_deepspeed(2, reference["model"], reference["data"], out, "--max-steps", str(STEPS),
                              "--save-every", str(STEPS), "--train-embeddings")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es) x batch 1 x 2 accumulation = 4 examples/step" in result.stderr
    saved = out / "checkpoints" / f"step-{STEPS}" / "pytorch_model"
    assert sorted(path.name for path in saved.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    check_as_one_process(reference, out, train_embeddings=True)
    # of the embedding rows the model started with, those of <image> and <|endofchunk|> trained, and only those
    initial, trained = (load_file(folder / "model.safetensors") for folder in (reference["model"], out))
    name = "language_model.gpt_neox.embed_in.weight"
    changed = {row for row, weights in enumerate(initial[name]) if not torch.equal(weights, trained[name][row])}
    processor = OtterProcessor.from_pretrained(out)
    assert changed == {processor.image_token_id, processor.eoc_token_id}


def test_a_zero3_run_resumes_and_trains_as_one_process_does(reference, tmp_path):
    out = tmp_path / "zero3"
    result = launch_deepspeed(3, reference["model"], reference["data"], out, "--max-steps", "2", "--save-every", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    # transformers loads the model partitioned under ZeRO-3: the trainer counts the whole parameters
    assert "training 103,492 parameters" in result.stderr
    saved = out / "checkpoints" / "step-2" / "pytorch_model"
    assert sorted(path.name for path in saved.glob("*model_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]

    result = launch_deepspeed(3, reference["model"], reference["data"], out, "--max-steps", str(STEPS), "--resume")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in result.stderr
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    check_as_one_process(reference, out, train_embeddings=False)


if __name__ == "__main__":  # a process of `launch_deepspeed`
    gloo_for_deepspeed_on_the_cpu()
    from otter.cli import main

    main()
