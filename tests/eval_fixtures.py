"""Tiny synthetic data sets in each benchmark's documented layout (eval/README.md), written under a test's tmp_path
(videos with PyAV, imported only by the video data sets)."""

import json
from pathlib import Path

from PIL import Image

COLOURS = [(220, 30, 30), (30, 170, 60), (40, 70, 220), (240, 200, 20), (150, 40, 160), (20, 190, 200),
           (250, 130, 20), (90, 90, 90)]


def save_image(path: Path, index: int) -> None:
    """A small solid image whose colour (and size) depends on `index`; the same index gives the same image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40 + 4 * (index % 3), 36), COLOURS[index % len(COLOURS)])
    image.save(path)


def _answers(words: list[str]) -> list[dict]:
    return [{"answer": word, "answer_confidence": "yes", "answer_id": i + 1} for i, word in enumerate(words)]


# ten annotators per question, with the normalisation cases VQAEval handles (articles, digits, punctuation, commas)
VQA_ANSWERS = [
    ["two"] * 4 + ["2"] * 3 + ["a pair"] * 2 + ["two."],
    ["red"] * 6 + ["the red"] * 2 + ["red!"] + ["dark red"],
    ["1,000"] * 3 + ["1000"] * 3 + ["thousand"] * 4,
    ["yes"] * 9 + ["no"],
    ["black/white"] * 5 + ["black and white"] * 5,
    ["dont know"] * 2 + ["don't know"] * 8,
]
QUESTIONS = ["how many circles are there?", "what colour is it?", "how many dots?", "is it a square?",
             "what colours are shown?", "what is written?"]

VQA_NAMES = {  # task: (pool images, test images, questions pattern, annotations pattern, pool split, test split)
    "vqav2": ("train2014", "val2014", "v2_OpenEnded_mscoco_{}_questions.json", "v2_mscoco_{}_annotations.json",
              "train2014", "val2014"),
    "ok_vqa": ("train2014", "val2014", "OpenEnded_mscoco_{}_questions.json", "mscoco_{}_annotations.json",
               "train2014", "val2014"),
    "textvqa": ("train_images", "train_images", "{}_questions_vqa_format.json", "{}_annotations_vqa_format.json",
                "train", "val"),
    "vizwiz": ("train", "val", "{}_questions_vqa_format.json", "{}_annotations_vqa_format.json", "train", "val"),
}


def _vqa_image_name(task: str, image_dir: str, image_id: int) -> tuple[object, str]:
    """(the image_id the JSON holds, the image's file name)."""
    if task in ("vqav2", "ok_vqa"):
        return image_id, f"COCO_{image_dir}_{image_id:012d}.jpg"
    if task == "textvqa":
        return f"{image_id:016x}", f"{image_id:016x}.jpg"
    name = f"VizWiz_{image_dir}_{image_id:08d}.jpg"
    return name, name


def make_vqa(root: Path, task: str, num_pool: int = 4, num_test: int = 3) -> Path:
    """Pool questions on images 0..num_pool-1, two questions per test image (shared images within a split)."""
    pool_dir, test_dir, questions_name, annotations_name, pool_split, test_split = VQA_NAMES[task]
    question_id = 100
    for split, image_dir, count, first_image in ((pool_split, pool_dir, num_pool, 0),
                                                 (test_split, test_dir, num_test, 50)):
        questions, annotations = [], []
        for n in range(count):
            image_number = first_image + n // 2 if split == test_split else first_image + n
            image_id, file_name = _vqa_image_name(task, image_dir, image_number + 1)
            save_image(root / image_dir / file_name, image_number)
            question_id += 1
            questions.append({"image_id": image_id, "question": QUESTIONS[n % len(QUESTIONS)], "question_id": question_id})
            answers = VQA_ANSWERS[(n + (split == test_split)) % len(VQA_ANSWERS)]
            annotations.append({"question_id": question_id, "image_id": image_id, "question_type": "what",
                                "answer_type": "other", "multiple_choice_answer": answers[0],
                                "answers": _answers(answers)})
        header = {"info": {"description": "fixture"}, "license": {"name": "fixture"}, "task_type": "Open-Ended",
                  "data_type": "mscoco", "data_subtype": split}
        (root / questions_name.format(split)).write_text(json.dumps({**header, "questions": questions}))
        (root / annotations_name.format(split)).write_text(json.dumps({**header, "annotations": annotations}))
    return root


CAPTIONS = ["A red circle on a white background.", "a green square", "Two blue dots, side by side",
            "a yellow star above the line", "A purple shape.", "an orange and grey picture"]


def make_captions(root: Path, task: str, num_pool: int = 4, num_test: int = 3) -> Path:
    """Karpathy split JSON (with a "val" and a "restval" image that must be ignored) and its images."""
    images = []
    splits = ["train"] * num_pool + ["test"] * num_test + ["val", "restval"]
    for n, split in enumerate(splits):
        caption = CAPTIONS[n % len(CAPTIONS)]  # five annotators' variants of one caption per image
        variants = [caption, caption.lower(), caption.rstrip(".") + " here.", "a picture: " + caption, caption.upper()]
        sentences = [{"raw": variant, "tokens": []} for variant in variants]
        if task == "coco":
            folder = "train2014" if split == "train" else "val2014"
            name = f"COCO_{folder}_{n + 1:012d}.jpg"
            save_image(root / folder / name, n)
            images.append({"filepath": folder, "filename": name, "cocoid": n + 1, "imgid": n, "split": split,
                           "sentences": sentences})
        else:
            name = f"{1000 + n}.jpg"
            save_image(root / "flickr30k-images" / name, n)
            images.append({"filename": name, "imgid": n, "split": split, "sentences": sentences})
    name = "dataset_coco.json" if task == "coco" else "dataset_flickr30k.json"
    (root / name).write_text(json.dumps({"images": images, "dataset": task}))
    return root


CLASS_FOLDERS = ["n01440764", "n01443537", "n01484850"]
CLASS_NAMES = ["red thing", "green thing", "blue thing"]


def make_image_folder(root: Path, per_class_pool: int = 2, per_class_test: int = 1) -> Path:
    """train/<class>/ and val/<class>/ folders with classnames.txt; images of a class share its colour."""
    for split, count in (("train", per_class_pool), ("val", per_class_test)):
        for label, folder in enumerate(CLASS_FOLDERS):
            for k in range(count):
                save_image(root / split / folder / f"{split}_{label}_{k}.JPEG", label)
    (root / "classnames.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


MEME_TEXTS = ["have a nice day", "this is fine", "look at this", "good morning", "what a view", "hello there"]


def make_hateful_memes(root: Path, num_pool: int = 4, num_test: int = 4) -> Path:
    """img/*.png with train.jsonl and dev_seen.jsonl (labels 0/1, both present in each split)."""
    for name, count, offset in (("train.jsonl", num_pool, 0), ("dev_seen.jsonl", num_test, 20)):
        lines = []
        for n in range(count):
            meme_id = 10000 + offset + n
            save_image(root / "img" / f"{meme_id}.png", offset + n)
            lines.append(json.dumps({"id": meme_id, "img": f"img/{meme_id}.png", "label": n % 2,
                                     "text": MEME_TEXTS[(offset + n) % len(MEME_TEXTS)]}))
        (root / name).write_text("\n".join(lines) + "\n")
    return root


# video QA: one-word answers, the first of each split "red"; evaluated videos alternate, each asked two questions
VIDEO_QA = [("what is the man doing?", "red"), ("who is playing a guitar?", "man"), ("how many dogs run?", "two"),
            ("where is the cat?", "table"), ("what colour is the car?", "blue"), ("when does it rain?", "night")]
VIDEO_FRAMES = [6, 3, 5, 6, 3, 6]  # frames of the k-th video (at 10 fps): some fewer than the 4 the tests show


def write_colour_video(path: Path, index: int, frames: int) -> Path:
    """A short video whose frames are solid colours that depend on `index` (PyAV: tests/video_fixtures.py)."""
    from PIL import Image

    from .video_fixtures import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    base = COLOURS[index % len(COLOURS)]
    return write_video(path, [Image.new("RGB", (40, 30), tuple((c + 25 * k) % 256 for c in base))
                              for k in range(frames)])


def _video_qa_records(video_ids: list, first_id: int) -> list[dict]:
    """Two questions per video of `video_ids` (the first question of each)."""
    records = []
    for n, video_id in enumerate(video_ids):
        question, answer = VIDEO_QA[n % len(VIDEO_QA)]
        records.append({"answer": answer, "id": first_id + n, "question": question, "video_id": video_id})
    return records


def make_msvd_qa(root: Path, num_pool: int = 4, num_test: int = 4) -> Path:
    """
    MSVD-QA's official layout: train_qa.json / test_qa.json name videos by video_id N, youtube_mapping.txt maps
    "vidN" to a clip name, YouTubeClips/<clip name>.avi. Pool questions on videos 1..num_pool-1 (the last two share
    one), test questions on videos 20 and 21 in turn (6 and 3 frames).
    """
    pool_videos = [1 + min(n, num_pool - 2) for n in range(num_pool)]
    test_videos = [20 + n % 2 for n in range(num_test)]
    mapping = []
    for k, number in enumerate(sorted(set(pool_videos + test_videos))):
        clip = f"-{number}xYz_Clip_{5 * number}_{5 * number + 10}"
        write_colour_video(root / "YouTubeClips" / f"{clip}.avi", number, VIDEO_FRAMES[k % len(VIDEO_FRAMES)])
        mapping.append(f"{clip} vid{number}")
    (root / "youtube_mapping.txt").write_text("\n".join(mapping) + "\n")
    (root / "train_qa.json").write_text(json.dumps(_video_qa_records(pool_videos, 0)))
    (root / "test_qa.json").write_text(json.dumps(_video_qa_records(test_videos, 1000)))
    return root


def make_msrvtt_qa(root: Path, num_pool: int = 4, num_test: int = 4) -> Path:
    """
    MSRVTT-QA's official layout: train_qa.json / test_qa.json name videos by video_id N, the file video/videoN.mp4
    (train videos from 0, test videos from 7010, as MSR-VTT's split). Questions and frames as `make_msvd_qa`'s.
    """
    pool_videos = [min(n, num_pool - 2) for n in range(num_pool)]
    test_videos = [7010 + n % 2 for n in range(num_test)]
    for k, number in enumerate(sorted(set(pool_videos + test_videos))):
        write_colour_video(root / "video" / f"video{number}.mp4", number, VIDEO_FRAMES[k % len(VIDEO_FRAMES)])
    for name, videos, first_id in (("train_qa.json", pool_videos, 0), ("test_qa.json", test_videos, 1000)):
        records = [{**record, "category_id": 3} for record in _video_qa_records(videos, first_id)]
        (root / name).write_text(json.dumps(records))
    return root


def make_dataset(task: str, root: Path) -> Path:
    """The fixture of any task in `otter.eval.TASKS`."""
    if task in VQA_NAMES:
        return make_vqa(root, task)
    if task in ("coco", "flickr30k"):
        return make_captions(root, task)
    if task == "imagenet":
        return make_image_folder(root)
    if task == "hateful_memes":
        return make_hateful_memes(root)
    if task == "msvd_qa":
        return make_msvd_qa(root)
    if task == "msrvtt_qa":
        return make_msrvtt_qa(root)
    raise ValueError(f"no fixture for task {task!r}")
