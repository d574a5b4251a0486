"""
Tokenization, labels and batching: one collator for every kind of training text.

`Collator.encode` runs the inference processor on one `Example` (so training sees the images, videos and tokens that
inference sees), truncates it, and labels it; `Collator.__call__` pads encoded examples into a batch, in the layout
the processor gives a batch, and counts the records that were skipped. The label rules are plain functions over token ids, tested token by token.
"""

import copy
import logging
import random
from collections import Counter

import torch
from PIL import ImageOps

from otter.prompts import ANSWER_TOKEN

from .data import INSTRUCTION, INTERLEAVED, PAIR, Example, Skipped, WebDataOptions

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def instruction_labels(input_ids: list[int], answer_id: int, eoc_id: int) -> list[int]:
    """
    Otter's rule: a token is a target when it follows an `<answer>` and is not past the `<|endofchunk|>` that closes
    that answer. The prompt, the images, `<answer>` itself and everything between chunks are `IGNORE_INDEX`.
    Every answer in the sequence is trained on, in-context ones included, as in Otter.
    """
    labels, in_answer = [], False
    for token in input_ids:
        labels.append(token if in_answer else IGNORE_INDEX)
        if token == answer_id:
            in_answer = True
        elif token == eoc_id:
            in_answer = False
    return labels


def interleaved_labels(input_ids: list[int], image_id: int, eoc_id: int, pad_id: int) -> list[int]:
    """
    OpenFlamingo's MMC4 rule (train_utils.train_one_epoch): ignore the pad tokens, every token before the first
    `<image>`, every token after an `<|endofchunk|>` up to the next `<image>`, and the `<image>` tokens.
    """
    labels, masked = [], True  # masked until the first <image>
    for token in input_ids:
        if token == image_id:
            masked = False
            labels.append(IGNORE_INDEX)
            continue
        labels.append(IGNORE_INDEX if masked or token == pad_id else token)
        if token == eoc_id:
            masked = True
    return labels


def pair_labels(input_ids: list[int], image_id: int, pad_id: int) -> list[int]:
    """
    OpenFlamingo's LAION rule: ignore the pad and `<image>` tokens. (OpenFlamingo's line that means to ignore eos
    compares ids with the eos *string* and matches nothing, so the eos after `<|endofchunk|>` is a target there, and
    here.)
    """
    return [IGNORE_INDEX if token in (image_id, pad_id) else token for token in input_ids]


