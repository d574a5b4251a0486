"""
The benchmarks as one table: how each is read, prompted, decoded, post-processed and scored. The defaults are
OpenFlamingo 2.0.1's evaluation protocol; change one with `dataclasses.replace(TASKS["vqav2"], ...)` and pass the
`Task` to `otter.eval.evaluate`.
"""

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from otter.prompts import (
    CAPTION,
    CLASSIFICATION,
    HATEFUL_MEMES,
    OTTER_CHAT,
    OTTER_VIDEO_CHAT,
    VIDEO_QA,
    VQA,
    PromptTemplate,
)

from .datasets import (
    Benchmark,
    Example,
    load_captions,
    load_hateful_memes,
    load_image_folder,
    load_msrvtt_qa,
    load_msvd_qa,
    load_vqa,
)
from .metrics import (
    cider,
    exact_match,
    normalise_exact,
    overall_vqa_accuracy,
    postprocess_caption,
    postprocess_ok_vqa,
    postprocess_vqa,
    roc_auc,
    vqa_accuracy,
)
from .shapesworld import (
    load_shapesworld_binding,
    load_shapesworld_comparison,
    load_shapesworld_naming,
    load_shapesworld_video,
    load_shapesworld_vqa,
)

# A scorer takes the evaluated examples and their per-sample records (same order) and returns the score and one dict
# of per-sample metric values per example.
Scorer = Callable[[list[Example], list[dict]], tuple[float, list[dict]]]


def score_vqa(examples: list[Example], records: list[dict]) -> tuple[float, list[dict]]:
    accuracies = [vqa_accuracy(record["prediction"], example.target) for example, record in zip(examples, records)]
    return overall_vqa_accuracy(accuracies), [{"accuracy": accuracy} for accuracy in accuracies]


def score_cider(examples: list[Example], records: list[dict]) -> tuple[float, list[dict]]:
    score, per_image = cider({e.id: r["prediction"] for e, r in zip(examples, records)},
                             {e.id: e.target for e in examples})
    return score, [{"cider": per_image[example.id]} for example in examples]


def score_top1(examples: list[Example], records: list[dict]) -> tuple[float, list[dict]]:
    correct = [record["prediction"] == example.target for example, record in zip(examples, records)]
    return 100 * statistics.fmean(correct), [{"correct": flag} for flag in correct]


def score_exact_match(examples: list[Example], records: list[dict]) -> tuple[float, list[dict]]:
    """Percentage of predictions equal to the target string, both stripped and lower-cased (`exact_match`)."""
    correct = [exact_match(record["prediction"], example.target) for example, record in zip(examples, records)]
    return 100 * statistics.fmean(correct), [{"correct": flag} for flag in correct]


def score_roc_auc(examples: list[Example], records: list[dict]) -> tuple[float, list[dict]]:
    """Binary tasks ranked over ["no", "yes"]: the score of a sample is P("yes"), the softmax over both classes."""
    probabilities = []
    for record in records:
        logprobs = dict(record["top"])  # both classes: top_k = 2
        probabilities.append(1 / (1 + math.exp(logprobs["no"] - logprobs["yes"])))
    labels = [example.target for example in examples]
    return roc_auc(labels, probabilities), [{"probability": p} for p in probabilities]


@dataclass(frozen=True)
class Task:
    """
    name, metric: what the results call the task and its score.
    load: data_dir -> Benchmark (demonstration pool, evaluated split, class names).
    prompt: the template of one example (demonstrations and query alike).
    generation: `generate()` settings for open-ended tasks; None for ranking tasks, which score every class name
        (`Benchmark.class_names`, or a sample's own `Example.candidates`) by its mean per-token log-probability after
        the prompt (OpenFlamingo's score), the name tokenized after the template's `answer_lead`.
    postprocess: generated text -> prediction.
    score: see `Scorer`.
    zero_shot_demos: how many text-only demonstrations a 0-shot prompt carries (Flamingo's protocol; only the
        query's image is given).
    group_by: a key of the samples' `fields`; when set, the results also give the score of each group of samples.
    media: what `Example.image` holds, "image" files or "video" files (decoded and sampled to a number of frames;
        the prompt template marks them `<video>`).
    """

    name: str
    metric: str
    load: Callable[[Path], Benchmark]
    prompt: PromptTemplate
    score: Scorer
    generation: dict | None = None
    postprocess: Callable[[str], str] | None = None
    zero_shot_demos: int = 2
    top_k: int = 1  # ranking tasks: how many best classes each record keeps, as [name, mean log-prob] pairs
    group_by: str | None = None
    media: str = "image"

    @property
    def ranks_classes(self) -> bool:
        return self.generation is None


VQA_GENERATION = dict(num_beams=3, max_new_tokens=5, length_penalty=0.0)
CAPTION_GENERATION = dict(num_beams=3, max_new_tokens=20, length_penalty=0.0)


