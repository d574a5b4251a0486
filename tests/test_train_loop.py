"""The training loop on tiny models: loss falls on every format, what trains, resume, NaN, LoRA, the CLI."""

import json

import pytest
import torch
from PIL import Image
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from otter import OtterForConditionalGeneration, OtterProcessor
from otter.cli import main as otter_main
from otter.prompts import ANSWER_TOKEN
from otter.train import trainer as trainer_module
from otter.train.trainer import (
    NonFiniteLossError,
    TrainingConfig,
    checkpoints_in,
    configure_training,
    parameter_groups,
    train,
)

from .train_fixtures import (
    quick_config,
    read_metrics,
    save_tiny_model,
    write_jsonl,
    write_laion_shards,
    write_mimicit,
    write_mmc4_shards,
)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each run builds its Accelerator; accelerate keeps process-wide singletons, reset between runs."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {
        "jsonl": [write_jsonl(folder / "jsonl")],
        "mimicit-json": [write_mimicit(folder / "mimicit-json", images="json")],
        "mimicit-parquet": [write_mimicit(folder / "mimicit-parquet", images="parquet")],
        "mmc4": write_mmc4_shards(folder / "mmc4"),
        "laion": write_laion_shards(folder / "laion"),
    }


def weights(folder):
    return load_file(folder / "model.safetensors")


def run_twice_resumed(config: TrainingConfig, stop_at: int, monkeypatch):
    """Runs `config` but stops it right after the checkpoint at `stop_at` (as a preempted job), then resumes it."""
    save = trainer_module.save_checkpoint

    class Preempted(Exception):
        pass

    def save_then_stop(accelerator, out, step, *args):
        path = save(accelerator, out, step, *args)
        if step == stop_at:
            raise Preempted
        return path

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Preempted):
        train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    train(TrainingConfig(**{**config.__dict__, "resume": True}))


