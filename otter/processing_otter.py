"""OtterProcessor: images and interleaved text with `<image>` markers -> input_ids, attention_mask, pixel_values."""

import os
import re
from typing import Literal, NamedTuple, Unpack

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin
from transformers.image_transforms import get_image_size, to_pil_image
from transformers.processing_utils import ProcessingKwargs, TextKwargs
from transformers.image_utils import ChannelDimension
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .auto_module import PROCESSOR_AUTO_MAP, write_module
from .prompts import ANSWER_TOKEN, END_OF_CHUNK, IMAGE_TOKEN, VIDEO_TOKEN, chat_template
from .video import is_video_file, read_video


class UnreadableImageError(ValueError):
    """An image file (or a PIL image opened from one) that cannot be decoded: missing, truncated, not an image."""


# what PIL raises for a broken image (UnidentifiedImageError and "image file is truncated" are OSErrors)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_image(image) -> Image.Image:
    """
    A PIL image or a path -> an upright RGB image (EXIF orientation applied; alpha, palette, grey converted), fully
    decoded. An image that cannot be read raises `UnreadableImageError` naming the file.
    """
    if not isinstance(image, (str, os.PathLike, Image.Image)):
        raise ValueError(f"expected a PIL image or a file path, got {type(image).__name__}")
    source = image if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", None) or "(in memory)"
    try:
        if isinstance(image, Image.Image):
            image = ImageOps.exif_transpose(image)
            image.load()
        else:
            with Image.open(image) as opened:
                image = ImageOps.exif_transpose(opened)
                image.load()
        if image.mode == "P":
            image = image.convert("RGBA")  # palette transparency is defined through RGBA
        return image.convert("RGB")  # as open_clip's transform: alpha is dropped, not composited
    except _DECODE_ERRORS as error:
        raise UnreadableImageError(f"image {source} could not be read ({error})") from error


def to_image(image) -> Image.Image:
    """
    An image as the processor takes it -> upright RGB PIL image: a PIL image or a file path (`load_image`), an
    `http(s)://` or `data:image/...` URL (transformers' `load_image`), a numpy array or tensor (HWC or CHW; floats in
    [0, 1] or integers in [0, 255]).
    """
    if isinstance(image, str) and image.startswith(("http://", "https://", "data:image/")):
        from huggingface_hub.utils import httpx  # what transformers fetches images with
        from transformers.image_utils import load_image as load_url

        shown = image if not image.startswith("data:") else image[:40] + "..."
        try:
            return load_image(load_url(image))
        except (OSError, ValueError, httpx.HTTPError) as error:
            raise UnreadableImageError(f"image {shown} could not be read ({error})") from error
    if isinstance(image, (np.ndarray, torch.Tensor)):
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        if array.ndim not in (2, 3):
            raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W), got shape {array.shape}")
        return load_image(to_pil_image(array))
    return load_image(image)


class OtterImageProcessor(CLIPImageProcessorPil):
    """
    CLIP preprocessing as open_clip and OpenAI CLIP do it, pixel for pixel: PIL resize of the shortest side, then a
    centre crop whose offset is rounded as torchvision rounds it, then mean/std normalisation. `crop_offset="floor"`
    crops as transformers' `CLIPImageProcessor` does (a one-pixel shift on odd margins): what the Otter project's
    releases were run with.
    """

    CROP_OFFSETS = ("round", "floor")

    def __init__(self, crop_offset: str = "round", **kwargs):
        if crop_offset not in self.CROP_OFFSETS:
            raise ValueError(f"crop_offset must be one of {self.CROP_OFFSETS}, got {crop_offset!r}")
        self.crop_offset = crop_offset
        super().__init__(**kwargs)

    def center_crop(self, image, size, **kwargs):
        height, width = get_image_size(image, channel_dim=ChannelDimension.FIRST)
        if self.crop_offset == "floor" or size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # padding case: never reached after a shortest-side resize
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top:top + size.height, left:left + size.width]


DEFAULT_VIDEO_FRAMES = 16  # Otter's video models were trained on 16 or 32 frames of a video


class Video(NamedTuple):
    """A video's sampled frames (PIL images, paths or arrays), one medium of the model."""

    frames: list


class _PerSample(list):
    """A list of one sample's images or videos (as opposed to a flat list over the batch)."""


def _is_frame(item) -> bool:
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim in (2, 3)
    return isinstance(item, Image.Image) or isinstance(item, (str, os.PathLike)) and not is_video_file(item)


def _is_video(item) -> bool:
    """A video file, a 4-D array or tensor, or a non-empty list of frames."""
    if isinstance(item, (str, os.PathLike)):
        return is_video_file(item)
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim == 4
    return isinstance(item, (list, tuple)) and bool(item) and all(_is_frame(frame) for frame in item)


