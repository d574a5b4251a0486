"""Conversion fails cleanly and leaves nothing behind: damaged weights files and mistyped folders are named (never a
bare EOFError or a download attempt for a local typo), an interrupted run's partial folder is cleaned up by the next,
outputs honour the umask, and the saved tokenizer knows the language model's length limit."""

import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoProcessor, AutoTokenizer

from otter.cli import is_user_error, main
from otter.conversion import folders
from otter.conversion.folders import atomic_folder, local_file, local_folder
from otter.conversion.mosaic_gpt import convert_mosaic_gpt
from otter.conversion.openflamingo import language_model_plan
from otter.conversion.weights import CheckpointFiles
from otter.language_models import max_positions
from otter.tiny import TEXT_CONFIGS, tiny_tokenizer

from . import mosaic_gpt_reference as mosaic
from .conversion_fixtures import write_open_clip
from .test_conversion import convert, release

TENSORS = {"a.weight": torch.arange(2000, dtype=torch.float32).reshape(40, 50), "b.bias": torch.ones(7)}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: anything not in it must fail without touching the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def mosaic_folder(tmp_path):
    tokenizer = tiny_tokenizer()
    config = dict(mosaic.TINY_MOSAIC, vocab_size=len(tokenizer))
    mosaic.write_folder(tmp_path / "mosaic", config, mosaic.random_state_dict(config), tokenizer)
    return tmp_path / "mosaic"


def torch_bytes(tmp_path, legacy=False) -> bytes:
    torch.save(TENSORS, tmp_path / "whole.pt", _use_new_zipfile_serialization=not legacy)
    return (tmp_path / "whole.pt").read_bytes()


# item 13: damaged weights files


