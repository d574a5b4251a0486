"""
The few-shot evaluator: builds each sample's prompt from its demonstrations, runs the model in left-padded batches
(generation, or ranking of class names on a reused KV cache), appends every sample's result to a log as it goes (an
interrupted run resumes where it stopped), and writes the per-shot scores, per-sample predictions and a Markdown
summary. The media of a task are image files, or video files decoded and sampled to a number of frames.
"""

import json
import logging
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from otter.chat import input_device
from otter.processing_otter import load_image
from otter.prompts import IMAGE_TOKEN, VIDEO_TOKEN, PromptTemplate, with_images
from otter.video import read_video

from .datasets import Benchmark, Example
from .demos import ImageEmbedder, random_demos, rices_demos
from .fingerprint import (
    benchmark_images,
    data_fingerprint,
    image_sizes,
    processor_fingerprint,
    video_settings,
    weights_fingerprint,
)
from .tasks import Task, get_task

logger = logging.getLogger(__name__)

DEFAULT_FRAMES = 8  # a video's frames when neither the caller nor the processor says (at most the model's)


# -- model calls -----------------------------------------------------------------------------------------------------
def _image_key(image):
    """An image file by its path (a str and a Path of one file are one image), a PIL image by its identity."""
    return str(image) if isinstance(image, (str, os.PathLike)) else id(image)


class ImageFeatureCache:
    """
    The perceiver latents of image (or video) files that later batches of an evaluation pass show again, each kept
    until its last use: a demonstration drawn for many samples runs through the vision tower and perceiver once per
    pass, not once per batch (and a video is decoded once per pass). `uses` are the media the pass will show (paths,
    one entry per showing); at most `max_images` are held at a time (a further one is encoded again when shown again),
    or with `max_images=None` every one that has uses left: a medium's latents, `(num_latents, dim)`, are far smaller
    than its decoded frames.
    """

    def __init__(self, uses: Iterable, max_images: int | None = 2048):
        self.remaining = Counter(_image_key(image) for image in uses if isinstance(image, (str, os.PathLike)))
        self.max_images = max_images
        self.features = {}

    def get(self, key):
        return self.features.get(key)

    def shown(self, key, features: torch.Tensor, times: int) -> None:
        """`key` (whose latents are `features`) was shown `times` times by a batch: keep it while it has uses left."""
        if key not in self.remaining:
            return
        self.remaining[key] -= times
        if self.remaining[key] <= 0:
            del self.remaining[key]
            self.features.pop(key, None)
        elif key not in self.features and (self.max_images is None or len(self.features) < self.max_images):
            self.features[key] = features.clone()  # not a view that would keep its whole batch alive


def _pixel_values(image_processor, image) -> torch.Tensor:
    """One image (a path or a PIL image), loaded and preprocessed: `(C, H, W)`."""
    return image_processor([load_image(image)], return_tensors="pt")["pixel_values"][0]


def _video_pixel_values(image_processor, video, num_frames: int) -> torch.Tensor:
    """
    One video file, decoded (PyAV), sampled uniformly to `num_frames` frames, first and last included (every frame of
    a shorter video), each preprocessed as an image, as the processor does: `(frames, C, H, W)`.
    """
    return image_processor(read_video(video, num_frames=num_frames), return_tensors="pt")["pixel_values"]


def _load_medium(image_processor, medium, num_frames: int | None) -> torch.Tensor:
    """An image `(C, H, W)`, or with `num_frames` set a video `(frames, C, H, W)`, loaded and preprocessed."""
    if num_frames is None:
        return _pixel_values(image_processor, medium)
    return _video_pixel_values(image_processor, medium, num_frames)


class ImagePrefetcher:
    """
    Loads and preprocesses the images (or, with `num_frames`, the videos, sampled to that many frames) of the next
    batch in background threads while the model runs the current one (decoding and resizing release the GIL). On a
    GPU, an evaluation that loads its media between batches spends most of its time there.
    """

    def __init__(self, image_processor, workers: int | None = None, num_frames: int | None = None):
        self.image_processor = image_processor
        self.num_frames = num_frames
        self.pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1), thread_name_prefix="otter-images")

    def submit(self, images: Iterable, skip=lambda key: False) -> dict:
        """Start on each distinct medium (by `_image_key`) that `skip(key)` does not rule out: key -> Future of its
        pixel values."""
        futures = {}
        for image in images:
            key = _image_key(image)
            if key not in futures and not skip(key):
                futures[key] = self.pool.submit(_load_medium, self.image_processor, image, self.num_frames)
        return futures

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.pool.shutdown(wait=True, cancel_futures=True)


