"""
The benchmarks' files, read in the layouts that eval/README.md documents (the official downloads' names, as
OpenFlamingo's evaluation reads them). Each loader returns a `Benchmark`: the demonstration pool (the training split)
and the evaluated split, as lists of `Example`.
"""

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otter.video import VIDEO_SUFFIXES

from .imagenet_classnames import IMAGENET_CLASSNAMES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Example:
    """
    One sample. `fields` fill the task's prompt template (the answer field included: it is what a demonstration
    shows); `target` is what the metric compares a prediction with (VQA answer records, reference captions, a class
    name, a 0/1 label).

    `image` is one image path, or a tuple of paths for a turn that shows several images (its prompt shows each image
    before its own label, in order: `otter.prompts.with_images`); for a task that shows videos (`Task.media`), the
    video file. `demos`, when set, are the sample's own
    demonstrations: a k-shot prompt uses the first k of them, in order, instead of drawing from the pool.
    `candidates`, when set, are the class names a ranking task scores for this sample (instead of
    `Benchmark.class_names`).
    """

    id: Any
    image: Path | tuple[Path, ...]
    fields: dict
    target: Any
    demos: tuple["Example", ...] | None = None
    candidates: tuple[str, ...] | None = None

    @property
    def images(self) -> tuple[Path, ...]:
        """The sample's images, in `<image>` order."""
        return self.image if isinstance(self.image, tuple) else (self.image,)


@dataclass(frozen=True)
class Benchmark:
    pool: list[Example]
    test: list[Example]
    class_names: list[str] | None = field(default=None)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ValueError(f"{what} not found: expected {path} (see the dataset layouts in eval/README.md)")
    return path


def _read_json(path: Path, what: str):
    with open(_require(path, what), encoding="utf-8") as file:
        try:
            return json.load(file)
        except ValueError as error:  # not JSON, or not UTF-8
            raise ValueError(f"{what} {path} is not a JSON file ({error})") from None


def _unique_ids(examples: list[Example], source: Path) -> list[Example]:
    seen = set()
    for example in examples:
        if example.id in seen:
            raise ValueError(f"sample id {example.id!r} occurs twice in {source}; sample ids must be unique")
        seen.add(example.id)
    return examples


# -- VQA: VQAv2, OK-VQA, TextVQA, VizWiz in the VQA API's JSON format -----------------------------------------------
VQA_FILES = {
    # task: (pool images, test images, questions pattern, annotations pattern), {split} in the patterns
    "vqav2": ("train2014", "val2014", "v2_OpenEnded_mscoco_{split}_questions.json", "v2_mscoco_{split}_annotations.json"),
    "ok_vqa": ("train2014", "val2014", "OpenEnded_mscoco_{split}_questions.json", "mscoco_{split}_annotations.json"),
    "textvqa": ("train_images", "train_images", "{split}_questions_vqa_format.json", "{split}_annotations_vqa_format.json"),
    "vizwiz": ("train", "val", "{split}_questions_vqa_format.json", "{split}_annotations_vqa_format.json"),
}
VQA_SPLITS = {"vqav2": ("train2014", "val2014"), "ok_vqa": ("train2014", "val2014"),
              "textvqa": ("train", "val"), "vizwiz": ("train", "val")}


def _vqa_image_path(task: str, image_dir: Path, image_id) -> Path:
    if task in ("vqav2", "ok_vqa"):
        return image_dir / f"COCO_{image_dir.name}_{int(image_id):012d}.jpg"
    if task == "textvqa":
        return image_dir / f"{image_id}.jpg"
    return image_dir / str(image_id)  # VizWiz: the image id is the file name


def _vqa_split(task: str, data_dir: Path, image_dir: Path, split: str) -> list[Example]:
    _, _, questions_pattern, annotations_pattern = VQA_FILES[task]
    questions_path = data_dir / questions_pattern.format(split=split)
    annotations_path = data_dir / annotations_pattern.format(split=split)
    questions = _read_json(questions_path, f"{task} {split} questions")["questions"]
    annotations = {a["question_id"]: a for a in _read_json(annotations_path, f"{task} {split} annotations")["annotations"]}
    _require(image_dir, f"{task} {split} image folder")
    examples = []
    for question in questions:
        annotation = annotations.get(question["question_id"])
        if annotation is None:
            raise ValueError(f"question {question['question_id']} of {questions_path} has no annotation in {annotations_path}")
        examples.append(Example(
            id=question["question_id"],
            image=_vqa_image_path(task, image_dir, question["image_id"]),
            # a demonstration shows the first annotator's answer, as OpenFlamingo does
            fields={"question": question["question"], "answer": annotation["answers"][0]["answer"]},
            target=annotation["answers"],
        ))
    return _unique_ids(examples, questions_path)


