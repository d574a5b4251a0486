"""Tiny models and tiny data sets in every format otter.train reads, for tests/test_train_*.py."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import webdataset as wds
from PIL import Image

from otter.tiny import build_tiny_otter
from otter.train.trainer import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}
QUESTION = "What colour is the image?"


def save_tiny_model(folder: Path, family: str = "gpt_neox", **config) -> Path:
    """A tiny random Otter folder (cross-attention every 2 layers), as `otter train --model` takes it; `config`: more
    `OtterConfig` fields (e.g. `max_num_frames` for frame embeddings)."""
    model, processor = build_tiny_otter(family, cross_attn_every_n_layers=2, **config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def png_bytes(colour: str, size=(40, 36)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(folder: Path, with_context: bool = True) -> Path:
    """Four examples, "What colour is the image?" -> "It is <colour>.", each with one in-context example."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        (folder / "images" / f"{colour}.png").write_bytes(png_bytes(colour))
    lines = []
    for index, colour in enumerate(COLOURS):
        record = {"images": [f"images/{colour}.png"], "instruction": QUESTION, "answer": f"It is {colour}."}
        if with_context:
            demo = list(COLOURS)[(index + 1) % len(COLOURS)]
            record["context"] = [{"images": [f"images/{demo}.png"], "instruction": QUESTION, "answer": f"It is {demo}."}]
        lines.append(json.dumps(record))
    path = folder / "colours.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_mixed_jsonl(folder: Path) -> Path:
    """
    `write_jsonl`'s four examples, but green's is text only ("Say hello." -> "Hello!") and yellow's image cannot be
    read, which skips yellow's example and blue's (yellow is its demo). Dealt one example per process per micro-batch,
    a micro-batch with images meets one with text only, or one with nothing left to train on, on the other process.
    """
    path = write_jsonl(folder)
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"instruction": "Say hello.", "answer": "Hello!"})
    path.write_text("\n".join(lines) + "\n")
    (folder / "images" / "yellow.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    return path


def write_mimicit(folder: Path, images: str = "json", train_config: bool = True) -> Path:
    """A MIMIC-IT subset `CO`: instructions, images (base64 JSON or parquet, url-safe), and a train config."""
    folder.mkdir(parents=True, exist_ok=True)
    image_ids = {colour: f"CO_IMG_{index:04d}" for index, colour in enumerate(COLOURS)}
    encoded = {image_ids[colour]: base64.urlsafe_b64encode(png_bytes(colour)).decode() for colour in COLOURS}
    data = {
        f"CO_INS_{index:04d}": {"instruction": QUESTION, "answer": f"It is {colour}.", "image_ids": [image_ids[colour]],
                                "rel_ins_ids": []}
        for index, colour in enumerate(COLOURS)
    }
    path = folder / "CO_instructions.json"
    path.write_text(json.dumps({"meta": {"version": "test"}, "data": data}))
    if images == "json":
        (folder / "CO.json").write_text(json.dumps(encoded))
    else:
        write_image_parquet(folder / "CO.parquet", encoded)
    if train_config:
        ids = list(data)
        (folder / "CO_train.json").write_text(json.dumps({ids[i]: [ids[(i + 1) % len(ids)]] for i in range(len(ids))}))
    return path


def write_image_parquet(path: Path, encoded: dict[str, str], row_group_size: int = 2) -> None:
    """As pandas writes `DataFrame({"base64": ...}, index=ids)`: the ids are the index, named in the pandas metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"base64": list(encoded.values()), "__index_level_0__": list(encoded)})
    pandas_meta = {"index_columns": ["__index_level_0__"], "columns": []}
    table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    pq.write_table(table, path, row_group_size=row_group_size)


def mmc4_document(colours: list[str], sentences: list[str], assigned: list[int], score: float = 0.3) -> dict:
    """An MMC4 document whose image i (of colour `colours[i]`) is most similar to sentence `assigned[i]`."""
    similarity = [[score if column == sentence else 0.01 for column in range(len(sentences))] for sentence in assigned]
    return {
        "text_list": sentences,
        "image_info": [{"image_base64": base64.b64encode(png_bytes(colour)).decode()} for colour in colours],
        "similarity_matrix": similarity,
    }


def write_mmc4_shards(folder: Path, shards: int = 2, per_shard: int = 4) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = []
    for shard in range(shards):
        path = folder / f"mmc4-{shard:03d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(per_shard):
                first, second = names[(shard + index) % 4], names[(shard + index + 1) % 4]
                document = mmc4_document([first, second], [f"A {first} square.", "It is bright.",
                                                           f"Then a {second} one."], [0, 2])
                writer.write({"__key__": f"{shard:03d}{index:04d}", "json": json.dumps(document).encode()})
        paths.append(str(path))
    return paths


def write_laion_shards(folder: Path, shards: int = 2, per_shard: int = 4) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = []
    for shard in range(shards):
        path = folder / f"laion-{shard:03d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(per_shard):
                colour = names[(shard + index) % 4]
                writer.write({"__key__": f"{shard:03d}{index:04d}", "png": png_bytes(colour),
                              "txt": f"a plain {colour} picture".encode()})
        paths.append(str(path))
    return paths


def quick_config(model: Path, data, out: Path, **overrides) -> TrainingConfig:
    """A short, quiet, single-worker run: what the tests train with unless they say otherwise."""
    options = dict(model=str(model), data=[str(path) for path in data], out=str(out), max_steps=4, batch_size=2,
                   lr=1e-3, schedule="constant", num_workers=0, save_every=1000, log_every=1000)
    if overrides.get("objective") == "pretraining":
        options["web"] = dict(min_image_bytes=0, single_image_keep_prob=1.0, shuffle_buffer=4)
    options.update(overrides)
    return TrainingConfig(**options)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(launch_config: Path, entry_module: str, model: Path, data: Path, out: Path, *options: str,
                         env: dict | None = None) -> subprocess.CompletedProcess:
    """
    `otter train finetune` on two processes of `accelerate launch --config_file launch_config`, one example per process
    per micro-batch, each process running `python -m entry_module train finetune ...` from the repository root;
    `env`: more environment variables.
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", entry_module, "train", "finetune", "--model", str(model), "--data", str(data), "--out", str(out),
        "--batch-size", "1", "--schedule", "constant", "--num-workers", "0", "--seed", "42", *options,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def weight_differences(first: Path, second: Path) -> dict[str, float]:
    """The largest absolute difference of each tensor of two trained folders' `model.safetensors` (same names)."""
    from safetensors.torch import load_file

    a, b = load_file(Path(first) / "model.safetensors"), load_file(Path(second) / "model.safetensors")
    assert a.keys() == b.keys(), (sorted(a.keys() - b.keys())[:5], sorted(b.keys() - a.keys())[:5])
    return {name: (a[name] - b[name]).abs().max().item() for name in a}


def largest(differences: dict[str, float], count: int = 3) -> list[tuple[str, float]]:
    return sorted(differences.items(), key=lambda item: -item[1])[:count]
