"""
Fingerprints of what determines an evaluation's results, which a resumed run must match: the weights of a model in
memory, its processor, and the loaded data set (its images' or videos' file sizes included); and how a video task
samples its frames. Each fingerprint is a sha256 hex digest, the same in every run and on every device for the same
content.
"""

import gc
import hashlib
import json
import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .datasets import Benchmark, Example

_MODULUS, _MULTIPLIER = 65521, 40503  # position weights ((i * 40503) mod 65521) + 1, in [1, 65521]: prime modulus
CHUNK = 16 * _MODULUS  # values summed at a time (about 2**20): whole periods of the weights, the same in every chunk


def _position_weights(device: torch.device, cache: dict) -> torch.Tensor:
    """The weight of each position of a chunk, `((i * 40503) mod 65521) + 1`, int32 on `device`. A chunk starts at a
    multiple of 65521, so these are also the weights of its values' positions in the whole tensor."""
    if device not in cache:
        positions = torch.arange(CHUNK, dtype=torch.int64, device=device)
        cache[device] = (positions * _MULTIPLIER % _MODULUS + 1).to(torch.int32)
    return cache[device]


def _tensor_sums(tensor: torch.Tensor, cache: dict) -> tuple[int, int]:
    """
    Two exact integer checksums of a tensor's bytes, computed on its own device: the tensor read as int16 values
    (uint8 for 1-byte dtypes), their plain sum and their sum weighted by position, `((i * 40503) mod 65521) + 1` for
    the i-th value. A value is at most 2**15 in magnitude and a weight at most 65521, so each product fits in int32
    and a chunk's products sum to less than 2**51 in int64: the sums are exact, and exact integer sums do not depend
    on the order of reduction, hence on the device.
    """
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    values = flat.view(torch.int16 if flat.element_size() >= 2 else torch.uint8)
    weights = _position_weights(values.device, cache)
    sums = []
    for start in range(0, values.numel(), CHUNK):
        chunk = values[start:start + CHUNK]
        weighted = chunk.to(torch.int32) * weights[:chunk.numel()]  # |product| < 2**31
        sums.append(torch.stack([chunk.sum(dtype=torch.int64), weighted.sum(dtype=torch.int64)]))
    if not sums:
        return 0, 0
    per_chunk = torch.stack(sums).tolist()  # one synchronisation per tensor; Python ints add up without bounds
    return sum(plain for plain, _ in per_chunk), sum(weighted for _, weighted in per_chunk)


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """
    Every entry of `model.state_dict()` (parameters and persistent buffers): its name, shape, dtype and two exact
    checksums of its bytes (`_tensor_sums`). Changing any value by one bit, swapping two values (unless 65521 apart),
    casting, renaming or reshaping changes it. Cheap on any device: about a read of the weights, in chunks.
    """
    digest = hashlib.sha256()
    cache = {}
    for name, tensor in model.state_dict().items():
        plain, weighted = _tensor_sums(tensor, cache)
        digest.update(f"{name}\t{tuple(tensor.shape)}\t{tensor.dtype}\t{plain}\t{weighted}\n".encode())
    return digest.hexdigest()


def json_default(value):
    return value.value if hasattr(value, "value") else str(value)  # enums (PIL's resampling filters), paths


def processor_fingerprint(processor) -> str:
    """
    What the processor makes of text and images: the tokenizer's class, its full definition (the `tokenizers` JSON:
    vocabulary, merges, added tokens, normalisation, pre- and post-processing; or, for a tokenizer without one, its
    vocabulary and added tokens), its special tokens, and the image processor's class and settings.
    """
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for call_state in ("truncation", "padding"):  # what the last call asked for, left behind by transformers
            definition.pop(call_state, None)
    else:
        definition = {
            "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]),
            "added_tokens": sorted((index, str(token), repr(token))
                                   for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items()),
        }
    image_processor = processor.image_processor
    description = {
        "tokenizer": type(tokenizer).__name__, "definition": definition,
        "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
        "image_processor": type(image_processor).__name__, "image_settings": image_processor.to_dict(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=json_default).encode()).hexdigest()


def _size(path: str) -> int | None:
    """The size of the regular file at `path` (links followed), None when there is none."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def image_sizes(paths: Iterable, threads: int = 16) -> dict[str, int | None]:
    """`str(path) -> size` of each distinct path (image or video files), None for a missing file or a path that is
    not a file; the files are looked up (not read) by `threads` threads, which is what counts on a network file
    system."""
    unique = list(dict.fromkeys(str(path) for path in paths))
    parts = [unique[k::threads] for k in range(threads)]
    with ThreadPoolExecutor(threads, thread_name_prefix="otter-stat") as pool:
        sizes = pool.map(lambda part: [_size(path) for path in part], parts)
        return {path: size for part, part_sizes in zip(parts, sizes) for path, size in zip(part, part_sizes)}


def benchmark_images(benchmark: Benchmark) -> list[Path]:
    """Every image (or video) path a benchmark's examples (their own demonstrations included) refer to, in order."""
    def images(example: Example):
        yield from example.images
        for demo in example.demos or ():
            yield from images(demo)

    return [image for examples in (benchmark.pool, benchmark.test) for example in examples for image in images(example)]


def data_fingerprint(benchmark: Benchmark, data_dir: Path, sizes: dict[str, int | None]) -> str:
    """
    What the loaded data set gives an evaluation: each example's id, prompt fields, candidates, own demonstrations,
    and images (or videos) by their path relative to `data_dir` with their file size (`sizes`, from `image_sizes`),
    for the pool and the evaluated split, in order; the evaluated examples' targets; the class names. (A pool
    example's target is not used: a demonstration shows its fields.) The same data set in another folder has the same
    fingerprint; an edited annotation, or an image or video replaced by a file of another size, changes it.
    """
    prefix = str(data_dir) + os.sep

    def relative(image) -> str:  # a loader may read images from outside the data folder: those stay absolute
        path = str(image)
        return path[len(prefix):] if path.startswith(prefix) else path

    def description(example: Example, target: bool) -> list:
        return [example.id, example.fields, example.target if target else None, example.candidates,
                [[relative(image), sizes.get(str(image))] for image in example.images],
                None if example.demos is None else [description(demo, False) for demo in example.demos]]

    digest = hashlib.sha256()
    collecting = gc.isenabled()
    gc.disable()  # the blocks' lists make no cycles; collections among a large pool's objects would double the time
    try:
        for examples, target in ((benchmark.pool, False), (benchmark.test, True)):
            digest.update(f"{len(examples)}\n".encode())
            for start in range(0, len(examples), 4096):  # in blocks: the text of a large pool is not held at once
                block = [description(example, target) for example in examples[start:start + 4096]]
                digest.update(json.dumps(block, sort_keys=True, separators=(",", ":"), default=json_default).encode())
    finally:
        if collecting:
            gc.enable()
    digest.update(json.dumps(benchmark.class_names).encode())
    return digest.hexdigest()


def video_settings(num_frames: int) -> dict:
    """
    What decides the frames a video task shows, besides the video files (whose sizes `data_fingerprint` holds) and the
    image preprocessing (`processor_fingerprint`): how many frames, and how they are picked (uniformly, first and last
    included: `otter.video.uniform_indices`). Settings of the resume key, so that a change is named.
    """
    return {"num_frames": num_frames, "frame_sampling": "uniform"}