def load_vqa(task: str, data_dir: Path) -> Benchmark:
    pool_images, test_images, _, _ = VQA_FILES[task]
    pool_split, test_split = VQA_SPLITS[task]
    return Benchmark(pool=_vqa_split(task, data_dir, data_dir / pool_images, pool_split),
                     test=_vqa_split(task, data_dir, data_dir / test_images, test_split))


# -- captioning: Karpathy splits of COCO and Flickr30K ------------------------------------------------------------
def load_captions(task: str, data_dir: Path) -> Benchmark:
    """
    Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`: demonstrations come from the "train" split,
    evaluation is on the "test" split, references are every `sentences[].raw` of an image.
    """
    karpathy = data_dir / ("dataset_coco.json" if task == "coco" else "dataset_flickr30k.json")
    images = _read_json(karpathy, f"{task} Karpathy split file")["images"]
    pool, test = [], []
    for entry in images:
        if entry["split"] not in ("train", "test"):
            continue  # "val" and "restval" are not used, as in OpenFlamingo
        if task == "coco":
            image = data_dir / entry["filepath"] / entry["filename"]  # filepath is "train2014" or "val2014"
            image_id = entry["cocoid"]
        else:
            image = data_dir / "flickr30k-images" / entry["filename"]
            image_id = entry["filename"].rsplit(".", 1)[0]
        references = [sentence["raw"] for sentence in entry["sentences"]]
        example = Example(id=image_id, image=image, fields={"caption": references[0].strip()}, target=references)
        (pool if entry["split"] == "train" else test).append(example)
    return Benchmark(pool=_unique_ids(pool, karpathy), test=_unique_ids(test, karpathy))


# -- ImageNet-style classification ----------------------------------------------------------------------------------
WORDNET_ID = re.compile(r"n\d{8}")


def _class_names(data_dir: Path, folders: list[str]) -> list[str]:
    names_file = data_dir / "classnames.txt"
    if names_file.exists():
        names = [line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"{names_file} names {len(names)} classes but {data_dir / 'train'} has {len(folders)} class folders")
        return names
    if len(folders) == len(IMAGENET_CLASSNAMES) and all(WORDNET_ID.fullmatch(folder) for folder in folders):
        return list(IMAGENET_CLASSNAMES)
    return [folder.replace("_", " ") for folder in folders]


def _image_folder(root: Path, folders: list[str], class_names: list[str], data_dir: Path) -> list[Example]:
    _require(root, "class folder root")
    present = sorted(path.name for path in root.iterdir() if path.is_dir())
    unknown = sorted(set(present) - set(folders))
    if unknown:
        raise ValueError(f"{root} has class folders {unknown[:5]} that {data_dir / 'train'} does not have")
    examples = []
    for folder, name in zip(folders, class_names):
        for image in sorted((root / folder).iterdir()) if (root / folder).is_dir() else []:
            if image.suffix.lower() in IMAGE_SUFFIXES:
                examples.append(Example(id=f"{folder}/{image.name}", image=image, fields={"label": name}, target=name))
    return examples


def load_image_folder(data_dir: Path) -> Benchmark:
    """`train/<class>/*` and `val/<class>/*`; class names from `classnames.txt`, ImageNet's names, or the folders."""
    train = _require(data_dir / "train", "classification train folder")
    folders = sorted(path.name for path in train.iterdir() if path.is_dir())
    if not folders:
        raise ValueError(f"{train} holds no class folders")
    class_names = _class_names(data_dir, folders)
    return Benchmark(pool=_image_folder(train, folders, class_names, data_dir),
                     test=_image_folder(data_dir / "val", folders, class_names, data_dir),
                     class_names=class_names)


# -- HatefulMemes ----------------------------------------------------------------------------------------------------
HATEFUL_MEMES_CLASSES = ["no", "yes"]


def _hateful_memes_split(data_dir: Path, name: str) -> list[Example]:
    path = _require(data_dir / name, "HatefulMemes annotations")
    examples = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path} line {number} is not valid JSON ({error})") from None
            if record.get("label") not in (0, 1):
                raise ValueError(f"{path}: sample {record.get('id')!r} has label {record.get('label')!r}; expected 0 or 1 "
                                 "(the unlabelled test files cannot be evaluated)")
            examples.append(Example(
                id=record["id"],
                image=data_dir / "img" / record["img"].split("/")[-1],
                fields={"ocr": record["text"], "answer": HATEFUL_MEMES_CLASSES[record["label"]]},
                target=record["label"],
            ))
    return _unique_ids(examples, path)