# -- loss falls on every format ---------------------------------------------------------------------------------
@pytest.mark.parametrize("data_format", ["jsonl", "mimicit-json", "mimicit-parquet", "mmc4", "laion"])
def test_loss_falls_when_overfitting_each_format(model_dir, data_dir, tmp_path, data_format):
    objective = "pretraining" if data_format in ("mmc4", "laion") else "instruction"
    out = train(quick_config(model_dir, data_dir[data_format], tmp_path / "out", objective=objective, full=True,
                             max_steps=12, batch_size=4))
    losses = [record["loss"] for record in read_metrics(out)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    model = OtterForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.vocab_size == len(OtterProcessor.from_pretrained(out).tokenizer)


def test_default_trains_only_perceiver_and_cross_attention(model_dir, data_dir, tmp_path):
    out = train(quick_config(model_dir, data_dir["jsonl"], tmp_path / "out", lr=1e-2, max_steps=10, batch_size=4))
    losses = [record["loss"] for record in read_metrics(out)]
    assert losses[-1] < 0.95 * losses[0], losses
    before, after = weights(model_dir), weights(out)
    changed = {name for name in before if name in after and before[name].shape == after[name].shape
               and not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("perceiver.") or ".gated_cross_attn_layer." in name for name in changed)
    assert any(".gated_cross_attn_layer.attn_gate" in name for name in changed)
    assert any(name.startswith("perceiver.") for name in changed)


def test_train_embeddings_updates_only_the_new_token_rows(model_dir, data_dir, tmp_path):
    out = train(quick_config(model_dir, data_dir["jsonl"], tmp_path / "out", train_embeddings=True, lr=1e-2))
    tokenizer = OtterProcessor.from_pretrained(out).tokenizer
    new_rows = tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", ANSWER_TOKEN])
    assert new_rows[2] == len(tokenizer) - 1, "<answer> is the last token"
    before, after = weights(model_dir), weights(out)
    for name in ("language_model.gpt_neox.embed_in.weight", "language_model.embed_out.weight"):
        name = name if name in after else name.replace("embed_out", "lm_head")
        old, new = before[name], after[name]
        assert new.shape[0] == old.shape[0] + 1
        rows_changed = (new[: old.shape[0]] != old).any(dim=1).nonzero().flatten().tolist()
        assert set(rows_changed) <= set(new_rows[:2])
    input_rows = (after["language_model.gpt_neox.embed_in.weight"][: before["language_model.gpt_neox.embed_in.weight"]
                  .shape[0]] != before["language_model.gpt_neox.embed_in.weight"]).any(dim=1)
    assert input_rows.nonzero().flatten().tolist() == sorted(new_rows[:2])


def test_bad_records_are_skipped_counted_and_reported(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data", with_context=False)
    (tmp_path / "data" / "images" / "yellow.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    with open(data, "a") as file:
        file.write('{"images": ["images/red.png"], "instruction": "no answer"}\n')
    out = train(quick_config(model_dir, [data], tmp_path / "out", batch_size=1, max_steps=None, epochs=2))
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["skipped"] == {"unreadable image": 2} and summary["malformed_when_read"] == {"malformed record": 1}
    metrics = read_metrics(out)
    assert len(metrics) == 8, "two epochs of the 4 readable records, one per step"
    assert [m["examples"] for m in metrics].count(0) == 2, "the broken example comes up once in each epoch"
    assert all((m["loss"] is None) == (m["examples"] == 0) for m in metrics)


def test_full_training_can_keep_the_vision_encoder_frozen(model_dir):
    model = OtterForConditionalGeneration.from_pretrained(model_dir)
    config = TrainingConfig(model="m", data=["d.jsonl"], out="o", full=True, freeze_vision=True)
    configure_training(model, config, [])
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith("vision_model.")} != set()
    with pytest.raises(ValueError, match="freeze_vision applies to full training"):
        TrainingConfig(model="m", data=["d.jsonl"], out="o", freeze_vision=True)


def test_weight_decay_applies_to_cross_attention_only(model_dir):
    model = OtterForConditionalGeneration.from_pretrained(model_dir)
    configure_training(model, TrainingConfig(model="m", data=["d.jsonl"], out="o", full=True), [])
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed, other = parameter_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and other["weight_decay"] == 0.0
    assert {names[id(p)] for p in decayed["params"]} == {
        name for name, _ in model.named_parameters() if ".gated_cross_attn_layer." in name}
    assert len(decayed["params"]) + len(other["params"]) == len(list(model.parameters()))


# -- checkpoints and resume -------------------------------------------------------------------------------------
def test_resume_continues_the_same_loss_curve(model_dir, data_dir, tmp_path, monkeypatch):
    options = dict(max_steps=6, save_every=3, batch_size=1, grad_accum=2, schedule="cosine", warmup_steps=2,
                   augment=True, train_embeddings=True)
    whole = train(quick_config(model_dir, data_dir["jsonl"], tmp_path / "whole", **options))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = tmp_path / "resumed"
    run_twice_resumed(quick_config(model_dir, data_dir["jsonl"], resumed, **options), 3, monkeypatch)
    strip = lambda records: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(resumed)) == strip(read_metrics(whole))
    first, second = weights(whole), weights(resumed)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert [path.name for path in checkpoints_in(resumed)] == ["step-3", "step-6"]


def test_resume_of_web_data_with_workers_continues_the_same_loss_curve(model_dir, data_dir, tmp_path, monkeypatch):
    options = dict(objective="pretraining", max_steps=4, save_every=2, batch_size=2, num_workers=2)
    whole = train(quick_config(model_dir, data_dir["mmc4"], tmp_path / "whole", **options))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = tmp_path / "resumed"
    run_twice_resumed(quick_config(model_dir, data_dir["mmc4"], resumed, **options), 2, monkeypatch)
    strip = lambda records: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]  # noqa: E731
    assert strip(read_metrics(resumed)) == strip(read_metrics(whole))
    first, second = weights(whole), weights(resumed)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_refuses_a_different_run_and_a_used_folder(model_dir, data_dir, tmp_path):
    config = quick_config(model_dir, data_dir["jsonl"], tmp_path / "out", max_steps=2, save_every=2)
    train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(ValueError, match="not empty"):
        train(config)
    with pytest.raises(ValueError, match="batch_size: 2 -> 4"):
        train(TrainingConfig(**{**config.__dict__, "resume": True, "batch_size": 4}))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    train(TrainingConfig(**{**config.__dict__, "resume": True, "max_steps": 3, "lr": 5e-4}))
    assert [(m["step"], m["lr"]) for m in read_metrics(config.out)] == [(1, 1e-3), (2, 1e-3), (3, 5e-4)]


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(model_dir, data_dir, tmp_path, monkeypatch):
    real_loss = trainer_module.token_loss_sum
    calls = []

    def loss_that_breaks(model, batch):
        calls.append(1)
        loss = real_loss(model, batch)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(trainer_module, "token_loss_sum", loss_that_breaks)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*step-2"):
        train(quick_config(model_dir, data_dir["jsonl"], out, max_steps=6, save_every=2))
    assert [path.name for path in checkpoints_in(out)] == ["step-2"]
    assert not (out / "model.safetensors").exists(), "no final model from a failed run"
    assert [record["step"] for record in read_metrics(out)] == [1, 2, 3]
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["step"] == 2


