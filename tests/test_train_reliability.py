"""
otter.train never trains on silently wrong input and never runs code from a file (issue 17): runs that skip too
many records fail, `--resume` refuses changed data and checkpoints it cannot load without unpickling objects,
broken images and lines are skipped records naming their file, a torn `metrics.jsonl` line, a second run on the same
`--out`, and the output folders' permissions.
"""

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from otter.cli import main as otter_main
from otter.train import trainer as trainer_module
from otter.train.data import JsonlInstructions, MimicItInstructions, Skipped, WebDataOptions, laion_example, \
    mmc4_example
from otter.train.trainer import SkippedRecordsError, TrainingConfig, checkpoints_in, train

from .train_fixtures import (
    COLOURS,
    QUESTION,
    mmc4_document,
    png_bytes,
    quick_config,
    read_metrics,
    save_tiny_model,
    write_image_parquet,
    write_jsonl,
    write_laion_shards,
    write_mimicit,
)


def reset_accelerate():
    """accelerate keeps process-wide singletons: reset them between runs."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def resume(config: TrainingConfig, **changes) -> TrainingConfig:
    return TrainingConfig(**{**config.__dict__, "resume": True, **changes})


def checkpointed_run(model_dir, data, out, **options) -> TrainingConfig:
    """A two-step run that leaves checkpoints/step-2, and its config."""
    config = quick_config(model_dir, data, out, max_steps=2, save_every=2, **options)
    train(config)
    reset_accelerate()
    return config


def truncated(image_format: str) -> bytes:
    """A noisy 64 x 64 image in `image_format`, cut in half (as a download that stopped)."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=image_format)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