@torch.no_grad()
def encode_batch(model, processor, texts: list[str], images: list[list],
                 cache: ImageFeatureCache | None = None, pixels: Mapping[object, Future] | None = None,
                 num_frames: int | None = None) -> dict:
    """
    Left-padded `input_ids`, `attention_mask` `(B, T)` and the cross-attention `media_key_values`
    `(B, blocks, media * latents, 2 * heads * dim_head)` of a batch. `images[b]` are the images (paths or PIL images)
    of sample b in `<image>` order, with the same count for every sample; with `num_frames` set they are video files
    (marked `<video>` or `<image>` in the text), each decoded and sampled uniformly to `num_frames` frames (fewer for a
    shorter video: videos of different frame counts go through the model's `frame_mask`). Each distinct medium of the
    batch (by path, or by object for PIL images) runs through the vision tower and perceiver once, however many
    samples show it, and not at all when `cache` holds its latents from an earlier batch. `pixels` (from
    `ImagePrefetcher.submit`) holds media already being loaded; the others are loaded here.
    """
    counts = {len(sample) for sample in images}
    if len(counts) != 1:
        raise ValueError(f"every sample of a batch must hold the same number of images, got {sorted(counts)}")
    tokenizer = processor.tokenizer
    # the model reads a video's marker as <image>, as the processor writes it
    token_ids = tokenizer([text.replace(VIDEO_TOKEN, IMAGE_TOKEN) for text in texts])["input_ids"]
    batch = tokenizer.pad({"input_ids": token_ids}, padding="longest", padding_side="left", return_tensors="pt")
    keys = [[_image_key(image) for image in sample] for sample in images]
    unique = {}
    for sample, sample_keys in zip(images, keys):
        for image, key in zip(sample, sample_keys):
            unique.setdefault(key, image)
    known = {key: cache.get(key) for key in unique} if cache is not None else {}
    known = {key: features for key, features in known.items() if features is not None}
    new = [key for key in unique if key not in known]
    if new:
        pixels = pixels or {}
        loaded = [pixels[key].result() if key in pixels else
                  _load_medium(processor.image_processor, unique[key], num_frames) for key in new]
        pixel_values, frame_mask = _media_pixel_values(loaded)
        encoded = model.get_image_features(pixel_values.to(model.device),  # (N, 1, latents, dim)
                                           None if frame_mask is None else frame_mask.to(model.device))[:, 0]
        known.update(zip(new, encoded))
    features = torch.stack([known[key] for key in unique])  # (U, latents, dim)
    if cache is not None:
        times = Counter(key for sample_keys in keys for key in sample_keys)
        for key in unique:
            cache.shown(key, known[key], times[key])
    position = {key: index for index, key in enumerate(unique)}
    index = torch.tensor([[position[key] for key in sample_keys] for sample_keys in keys], device=features.device)
    device = input_device(model)  # where the input embeddings run (with a device map, not the vision tower's)
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "media_key_values": model.get_media_key_values(features[index]),  # features[index]: (B, media, latents, dim)
    }