# -- LoRA, precision, checkpointing --------------------------------------------------------------------------------
def test_lora_runs_produce_loadable_models_merged_or_as_an_adapter(model_dir, data_dir, tmp_path):
    outputs = {}
    for lora_output in ("merged", "adapter"):
        outputs[lora_output] = train(quick_config(model_dir, data_dir["jsonl"], tmp_path / lora_output, lora=True,
                                                  lora_output=lora_output, lora_dropout=0.0, lr=1e-2, max_steps=3))
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    base = weights(model_dir)
    qkv = "language_model.gpt_neox.layers.0.decoder_layer.attention.query_key_value.weight"
    gate = "language_model.gpt_neox.layers.1.gated_cross_attn_layer.attn_gate"
    merged = OtterForConditionalGeneration.from_pretrained(outputs["merged"]).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert not torch.equal(merged.state_dict()[qkv], base[qkv]), "the adapter is merged into the weights"
    assert not torch.equal(merged.state_dict()[gate], base[gate]), "cross-attention trains alongside LoRA"
    with_adapter = OtterForConditionalGeneration.from_pretrained(outputs["adapter"]).eval()
    assert torch.equal(with_adapter.state_dict()[qkv], base[qkv]), "the language model itself is left as it was"
    with_adapter.load_adapter(str(outputs["adapter"] / "lora-adapter"))
    assert any("lora_B" in name for name, _ in with_adapter.named_parameters())

    processor = OtterProcessor.from_pretrained(outputs["merged"])
    inputs = processor(text=f"<image>User: What colour is the image? GPT:{ANSWER_TOKEN} It is", images=[
        Image.new("RGB", (32, 32), (220, 30, 30))])
    with torch.no_grad():
        expected, actual = merged(**inputs).logits, with_adapter(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_and_bf16_train_like_the_default(model_dir, data_dir, tmp_path):
    plain = read_metrics(train(quick_config(model_dir, data_dir["jsonl"], tmp_path / "plain", max_steps=2)))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    checkpointed = read_metrics(train(quick_config(model_dir, data_dir["jsonl"], tmp_path / "ckpt", max_steps=2,
                                                   gradient_checkpointing=True)))
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    bf16 = read_metrics(train(quick_config(model_dir, data_dir["jsonl"], tmp_path / "bf16", max_steps=2,
                                           precision="bf16")))
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in plain], rel=2e-2)


# -- the command line ---------------------------------------------------------------------------------------------
def test_cli_finetune_with_yaml_config(model_dir, data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch_size: 2\nlr: 0.001\nnum_workers: 0\nmax_steps: 5\nsave_every: 100\n")
    out = tmp_path / "out"
    otter_main(["train", "finetune", "--model", str(model_dir), "--data", str(data_dir["jsonl"][0]), "--out",
                str(out), "--config", str(config), "--max-steps", "2", "--tensorboard"])
    assert [record["step"] for record in read_metrics(out)] == [1, 2], "flags override the YAML"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["config"]["batch_size"] == 2 and summary["config"]["lr"] == 0.001
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    OtterForConditionalGeneration.from_pretrained(out)


def test_config_rejects_bad_values(tmp_path):
    base = dict(model="m", data=["d.jsonl"], out="o")
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainingConfig(**base, schedule="linear")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainingConfig(**base, batch_size=0)
    with pytest.raises(ValueError, match="not both"):
        TrainingConfig(**base, full=True, lora=True)
    with pytest.raises(ValueError, match="give max_steps"):
        TrainingConfig(**base, objective="pretraining")
    config = tmp_path / "bad.yaml"
    config.write_text("batchsize: 3\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['batchsize'\]"):
        TrainingConfig.load(config, **base)