# -- item 3: a run that trains nothing, or too little, fails ------------------------------------------------------
def test_a_run_whose_images_are_not_beside_the_jsonl_fails_after_the_first_epoch(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data", with_context=False)
    moved = tmp_path / "elsewhere" / data.name
    moved.parent.mkdir()
    shutil.move(data, moved)  # the images stay behind
    out = tmp_path / "out"
    with pytest.raises(SkippedRecordsError) as caught:
        train(quick_config(model_dir, [moved], out, batch_size=1, max_steps=None, epochs=5))
    message = str(caught.value)
    assert "every record was skipped" in message and "unreadable image: 4" in message, message
    assert str(moved.parent / "images") in message, "a few examples name the files"
    assert [record["step"] for record in read_metrics(out)] == [1, 2, 3, 4], "it stops after the first epoch"
    assert not (out / "model.safetensors").exists(), "no model from a run that trained nothing"


def test_a_max_length_too_short_for_any_answer_fails_naming_the_reason(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data")
    with pytest.raises(SkippedRecordsError, match=r"every record was skipped.*no answer tokens after truncation: 4"):
        train(quick_config(model_dir, [data], tmp_path / "out", max_length=8, batch_size=2, max_steps=50))
    assert len(read_metrics(tmp_path / "out")) == 2, "stopped after one epoch of two steps, not 50"


def test_more_skipped_records_than_max_skipped_share_fail_the_run(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data", with_context=False)
    (tmp_path / "data" / "images" / "yellow.png").write_bytes(truncated("PNG"))  # 1 of the 4 records: 25%
    expected = r"25% of the records were skipped, more than max_skipped_share \(20%\) allows: 1 of the 4 records"
    with pytest.raises(SkippedRecordsError, match=expected):
        train(quick_config(model_dir, [data], tmp_path / "strict", batch_size=1, max_skipped_share=0.2))
    reset_accelerate()
    out = train(quick_config(model_dir, [data], tmp_path / "lenient", batch_size=1, max_skipped_share=0.3))
    assert json.loads((out / "training_summary.json").read_text())["skipped"] == {"unreadable image": 1}


def test_malformed_records_count_and_can_fail_a_run_before_it_starts(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data", with_context=False)
    with open(data, "a") as file:
        file.write('{"instruction": "no answer"}\n{not json\n')  # 2 of 6 records: 33% before a step is run
    out = tmp_path / "out"
    with pytest.raises(SkippedRecordsError, match=r"malformed record: 2") as caught:
        train(quick_config(model_dir, [data], out, max_skipped_share=0.3, max_steps=50))
    assert f"{data}:5" in str(caught.value)
    assert not (out / "metrics.jsonl").exists() or read_metrics(out) == [], "it failed before training"


def test_web_data_that_skips_every_sample_stops_early(model_dir, tmp_path, monkeypatch):
    shards = []
    for shard in range(2):
        shards.append(str(tmp_path / f"bad-{shard}.tar"))
        with wds.TarWriter(shards[-1]) as writer:
            for index in range(4):
                writer.write({"__key__": f"{shard}{index:03d}", "png": truncated("PNG"), "txt": b"a picture"})
    monkeypatch.setattr(trainer_module, "WEB_EARLY_RECORDS", 8)
    out = tmp_path / "out"
    with pytest.raises(SkippedRecordsError, match=r"the first 8 records were all skipped.*unreadable image: 8"):
        train(quick_config(model_dir, shards, out, objective="pretraining", max_steps=1000, batch_size=2))
    assert len(read_metrics(out)) == 4


def test_cli_max_skipped_share_fails_with_one_line(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data", with_context=False)
    (tmp_path / "data" / "images" / "red.png").write_bytes(truncated("JPEG"))
    with pytest.raises(SystemExit) as caught:
        otter_main(["train", "finetune", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                    "--batch-size", "1", "--num-workers", "0", "--max-skipped-share", "0.1"])
    assert caught.value.code == 1
    assert "otter: 25% of the records were skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"max_skipped_share must be in \[0, 1\], got 1.5"):
        TrainingConfig(model="m", data=["d.jsonl"], out="o", max_skipped_share=1.5)


# -- item 5: resume after the data changed ------------------------------------------------------------------------
def test_resume_refuses_changed_data_unless_allowed(model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "data")
    config = checkpointed_run(model_dir, [data], tmp_path / "out")
    original = data.read_bytes()
    stat = data.stat()
    data.write_bytes(original.replace(b"It is red.", b"It is tan."))  # same size, the old mtime put back
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match=rf"{data}: the content of its first 1 MiB differs.*--allow-data-change"):
        train(resume(config, max_steps=3))
    data.write_bytes(original + b"\n")
    with pytest.raises(ValueError, match=rf"{data}: size {len(original)} -> {len(original) + 1} bytes"):
        train(resume(config, max_steps=3))
    with caplog.at_level(logging.WARNING, logger="otter.train.trainer"):
        train(resume(config, max_steps=3, allow_data_change=True))
    assert [record["step"] for record in read_metrics(config.out)] == [1, 2, 3]
    assert f"{data}: size" in caplog.text, "the change is logged"


def test_resume_detects_a_changed_mimicit_image_file(model_dir, tmp_path):
    instructions = write_mimicit(tmp_path / "data", images="parquet")
    config = checkpointed_run(model_dir, [instructions], tmp_path / "out")
    swapped = {f"CO_IMG_{index:04d}": base64.urlsafe_b64encode(png_bytes(colour)).decode()
               for index, colour in enumerate(reversed(COLOURS))}  # every id shows another colour now
    write_image_parquet(tmp_path / "data" / "CO.parquet", swapped)
    with pytest.raises(ValueError, match=r"CO.parquet: (size|the content)"):
        train(resume(config, max_steps=3))


def test_resume_detects_a_changed_web_shard(model_dir, tmp_path):
    shards = write_laion_shards(tmp_path / "shards")
    config = checkpointed_run(model_dir, shards, tmp_path / "out", objective="pretraining", num_workers=0)
    write_laion_shards(tmp_path / "shards", per_shard=3)
    with pytest.raises(ValueError, match=r"laion-000.tar: (size|the content)"):
        train(resume(config, max_steps=3))


def test_resume_compares_resolved_paths_and_a_moved_run_folder_resumes(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data")
    config = checkpointed_run(model_dir, ["./data/colours.jsonl"], "runs/first")
    for path in (tmp_path / "runs" / "first" / "checkpoints").rglob("*.json"):
        assert "runs/first" not in path.read_text(), f"{path} names the run folder, which may move"
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    train(resume(config, data=["data/colours.jsonl"], out=str(tmp_path / "moved" / "first"), max_steps=3))
    assert [record["step"] for record in read_metrics(tmp_path / "moved" / "first")] == [1, 2, 3]


# -- item 6: --resume never unpickles -----------------------------------------------------------------------------
class Trap:
    """Unpickled without weights_only, this creates `marker`: what a booby-trapped checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_resume_never_unpickles_objects_from_a_checkpoint(model_dir, tmp_path, name):
    config = checkpointed_run(model_dir, [write_jsonl(tmp_path / "data")], tmp_path / "out")
    checkpoint = checkpoints_in(tmp_path / "out")[-1]
    assert not list(checkpoint.glob("custom_checkpoint_*")), "the scheduler is not pickled"
    assert "scheduler" in json.loads((checkpoint / "trainer_state.json").read_text())
    marker = tmp_path / "marker"
    torch.save(Trap(marker), checkpoint / name)
    with pytest.raises(ValueError, match=rf"{checkpoint / name}"):
        train(resume(config, max_steps=3))
    assert not marker.exists(), "resuming ran code from the checkpoint"


def test_resume_refuses_a_checkpoint_of_the_pickled_format(model_dir, tmp_path):
    config = checkpointed_run(model_dir, [write_jsonl(tmp_path / "data")], tmp_path / "out")
    checkpoint = checkpoints_in(tmp_path / "out")[-1]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    scheduler = state.pop("scheduler")
    state.pop("format", None)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    torch.save(scheduler, checkpoint / "custom_checkpoint_0.pkl")  # as the older trainer wrote it
    with pytest.raises(ValueError, match=r"custom_checkpoint_0.pkl\. Checkpoints of older versions"):
        train(resume(config, max_steps=3))


# -- items 9 and 10: broken images and lines are skipped records naming their file --------------------------------
@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_a_truncated_image_is_a_skipped_record_naming_its_file_once(tmp_path, image_format):
    broken = truncated(image_format)
    (tmp_path / "cut.img").write_bytes(broken)
    (tmp_path / "data.jsonl").write_text(json.dumps({"images": ["cut.img"], "instruction": "q", "answer": "a"}))
    skipped = JsonlInstructions(tmp_path / "data.jsonl").example(0)
    assert isinstance(skipped, Skipped) and skipped.reason == "unreadable image"
    assert "truncated" in skipped.detail and skipped.detail.count("cut.img") == 1, skipped.detail

    for images in ("json", "parquet"):
        instructions = write_mimicit(tmp_path / images, images=images, train_config=False)
        encoded = {f"CO_IMG_{index:04d}": base64.urlsafe_b64encode(png_bytes(colour)).decode()
                   for index, colour in enumerate(COLOURS)}
        encoded["CO_IMG_0001"] = base64.urlsafe_b64encode(broken).decode()
        if images == "json":
            (tmp_path / images / "CO.json").write_text(json.dumps(encoded))
        else:
            write_image_parquet(tmp_path / images / "CO.parquet", encoded)
        skipped = MimicItInstructions(instructions).example(1)
        assert isinstance(skipped, Skipped) and skipped.reason == "unreadable image"
        assert "truncated" in skipped.detail and skipped.detail.count("CO_IMG_0001") == 1, skipped.detail
        assert "in memory" not in skipped.detail

    skipped = laion_example(broken, b"a picture", "shard-000.tar:0007", "</s>")
    assert skipped.reason == "unreadable image" and "truncated" in skipped.detail and "in memory" not in skipped.detail
    assert skipped.detail.startswith("shard-000.tar:0007: image ")
    document = mmc4_document(["red", "blue"], ["A red square.", "A blue one."], [0, 1])
    document["image_info"][1]["image_base64"] = base64.b64encode(broken).decode()
    skipped = mmc4_example(document, "shard-001.tar:0003", WebDataOptions(min_image_bytes=0), "</s>")
    assert skipped.reason == "unreadable image" and "truncated" in skipped.detail and "in memory" not in skipped.detail
    assert skipped.detail.startswith("shard-001.tar:0003: image 1 ")


def test_jsonl_lines_that_are_not_utf8_are_skipped_and_a_bom_costs_nothing(tmp_path):
    good = {"instruction": QUESTION, "answer": "It is red."}
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n"
                     + b'{"instruction": "caf\xe9?", "answer": "yes"}\n'  # Latin-1, not UTF-8
                     + json.dumps({**good, "answer": "Red."}).encode() + b"\n")
    source = JsonlInstructions(path)
    assert len(source) == 2 and source.line_numbers == [1, 3]
    assert [skipped.reason for skipped in source.malformed] == ["malformed record"]
    assert source.malformed[0].detail.startswith(f"{path}:2: not UTF-8")


# -- item 11: a torn metrics.jsonl --------------------------------------------------------------------------------
def test_resume_drops_a_torn_last_metrics_line_and_refuses_a_torn_middle_one(model_dir, tmp_path, caplog):
    config = checkpointed_run(model_dir, [write_jsonl(tmp_path / "data")], tmp_path / "out")
    metrics = tmp_path / "out" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:10] + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=rf"{metrics}: line 2 is not valid JSON"):
        train(resume(config, max_steps=3))
    reset_accelerate()
    metrics.write_text("\n".join(lines) + "\n" + '{"step": 3, "lo')  # killed while writing step 3
    with caplog.at_level(logging.WARNING, logger="otter.train.trainer"):
        train(resume(config, max_steps=3))
    assert [record["step"] for record in read_metrics(config.out)] == [1, 2, 3]
    assert "incomplete last line" in caplog.text


# -- item 15: one run per --out -----------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_out_is_refused_and_a_killed_runs_lock_is_taken_over(model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    hold = ("import sys; from pathlib import Path; from otter.train.trainer import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"{out} is in use by another training run \(pid {holder.pid} on "):
            train(quick_config(model_dir, [data], out, max_steps=1))
    finally:
        holder.kill()
        holder.wait()
    reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="otter.train.trainer"):
        train(quick_config(model_dir, [data], out, max_steps=1, resume=True))
    assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert [path.name for path in out.iterdir() if "lock" in path.name] == [], "released at the end"


def test_the_lock_is_released_when_a_run_fails(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(SkippedRecordsError):
        train(quick_config(model_dir, [data], out, max_length=8))
    assert [path.name for path in out.iterdir() if "lock" in path.name] == []
    reset_accelerate()
    with pytest.raises(ValueError, match="not empty"):  # the folder's state, not a lock, is what stops it now
        train(quick_config(model_dir, [data], out))


# -- item 17: permissions -----------------------------------------------------------------------------------------
def test_output_folders_and_files_honour_the_umask(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "data")
    previous = os.umask(0o002)
    try:
        out = train(quick_config(model_dir, [data], tmp_path / "out", max_steps=2, save_every=2))
    finally:
        os.umask(previous)
    checkpoint = checkpoints_in(out)[-1]
    for folder in (out, out / "checkpoints", checkpoint):
        assert oct(folder.stat().st_mode & 0o777) == oct(0o775), folder
    for file in (out / "model.safetensors", out / "metrics.jsonl", out / "training_summary.json",
                 checkpoint / "trainer_state.json", checkpoint / "model.safetensors", checkpoint / "optimizer.bin"):
        assert oct(file.stat().st_mode & 0o777) == oct(0o664), file