def _vqa_task(name: str, postprocess=postprocess_vqa, max_new_tokens: int = 5) -> Task:
    return Task(name=name, metric="VQA accuracy", load=partial(load_vqa, name), prompt=VQA, score=score_vqa,
                generation={**VQA_GENERATION, "max_new_tokens": max_new_tokens}, postprocess=postprocess)


def _caption_task(name: str) -> Task:
    return Task(name=name, metric="CIDEr", load=partial(load_captions, name), prompt=CAPTION, score=score_cider,
                generation=CAPTION_GENERATION, postprocess=postprocess_caption)


TASKS: dict[str, Task] = {
    "vqav2": _vqa_task("vqav2"),
    "ok_vqa": _vqa_task("ok_vqa", postprocess=postprocess_ok_vqa),
    "textvqa": _vqa_task("textvqa", max_new_tokens=10),
    "vizwiz": _vqa_task("vizwiz"),
    "coco": _caption_task("coco"),
    "flickr30k": _caption_task("flickr30k"),
    # OpenFlamingo 2.0.1 joins classification demonstrations with no separator (evaluate_classification)
    "imagenet": Task(name="imagenet", metric="top-1 accuracy", load=load_image_folder,
                     prompt=CLASSIFICATION, score=score_top1, top_k=5),
    "hateful_memes": Task(name="hateful_memes", metric="ROC AUC", load=load_hateful_memes, prompt=HATEFUL_MEMES,
                          score=score_roc_auc, top_k=2),
}


# ShapesWorld (otter.shapesworld), held-out sets written by otter.eval.shapesworld.write_eval_sets: Otter's chat
# format exactly as training writes it, each sample's own demonstrations, no demonstrations at all at 0 shots.
TASKS["shapesworld_vqa"] = Task(
    name="shapesworld_vqa", metric="exact-match accuracy", load=load_shapesworld_vqa, prompt=OTTER_CHAT,
    score=score_exact_match, generation=dict(num_beams=1, max_new_tokens=8), postprocess=normalise_exact,
    zero_shot_demos=0, group_by="kind")
TASKS["shapesworld_binding"] = Task(
    name="shapesworld_binding", metric="top-1 accuracy", load=load_shapesworld_binding,
    prompt=OTTER_CHAT, score=score_top1, zero_shot_demos=0, top_k=2)
TASKS["shapesworld_comparison"] = Task(
    name="shapesworld_comparison", metric="exact-match accuracy", load=load_shapesworld_comparison,
    prompt=OTTER_CHAT, score=score_exact_match, generation=dict(num_beams=1, max_new_tokens=48),
    postprocess=normalise_exact, zero_shot_demos=0)
# the in-context names generated, not ranked: the model must write a word it has seen only in the prompt
NAME_GENERATION = dict(num_beams=1, max_new_tokens=12)
TASKS["shapesworld_binding_generation"] = Task(
    name="shapesworld_binding_generation", metric="exact-match accuracy", load=load_shapesworld_binding,
    prompt=OTTER_CHAT, score=score_exact_match, generation=NAME_GENERATION, postprocess=normalise_exact,
    zero_shot_demos=0)
# clips (mp4 files of otter.shapesworld.ShapesWorld.clip), shown as videos of their frames, as training shows them
TASKS["shapesworld_video"] = Task(
    name="shapesworld_video", metric="exact-match accuracy", load=load_shapesworld_video, prompt=OTTER_VIDEO_CHAT,
    score=score_exact_match, generation=dict(num_beams=1, max_new_tokens=8), postprocess=normalise_exact,
    zero_shot_demos=0, group_by="kind", media="video")
TASKS["shapesworld_naming"] = Task(
    name="shapesworld_naming", metric="top-1 accuracy", load=load_shapesworld_naming, prompt=OTTER_VIDEO_CHAT,
    score=score_top1, zero_shot_demos=0, top_k=2, media="video")
TASKS["shapesworld_naming_generation"] = Task(
    name="shapesworld_naming_generation", metric="exact-match accuracy", load=load_shapesworld_naming,
    prompt=OTTER_VIDEO_CHAT, score=score_exact_match, generation=NAME_GENERATION, postprocess=normalise_exact,
    zero_shot_demos=0, media="video")


# Video QA (Xu et al., 2017): VQA's prompt, demonstrations, zero-shot protocol, decoding and post-processing, a video
# in place of the image; accuracy by exact match with the one-word answer, also per question type (what, who, ...).
def _video_qa_task(name: str, load: Callable[[Path], Benchmark]) -> Task:
    return Task(name=name, metric="exact-match accuracy", load=load, prompt=VIDEO_QA, score=score_exact_match,
                generation=VQA_GENERATION, postprocess=postprocess_vqa, group_by="type", media="video")


TASKS["msvd_qa"] = _video_qa_task("msvd_qa", load_msvd_qa)
TASKS["msrvtt_qa"] = _video_qa_task("msrvtt_qa", load_msrvtt_qa)


def get_task(task: "str | Task") -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task]