def _media_pixel_values(loaded: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Loaded media (images `(C, H, W)`, videos `(frames, C, H, W)`) -> `pixel_values` `(N, 1, frames, C, H, W)`, each
    medium its own sample, zeros after a shorter video's frames, and the `frame_mask` `(N, 1, frames)` of its real
    frames when their counts differ (None when they do not).
    """
    frames = [item if item.ndim == 4 else item[None] for item in loaded]  # an image is one frame
    counts = [item.shape[0] for item in frames]
    if len(set(counts)) == 1:
        return torch.stack(frames)[:, None], None
    pixel_values = frames[0].new_zeros(len(frames), 1, max(counts), *frames[0].shape[1:])
    frame_mask = torch.zeros(len(frames), 1, max(counts), dtype=torch.long)
    for index, (item, count) in enumerate(zip(frames, counts)):
        pixel_values[index, 0, :count] = item
        frame_mask[index, 0, :count] = 1
    return pixel_values, frame_mask


@torch.no_grad()
def rank_classes(model, inputs: dict, class_token_ids: list[list[int]], classes_per_forward: int = 16) -> torch.Tensor:
    """
    The mean per-token log-probability of each class name continuing each prompt: `(B, num_classes)`.

    The prompt runs once; its KV cache is repeated for `classes_per_forward` classes at a time, the class tokens
    run against it, and the cache is cropped back to the prompt for the next classes. Class tokens are right-padded
    within a group (padding comes after them, so causal attention keeps it out of their scores).
    """
    input_ids, attention_mask, media_key_values = inputs["input_ids"], inputs["attention_mask"], inputs["media_key_values"]
    batch = input_ids.shape[0]
    prompt = model(input_ids=input_ids, attention_mask=attention_mask, media_key_values=media_key_values,
                   use_cache=True, logits_to_keep=1)
    first_token_logprobs = prompt.logits[:, -1].float().log_softmax(-1)  # (B, vocab): predicts each class's 1st token
    cache = prompt.cache
    group = min(classes_per_forward, len(class_token_ids))
    cache.batch_repeat_interleave(group)  # row b * group + j: sample b, j-th class of the group
    rows_mask = attention_mask.repeat_interleave(group, 0)
    rows_media = media_key_values.repeat_interleave(group, 0)
    rows_image = model.media_index(input_ids)[:, -1].repeat_interleave(group, 0)  # class tokens read the query image
    rows_first = first_token_logprobs.repeat_interleave(group, 0)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    scores = []
    for start in range(0, len(class_token_ids), group):
        classes = class_token_ids[start:start + group]
        classes = classes + [classes[0]] * (group - len(classes))  # the last group is filled up, its extra rows dropped
        length = max(len(tokens) for tokens in classes)
        tokens = torch.tensor([t + [pad_id] * (length - len(t)) for t in classes], device=input_ids.device)
        tokens_mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in classes], device=input_ids.device)
        tokens, tokens_mask = tokens.repeat(batch, 1), tokens_mask.repeat(batch, 1)  # (B * group, length)
        logits = model(input_ids=tokens, attention_mask=torch.cat([rows_mask, tokens_mask], 1), cache=cache,
                       media_key_values=rows_media, media_index=rows_image[:, None].expand(-1, length),
                       use_cache=True).logits.float()  # (B * group, length, vocab)
        cache.crop(-length)
        # token t is predicted by position t - 1 of this pass, token 0 by the prompt's last position
        logprobs = torch.cat([rows_first[:, None], logits[:, :-1].log_softmax(-1)], 1)
        token_logprobs = logprobs.gather(-1, tokens[..., None]).squeeze(-1) * tokens_mask
        mean = token_logprobs.sum(1) / tokens_mask.sum(1)
        scores.append(mean.view(batch, group)[:, :len(class_token_ids[start:start + group])])
    return torch.cat(scores, 1)


# -- prompts ---------------------------------------------------------------------------------------------------------
def _with_images(template: PromptTemplate, text: str, count: int, example: Example) -> str:
    """`text`, one turn of `template`, showing the turn's `count` images as training does (`with_images`)."""
    if count == 1:
        return text
    if template.template.count(IMAGE_TOKEN) != 1 or not text.startswith(IMAGE_TOKEN):
        raise ValueError(f"sample {example.id!r} shows {count} images, but the prompt template {template.template!r} "
                         f"does not start with a single {IMAGE_TOKEN}")
    return with_images(text, count)


def build_prompt(task: Task, example: Example, demos: list[Example], shots: int) -> tuple[str, list]:
    """
    A sample's prompt and its images: every demo filled in (`PromptTemplate.demo`) and followed by the template's
    separator, then the query cut before its answer (`PromptTemplate.query`), as `otter.prompts.few_shot_prompt` does.
    A turn with several images (`Example.image` a tuple) shows each before its own label, as in training
    (`otter.prompts.with_images`). With `shots == 0` the demos are text-only (their `<image>` or `<video>` removed)
    and only the query's images are given: OpenFlamingo's zero-shot protocol.
    """
    template = task.prompt
    context = "".join(_with_images(template, template.demo(**demo.fields), len(demo.images), demo) + template.separator
                      for demo in demos)
    if shots == 0:
        context = context.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "")
    text = context + _with_images(template, template.query(**example.fields), len(example.images), example)
    images = ([image for demo in demos for image in demo.images] if shots > 0 else []) + list(example.images)
    return text, images


# -- the resumable per-sample log ------------------------------------------------------------------------------------
# settings whose change is described in words rather than by their values (fingerprints)
_CHANGED = {
    "weights": "the model's weights changed",
    "processor": "the processor changed (its tokenizer or image preprocessing)",
    "data": "the data set changed (its samples' annotations, or the sizes of their image or video files)",
}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe_change(key: str, logged, now) -> str:
    if key in _CHANGED:
        return _CHANGED[key]
    if key == "rices" and isinstance(logged, str) and isinstance(now, str):
        return "the RICES encoder changed (its weights or settings)"
    if key == "rices":
        return f"RICES changed ({'on' if logged else 'off'} in the log, {'on' if now else 'off'} now)"
    return f"{key} changed ({_short(logged)} in the log, {_short(now)} now)"


def _check_log(path: Path, settings: dict, partial: bool = False) -> None:
    """
    Refuse the log at `path`, if there is one, unless it was made with `settings` (all its settings, or with
    `partial` those of `settings` only: what is known before the model is loaded), saying what changed.
    """
    if not path.exists():
        return
    if path.is_dir():
        raise ValueError(f"{path} is a directory; the per-sample log is written there (choose another --out)")
    with open(path, "rb") as file:
        first = file.readline()
    if not first.endswith(b"\n"):  # stopped while writing the settings line: a fresh log
        return
    try:
        logged = json.loads(first.decode("utf-8")).get("settings")
    except (ValueError, AttributeError):
        logged = None
    start_fresh = "remove it to start fresh, or choose another --out"
    if not isinstance(logged, dict):
        raise ValueError(f"{path} is not an evaluation log of otter eval (its first line holds no settings); "
                         f"{start_fresh}")
    if "weights" not in logged:
        raise ValueError(f"{path} was written by an earlier version of Otter, which recorded the model's path rather "
                         f"than its weights: its results cannot be checked against this run; {start_fresh}")
    keys = list(settings) if partial else list(dict.fromkeys([*settings, *logged]))
    changed = [_describe_change(key, logged.get(key), settings.get(key)) for key in keys
               if logged.get(key) != settings.get(key)]
    if changed:
        raise ValueError(f"{path} holds the results of another evaluation ({'; '.join(changed)}); {start_fresh}")


