"""
Held-out ShapesWorld evaluation sets (see `otter.shapesworld`) and their loaders, for the `shapesworld_*` tasks.

    write_eval_sets("data/shapesworld_eval", seed=1234, count=200, shots=8)
    otter eval --task shapesworld_binding --data-dir data/shapesworld_eval --shots 0 4 8 ...

`write_eval_sets` writes the sets the shipped model is measured on; `write_set` writes one set of any kind (`FILES`)
from varied scenes, by default from the held-out bands of every axis of variation, e.g. 5-way binding named by
vowel-initial words, or video clips (`videos/*.mp4`):

    write_set("data/binding-5way", "binding", seed=1234, count=200, shots=10, ways=5,
              words=nonce_words(200, 1234, held_out=True, form="V..C"))

The folder holds `images/*.png` and one JSON Lines file per task, one sample per line:

    {"id": "binding-0000", "images": ["images/binding-0000.png"], "instruction": "What is it called?",
     "answer": "fowa", "kind": "binding", "demos": [{"images": [...], "instruction": ..., "answer": ...}, ...],
     "candidates": ["fowa", "kib"]}

A video set's records name `videos` (mp4 files) where the others name `images`. Paths are relative to the folder;
`demos` are the sample's own demonstrations (a k-shot prompt shows the first k, in order); `candidates` (binding and
naming) are the episode's names, which the ranking tasks rank. The instructions and answers are those the training
data uses, so that evaluation prompts equal training text token for token.
"""

import json
from pathlib import Path

from otter.shapesworld import (
    BINDING_INSTRUCTION,
    CLIP_KINDS,
    MOTION_INSTRUCTION,
    VQA_KINDS,
    ShapesWorld,
    nonce_words,
    render,
    video_bytes,
)

from .datasets import Benchmark, Example

FILES = {"vqa": "vqa.jsonl", "binding": "binding.jsonl", "comparison": "comparison.jsonl", "video": "video.jsonl",
         "naming": "naming.jsonl"}
RANKED = ("binding", "naming")  # the sets whose samples carry `candidates`
BINDING_WAYS = 2
BINDING_WORDS = 200  # the held-out nonce words an episode's names are drawn from


def _save(images_dir: Path, name: str, scene) -> str:
    render(scene).save(images_dir / name)
    return f"images/{name}"


def _save_video(videos_dir: Path, name: str, frames) -> str:
    (videos_dir / name).write_bytes(video_bytes([render(scene) for scene in frames]))
    return f"videos/{name}"


def _vqa_records(world: ShapesWorld, images_dir: Path, count: int, shots: int, kinds=VQA_KINDS,
                 **options) -> list[dict]:
    records = []
    for index in range(count):
        sample_id = f"vqa-{index:04d}"
        query = world.vqa(kinds[index % len(kinds)], **options)
        demos = [world.vqa() for _ in range(shots)]
        records.append({
            "id": sample_id, "images": [_save(images_dir, f"{sample_id}.png", query["scene"])],
            "instruction": query["question"], "answer": query["answer"], "kind": query["kind"],
            "demos": [{"images": [_save(images_dir, f"{sample_id}-demo{j}.png", demo["scene"])],
                       "instruction": demo["question"], "answer": demo["answer"]} for j, demo in enumerate(demos)],
        })
    return records


def _binding_records(world: ShapesWorld, images_dir: Path, count: int, shots: int, words: list[str],
                     ways: int = BINDING_WAYS) -> list[dict]:
    records = []
    for index in range(count):
        sample_id = f"binding-{index:04d}"
        episode = world.binding_episode(shots, words=words, ways=ways)
        records.append({
            "id": sample_id, "images": [_save(images_dir, f"{sample_id}.png", episode["query"]["scene"])],
            "instruction": BINDING_INSTRUCTION, "answer": episode["query"]["answer"], "kind": "binding",
            "demos": [{"images": [_save(images_dir, f"{sample_id}-demo{j}.png", demo["scene"])],
                       "instruction": BINDING_INSTRUCTION, "answer": demo["answer"]}
                      for j, demo in enumerate(episode["demos"])],
            "candidates": sorted(episode["names"].values()),
        })
    return records


def _comparison_turn(images_dir: Path, name: str, record: dict) -> dict:
    images = [_save(images_dir, f"{name}-{side}.png", scene) for side, scene in zip("ab", record["scenes"])]
    return {"images": images, "instruction": record["question"], "answer": record["answer"]}


def _comparison_records(world: ShapesWorld, images_dir: Path, count: int, shots: int) -> list[dict]:
    records = []
    for index in range(count):
        sample_id = f"comparison-{index:04d}"
        query = _comparison_turn(images_dir, sample_id, world.comparison())
        demos = [_comparison_turn(images_dir, f"{sample_id}-demo{j}", world.comparison()) for j in range(shots)]
        records.append({"id": sample_id, **query, "kind": "comparison", "demos": demos})
    return records