def load_hateful_memes(data_dir: Path) -> Benchmark:
    return Benchmark(pool=_hateful_memes_split(data_dir, "train.jsonl"),
                     test=_hateful_memes_split(data_dir, "dev_seen.jsonl"),
                     class_names=HATEFUL_MEMES_CLASSES)


# -- video QA: MSVD-QA and MSRVTT-QA (Xu et al., 2017) -------------------------------------------------------------
# The question types the papers report accuracy for: a question's first word.
QUESTION_TYPES = ("what", "who", "how", "when", "where")
MSRVTT_FIRST_TEST_VIDEO = 7010  # MSR-VTT's split: videos 0-6512 train, 6513-7009 val, 7010-9999 test


def question_type(question: str) -> str:
    """The type the papers break video QA accuracy down by: the question's first word (what, who, how, when,
    where), "other" for any other."""
    words = question.strip().lower().split(maxsplit=1)
    return words[0] if words and words[0] in QUESTION_TYPES else "other"


class VideoFolder:
    """
    A data set's videos: the first of `layouts` (each a tuple of folders under `data_dir`) of which a folder exists,
    its files listed once. A video is found by its name without extension: the file with the official `suffix`, else
    one with another video suffix (a copy converted to mp4, say); a video not there is given its official path
    (`home(name)` picks its folder in a layout of several), which the check of the files a run shows reports missing.
    """

    def __init__(self, what: str, data_dir: Path, layouts: list[tuple[str, ...]], suffix: str,
                 home: Callable[[str], int] = lambda name: 0):
        for layout in layouts:
            folders = [data_dir / folder for folder in layout]
            if any(folder.is_dir() for folder in folders):
                break
        else:
            expected = " or ".join("/, ".join(layout) + "/" for layout in layouts)
            raise ValueError(f"{what} video folder not found: expected {expected} under {data_dir} (see the dataset "
                             "layouts in eval/README.md)")
        self.folders, self.suffix, self.home = folders, suffix, home
        self.files: dict[str, dict[str, Path]] = {}
        for folder in folders:
            if folder.is_dir():
                for entry in os.scandir(folder):
                    path = Path(entry.path)
                    if path.suffix.lower() in VIDEO_SUFFIXES:
                        self.files.setdefault(path.stem, {})[path.suffix.lower()] = path

    def path(self, name: str) -> Path:
        found = self.files.get(name)
        if found:
            return found.get(self.suffix) or found[min(found)]
        return self.folders[self.home(name) if len(self.folders) > 1 else 0] / (name + self.suffix)


def _video_name(name) -> str:
    """A video's name as a record gives it, without a video suffix ("video7010.mp4" -> "video7010")."""
    name = str(name).strip()
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in VIDEO_SUFFIXES else name