def _read_records(path: Path, repair: bool = True) -> dict:
    """
    The records already in the log at `path` (its settings checked by `_check_log`), keyed by (shots, trial, sample
    id). A partial last line, left by a run stopped while writing it, is ignored, and with `repair` dropped from the
    file.
    """
    if not path.exists():
        return {}
    content = path.read_bytes()
    if not content.endswith(b"\n") and content:
        content = content[: content.rfind(b"\n") + 1]  # nothing at all if it was the settings line
        if repair:
            logger.warning("%s: dropping an incomplete last line left by an interrupted run", path)
            path.write_bytes(content)
    records = {}
    for number, line in enumerate(content.split(b"\n")[1:-1], 2):
        try:
            record = json.loads(line.decode("utf-8"))
            records[(record["shots"], record["trial"], record["id"])] = record
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} line {number} is not a sample's record ({error}): the log is damaged; remove it "
                             "to start fresh, or choose another --out") from None
    if records:
        logger.info("%s: resuming with %d samples already evaluated", path, len(records))
    return records


# -- checks made before the model is involved ------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    """`out` (and the files written beside it) must be files that can be written: refused now, not after the run."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; expected the results file to write (e.g. {out / 'results.json'})")
    for path in (out.with_suffix(".md"), out.with_suffix(".samples.jsonl")):
        if path.is_dir():
            raise ValueError(f"--out {out}: {path}, where the run writes beside it, is a directory")
    for folder in (out.parent, *out.parent.parents):  # the nearest one that exists is created in, or written in
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out {out}: {folder} is not a directory")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"--out {out}: {folder} is not writable")
            break


def _check_images(sizes: Mapping[str, int | None], images: Iterable, what: str, media: str = "image") -> None:
    """Every image (or video: `media`) of `images` is a file (by `sizes`, from `image_sizes`); else one error counting
    and naming the missing ones."""
    missing = [image for image in dict.fromkeys(str(image) for image in images) if sizes.get(image) is None]
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        files = f"{media} file" if len(missing) == 1 else f"{media} files"
        raise ValueError(f"{len(missing)} {files} {what} {'is' if len(missing) == 1 else 'are'} missing (or not a "
                         f"file): {listed} (see the dataset layouts in eval/README.md)")


# -- the evaluation --------------------------------------------------------------------------------------------------
def evaluation_processes() -> PartialState:
    """
    This process among those `accelerate launch` (or torchrun) started, or the only one. Without an accelerator (or
    with ACCELERATE_USE_CPU set, as `accelerate launch --cpu` sets it) the processes meet over gloo on the CPU.
    """
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or torch.accelerator.current_accelerator() is None)