DAMAGED_TORCH = {
    "empty": lambda whole, legacy: b"",
    "zip cut in half": lambda whole, legacy: whole[:len(whole) // 2],
    "zip cut to its header": lambda whole, legacy: whole[:100],
    "zip missing its last bytes": lambda whole, legacy: whole[:-10],
    "legacy cut in half": lambda whole, legacy: legacy[:len(legacy) // 2],
    "legacy cut to its header": lambda whole, legacy: legacy[:10],
    "an HTML error page": lambda whole, legacy: b"<html><body>504 Gateway Time-out</body></html>\n",
    "plain text": lambda whole, legacy: b"hello world\n",
}


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
@pytest.mark.parametrize("damage", DAMAGED_TORCH)
def test_a_damaged_torch_file_is_named_as_damaged(damage, suffix, tmp_path, caplog):
    data = DAMAGED_TORCH[damage](torch_bytes(tmp_path), torch_bytes(tmp_path, legacy=True))
    path = tmp_path / f"checkpoint{suffix}"
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as raised:
        CheckpointFiles([path])
    message = str(raised.value)
    assert str(path) in message and "truncated or not a PyTorch checkpoint" in message
    assert f"{len(data)} bytes" in message
    assert is_user_error(raised.value)
    assert "legacy" not in caplog.text  # the file is not called a legacy checkpoint when it is a damaged one


def test_a_git_lfs_pointer_is_named_as_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123abcd\nsize 3215614463\n")
    with pytest.raises(ValueError, match=rf"{path} .*Git LFS pointer.*git lfs pull"):
        CheckpointFiles([path])


def test_sound_torch_files_still_load_zip_and_legacy(tmp_path, caplog):
    torch.save(TENSORS, tmp_path / "zip.pt")
    torch.save(TENSORS, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with caplog.at_level(logging.WARNING):
        files = CheckpointFiles([tmp_path / "zip.pt"])
        assert "legacy" not in caplog.text
        legacy = CheckpointFiles([tmp_path / "legacy.pt"])
    assert "legacy (pre-zip)" in caplog.text
    for source in (files, legacy):
        assert all(torch.equal(tensor, TENSORS[name]) for name, tensor in source.read(TENSORS).items())


@pytest.mark.parametrize("damage", ["empty", "cut to 5 bytes", "cut in half", "missing its last bytes", "text"])
def test_a_damaged_safetensors_file_is_named(damage, tmp_path):
    save_file(TENSORS, tmp_path / "whole.safetensors")
    whole = (tmp_path / "whole.safetensors").read_bytes()
    data = {"empty": b"", "cut to 5 bytes": whole[:5], "cut in half": whole[:len(whole) // 2],
            "missing its last bytes": whole[:-4], "text": b"not weights at all"}[damage]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError) as raised:
        CheckpointFiles([path])
    assert str(path) in str(raised.value) and "truncated or not a safetensors file" in str(raised.value)
    assert f"{len(data)} bytes" in str(raised.value)
    assert is_user_error(raised.value)


def test_a_damaged_language_model_shard_is_named(mosaic_folder):
    shard = mosaic_folder / "pytorch_model.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard} .*truncated or not a PyTorch checkpoint"):
        language_model_plan(mosaic_folder)


def test_the_command_line_names_a_truncated_checkpoint(tmp_path, capsys):
    config_path, weights = write_open_clip(tmp_path / "open_clip", name="tiny-vit-damaged")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(SystemExit) as exited:
        main(["convert", "open-clip", "--vision-encoder", str(config_path), "--vision-pretrained", str(cut),
              "--out", str(tmp_path / "clip")])
    assert exited.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("otter: ") and str(cut) in error and "truncated" in error
    assert "\n" not in error and not (tmp_path / "clip").exists()


# item 13: folder names


@pytest.mark.parametrize("name", ["parts/lm-mtp", "parts/lm-mpt/extra", "./lm-mtp", "parts/../lm-mtp"])
def test_a_mistyped_local_path_says_no_such_folder_and_downloads_nothing(name, tmp_path, monkeypatch):
    (tmp_path / "parts" / "lm-mpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    downloads = []

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        if not local_files_only:
            downloads.append(repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError(f"{repo_id} is not in the cache")

    monkeypatch.setattr(folders, "snapshot_download", snapshot_download)
    with pytest.raises(FileNotFoundError, match=rf"language model {name}: no such folder") as raised:
        local_folder(name, "language model")
    assert not downloads
    assert is_user_error(raised.value)


def test_a_mistyped_folder_next_to_a_similar_one_is_pointed_at_it(tmp_path, monkeypatch):
    (tmp_path / "parts" / "lm-mpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="did you mean parts/lm-mpt"):
        local_folder("parts/lm-mtp", "language model")


def test_a_hub_id_neither_local_nor_cached_names_both_failures(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as raised:
        local_folder("someone/some-model", "language model")
    message = str(raised.value)
    assert "language model someone/some-model: no local folder someone/some-model" in message
    assert "the hub download failed" in message and "offline" in message.lower()
    assert is_user_error(raised.value)


def test_a_name_that_is_no_hub_id_is_no_such_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="bad name/x y: no such folder") as raised:
        local_folder("bad name/x y", "tokenizer")
    assert is_user_error(raised.value)


def test_a_preset_checkpoint_that_cannot_be_fetched_is_named(offline_hub):
    with pytest.raises(FileNotFoundError) as raised:
        local_file("openflamingo/OpenFlamingo-3B-vitl-mpt1b", "checkpoint.pt")
    assert "openflamingo/OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt" in str(raised.value)
    assert "not in the Hugging Face cache" in str(raised.value) and "offline" in str(raised.value).lower()
    assert is_user_error(raised.value)


# item 16: partial folders of interrupted runs


def partials(folder):
    return sorted(path.name for path in folder.iterdir() if ".partial-" in path.name)


def test_a_killed_conversion_leaves_a_partial_folder_the_next_run_removes(tmp_path, caplog):
    out = tmp_path / "model"
    script = textwrap.dedent(f"""
        import os, signal
        from otter.conversion.folders import atomic_folder
        with atomic_folder({str(out)!r}) as partial:
            (partial / "model-00001-of-00009.safetensors").write_bytes(b"half written")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -9
    assert len(partials(tmp_path)) == 1 and not out.exists()

    with caplog.at_level(logging.INFO), atomic_folder(out) as partial:
        (partial / "config.json").write_text("{}")
    assert partials(tmp_path) == [] and sorted(os.listdir(out)) == ["config.json"]
    assert "removed" in caplog.text and "interrupted" in caplog.text


def test_only_partial_folders_of_dead_processes_on_this_host_are_removed(mosaic_folder, tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid names no live process now
    host = socket.gethostname()
    dead = tmp_path / f".mpt.partial-{host}-{finished.pid}"
    live = tmp_path / f".mpt.partial-{host}-{os.getppid()}"  # another conversion still at work
    elsewhere = tmp_path / f".mpt.partial-some-other-host-{finished.pid}"  # a shared disk: not ours to judge
    other_output = tmp_path / f".other.partial-{host}-{finished.pid}"
    for folder in (dead, live, elsewhere, other_output):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    convert_mosaic_gpt(str(mosaic_folder), tmp_path / "mpt")
    assert (tmp_path / "mpt" / "config.json").is_file()
    assert partials(tmp_path) == sorted(folder.name for folder in (live, elsewhere, other_output))


def test_the_partial_folder_is_named_after_this_process(tmp_path):
    with atomic_folder(tmp_path / "out") as partial:
        assert partial.parent == tmp_path
        assert partial.name == f".out.partial-{socket.gethostname()}-{os.getpid()}"
    assert (tmp_path / "out").is_dir() and partials(tmp_path) == []


# item 17: permissions


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_converted_folders_honour_the_umask(umask, folder_mode, file_mode, mosaic_folder, tmp_path):
    previous = os.umask(umask)
    try:
        convert_mosaic_gpt(str(mosaic_folder), tmp_path / "mpt")
    finally:
        os.umask(previous)
    out = tmp_path / "mpt"
    assert stat.S_IMODE(out.stat().st_mode) == folder_mode
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(modes)
    assert modes == dict.fromkeys(modes, file_mode)


# item 7: the tokenizer's length limit


def test_a_converted_mosaic_gpt_tokenizer_knows_the_length_limit(mosaic_folder, tmp_path):
    convert_mosaic_gpt(str(mosaic_folder), tmp_path / "mpt")
    assert AutoTokenizer.from_pretrained(tmp_path / "mpt").model_max_length == mosaic.TINY_MOSAIC["max_seq_len"]


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_a_converted_openflamingo_tokenizer_knows_the_length_limit(family, tmp_path, monkeypatch):
    vision = write_open_clip(tmp_path / "open_clip", name="tiny-vit-limit")
    _, _, _, checkpoint, lm_folder = release(tmp_path, vision, family, 2, monkeypatch)
    limit = max_positions(AutoConfig.from_pretrained(lm_folder))
    assert limit == TEXT_CONFIGS[family].get("max_seq_len", TEXT_CONFIGS[family].get("max_position_embeddings"))
    assert AutoTokenizer.from_pretrained(lm_folder).model_max_length > limit  # the source tokenizer does not know it
    out = convert(tmp_path, vision, checkpoint, lm_folder, 2)
    assert AutoProcessor.from_pretrained(out).tokenizer.model_max_length == limit
    assert AutoTokenizer.from_pretrained(out).model_max_length == limit
