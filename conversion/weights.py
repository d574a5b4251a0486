"""
Streaming weight conversion: tensors are read lazily from checkpoint files and written to sharded safetensors one
shard at a time.

What stays in memory is the shard being written (plus the source pages it touched, released when the shard is done),
never a whole model.
"""

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.utils.hub import convert_file_size_to_int

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _state_dict_in(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a loaded torch checkpoint: a plain state dict, or one nested under `model_state_dict` (training
    checkpoints) or `state_dict`; a `module.` prefix (DDP) is removed."""
    state = loaded
    if isinstance(state, dict) and not all(isinstance(value, torch.Tensor) for value in state.values()):
        nested = [key for key in ("model_state_dict", "state_dict") if isinstance(state.get(key), dict)]
        if not nested:
            raise ValueError(
                f"{path} holds no state dict: expected tensors by name, or a dict with 'model_state_dict' or "
                f"'state_dict'; found keys {sorted(map(str, state))[:10]}"
            )
        state = state[nested[0]]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path}: the state dict must map names to tensors")
    if state and all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: tensor for name, tensor in state.items()}
    return state


ZIP_MAGIC = b"PK\x03\x04"
LFS_POINTER = b"version https://git-lfs"


def _damaged(path: Path, what: str, reason: str) -> ValueError:
    """The error for a weights file that cannot be what it claims: named, with its size and why."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if handle.read(len(LFS_POINTER)) == LFS_POINTER:
            return ValueError(f"{path} ({size} bytes) is a Git LFS pointer, not the weights it stands for: fetch the "
                              "file itself (git lfs pull)")
    return ValueError(f"{path} ({size} bytes) is truncated or not {what}: {reason}")


def _load_torch(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """
    (tensors, memory_mapped). Zip archives (torch >= 1.6) are memory-mapped, so nothing is read until used; legacy
    files (a bare pickle) are read whole. Only tensors and plain containers are unpickled (weights_only=True). Which
    of the two a file is, is read off its first bytes, so that a zip cut short (no longer a zip) is called damaged,
    not legacy; a file that is neither, or fails to load, is a ValueError naming it.
    """
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise _damaged(path, "a PyTorch checkpoint", "a zip archive without its end (central directory)")
        mapped = True
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's PROTO opcode: legacy torch.save
        mapped = False
    else:
        reason = "the file is empty" if not head else f"it starts with {head!r}, neither a zip archive nor a pickle"
        raise _damaged(path, "a PyTorch checkpoint", reason)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:
            raise ValueError(f"{path} does not load with weights_only=True: it pickles {refused.group(1)}, not only "
                             "tensors (Otter never unpickles code from files)") from error
        raise _damaged(path, "a PyTorch checkpoint", _reason(error)) from error
    except (EOFError, RuntimeError, OSError) as error:
        raise _damaged(path, "a PyTorch checkpoint", _reason(error)) from error
    if not mapped:
        logger.warning("%s is a legacy (pre-zip) torch file: it is read into memory whole", path)
    return _state_dict_in(loaded, path), mapped


def _reason(error: BaseException) -> str:
    """The informative line of a loading error (torch's weights-only errors put it after a paragraph of advice)."""
    message = str(error)
    if isinstance(error, EOFError) and not message.strip():
        return "the file ends early"
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    return next((line.strip() for line in message.splitlines() if line.strip()), type(error).__name__)


@contextmanager
def _open_safetensors(path: Path):
    """safe_open, a damaged file named as such (safetensors' own error names no file)."""
    try:
        handle = safe_open(path, framework="pt")
    except SafetensorError as error:
        raise _damaged(path, "a safetensors file", _reason(error)) from error
    with handle:
        yield handle


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointFiles:
    """
    Named tensors in one or more files (`.safetensors`, or PyTorch `.pt`/`.bin`), indexed without reading their data.

    `read(names)` returns independent copies and lets go of the files again, so the process only ever holds what it
    asked for (legacy non-zip torch files, which cannot be memory-mapped, are the exception and are held whole).
    """

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.paths = [Path(path) for path in paths]
        self.info: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        self._resident: dict[Path, dict[str, torch.Tensor]] = {}
        for path in self.paths:
            if not path.is_file():
                raise FileNotFoundError(f"weights file not found: {path}")
            for name, info in self._index(path).items():
                if name in self.info:
                    raise ValueError(f"tensor {name!r} appears in both {self._file_of[name]} and {path}")
                self.info[name] = info
                self._file_of[name] = path

    def _index(self, path: Path) -> dict[str, TensorInfo]:
        if path.suffix == ".safetensors":
            with _open_safetensors(path) as handle:
                return {
                    name: TensorInfo(tuple(handle.get_slice(name).get_shape()),
                                     SAFETENSORS_DTYPES[handle.get_slice(name).get_dtype()])
                    for name in handle.keys()
                }
        tensors, mapped = _load_torch(path)
        if not mapped:
            self._resident[path] = tensors
        return {name: TensorInfo(tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def names(self) -> list[str]:
        return list(self.info)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        out = {}
        for path, wanted in by_file.items():
            if path.suffix == ".safetensors":
                with _open_safetensors(path) as handle:
                    out.update({name: handle.get_tensor(name) for name in wanted})
            elif path in self._resident:
                out.update({name: self._resident[path][name] for name in wanted})
            else:
                tensors, _ = _load_torch(path)
                out.update({name: tensors[name].clone() for name in wanted})
                del tensors  # unmaps the file: its pages leave this process
        return out


@dataclass
class Take:
    """One output tensor: `transform(source[name])` (the identity when `transform` is None)."""

    source: CheckpointFiles
    name: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def saved_names(model: PreTrainedModel) -> dict[str, str]:
    """
    {name in the saved files: name in memory} for the tensors `model.save_pretrained` writes: tied copies left out,
    transformers' key renames reverted (e.g. GPT-NeoX's `lm_head` is saved as `embed_out`). Works on a meta model.
    """
    state = model.state_dict()
    memory_name = {id(tensor): name for name, tensor in state.items()}
    saved = revert_weight_conversion(model, remove_tied_weights_from_state_dict(dict(state), model))
    names = {}
    for name, tensor in saved.items():
        if id(tensor) not in memory_name:
            raise NotImplementedError(f"{type(model).__name__} saves {name!r} through a weight conversion that is not a rename")
        names[name] = memory_name[id(tensor)]
    return names


def write_safetensors(folder: Path, plan: dict[str, Take], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                      max_shard_size: int | str = "2GB") -> int:
    """
    Writes `plan` (saved name -> Take) as transformers' sharded safetensors layout (`model.safetensors`, or
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`). Floating tensors are cast to `dtype`.
    One shard is materialised at a time. Returns the total bytes written.
    """
    if set(plan) != set(shapes):
        raise ValueError(f"plan and shapes disagree on {sorted(set(plan) ^ set(shapes))[:10]}")
    limit = convert_file_size_to_int(max_shard_size)

    def nbytes(name):
        info = plan[name].source.info[plan[name].name]
        element = torch.empty((), dtype=dtype if info.dtype.is_floating_point else info.dtype).element_size()
        return element * int(torch.Size(shapes[name]).numel())

    shards, current, current_size, total = [], [], 0, 0
    for name in plan:
        size = nbytes(name)
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
        total += size
    if current or not shards:
        shards.append(current)

    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors" for index in range(len(shards))])
    weight_map = {}
    progress = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights")
    for filename, names in zip(files, shards):
        tensors = {}
        by_source: dict[int, list[str]] = {}
        for name in names:
            by_source.setdefault(id(plan[name].source), []).append(name)
        for group in by_source.values():
            source = plan[group[0]].source
            loaded = source.read({plan[name].name for name in group})
            for name in group:
                take = plan[name]
                tensor = loaded[take.name] if take.transform is None else take.transform(loaded[take.name])
                if tuple(tensor.shape) != tuple(shapes[name]):
                    raise RuntimeError(f"{name}: made a tensor of shape {tuple(tensor.shape)}, expected {shapes[name]}")
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                tensors[name] = tensor.contiguous()
            del loaded
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        progress.update(sum(nbytes(name) for name in names))
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    progress.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_model(folder: Path, meta_model: PreTrainedModel, plan: dict[str, Take], dtype: torch.dtype,
                max_shard_size: int | str = "2GB") -> None:
    """
    Writes `meta_model`'s config and weights into `folder` as `save_pretrained` would, the weights made by `plan`
    ({parameter name in memory: Take}). Every saved parameter must be planned, with its shape.
    """
    shapes = {name: tuple(tensor.shape) for name, tensor in meta_model.state_dict().items()}
    names = saved_names(meta_model)
    missing = sorted(set(names.values()) - set(plan))
    unknown = sorted(set(plan) - set(shapes))
    if missing or unknown:
        raise ValueError(f"conversion plan: no source for {missing[:8]}, unknown parameters {unknown[:8]}")
    for name, take in plan.items():
        if take.transform is None and take.source.info[take.name].shape != shapes[name]:
            raise ValueError(f"{take.name} has shape {take.source.info[take.name].shape}; {name} needs {shapes[name]}")
    write_safetensors(folder, {saved: plan[memory] for saved, memory in names.items()},
                      {saved: shapes[memory] for saved, memory in names.items()}, dtype, max_shard_size)
    meta_model.config.dtype = dtype
    meta_model.config.architectures = [type(meta_model).__name__]
    meta_model.config.save_pretrained(folder)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a transformers model folder: sharded or single, safetensors preferred over PyTorch."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            return [folder / name for name in dict.fromkeys(weight_map.values())]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(
        f"no weights in {folder}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
    )