class Collator:
    """
    Encodes examples with the model's processor and pads them into batches.

    Args:
        processor: the model's `OtterProcessor`; its tokenizer must hold `<image>`, `<|endofchunk|>`, a pad token and,
            for instruction data, `<answer>`. It is copied, truncating on the right.
        max_length: tokens kept of an instruction example (web data use `web.max_tokens_*`).
        web: OpenFlamingo's preprocessing options for web data.
        augment: flip all images and video frames of an example horizontally with probability 0.5 (OpenFlamingo's
            augmentation).
        seed: with the epoch and the example's key, seeds the example's random choices.

    A batch is a dict: `input_ids`, `attention_mask`, `labels` `(batch, length)` padded on the right;
    `pixel_values` `(batch, max_media, max_frames, C, H, W)` when any example has media (an image is a medium of one
    frame, so a batch without videos is `(batch, max_images, 1, C, H, W)`; zeros pad media and frames) and, when the
    media hold different numbers of frames, `frame_mask` `(batch, max_media, max_frames)` (1 for real frames), as the
    processor returns them for the same samples; `num_examples`; `skipped`, a `Counter` of reasons for the records of
    this batch that were dropped, and `skipped_details`, what was wrong with the first few of them.
    """

    def __init__(self, processor, max_length: int = 512, web: WebDataOptions | None = None, augment: bool = False,
                 seed: int = 0):
        self.processor = copy.copy(processor)
        self.processor.truncation_side = "right"
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the processor's tokenizer has no pad token; Otter models add <PAD> (otter.from_parts)")
        self.image_id = processor.image_token_id
        self.eoc_id = processor.eoc_token_id
        self.answer_id = tokenizer.convert_tokens_to_ids(ANSWER_TOKEN)
        if self.answer_id == tokenizer.unk_token_id:
            self.answer_id = None
        self.max_lengths = {INSTRUCTION: max_length}
        self.web = web or WebDataOptions()
        self.max_lengths.update({INTERLEAVED: self.web.max_tokens_interleaved, PAIR: self.web.max_tokens_pair})
        self.augment = augment
        self.seed = seed

    def labels(self, input_ids: list[int], kind: str) -> list[int]:
        if kind == INSTRUCTION:
            if self.answer_id is None:
                raise ValueError(f"instruction data needs {ANSWER_TOKEN} in the tokenizer (the trainer adds it)")
            return instruction_labels(input_ids, self.answer_id, self.eoc_id)
        if kind == INTERLEAVED:
            return interleaved_labels(input_ids, self.image_id, self.eoc_id, self.pad_id)
        if kind == PAIR:
            return pair_labels(input_ids, self.image_id, self.pad_id)
        raise ValueError(f"unknown example kind {kind!r}; expected {INSTRUCTION!r}, {INTERLEAVED!r} or {PAIR!r}")

    def encode(self, example: Example, epoch: int = 0) -> dict | Skipped:
        """
        One example -> `input_ids`, `labels` `(length,)`, `pixel_values` `(media, frames, C, H, W)` in marker order
        (an image is one frame; None without media) and `num_frames` `(media,)`, or a `Skipped` when truncation leaves
        nothing to train on or an OpenFlamingo filter drops it. A video's frames are sampled already (`data.sampled`).
        """
        rng = random.Random(f"{self.seed}:{epoch}:{example.key}")
        images, videos = example.images, example.videos
        if self.augment and rng.random() < 0.5:
            images = [ImageOps.mirror(image) for image in images]
            videos = [[ImageOps.mirror(frame) for frame in frames] for frames in videos]
        # videos: every frame given is kept (num_frames is their count, so the processor samples nothing again)
        video_inputs = dict(videos=[videos], num_frames=max(len(frames) for frames in videos)) if videos else {}
        inputs = self.processor(text=[example.text], images=[images], max_length=self.max_lengths[example.kind],
                                **video_inputs)
        input_ids = inputs["input_ids"][0].tolist()
        if example.kind == INTERLEAVED:
            # OpenFlamingo's filters on MMC4 documents, applied after truncation as there
            num_images = input_ids.count(self.image_id)
            if num_images < self.web.min_images:
                return Skipped("too few images after truncation",
                               f"{example.key}: {num_images} <image> left, at least {self.web.min_images} needed")
            if num_images == 1 and rng.random() >= self.web.single_image_keep_prob:
                return Skipped("single-image document dropped",
                               f"{example.key}: OpenFlamingo keeps {self.web.single_image_keep_prob:.0%} of these")
        labels = self.labels(input_ids, example.kind)
        if all(label == IGNORE_INDEX for label in labels):
            what = "answer" if example.kind == INSTRUCTION else "trainable"
            return Skipped(f"no {what} tokens after truncation",
                           f"{example.key}: nothing to train on in the first {self.max_lengths[example.kind]} tokens")
        pixel_values = inputs["pixel_values"]
        if pixel_values.ndim == 4:  # images only (or no media left): (images, C, H, W)
            pixel_values, num_frames = pixel_values[:, None], torch.ones(len(pixel_values), dtype=torch.long)
        else:  # with videos: (1, media, frames, C, H, W), and frame_mask when the frame counts differ
            pixel_values = pixel_values[0]
            frame_mask = inputs.get("frame_mask")
            num_frames = frame_mask[0].sum(-1) if frame_mask is not None else \
                torch.full((len(pixel_values),), pixel_values.shape[1], dtype=torch.long)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "pixel_values": pixel_values if len(pixel_values) else None,
            "num_frames": num_frames if len(pixel_values) else None,
        }

    def __call__(self, items: list) -> dict:
        skipped, details = Counter(), []
        encoded = []
        for item in items:
            if isinstance(item, Skipped):
                logger.warning("skipping %s (%s)", item.detail, item.reason)
                skipped[item.reason] += 1
                details.append(item.detail)
            else:
                encoded.append(item)
        batch = {"num_examples": len(encoded), "skipped": skipped, "skipped_details": details[:3]}
        if not encoded:
            return batch
        length = max(len(item["input_ids"]) for item in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(encoded):
            size = len(item["input_ids"])
            input_ids[row, :size] = item["input_ids"]
            attention_mask[row, :size] = 1
            labels[row, :size] = item["labels"]
        batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        batch.update(self._media(encoded))
        return batch

    @staticmethod
    def _media(encoded: list[dict]) -> dict:
        """
        `pixel_values` `(batch, media, frames, C, H, W)` (zeros pad media and frames) and, when the media hold different
        numbers of frames, `frame_mask` `(batch, media, frames)`: the processor's layout for the same samples. Without
        videos, frames is 1: the images' layout.
        """
        with_media = [item for item in encoded if item["pixel_values"] is not None]
        if not with_media:
            return {}
        first = with_media[0]["pixel_values"]
        most_media = max(item["pixel_values"].shape[0] for item in with_media)
        most_frames = max(item["pixel_values"].shape[1] for item in with_media)
        pixel_values = first.new_zeros(len(encoded), most_media, most_frames, *first.shape[2:])
        frame_mask = torch.zeros(pixel_values.shape[:3], dtype=torch.long)
        for row, item in enumerate(encoded):
            if item["pixel_values"] is not None:
                media, frames = item["pixel_values"].shape[:2]
                pixel_values[row, :media, :frames] = item["pixel_values"]
                for column, count in enumerate(item["num_frames"].tolist()):
                    frame_mask[row, column, :count] = 1
        counts = torch.cat([item["num_frames"] for item in with_media])
        if (counts != counts[0]).any():
            return {"pixel_values": pixel_values, "frame_mask": frame_mask}
        return {"pixel_values": pixel_values}


__all__ = ["Collator", "IGNORE_INDEX", "instruction_labels", "interleaved_labels", "pair_labels"]
