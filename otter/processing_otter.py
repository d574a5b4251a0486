"""OtterProcessor: images and interleaved text with `<image>` markers -> input_ids, attention_mask, pixel_values."""

import os

import torch
from PIL import Image, ImageOps
from transformers import BatchFeature, ProcessorMixin
from transformers.image_transforms import get_image_size
from transformers.image_utils import ChannelDimension
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .prompts import END_OF_CHUNK, IMAGE_TOKEN


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


class OtterImageProcessor(CLIPImageProcessorPil):
    """
    CLIP preprocessing as open_clip and OpenAI CLIP do it, pixel for pixel: PIL resize of the shortest side, then a
    centre crop whose offset is rounded as torchvision rounds it (transformers' crop floors it, a one-pixel shift on
    odd margins), then mean/std normalisation.
    """

    def center_crop(self, image, size, **kwargs):
        height, width = get_image_size(image, channel_dim=ChannelDimension.FIRST)
        if size.height > height or size.width > width:
            return super().center_crop(image, size, **kwargs)  # padding case: never reached after a shortest-side resize
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top:top + size.height, left:left + size.width]


class OtterProcessor(ProcessorMixin):
    """
    Pairs a CLIP image processor with the tokenizer (which holds `<image>` and `<|endofchunk|>`).

    `processor(text=..., images=...)`: `text` is a string or a list of strings with `<image>` markers; `images` is
    one list of images per sample, or a flat list in marker order across the batch. `padding_side` is left by
    default (what batched generation needs; training collators pad right); `truncation_side` says which end
    `max_length` cuts, and truncation drops the images whose markers it cut, so markers and images always pair up.
    Both are saved with the processor.
    """

    image_token = IMAGE_TOKEN
    eoc_token = END_OF_CHUNK

    def __init__(self, image_processor=None, tokenizer=None, padding_side: str = "left", truncation_side: str = "right",
                 **kwargs):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def eoc_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.eoc_token)

    def __call__(self, text=None, images=None, max_length: int | None = None, add_special_tokens: bool = True,
                 return_tensors: str = "pt") -> BatchFeature:
        if text is None:
            raise ValueError("OtterProcessor needs text: a string or a list of strings with <image> markers")
        if return_tensors != "pt":
            raise ValueError(f"OtterProcessor returns PyTorch tensors only (return_tensors='pt'), got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is an empty list: give at least one prompt")
        token_ids = self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        empty = [index for index, ids in enumerate(token_ids) if not ids]
        if empty:
            raise ValueError(f"sample(s) {empty} of the text tokenize to nothing (an empty prompt)")
        per_sample = self._images_per_sample(texts, token_ids, images)
        if max_length is not None:
            token_ids, per_sample = zip(*(self._truncate(ids, imgs, max_length) for ids, imgs in zip(token_ids, per_sample)))
        batch = self.tokenizer.pad({"input_ids": list(token_ids)}, padding="longest", padding_side=self.padding_side,
                                   return_tensors="pt")
        data = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if any(per_sample):
            data["pixel_values"] = self._pixel_values(per_sample)
        return BatchFeature(data=data)

    def _images_per_sample(self, texts, token_ids, images) -> list[list]:
        counts = [ids.count(self.image_token_id) for ids in token_ids]
        if images is None:
            images = []
        elif isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        if images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(texts):
                raise ValueError(f"got image lists for {len(images)} samples but {len(texts)} texts")
            per_sample = [list(item) for item in images]
        else:
            if any(isinstance(item, (list, tuple)) for item in images):
                raise ValueError("images must be a flat list, or one list per sample, not a mix of both")
            if len(images) != sum(counts):
                raise ValueError(
                    f"the texts hold {sum(counts)} <image> markers ({counts} per sample) but {len(images)} images were given"
                )
            starts = [sum(counts[:i]) for i in range(len(counts))]
            per_sample = [list(images[start:start + count]) for start, count in zip(starts, counts)]
        for index, (count, sample_images) in enumerate(zip(counts, per_sample)):
            if count != len(sample_images):
                raise ValueError(
                    f"sample {index} has {count} <image> markers but {len(sample_images)} images: {texts[index][:80]!r}"
                )
        return per_sample

    def _truncate(self, ids: list[int], images: list, max_length: int) -> tuple[list[int], list]:
        if len(ids) <= max_length:
            return ids, images
        if self.truncation_side == "left":
            kept = ids[-max_length:]
            kept_markers = kept.count(self.image_token_id)
            return kept, images[len(images) - kept_markers:]
        kept = ids[:max_length]
        return kept, images[:kept.count(self.image_token_id)]

    def _pixel_values(self, per_sample: list[list]) -> torch.Tensor:
        """`(batch, max_media, 1, C, H, W)`; samples with fewer images are padded with zeros (never attended)."""
        flat = [load_image(image) for sample in per_sample for image in sample]
        pixels = self.image_processor(flat, return_tensors="pt")["pixel_values"]
        out = pixels.new_zeros(len(per_sample), max(len(s) for s in per_sample), 1, *pixels.shape[1:])
        offset = 0
        for row, sample in enumerate(per_sample):
            out[row, : len(sample), 0] = pixels[offset: offset + len(sample)]
            offset += len(sample)
        return out

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
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["OtterProcessor", "UnreadableImageError", "load_image"]