def _as_list(items, is_video) -> list:
    """`images=` / `videos=` as a list: one item, a flat list of items, or per-sample lists (as `_PerSample`)."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)) or is_video(items):
        return [items]
    return [_PerSample(item) if isinstance(item, (list, tuple)) and not is_video(item) else item for item in items]


def default_chat_template(tokenizer) -> str:
    """Otter's chat template, with `<answer>` when the tokenizer has it (Otter's models), without it otherwise."""
    return chat_template(answer_token=ANSWER_TOKEN in tokenizer.get_vocab())


class OtterTextKwargs(TextKwargs, total=False):
    """transformers' text kwargs, and `truncation_side` ("left" or "right"; default: the tokenizer's) for one call."""

    truncation_side: Literal["left", "right"] | None


class OtterProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: OtterTextKwargs


# text kwargs the processor applies itself (truncation drops images; padding comes after it), and those it passes on
_OWN_TEXT_KWARGS = {"padding", "truncation", "max_length", "pad_to_multiple_of", "padding_side", "truncation_side",
                    "return_attention_mask", "return_tensors", "add_special_tokens", "verbose"}
_UNSUPPORTED_TEXT_KWARGS = {"text_pair", "text_target", "text_pair_target", "stride", "is_split_into_words",
                            "return_overflowing_tokens", "return_offsets_mapping", "return_length",
                            "return_special_tokens_mask", "return_token_type_ids"}


class OtterProcessor(ProcessorMixin):
    """
    Pairs a CLIP image processor with the tokenizer (which holds `<image>` and `<|endofchunk|>`), on transformers'
    conventions: `processor(images=..., text=..., **kwargs)` takes every standard text and image kwarg, per call or in
    `text_kwargs` / `images_kwargs`, and `return_tensors` "pt" (default), "np" or None.

    - `text`: a string or a list of strings with one `<image>` marker per image and one `<video>` marker per video
      (the model reads a video's marker as `<image>`, as Otter's video models were trained). `images`: one list per
      sample, or a flat list in marker order across the batch; an image is a PIL image, a file path, a numpy array or
      a tensor (HWC or CHW), an `http(s)://` URL or a `data:image/...` URL. `videos` likewise; a video is a file
      (decoded with PyAV), a list of frames, an array `(T, H, W, C)` or a tensor, sampled uniformly to `num_frames`
      (a videos kwarg; default the processor's `num_frames`, the model's `max_num_frames` capped at 16) or at `fps`.
    - Output: `input_ids`, `attention_mask` (padded to the longest sample by default, on the tokenizer's
      `padding_side`, which Otter folders set to left, what batched generation needs) and `pixel_values`
      `(images, C, H, W)`: every image of the batch in marker order (none: zero rows), which the model sorts into
      samples by their `<image>` tokens. With videos: `pixel_values` `(batch, media, frames, C, H, W)` (an image is
      one frame) and, when media hold different numbers of frames, `frame_mask` `(batch, media, frames)`.
    - Truncation (`max_length`, on the tokenizer's `truncation_side` unless `truncation_side` is given) drops the
      images whose markers it cut, so markers and images always pair up; `truncation=False` turns it off.
    - The chat template is Otter's (`otter.prompts.chat_template`; without `<answer>` for tokenizers that lack it).
    """

    image_token = IMAGE_TOKEN
    video_token = VIDEO_TOKEN  # in the text only: the model reads a video's marker as <image>, as Otter was trained
    eoc_token = END_OF_CHUNK
    valid_processor_kwargs = OtterProcessorKwargs
    text_kwargs = {"padding": "longest", "return_tensors": "pt"}  # defaults, under the caller's kwargs
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, padding_side=None,
                 truncation_side=None, num_frames: int | None = None, **kwargs):
        # padding_side / truncation_side: what processor_config.json held before the tokenizer's became the one
        # setting; an Otter tokenizer that never chose pads left
        if tokenizer is not None:
            for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
                if side not in (None, "left", "right"):
                    raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
            if padding_side is not None or "padding_side" not in tokenizer.init_kwargs:
                tokenizer.padding_side = padding_side or "left"
            if truncation_side is not None:
                tokenizer.truncation_side = truncation_side
            if chat_template is None:
                chat_template = default_chat_template(tokenizer)
            if tokenizer.chat_template is None:  # one template, the tokenizer's apply_chat_template too
                tokenizer.chat_template = chat_template
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.num_frames = num_frames  # a video's frames by default (None: DEFAULT_VIDEO_FRAMES); saved
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def eoc_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.eoc_token)

    def __call__(self, images=None, text=None, videos=None, audio=None,
                 **kwargs: Unpack[OtterProcessorKwargs]) -> BatchFeature:
        if audio is not None:
            raise ValueError("Otter models take images and text, not audio")
        if text is None:
            raise ValueError("OtterProcessor needs text: a string or a list of strings with <image> markers")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(sample, str) for sample in texts):
            raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r}")
        merged = self._merge_kwargs(OtterProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = merged["text_kwargs"], merged["images_kwargs"]
        unsupported = sorted(key for key in text_kwargs if key in _UNSUPPORTED_TEXT_KWARGS and text_kwargs[key])
        if unsupported:
            raise ValueError(f"OtterProcessor does not support {unsupported} (its truncation keeps images and "
                             "<image> markers paired)")
        return_tensors = text_kwargs.get("return_tensors")
        media = self._media_per_sample(texts, images, videos, merged["videos_kwargs"])
        texts = [sample.replace(self.video_token, self.image_token) for sample in texts]  # what the model reads

        token_ids = self.tokenizer(texts, add_special_tokens=text_kwargs.get("add_special_tokens", True),
                                   **{key: value for key, value in text_kwargs.items()
                                      if key not in _OWN_TEXT_KWARGS | _UNSUPPORTED_TEXT_KWARGS})["input_ids"]
        empty = [index for index, ids in enumerate(token_ids) if not ids]
        if empty:
            raise ValueError(f"sample(s) {empty} of the text tokenize to nothing (an empty prompt)")
        for index, (ids, sample) in enumerate(zip(token_ids, media)):
            if ids.count(self.image_token_id) != len(sample):
                raise ValueError(f"sample {index} tokenizes to {ids.count(self.image_token_id)} <image> tokens for "
                                 f"{len(sample)} images and videos: {texts[index][:80]!r}")
        per_sample = media
        max_length = text_kwargs.get("max_length")
        truncation = text_kwargs.get("truncation")
        if truncation is None:
            truncation = max_length is not None  # a max_length alone truncates, as this processor always did
        if truncation not in (False, "do_not_truncate"):
            limit = max_length if max_length is not None else self.tokenizer.model_max_length
            side = text_kwargs.get("truncation_side") or self.tokenizer.truncation_side
            token_ids, per_sample = zip(*(self._truncate(ids, sample, limit, side)
                                          for ids, sample in zip(token_ids, per_sample)))
        padding = text_kwargs.get("padding")
        batch = self.tokenizer.pad(
            {"input_ids": list(token_ids)},
            padding=False if padding is None else padding, max_length=max_length,
            pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
            padding_side=text_kwargs.get("padding_side") or self.tokenizer.padding_side,
            return_attention_mask=text_kwargs.get("return_attention_mask"), return_tensors=return_tensors,
        )
        data = dict(batch)
        images_kwargs["return_tensors"] = return_tensors
        if any(isinstance(medium, Video) for sample in per_sample for medium in sample):
            data.update(self._video_pixel_values(per_sample, images_kwargs))
        else:
            data["pixel_values"] = self._pixel_values([image for sample in per_sample for image in sample],
                                                      images_kwargs)
        return BatchFeature(data=data, tensor_type=None)

    def _media_per_sample(self, texts, images, videos, videos_kwargs) -> list[list]:
        """Each sample's images and `Video`s, in the order of its `<image>` and `<video>` markers."""
        markers = [re.findall(f"{re.escape(self.image_token)}|{re.escape(self.video_token)}", sample)
                   for sample in texts]
        images = self._per_sample("image", [[m for m in found if m == self.image_token] for found in markers],
                                  _as_list(images, is_video=lambda item: False), texts)
        videos = self._per_sample("video", [[m for m in found if m == self.video_token] for found in markers],
                                  _as_list(videos, is_video=_is_video), texts)
        num_frames = videos_kwargs.get("num_frames") or self.num_frames or DEFAULT_VIDEO_FRAMES
        fps = videos_kwargs.get("fps")
        media = []
        for found, sample_images, sample_videos in zip(markers, images, videos):
            sample_images, sample_videos = iter(sample_images), iter(sample_videos)
            media.append([next(sample_images) if marker == self.image_token else
                          Video(read_video(next(sample_videos), num_frames=num_frames, fps=fps)) for marker in found])
        return media

    @staticmethod
    def _per_sample(kind: str, markers: list[list], items: list, texts) -> list[list]:
        """`items` (a flat list in marker order across the batch, or one list per sample) split into samples."""
        counts = [len(found) for found in markers]
        if items and all(isinstance(item, _PerSample) for item in items):
            if len(items) != len(texts):
                raise ValueError(f"got {kind} lists for {len(items)} samples but {len(texts)} texts")
            per_sample = [list(item) for item in items]
        else:
            if any(isinstance(item, _PerSample) for item in items):
                raise ValueError(f"{kind}s must be a flat list, or one list per sample, not a mix of both")
            if len(items) != sum(counts):
                raise ValueError(f"the texts hold {sum(counts)} <{kind}> markers ({counts} per sample) but "
                                 f"{len(items)} {kind}s were given")
            starts = [sum(counts[:i]) for i in range(len(counts))]
            per_sample = [list(items[start:start + count]) for start, count in zip(starts, counts)]
        for index, (count, sample) in enumerate(zip(counts, per_sample)):
            if count != len(sample):
                raise ValueError(f"sample {index} has {count} <{kind}> markers but {len(sample)} {kind}s: "
                                 f"{texts[index][:80]!r}")
        return per_sample

    def _video_pixel_values(self, per_sample: list[list], images_kwargs: dict) -> dict:
        """
        `pixel_values` `(batch, media, frames, C, H, W)` (an image is a medium of one frame; zeros pad frames and
        media) and, when the real media hold different numbers of frames, `frame_mask` `(batch, media, frames)`.
        """
        frames = [medium.frames if isinstance(medium, Video) else [medium] for sample in per_sample for medium in sample]
        pixels = np.asarray(self.image_processor([to_image(frame) for medium in frames for frame in medium],
                                                 **{**images_kwargs, "return_tensors": "np"})["pixel_values"])
        most_media = max(len(sample) for sample in per_sample)
        most_frames = max(len(medium) for medium in frames)
        out = np.zeros((len(per_sample), most_media, most_frames, *pixels.shape[1:]), dtype=pixels.dtype)
        mask = np.zeros(out.shape[:3], dtype=np.int64)
        offset, medium_index = 0, 0
        for row, sample in enumerate(per_sample):
            for column in range(len(sample)):
                count = len(frames[medium_index])
                out[row, column, :count] = pixels[offset:offset + count]
                mask[row, column, :count] = 1
                offset += count
                medium_index += 1
        data = {"pixel_values": out}
        if len({len(medium) for medium in frames}) > 1:
            data["frame_mask"] = mask
        return_tensors = images_kwargs.get("return_tensors")
        convert = {"pt": torch.from_numpy, "np": lambda array: array}.get(return_tensors, lambda array: array.tolist())
        return {name: convert(value) for name, value in data.items()}

    def _truncate(self, ids: list[int], images: list, max_length: int, side: str) -> tuple[list[int], list]:
        if len(ids) <= max_length:
            return ids, images
        if side == "left":
            kept = ids[-max_length:]
            kept_markers = kept.count(self.image_token_id)
            return kept, images[len(images) - kept_markers:]
        kept = ids[:max_length]
        return kept, images[:kept.count(self.image_token_id)]

    def _pixel_values(self, images: list, images_kwargs: dict):
        """`(images, C, H, W)` in the requested tensor type; with no images, zero rows of the shape one would have."""
        if images:
            return self.image_processor([to_image(image) for image in images], **images_kwargs)["pixel_values"]
        blank = Image.new("RGB", (8, 8))
        shape = np.asarray(self.image_processor([blank], **{**images_kwargs, "return_tensors": "np"})["pixel_values"])
        empty = np.zeros((0, *shape.shape[1:]), dtype=np.float32)
        return torch.from_numpy(empty) if images_kwargs.get("return_tensors") == "pt" else \
            empty if images_kwargs.get("return_tensors") == "np" else []

    def save_pretrained(self, save_directory, **kwargs):
        """
        As transformers' processors; the tokenizer's padding and truncation sides and the chat template are saved with
        it, and `auto_map` points at `otter_auto.py` (see `otter.auto_module`).
        """
        for name in ("padding_side", "truncation_side"):
            self.tokenizer.init_kwargs[name] = getattr(self.tokenizer, name)
        self.auto_map = dict(PROCESSOR_AUTO_MAP)  # see otter.auto_module
        files = super().save_pretrained(save_directory, **kwargs)
        write_module(save_directory)
        return files

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Nothing to register: the class lives in the installed package, and `auto_map` points there."""

    def decode_answers(self, sequences: torch.Tensor, prompt_length: int) -> list[str]:
        """
        The generated answers only: drops the prompt (the first `prompt_length` columns, i.e. `input_ids.shape[1]`),
        stops at the first `<|endofchunk|>`, removes special tokens and surrounding spaces.
        """
        answers = []
        for row in sequences[:, prompt_length:].tolist():
            if self.eoc_token_id in row:
                row = row[: row.index(self.eoc_token_id)]
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "frame_mask"]


__all__ = ["OtterProcessor", "UnreadableImageError", "load_image", "to_image"]