def _video_records(world: ShapesWorld, videos_dir: Path, count: int, shots: int) -> list[dict]:
    """Clips of every kind in turn (CLIP_KINDS), each with `shots` demonstration clips of random kinds."""
    records = []
    for index in range(count):
        sample_id = f"video-{index:04d}"
        query = world.clip(CLIP_KINDS[index % len(CLIP_KINDS)])
        demos = [world.clip() for _ in range(shots)]
        records.append({
            "id": sample_id, "videos": [_save_video(videos_dir, f"{sample_id}.mp4", query["frames"])],
            "instruction": query["question"], "answer": query["answer"], "kind": query["kind"],
            "demos": [{"videos": [_save_video(videos_dir, f"{sample_id}-demo{j}.mp4", demo["frames"])],
                       "instruction": demo["question"], "answer": demo["answer"]} for j, demo in enumerate(demos)],
        })
    return records


def _naming_records(world: ShapesWorld, videos_dir: Path, count: int, shots: int, words: list[str],
                    ways: int) -> list[dict]:
    records = []
    for index in range(count):
        sample_id = f"naming-{index:04d}"
        episode = world.motion_naming_episode(shots, words=words, ways=ways)
        records.append({
            "id": sample_id, "videos": [_save_video(videos_dir, f"{sample_id}.mp4", episode["query"]["frames"])],
            "instruction": MOTION_INSTRUCTION, "answer": episode["query"]["answer"], "kind": "naming",
            "demos": [{"videos": [_save_video(videos_dir, f"{sample_id}-demo{j}.mp4", demo["frames"])],
                       "instruction": MOTION_INSTRUCTION, "answer": demo["answer"]}
                      for j, demo in enumerate(episode["demos"])],
            "candidates": sorted(episode["names"].values()),
        })
    return records