def _video_qa_records(data_dir: Path, split: str, what: str) -> tuple[list[dict], Path]:
    """
    A split's records, each with "question", "answer" and the video's reference, and the file they come from: the
    official `{split}_qa.json`, or for the test split the `test_q.json` and `test_a.json` of Video-ChatGPT's
    zero-shot QA copies (records joined by "question_id").
    """
    path = data_dir / f"{split}_qa.json"
    questions_path, answers_path = data_dir / "test_q.json", data_dir / "test_a.json"
    if split == "test" and not path.exists() and questions_path.exists():
        questions = _read_json(questions_path, f"{what} test questions")
        answers = _read_json(answers_path, f"{what} test answers")
        if not isinstance(questions, list) or not isinstance(answers, list):
            raise ValueError(f"{questions_path} and {answers_path} must each hold a list of records")
        by_id = {answer.get("question_id"): answer for answer in answers if isinstance(answer, dict)}
        records = []
        for question in questions:
            question_id = question.get("question_id") if isinstance(question, dict) else None
            if question_id not in by_id:
                raise ValueError(f"question {question_id!r} of {questions_path} has no answer in {answers_path}")
            records.append({**question, "answer": by_id[question_id]["answer"]})
        return records, questions_path
    records = _read_json(path, f"{what} {split} questions and answers")
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a {type(records).__name__}; expected a list of {{'question', 'answer', "
                         "'video_id', 'id'}} records")
    return records, path


def _video_qa_examples(records: list[dict], source: Path, video_name: Callable[[dict, Path], str],
                       videos: VideoFolder) -> list[Example]:
    examples = []
    for position, record in enumerate(records):
        if not isinstance(record, dict) or "question" not in record or "answer" not in record:
            raise ValueError(f"{source}: record {position} is not a {{'question', 'answer', 'video_id'}} "
                             f"record: {str(record)[:80]}")
        question, answer = str(record["question"]), str(record["answer"])
        examples.append(Example(
            id=record.get("id", record.get("question_id", position)),  # official: "id"; Video-ChatGPT: "question_id"
            image=videos.path(video_name(record, source)),
            fields={"question": question, "answer": answer, "type": question_type(question)},
            target=answer,
        ))
    return _unique_ids(examples, source)


def _video_reference(record: dict, source: Path):
    """A record's video: its "video_name" (or "video"), else its "video_id"; (is it a name, the value)."""
    for key in ("video_name", "video"):
        if key in record:
            return True, record[key]
    if "video_id" not in record:
        raise ValueError(f"{source}: record {record.get('id', record.get('question_id'))!r} names no video (expected "
                         "'video_id' or 'video_name')")
    return False, record["video_id"]


MSRVTT_VIDEO_LAYOUTS = [("video",), ("videos",), ("videos/all",), ("TrainValVideo", "TestVideo")]


def _msrvtt_folder(name: str) -> int:
    """Which folder of MSR-VTT's own layout (TrainValVideo/, TestVideo/) holds video `name` ("video7010")."""
    number = name.removeprefix("video")
    return int(number.isdigit() and int(number) >= MSRVTT_FIRST_TEST_VIDEO)


def load_msrvtt_qa(data_dir: Path) -> Benchmark:
    """
    MSRVTT-QA: `train_qa.json` (demonstrations) and `test_qa.json` (evaluated), lists of {"question", "answer",
    "video_id", "id"}; video N is `video{N}.mp4` in `video/` (or `videos/`, `videos/all/`, or MSR-VTT's own
    `TrainValVideo/` and `TestVideo/`).
    """
    videos = VideoFolder("MSRVTT-QA", data_dir, MSRVTT_VIDEO_LAYOUTS, ".mp4", home=_msrvtt_folder)

    def video_name(record: dict, source: Path) -> str:
        is_name, value = _video_reference(record, source)
        if not is_name and (isinstance(value, int) or str(value).strip().isdigit()):
            return f"video{int(value)}"
        return _video_name(value)

    splits = [_video_qa_records(data_dir, split, "MSRVTT-QA") for split in ("train", "test")]
    pool, test = (_video_qa_examples(records, source, video_name, videos) for records, source in splits)
    return Benchmark(pool=pool, test=test)


VID = re.compile(r"vid\d+")


def _youtube_mapping(path: Path) -> dict[str, str]:
    """MSVD-QA's `youtube_mapping.txt`: one "<clip name> vid<N>" pair per line -> {"vid<N>": clip name}."""
    mapping = {}
    for number, line in enumerate(_require(path, "MSVD-QA youtube_mapping.txt (video ids to clip names)")
                                  .read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        ids = [part for part in parts if VID.fullmatch(part)]
        if len(parts) != 2 or len(ids) != 1:
            raise ValueError(f"{path} line {number} is not a '<clip name> vid<N>' pair: {line[:80]!r}")
        clip = parts[0] if parts[1] == ids[0] else parts[1]
        mapping[ids[0]] = _video_name(clip)
    return mapping


def load_msvd_qa(data_dir: Path) -> Benchmark:
    """
    MSVD-QA: `train_qa.json` (demonstrations) and `test_qa.json` (evaluated), lists of {"question", "answer",
    "video_id", "id"}; video_id N is `vid{N}`, which `youtube_mapping.txt` maps to a clip name, the file
    `YouTubeClips/<clip name>.avi` (or in `video/`, `videos/`).
    """
    videos = VideoFolder("MSVD-QA", data_dir, [("YouTubeClips",), ("video",), ("videos",)], ".avi")
    mapping_path = data_dir / "youtube_mapping.txt"
    mapping = None

    def video_name(record: dict, source: Path) -> str:
        nonlocal mapping
        is_name, value = _video_reference(record, source)
        if is_name:
            return _video_name(value)
        key = f"vid{int(value)}" if isinstance(value, int) or str(value).strip().isdigit() else str(value).strip()
        if not VID.fullmatch(key):
            return _video_name(key)  # a clip name given as the id
        if mapping is None:
            mapping = _youtube_mapping(mapping_path)
        if key not in mapping:
            raise ValueError(f"{source}: video_id {value!r} ({key}) is not in {mapping_path}")
        return mapping[key]

    splits = [_video_qa_records(data_dir, split, "MSVD-QA") for split in ("train", "test")]
    pool, test = (_video_qa_examples(records, source, video_name, videos) for records, source in splits)
    return Benchmark(pool=pool, test=test)