class Evaluation:
    """
    An evaluation prepared and checked before any model is involved (what `otter eval` does before it loads the
    model), then run on a model with `run`: the arguments are checked; the data set is loaded and fingerprinted;
    every image or video the run will show (every image RICES embeds, with `rices`) is checked to be a file; `out` is
    checked to be a file that can be written; a per-sample log made with other data or task settings is refused. The
    arguments are `evaluate`'s.
    """

    def __init__(
        self,
        task: "str | Task",
        data_dir: str | os.PathLike,
        out: str | os.PathLike,
        shots: Sequence[int] = (0, 4, 8),
        trials: int = 1,
        seed: int = 42,
        rices: bool = False,
        rices_cache: str | os.PathLike | None = None,
        batch_size: int = 8,
        num_samples: int | None = None,
        query_set_size: int = 2048,
        classes_per_forward: int = 16,
        num_frames: int | None = None,
    ):
        task = get_task(task)
        shots = list(shots)
        if not shots or any(not isinstance(n, int) or n < 0 for n in shots):
            raise ValueError(f"shots must be a non-empty list of integers >= 0, got {shots}")
        for name, value in (("trials", trials), ("batch_size", batch_size),
                            ("classes_per_forward", classes_per_forward), ("query_set_size", query_set_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if rices and trials > 1:
            raise ValueError(f"RICES picks the same demonstrations in every trial; use trials=1 with rices=True, got "
                             f"{trials}")
        if task.media not in ("image", "video"):
            raise ValueError(f"task {task.name}: media must be 'image' or 'video', got {task.media!r}")
        if num_frames is not None:
            if task.media != "video":
                raise ValueError(f"num_frames is how many frames of a video are shown; {task.name} shows images")
            if not isinstance(num_frames, int) or num_frames < 1:
                raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
        if task.media == "video":
            if rices:
                raise ValueError(f"RICES retrieves demonstrations by image similarity, and {task.name} shows videos; "
                                 "run without rices (random demonstrations)")
            try:
                import av  # noqa: F401
            except ImportError:
                raise ValueError(f"{task.name} shows videos, which are decoded with PyAV, not installed: "
                                 "pip install 'otter-flamingo[video]'") from None
        if task.postprocess is not None:
            task.postprocess("")  # fail now, not after the first batch, if post-processing lacks something (NLTK data)
        out = Path(out)
        _check_out(out)
        rices_cache = Path(rices_cache) if rices_cache is not None else out.parent / "rices_cache"
        if rices and rices_cache.exists() and not rices_cache.is_dir():
            raise ValueError(f"the RICES cache {rices_cache} is a file; expected a folder")

        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise ValueError(f"data folder {data_dir} {'is not a folder' if data_dir.exists() else 'does not exist'} "
                             "(see the dataset layouts in eval/README.md)")
        data_dir = data_dir.resolve()
        try:
            benchmark = task.load(data_dir)
        except (KeyError, IndexError, TypeError) as error:
            raise ValueError(f"{task.name}: the files under {data_dir} are not in the layout eval/README.md documents "
                             f"({type(error).__name__}: {error})") from error
        test = benchmark.test
        if num_samples is not None:
            if not 0 < num_samples <= len(test):
                raise ValueError(f"num_samples must be in [1, {len(test)}] (the split's size), got {num_samples}")
            test = [test[i] for i in sorted(random.Random(seed).sample(range(len(test)), num_samples))]
        own_demos = sum(example.demos is not None for example in test)
        if not test or (not benchmark.pool and own_demos < len(test)):
            raise ValueError(f"{task.name}: {len(test)} samples to evaluate and {len(benchmark.pool)} demonstrations "
                             f"under {data_dir}; both must be non-empty (unless every sample has demonstrations of its "
                             "own)")
        if own_demos:
            if rices:
                raise ValueError(f"{task.name}: its samples under {data_dir} have demonstrations of their own; RICES "
                                 "does not apply (run without rices)")
            if own_demos == len(test) and trials > 1:
                raise ValueError(f"{task.name}: every sample has demonstrations of its own, the same in every trial; "
                                 f"use trials=1, got {trials}")
            for num_shots in shots:
                needed = num_shots or task.zero_shot_demos
                for example in test:
                    if example.demos is not None and len(example.demos) < needed:
                        raise ValueError(f"{task.name}: sample {example.id!r} has {len(example.demos)} demonstrations "
                                         f"of its own, but a {num_shots}-shot prompt needs {needed}")
        if task.ranks_classes and benchmark.class_names is None:
            lacking = [example.id for example in test if example.candidates is None]
            if lacking:
                raise ValueError(f"{task.name} ranks class names, but the data under {data_dir} has no class names "
                                 f"and sample {lacking[0]!r} has no candidates")

        self.task, self.benchmark, self.test, self.own_demos = task, benchmark, test, own_demos
        self.data_dir, self.out, self.log_path = data_dir, out, out.with_suffix(".samples.jsonl")
        self.shots, self.trials, self.seed, self.query_set_size = shots, trials, seed, query_set_size
        self.rices, self.rices_cache = rices, rices_cache
        self.batch_size, self.classes_per_forward, self.num_frames = batch_size, classes_per_forward, num_frames
        sizes = image_sizes(benchmark_images(benchmark))  # the videos' sizes, for a video task
        # what determines the results, but for the model: a log made with other settings is refused before it loads
        self.data_settings = json.loads(json.dumps({
            "task": task.name, "data": data_fingerprint(benchmark, data_dir, sizes), "seed": seed,
            "num_samples": num_samples, "query_set_size": query_set_size,
            "prompt": [task.prompt.template, task.prompt.separator], "zero_shot_demos": task.zero_shot_demos,
            "generation": task.generation, "classes": benchmark.class_names,
            # a video task's frames, when given: otherwise the processor's, known once it is loaded (`run`)
            **(video_settings(num_frames) if num_frames is not None else {}),
        }))
        for path in [self.log_path, *self.rank_logs()]:
            _check_log(path, self.data_settings, partial=True)
        logger.info("%s: %d samples to evaluate, %d demonstrations to draw from, %d samples with their own",
                    task.name, len(test), len(benchmark.pool), own_demos)
        if rices:  # every image is embedded; the demonstrations follow from the embeddings, in `run`
            _check_images(sizes, [image for example in [*test, *benchmark.pool] for image in example.images],
                          "RICES embeds")
        else:
            _check_images(sizes, self._shown_images(), "this run shows", task.media)

    def rank_logs(self) -> list[Path]:
        """The per-sample logs of processes other than the main one (`<out>.samples.rank<N>.jsonl`), left by a
        multi-process run until it merges them into the main log at its end (or by one that was interrupted)."""
        pattern = self.log_path.name.removesuffix(".jsonl") + ".rank*.jsonl"
        return sorted(path for path in self.log_path.parent.glob(pattern)
                      if path.name.removeprefix(self.log_path.stem + ".rank").removesuffix(".jsonl").isdigit())

    def _log_of(self, rank: int) -> Path:
        return self.log_path if rank == 0 else self.log_path.with_suffix(f".rank{rank}.jsonl")

    def _plan(self, num_shots: int, trial: int, most_similar=None) -> list[list[Example]]:
        """The demonstrations of every evaluated sample in one pass: its own, RICES's or random ones."""
        demos_per_sample = num_shots or self.task.zero_shot_demos
        plan = None
        if most_similar is not None:
            plan = [row[len(row) - demos_per_sample:] for row in most_similar]
        elif self.own_demos < len(self.test):
            plan = random_demos(len(self.benchmark.pool), len(self.test), demos_per_sample, self.seed + trial,
                                self.query_set_size)
        return [list(example.demos[:demos_per_sample]) if example.demos is not None
                else [self.benchmark.pool[j] for j in plan[i]] for i, example in enumerate(self.test)]

    def _shown_images(self) -> Iterable:
        """Every image the prompts of every pass show (a 0-shot prompt shows only its query's)."""
        yield from (image for example in self.test for image in example.images)
        for num_shots in self.shots:
            if num_shots == 0:
                continue
            for trial in range(self.trials):
                demos = {id(demo): demo for sample in self._plan(num_shots, trial) for demo in sample}
                yield from (image for demo in demos.values() for image in demo.images)

    def _video_frames(self, model, processor) -> int:
        """How many frames of each video are shown: `num_frames`, else the processor's, else `DEFAULT_FRAMES` (at
        most the model's `max_num_frames`)."""
        most = getattr(model.config, "max_num_frames", None)
        num_frames, source = self.num_frames, "num_frames"
        if num_frames is None and getattr(processor, "num_frames", None):
            num_frames, source = processor.num_frames, "the processor's num_frames"
        if num_frames is None:
            num_frames = min(DEFAULT_FRAMES, most or DEFAULT_FRAMES)
        if most is not None and num_frames > most:
            raise ValueError(f"{source} is {num_frames}, but this model takes at most {most} frames per video (its "
                             "config's max_num_frames)")
        return num_frames

    def run(self, model, processor, rices_encoder=None) -> dict:
        """Evaluate `model` with `processor` (see `evaluate`) and write the results; returns them."""
        task, benchmark, test, out = self.task, self.benchmark, self.test, self.out
        num_frames = self._video_frames(model, processor) if task.media == "video" else None
        embed = None
        if self.rices:
            vision_model, image_processor = rices_encoder or (model.vision_model, processor.image_processor)
            embed = ImageEmbedder(vision_model, image_processor, cache_dir=self.rices_cache)
        # the resume key: everything that determines the results (the paths of the model and data are not)
        settings = {
            "task": task.name, "weights": weights_fingerprint(model), "processor": processor_fingerprint(processor),
            "dtype": str(model.dtype).removeprefix("torch."), "device": model.device.type,
            **self.data_settings, **(video_settings(num_frames) if num_frames is not None else {}),
            "rices": embed.fingerprint if embed else False,
        }
        # one process, or N launched by accelerate / torchrun: each runs every N-th batch of a pass and logs its
        # records to a log of its own; all of them read every log at the end of each pass
        processes = evaluation_processes()
        rank, world = processes.process_index, processes.num_processes
        with processes.main_process_first():  # the main process repairs a log cut short before the others read it
            for path in [self.log_path, *self.rank_logs()]:
                _check_log(path, settings)
            done = {key: record for path in [self.log_path, *self.rank_logs()]
                    for key, record in _read_records(path).items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        most_similar = None
        if embed:  # each sample's most similar pool examples, enough for the largest shot count, most similar last
            with processes.main_process_first():  # computed once, by the main process; the others read its cache
                most_similar = rices_demos(embed([example.image for example in test]),
                                           embed([example.image for example in benchmark.pool]),
                                           max(n or task.zero_shot_demos for n in self.shots), device=model.device)

        class_token_ids = None
        if task.ranks_classes and benchmark.class_names is not None:
            class_token_ids = _class_token_ids(processor, benchmark.class_names, task.prompt)

        results = []
        log_path = self._log_of(rank)
        fresh_log = not log_path.exists() or log_path.stat().st_size == 0
        with (open(log_path, "a", encoding="utf-8") as log,
              ImagePrefetcher(processor.image_processor, num_frames=num_frames) as prefetcher):
            if fresh_log:
                log.write(json.dumps({"settings": settings}) + "\n")
                log.flush()
            for num_shots in self.shots:
                trial_results = []
                for trial in range(self.trials):
                    demos = self._plan(num_shots, trial, most_similar)
                    started = time.perf_counter()
                    todo = [i for i, example in enumerate(test) if (num_shots, trial, example.id) not in done]
                    # the batches a single process would run, every world-th one here: the same batches, so the same
                    # results, however many processes share them
                    batches = [todo[start:start + self.batch_size]
                               for start in range(0, len(todo), self.batch_size)][rank::world]
                    prompts = {i: build_prompt(task, test[i], demos[i], num_shots) for batch in batches for i in batch}
                    # a video's latents are kept until its last use: each video is decoded once per pass
                    cache = ImageFeatureCache((image for _, images in prompts.values() for image in images),
                                              max_images=None if num_frames else 2048)
                    upcoming = None
                    # closed on an error too, so that the error's message starts a line of its own
                    with tqdm(total=len(test), initial=len(test) - len(todo), unit="sample",
                              desc=f"{task.name} {num_shots}-shot trial {trial}",
                              disable=not processes.is_main_process) as progress:
                        for position, indices in enumerate(batches):
                            # this batch's images were started on while the previous batch ran; start on the next
                            # one's, but for those this batch shows (it caches them when they are shown again) or the
                            # cache holds
                            current = (upcoming if upcoming is not None else
                                       prefetcher.submit(image for i in indices for image in prompts[i][1]))
                            upcoming = None if position + 1 == len(batches) else prefetcher.submit(
                                (image for i in batches[position + 1] for image in prompts[i][1]),
                                skip=lambda key: key in current or cache.get(key) is not None)
                            records = _run_batch(model, processor, task, benchmark, [test[i] for i in indices],
                                                 [demos[i] for i in indices], [prompts[i] for i in indices], cache,
                                                 current, class_token_ids, self.classes_per_forward, num_frames)
                            for record in records:
                                record.update(shots=num_shots, trial=trial)
                                log.write(json.dumps(record) + "\n")
                                done[(num_shots, trial, record["id"])] = record
                            log.flush()
                            progress.update(len(indices) * world)
                    if world > 1:  # every process's records of this pass, read by every process
                        processes.wait_for_everyone()
                        for other in range(world):
                            if other != rank:
                                done.update(_read_records(self._log_of(other), repair=False))
                    records = [done[(num_shots, trial, example.id)] for example in test]
                    score, per_sample = task.score(test, records)
                    trial_results.append({"seed": None if self.rices else self.seed + trial, "score": score,
                                          "predictions": [{**r, **extra} for r, extra in zip(records, per_sample)]})
                    if task.group_by is not None:
                        trial_results[-1]["groups"] = _group_scores(task, test, records)
                    logger.info("%s %d-shot trial %d: %s %.2f (%d samples evaluated in %.2f s)", task.name, num_shots,
                                trial, task.metric, score, len(todo), time.perf_counter() - started)
                scores = [trial["score"] for trial in trial_results]
                results.append({"shots": num_shots, "mean": statistics.fmean(scores), "std": statistics.pstdev(scores),
                                "trials": trial_results})
                if task.group_by is not None:
                    results[-1]["groups"] = {group: statistics.fmean(trial["groups"][group] for trial in trial_results)
                                             for group in trial_results[0]["groups"]}

            if world > 1:  # every process has read the others' logs
                processes.wait_for_everyone()
            if processes.is_main_process:  # one log again: the other processes' records join the main one
                for path in self.rank_logs():
                    log.writelines(json.dumps(record) + "\n" for record in _read_records(path, repair=False).values())
                    log.flush()
                    path.unlink()

        report = {"task": task.name, "metric": task.metric, "model": str(getattr(model, "name_or_path", "") or ""),
                  "data_dir": str(self.data_dir), "settings": settings, "results": results}
        if task.group_by is not None:
            report["group_by"] = task.group_by
        if processes.is_main_process:
            with open(out, "w", encoding="utf-8") as file:
                json.dump(report, file, indent=1)
            out.with_suffix(".md").write_text(markdown_summary(report), encoding="utf-8")
        return report


def evaluate(
    model,
    processor,
    task: "str | Task",
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    shots: Sequence[int] = (0, 4, 8),
    trials: int = 1,
    seed: int = 42,
    rices: bool = False,
    rices_encoder=None,
    rices_cache: str | os.PathLike | None = None,
    batch_size: int = 8,
    num_samples: int | None = None,
    query_set_size: int = 2048,
    classes_per_forward: int = 16,
    num_frames: int | None = None,
) -> dict:
    """
    Evaluate `model` (an `OtterForConditionalGeneration`, in eval mode on its device) few-shot on `task` (a name in
    `TASKS`, or a `Task`), reading the data set under `data_dir` in the layout eval/README.md documents.

    For each number of `shots` and each of `trials` (trial t draws random demonstrations with seed `seed + t`; a
    sample with demonstrations of its own (`Example.demos`) uses its first k, in order, in every trial;
    `rices=True` retrieves them instead, by the image embeddings of `rices_encoder`, a (CLIP vision model, image
    processor) pair (see `ImageEmbedder`; default: the model's own vision tower), cached under `rices_cache`
    (default: `rices_cache/` next to `out`)),
    the samples are evaluated in batches of `batch_size`. `num_samples` evaluates a seeded random subset of the split.
    A video task (`Task.media == "video"`) shows each video as `num_frames` frames sampled uniformly (default: the
    processor's `num_frames`, else 8, at most the model's `max_num_frames`), decoded once per pass.

    Writes `out` (JSON: the resume settings, per-shot scores with mean and std over trials, per-sample predictions),
    the Markdown summary next to it (`.md`), and the per-sample log (`.samples.jsonl`) from which an interrupted run
    resumes. The log is keyed on what determines the results: the weights and processor (fingerprints of their
    content, not their path), dtype, device type, the data set (its content, not its folder) and the task settings; a
    log made otherwise is refused, naming what changed. Arguments, the data, every image the run shows and `out` are
    checked before the first sample is evaluated (`Evaluation`). Returns the JSON's content.
    """
    evaluation = Evaluation(task, data_dir, out, shots=shots, trials=trials, seed=seed, rices=rices,
                            rices_cache=rices_cache, batch_size=batch_size, num_samples=num_samples,
                            query_set_size=query_set_size, classes_per_forward=classes_per_forward,
                            num_frames=num_frames)
    return evaluation.run(model, processor, rices_encoder=rices_encoder)


def _class_token_ids(processor, names: list[str], template: PromptTemplate) -> list[list[int]]:
    """
    Each class name tokenized alone, as OpenFlamingo does, after the template's `answer_lead`: in Otter's chat format
    the answer is " name" (one token " b" in BPE, as training wrote it), not "name".
    """
    texts = [template.answer_lead + name for name in names]
    token_ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    empty = [name for name, ids in zip(names, token_ids) if not ids]
    if empty:
        raise ValueError(f"class names {empty} tokenize to nothing")
    return token_ids


def _group_scores(task: Task, examples: list[Example], records: list[dict]) -> dict:
    """The task's score over the samples of each group (the samples' `fields[task.group_by]`), groups sorted."""
    groups = {}
    for example, record in zip(examples, records):
        groups.setdefault(str(example.fields[task.group_by]), []).append((example, record))
    return {group: task.score([e for e, _ in pairs], [r for _, r in pairs])[0] for group, pairs in sorted(groups.items())}


def _rank_candidates(model, processor, task: Task, inputs: dict, examples: list[Example],
                     class_names: list[str] | None, classes_per_forward: int) -> list[tuple[list[str], torch.Tensor]]:
    """
    Each sample's own class names (its `candidates`, else `class_names`) with their scores `(names,)`: the union of
    the batch's names is ranked once by `rank_classes`, and each sample keeps its own columns.
    """
    names = [list(example.candidates) if example.candidates is not None else list(class_names) for example in examples]
    union = list(dict.fromkeys(name for sample_names in names for name in sample_names))
    logprobs = rank_classes(model, inputs, _class_token_ids(processor, union, task.prompt),
                            classes_per_forward)  # (B, union)
    column = {name: index for index, name in enumerate(union)}
    return [(sample_names, row[[column[name] for name in sample_names]]) for sample_names, row in zip(names, logprobs)]


def _run_batch(model, processor, task: Task, benchmark: Benchmark, examples: list[Example], demos: list[list[Example]],
               prompts: list[tuple[str, list]], cache: ImageFeatureCache, pixels: Mapping[object, Future],
               class_token_ids, classes_per_forward: int, num_frames: int | None = None) -> list[dict]:
    """Per-sample records of one batch (prompts from `build_prompt`): id, demonstration ids, the output, the prediction."""
    inputs = encode_batch(model, processor, [text for text, _ in prompts], [images for _, images in prompts], cache,
                          pixels, num_frames)
    records = [{"id": example.id, "demos": [demo.id for demo in sample_demos]}
               for example, sample_demos in zip(examples, demos)]
    if task.ranks_classes and any(example.candidates is not None for example in examples):
        ranked = _rank_candidates(model, processor, task, inputs, examples, benchmark.class_names, classes_per_forward)
        for record, (names, scores) in zip(records, ranked):
            top = scores.topk(min(task.top_k, len(names)))
            record["top"] = [[names[i], value] for i, value in zip(top.indices.tolist(), top.values.tolist())]
            record["prediction"] = record["top"][0][0]
        return records
    if task.ranks_classes:
        logprobs = rank_classes(model, inputs, class_token_ids, classes_per_forward)  # (B, classes)
        top = logprobs.topk(min(task.top_k, logprobs.shape[1]), dim=1)
        for record, values, indices in zip(records, top.values.tolist(), top.indices.tolist()):
            record["top"] = [[benchmark.class_names[i], value] for i, value in zip(indices, values)]
            record["prediction"] = record["top"][0][0]
        return records
    sequences = model.generate(**inputs, **{"do_sample": False, **task.generation})
    outputs = processor.decode_answers(sequences, inputs["input_ids"].shape[1])
    for record, output in zip(records, outputs):
        record["output"] = output
        record["prediction"] = task.postprocess(output)
    return records


def markdown_summary(report: dict) -> str:
    """
    One row per number of shots: mean and standard deviation of the score over trials; for a task that groups its
    samples (`Task.group_by`), a second table with the mean score of each group.
    """
    lines = ["| task | shots | metric | mean | std | trials |", "|---|---:|---|---:|---:|---:|"]
    for result in report["results"]:
        lines.append(f"| {report['task']} | {result['shots']} | {report['metric']} | {result['mean']:.2f} | "
                     f"{result['std']:.2f} | {len(result['trials'])} |")
    if report.get("group_by") is not None:
        lines += ["", f"| task | shots | {report['group_by']} | metric | mean |", "|---|---:|---|---|---:|"]
        for result in report["results"]:
            for group, score in result["groups"].items():
                lines.append(f"| {report['task']} | {result['shots']} | {group} | {report['metric']} | {score:.2f} |")
    return "\n".join(lines) + "\n"