def write_set(out_dir, kind: str, seed: int, count: int = 200, shots: int = 8, *, varied: bool = True,
              held_out: bool = True, ways: int = BINDING_WAYS, words: list[str] | None = None,
              vqa_kinds=VQA_KINDS, **vqa_options) -> Path:
    """
    Write one evaluation set of `kind` (a key of FILES) into `out_dir`: `count` samples drawn from
    `ShapesWorld(seed, varied=varied, held_out=held_out)`, each with `shots` demonstrations of its own.

    - "vqa": questions cycling through `vqa_kinds` (`vqa_options`, e.g. `objects=1, radius=0.1`, go to
      `ShapesWorld.vqa`), demonstrations of random kinds;
    - "binding", "naming": `ways`-way episodes of shapes, or of motions in clips, named by `words` (by default
      `nonce_words(200, seed, held_out=True, form="any")`; real words such as SHAPES bind against their meaning);
    - "comparison": two images of different shapes;
    - "video": clips that move, change colour, appear or vanish (CLIP_KINDS in turn), as mp4 files.

    The same arguments write the same bytes. Returns `out_dir` as a Path.
    """
    if kind not in FILES:
        raise ValueError(f"unknown ShapesWorld set {kind!r}; expected one of {sorted(FILES)}")
    if count < 1 or shots < 0:
        raise ValueError(f"count must be >= 1 and shots >= 0, got count={count}, shots={shots}")
    if vqa_options and kind != "vqa":
        raise ValueError(f"{sorted(vqa_options)} are options of VQA sets, not of {kind!r}")
    out_dir = Path(out_dir)
    media_dir = out_dir / ("videos" if kind in ("video", "naming") else "images")
    media_dir.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(seed, varied=varied, held_out=held_out)
    words = words if words is not None else nonce_words(BINDING_WORDS, seed, held_out=True, form="any")
    if kind == "vqa":
        records = _vqa_records(world, media_dir, count, shots, tuple(vqa_kinds), **vqa_options)
    elif kind == "binding":
        records = _binding_records(world, media_dir, count, shots, words, ways)
    elif kind == "comparison":
        records = _comparison_records(world, media_dir, count, shots)
    elif kind == "video":
        records = _video_records(world, media_dir, count, shots)
    else:
        records = _naming_records(world, media_dir, count, shots, words, ways)
    with open(out_dir / FILES[kind], "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    return out_dir


def write_eval_sets(out_dir, seed: int = 1234, count: int = 200, shots: int = 8) -> Path:
    """
    Write the held-out evaluation folder `out_dir`: `count` samples per task, each with `shots` demonstrations of its
    own. Each file is drawn from its own `ShapesWorld(seed)` (pick a seed the training data does not use); binding
    names come from `nonce_words(200, seed, held_out=True)`, words never trained on. VQA queries cycle evenly
    through `VQA_KINDS`, their demonstrations are of random kinds. The same arguments write the same bytes.
    Returns `out_dir` as a Path.
    """
    if count < 1 or shots < 0:
        raise ValueError(f"count must be >= 1 and shots >= 0, got count={count}, shots={shots}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    words = nonce_words(BINDING_WORDS, seed, held_out=True)
    sets = {
        "vqa": _vqa_records(ShapesWorld(seed), images_dir, count, shots),
        "binding": _binding_records(ShapesWorld(seed), images_dir, count, shots, words),
        "comparison": _comparison_records(ShapesWorld(seed), images_dir, count, shots),
    }
    for kind, records in sets.items():
        with open(out_dir / FILES[kind], "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record) + "\n" for record in records)
    return out_dir


# -- loading ---------------------------------------------------------------------------------------------------------
def _strings(value, what: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"{what} must be a non-empty list of non-empty strings, got {value!r}")
    return value


def _turn_images(data_dir: Path, turn: dict, where: str):
    """A turn's media: its `images`, or the `videos` of a video set."""
    key = "videos" if "videos" in turn else "images"
    if "videos" in turn and "images" in turn:
        raise ValueError(f"{where} names both 'images' and 'videos'; a ShapesWorld turn shows one kind of media")
    paths = []
    for relative in _strings(turn.get(key), f"{where} {key!r}"):
        path = data_dir / relative
        if not path.is_file():
            raise ValueError(f"{where}: {key[:-1]} {relative!r} not found (expected {path})")
        paths.append(path)
    return paths[0] if len(paths) == 1 else tuple(paths)


def _turn_text(turn: dict, where: str) -> tuple[str, str]:
    for name in ("instruction", "answer"):
        if not isinstance(turn.get(name), str) or not turn[name].strip():
            raise ValueError(f"{where} needs a non-empty string {name!r}, got {turn.get(name)!r}")
    return turn["instruction"], turn["answer"]


def _example(data_dir: Path, record, where: str) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, expected a JSON object")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise ValueError(f"{where} needs a non-empty string 'id', got {record.get('id')!r}")
    where = f"{where} (sample {record['id']!r})"
    instruction, answer = _turn_text(record, where)
    kind = record.get("kind")
    if not isinstance(kind, str):
        raise ValueError(f"{where} needs a string 'kind', got {kind!r}")
    if not isinstance(record.get("demos"), list):
        raise ValueError(f"{where} needs a list 'demos', got {record.get('demos')!r}")
    demos = []
    for j, demo in enumerate(record["demos"]):
        demo_where = f"{where} demo {j}"
        if not isinstance(demo, dict):
            raise ValueError(f"{demo_where} is a {type(demo).__name__}, expected a JSON object")
        demo_instruction, demo_answer = _turn_text(demo, demo_where)
        demos.append(Example(id=f"{record['id']}/demo{j}", image=_turn_images(data_dir, demo, demo_where),
                             fields={"instruction": demo_instruction, "answer": demo_answer}, target=demo_answer))
    candidates = None
    if "candidates" in record:
        candidates = _strings(record["candidates"], f"{where} 'candidates'")
        if len(set(candidates)) != len(candidates) or answer not in candidates:
            raise ValueError(f"{where}: 'candidates' {candidates} must be distinct and hold the answer {answer!r}")
        candidates = tuple(candidates)
    return Example(id=record["id"], image=_turn_images(data_dir, record, where),
                   fields={"instruction": instruction, "answer": answer, "kind": kind}, target=answer,
                   demos=tuple(demos), candidates=candidates)


def load_shapesworld(kind: str, data_dir: Path) -> Benchmark:
    """
    The samples of `data_dir/<kind>.jsonl` (`kind` a key of FILES), as written by `write_eval_sets` or
    `write_set`: an empty pool (every sample has its own demonstrations) and the samples to evaluate.
    """
    if kind not in FILES:
        raise ValueError(f"unknown ShapesWorld set {kind!r}; expected one of {sorted(FILES)}")
    data_dir = Path(data_dir)
    path = data_dir / FILES[kind]
    if not path.is_file():
        raise ValueError(f"ShapesWorld {kind} set not found: expected {path} (write it with "
                         "otter.eval.shapesworld.write_eval_sets; see eval/README.md)")
    examples, seen = [], set()
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from None
            example = _example(data_dir, record, where)
            if kind in RANKED and example.candidates is None:
                raise ValueError(f"{where} (sample {example.id!r}) needs 'candidates', the episode's names")
            if example.id in seen:
                raise ValueError(f"sample id {example.id!r} occurs twice in {path}; sample ids must be unique")
            seen.add(example.id)
            examples.append(example)
    if not examples:
        raise ValueError(f"{path} holds no samples")
    return Benchmark(pool=[], test=examples)


def load_shapesworld_vqa(data_dir: Path) -> Benchmark:
    """`data_dir/vqa.jsonl`: see `load_shapesworld`."""
    return load_shapesworld("vqa", data_dir)


def load_shapesworld_binding(data_dir: Path) -> Benchmark:
    """`data_dir/binding.jsonl`: see `load_shapesworld`."""
    return load_shapesworld("binding", data_dir)


def load_shapesworld_comparison(data_dir: Path) -> Benchmark:
    """`data_dir/comparison.jsonl`: see `load_shapesworld`."""
    return load_shapesworld("comparison", data_dir)


def load_shapesworld_video(data_dir: Path) -> Benchmark:
    """`data_dir/video.jsonl`: see `load_shapesworld`."""
    return load_shapesworld("video", data_dir)


def load_shapesworld_naming(data_dir: Path) -> Benchmark:
    """`data_dir/naming.jsonl`: see `load_shapesworld`."""
    return load_shapesworld("naming", data_dir)
