"""
The training loop, on accelerate: one process or many (DDP, FSDP, DeepSpeed), whatever `accelerate launch` set up.

`train(TrainingConfig(...))` loads an Otter folder, trains what the config says (perceiver and cross-attention by
default; the new tokens' embedding rows; LoRA on the language model; or everything), and writes an Otter folder that
`from_pretrained` loads. Along the way it writes `metrics.jsonl` (one line per optimizer step) and, every
`save_every` steps, an atomic checkpoint `checkpoints/step-N` (trained weights, optimizer, scheduler, RNG states and
the data position) from which `resume=True` continues the very same loss curve.

What would go silently wrong is refused instead: a run that skips every record (or more than `max_skipped_share` of
them) fails, a resumed run checks that its config, data files and process count are those of the run it continues
and loads no pickled object from the checkpoint, and an output folder takes one run at a time (`RunLock`).

The loss of a step is the mean token cross-entropy over the whole global batch (all processes, all accumulated
micro-batches), so a run gives the same updates on 1 or N processes with the same global batch.
"""

import dataclasses
import datetime
import hashlib
import importlib.util
import json
import logging
import math
import os
import pickle
import shutil
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from otter import OtterConfig, OtterForConditionalGeneration, OtterProcessor
from otter.conversion.folders import honour_umask, limit_tokenizer_length
from otter.language_models import lora_target_pattern
from otter.model_card import CAPTION_PROMPT, CHAT_PROMPT, describe, hub_id, model_card, source_card, usage
from otter.prompts import ANSWER_TOKEN, chat_template

from .collate import IGNORE_INDEX, Collator
from .data import RESAMPLE_FRAMES, WebDataOptions
from .loaders import InstructionData, WebData

logger = logging.getLogger(__name__)

INSTRUCTION, PRETRAINING = "instruction", "pretraining"
PRECISIONS = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
SCHEDULES = {"cosine": "cosine", "constant": "constant_with_warmup"}
LORA_OUTPUTS = ("merged", "adapter")
CROSS_ATTENTION = "gated_cross_attn_layer"  # OpenFlamingo decays these parameters' weights, and only these
# what may differ between a run and its resumption: how long it runs, how it reports, the precision and the lr, where
# its folder is, how strict it is about skipped records and changed data (not num_workers: web shards are dealt to
# processes x workers)
RESUMABLE_CHANGES = {"max_steps", "epochs", "save_every", "keep_checkpoints", "log_every", "tensorboard", "resume",
                     "precision", "lr", "out", "max_skipped_share", "allow_data_change"}
# 2: the scheduler's state is JSON in trainer_state.json (format 1 pickled it in custom_checkpoint_0.pkl)
CHECKPOINT_FORMAT = 2
HEAD_BYTES = 1 << 20  # a data file's fingerprint hashes its first MiB
WEB_EARLY_RECORDS = 1000  # web data: a run whose first this many records were all skipped stops
LOCK_FILE = ".otter-train.lock"


@dataclass
class TrainingConfig:
    """
    Everything a run needs; `otter train finetune|pretrain` fills it from the command line and `--config` YAML.

    model / data / out: the Otter folder to start from, the data files (instruction files for the `instruction`
        objective, webdataset shards for `pretraining`), the output folder.
    max_steps / epochs: optimizer steps to run; `epochs` (instruction data only) counts passes over the data, and
        when both are given the run stops at the first reached. Without either, one epoch.
    batch_size: examples per process per micro-batch; grad_accum micro-batches make a step, so the global batch is
        `batch_size * processes * grad_accum`.
    lr / schedule / warmup_steps: AdamW's peak learning rate, `cosine` (to 0) or `constant`, after a linear warmup.
    weight_decay: applied to the gated cross-attention blocks only, as OpenFlamingo; max_grad_norm: clipping.
    precision: `bf16`, `fp16` (autocast; weights stay fp32) or `fp32`; None keeps accelerate's setting.
    What trains: the perceiver and cross-attention always; `train_embeddings` adds the embedding rows of the tokens
        Otter adds (`<image>`, `<|endofchunk|>`, `<answer>`), and only those rows; `lora` adds LoRA adapters on the
        language model's attention (`lora_target_modules` overrides peft's choice per family), written `merged` into
        the weights or as an `adapter` folder (`lora_output`); `full` trains every parameter, but the vision
        encoder's with `freeze_vision` (Otter's instruction tuning keeps CLIP frozen; it also saves its backward).
    max_length: tokens kept per instruction example (right truncation); web data use `web`'s OpenFlamingo options.
    resample_frames: a video's frames are sampled uniformly to this many (Otter's `resample_frames`; a shorter video
        keeps all its frames). A model with frame embeddings takes at most its `max_num_frames`.
    video_sets: the MIMIC-IT subsets (the `<name>` of `<name>_instructions.json`) whose instructions' images are the
        frames of a video; None reads those the Otter project reads as videos (DC, E4D, TVC, FunQA, VideoQA), []
        reads none as videos.
    augment: random horizontal flips (OpenFlamingo's augmentation); None means on for pretraining, off otherwise.
    save_every / keep_checkpoints / resume: checkpoint period, how many to keep, continue from the latest one.
    allow_data_change: resume although the data files changed (or moved) since the checkpoint was saved.
    max_skipped_share: the share of records that may be skipped (malformed, unreadable images, nothing left to train
        on after truncation) before the run fails; 1.0 fails only a run that skips every record.
    """

    model: str | None = None
    data: list[str] = field(default_factory=list)
    out: str | None = None
    objective: str = INSTRUCTION
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    precision: str | None = None
    gradient_checkpointing: bool = False
    train_embeddings: bool = False
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    lora_output: str = "merged"
    full: bool = False
    freeze_vision: bool = False
    max_length: int = 512
    resample_frames: int = RESAMPLE_FRAMES
    video_sets: list[str] | None = None
    augment: bool | None = None
    web: WebDataOptions = field(default_factory=WebDataOptions)
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    allow_data_change: bool = False
    max_skipped_share: float = 1.0
    seed: int = 42
    num_workers: int = 2
    log_every: int = 10
    tensorboard: bool = False

    def __post_init__(self):
        if isinstance(self.web, dict):
            self.web = _dataclass_from_dict(WebDataOptions, self.web, "web")
        self.data = [str(path) for path in ([self.data] if isinstance(self.data, (str, os.PathLike)) else self.data)]
        self.model, self.out = (str(value) if value is not None else None for value in (self.model, self.out))
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ValueError(f"a training run needs {name!r} (--{name})")
        if not self.data:
            raise ValueError("a training run needs data files (--data)")
        choices = {"objective": (INSTRUCTION, PRETRAINING), "schedule": tuple(SCHEDULES),
                   "precision": (None, *PRECISIONS), "lora_output": LORA_OUTPUTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.video_sets, str):
            self.video_sets = [self.video_sets]
        if self.video_sets is not None and not all(isinstance(name, str) and name for name in self.video_sets):
            raise ValueError(f"video_sets must be a list of MIMIC-IT subset names, got {self.video_sets!r}")
        for name in ("batch_size", "grad_accum", "save_every", "keep_checkpoints", "log_every", "lora_rank",
                     "resample_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError(
                f"expected lr > 0, warmup_steps >= 0, weight_decay >= 0, max_grad_norm > 0; got lr={self.lr}, "
                f"warmup_steps={self.warmup_steps}, weight_decay={self.weight_decay}, max_grad_norm={self.max_grad_norm}"
            )
        if not 0.0 <= self.max_skipped_share <= 1.0:
            raise ValueError(f"max_skipped_share must be in [0, 1], got {self.max_skipped_share}")
        if self.full and self.lora:
            raise ValueError("choose full (train every parameter) or lora (adapters on the language model), not both")
        if self.freeze_vision and not self.full:
            raise ValueError("freeze_vision applies to full training (without full the vision encoder is frozen)")
        if self.objective == PRETRAINING and self.max_steps is None:
            raise ValueError("pretraining streams webdataset shards without a known length: give max_steps")
        if self.objective == PRETRAINING and self.epochs is not None:
            raise ValueError("epochs counts passes over instruction data; pretraining runs for max_steps")
        if self.augment is None:
            self.augment = self.objective == PRETRAINING

    @classmethod
    def load(cls, yaml_path: str | os.PathLike | None = None, **overrides) -> "TrainingConfig":
        """A config from a YAML file of field names (optional), with `overrides` (e.g. command-line flags) on top."""
        values = {}
        if yaml_path is not None:
            import yaml

            with open(yaml_path, encoding="utf-8") as file:
                values = yaml.safe_load(file) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{yaml_path} must hold a mapping of training options, got {type(values).__name__}")
        return _dataclass_from_dict(cls, {**values, **overrides}, str(yaml_path or "config"))


def _dataclass_from_dict(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; expected some of {sorted(names)}")
    return cls(**values)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing of that step was applied or saved."""


class SkippedRecordsError(ValueError):
    """The run skipped every record, or more than `max_skipped_share` of them: it would train on too little."""


# -- the model and what trains ------------------------------------------------------------------------------------
def add_answer_token(model: OtterForConditionalGeneration, tokenizer) -> bool:
    """
    Adds `<answer>` when the tokenizer lacks it, as the last token of the vocabulary (id `len(tokenizer)`), so it
    never takes a row that a token was trained with. Its embedding rows (input, and output when untied) start as the
    mean of the existing tokens' rows. Returns whether the token was added.
    """
    if ANSWER_TOKEN in tokenizer.get_vocab():
        return False
    owned = len(tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": [ANSWER_TOKEN]}, replace_extra_special_tokens=False)
    answer_id = tokenizer.convert_tokens_to_ids(ANSWER_TOKEN)
    if answer_id != owned:
        raise RuntimeError(f"{ANSWER_TOKEN} got id {answer_id}, expected the end of the vocabulary ({owned})")
    if model.get_input_embeddings().num_embeddings <= answer_id:
        model.resize_token_embeddings(answer_id + 1, mean_resizing=False)
    with torch.no_grad():
        for embedding in _embedding_weights(model):
            embedding[answer_id] = embedding[:owned].mean(0)
    logger.info("added %s to the vocabulary as token %d", ANSWER_TOKEN, answer_id)
    return True


def use_answer_chat_template(processor) -> None:
    """
    After `add_answer_token`: the processor's (and its tokenizer's) chat template becomes Otter's with `<answer>`
    where it was the one without it (a tokenizer that lacked `<answer>` got that one), so the trained folder's
    `apply_chat_template` writes the text the model was trained on. A custom template is left as it is.
    """
    without, with_answer = chat_template(answer_token=False), chat_template(answer_token=True)
    for owner in (processor, processor.tokenizer):
        if owner.chat_template == without:
            owner.chat_template = with_answer


def _embedding_weights(model) -> list[torch.nn.Parameter]:
    """The input embedding matrix, and the output one when it is a separate tensor."""
    weights = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)
    return weights


def configure_training(model: OtterForConditionalGeneration, config: TrainingConfig, new_token_ids: list[int]):
    """
    Sets what trains and returns the module to train (the model, or a peft model around it with LoRA).
    `new_token_ids`: the rows of the embeddings that `train_embeddings` trains; a gradient hook zeroes the others.
    """
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=lora_target_pattern(model.config.text_config.model_type,
                                                             config.lora_target_modules))
        trained = get_peft_model(model, lora)
    else:
        trained = model
    if config.full:
        model.requires_grad_(True)
        if config.freeze_vision:
            model.vision_model.requires_grad_(False)
        return trained
    model.freeze_backbones(train_embeddings=config.train_embeddings)
    if config.lora:
        for name, parameter in trained.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)
    if config.train_embeddings:
        for weight in _embedding_weights(model):
            keep = torch.zeros(weight.shape[0], 1)
            keep[new_token_ids] = 1
            weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device, grad.dtype))
    return trained


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the gated cross-attention blocks' parameters (OpenFlamingo), none elsewhere."""
    decayed, other = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if CROSS_ATTENTION in name else other).append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """
    Summed next-token cross-entropy over the labelled tokens of `batch` (labels `(batch, length)`, -100 ignored);
    `pixel_values` and, for media of different frame counts, `frame_mask` as the collator gives them.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch.get("pixel_values"), frame_mask=batch.get("frame_mask"), use_cache=False).logits
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# -- checkpoints --------------------------------------------------------------------------------------------------
def _trainable_names(module: torch.nn.Module) -> set[str]:
    return {name for name, parameter in module.named_parameters() if parameter.requires_grad}


def _keep_trainable_weights(models, weights, output_dir):
    """
    accelerate save hook: a checkpoint holds the trained parameters, not the frozen backbones. (Under FSDP and
    DeepSpeed, which save their own shards, `weights` is empty and this does nothing.)
    """
    for index, (model, state_dict) in enumerate(zip(models, weights)):
        names = _trainable_names(model)
        weights[index] = {name: tensor for name, tensor in state_dict.items() if name in names}


def _load_trainable_weights(models, input_dir):
    """accelerate load hook: the counterpart of `_keep_trainable_weights`, accounting for every key."""
    for index, model in enumerate(models):
        path = Path(input_dir) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")
        saved = load_file(path)
        parameters = dict(model.named_parameters())
        expected = _trainable_names(model)
        if set(saved) != expected:
            raise ValueError(
                f"checkpoint {path} does not match what this run trains: missing {sorted(expected - set(saved))[:5]}, "
                f"unexpected {sorted(set(saved) - expected)[:5]}"
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                parameters[name].copy_(tensor)
    models.clear()  # loaded here; accelerate must not load them again


def checkpoints_in(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint folder is renamed into place only once complete)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and path.name.startswith("step-")
             and (path / "trainer_state.json").exists()]
    return sorted(found, key=lambda path: int(path.name.removeprefix("step-")))


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """Writes `checkpoints/step-N` atomically: into a temporary folder, renamed when complete; keeps the last `keep`."""
    folder = out / "checkpoints"
    final = folder / f"step-{step}"
    temporary = folder / f".step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        honour_umask(temporary)
        if final.exists():
            raise RuntimeError(f"{final} exists already; it would be overwritten")
        os.replace(temporary, final)
        for old in checkpoints_in(out)[:-keep]:
            shutil.rmtree(old)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _read_checkpoint(checkpoint: Path) -> dict:
    """A checkpoint's `trainer_state.json`; a checkpoint of the older, pickling format is refused."""
    path = checkpoint / "trainer_state.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot resume from {checkpoint}: {path} cannot be read ({error})") from error
    pickled = sorted(str(path) for path in checkpoint.glob("custom_checkpoint_*.pkl"))
    if pickled or not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = f"it holds {', '.join(pickled)}" if pickled else f"its {path.name} has no format {CHECKPOINT_FORMAT}"
        raise ValueError(
            f"cannot resume from {checkpoint}: {found}. Checkpoints of older versions of otter.train hold the "
            "scheduler as a pickle, and Otter unpickles nothing but tensors from a checkpoint (unpickling can run "
            "code). Start the run again in an empty output folder"
        )
    return saved


def _check_pickled_files(checkpoint: Path) -> None:
    """
    The files accelerate reads with `torch.load` (optimizer, RNG states, gradient scaler) must hold plain data only:
    each is read here first as accelerate reads it, with torch's `weights_only` unpickler (tensors, numbers, strings,
    containers, and the numpy types of RNG states; nothing that runs code), and one that needs more is named and
    refused. (accelerate would refuse it too, but skips RNG states it cannot read without a word.)
    """
    for path in sorted(checkpoint.iterdir()):
        if not path.is_file() or path.suffix not in (".bin", ".pkl", ".pt"):
            continue
        try:  # mmap: the tensors themselves are not read
            accelerate_load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"cannot resume from {checkpoint}: {path} does not hold plain tensor data, and Otter does not unpickle "
                f"other objects from a checkpoint (unpickling can run code): {reason}"
            ) from None


# -- data files, and what a resumed run checks -----------------------------------------------------------------
def data_fingerprint(files: list[Path]) -> dict:
    """Each file's resolved path -> its size, modification time and the SHA-256 of its first `HEAD_BYTES`."""
    fingerprint = {}
    for path in files:
        resolved = Path(path).resolve()
        stat = resolved.stat()
        with open(resolved, "rb") as file:
            head = hashlib.sha256(file.read(HEAD_BYTES)).hexdigest()
        fingerprint[str(resolved)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}
    return fingerprint


def _data_changes(saved: dict, current: dict) -> list[str]:
    """What differs between two `data_fingerprint`s, file by file."""
    def when(entry):
        return datetime.datetime.fromtimestamp(entry["mtime_ns"] / 1e9).isoformat()

    changes = []
    for path in sorted(saved.keys() | current.keys()):
        if path not in current:
            changes.append(f"{path}: read by the checkpoint's run, not by this one")
            continue
        if path not in saved:
            changes.append(f"{path}: read by this run, not by the checkpoint's")
            continue
        old, new = saved[path], current[path]
        how = []
        if old["size"] != new["size"]:
            how.append(f"size {old['size']} -> {new['size']} bytes")
        if old["head_sha256"] != new["head_sha256"]:
            how.append(f"the content of its first {HEAD_BYTES / 2**20:g} MiB differs")
        if old["mtime_ns"] != new["mtime_ns"]:
            how.append(f"modified {when(old)} -> {when(new)}")
        if how:
            changes.append(f"{path}: {', '.join(how)}")
    return changes


def _check_data(files: list[Path], saved: dict | None, config: TrainingConfig, checkpoint: Path | None) -> dict:
    """The data files' fingerprint; when resuming, files that changed since the checkpoint are refused (or logged)."""
    current = data_fingerprint(files)
    changes = _data_changes(saved.get("data_files") or {}, current) if saved is not None else []
    if changes and not config.allow_data_change:
        raise ValueError(
            f"cannot resume from {checkpoint}: the data changed since it was saved ({'; '.join(changes)}). The run "
            "continues from a position in the data as it was; pass --allow-data-change (allow_data_change) to "
            "resume anyway"
        )
    if changes:
        logger.warning("resuming from %s although the data changed (allow_data_change): %s", checkpoint,
                       "; ".join(changes))
    return current


def _resolved(path: str) -> str:
    """A local path made absolute, symbolic links resolved; URLs and `pipe:` commands as they are."""
    if "://" in path or path.startswith("pipe:"):
        return path
    return str(Path(path).expanduser().resolve())


def _checkpoint_config(config: TrainingConfig) -> dict:
    """
    The config as a checkpoint records it: model and data paths resolved (so that a run compares files, not how
    they were typed), and without `out`, the run folder itself, which may be moved.
    """
    recorded = dataclasses.asdict(config)
    del recorded["out"]
    recorded["data"] = [_resolved(path) for path in config.data]
    if Path(config.model).expanduser().exists():
        recorded["model"] = _resolved(config.model)
    return recorded


def _recorded_defaults() -> dict:
    """What a checkpoint saved before an option existed ran with: the option's default (e.g. `resample_frames`)."""
    return {option.name: option.default for option in dataclasses.fields(TrainingConfig)
            if option.default is not dataclasses.MISSING}


def _check_resumable(saved: dict, config: TrainingConfig, checkpoint: Path, num_processes: int) -> None:
    current = _checkpoint_config(config)
    free = RESUMABLE_CHANGES | ({"data"} if config.allow_data_change else set())
    recorded = {**_recorded_defaults(), **saved["config"]}  # options added since the checkpoint: their defaults
    changed = sorted(name for name in current if name not in free and recorded.get(name) != current[name])
    if changed:
        details = ", ".join(f"{name}: {recorded.get(name)!r} -> {current[name]!r}" for name in changed)
        raise ValueError(
            f"cannot resume {checkpoint} with a different run ({details}); only {sorted(RESUMABLE_CHANGES)} may change"
        )
    if saved["num_processes"] != num_processes:
        raise ValueError(
            f"{checkpoint} was saved by {saved['num_processes']} process(es); resume it with as many "
            f"(this launch has {num_processes}): the data order and RNG states are per process"
        )


# -- one run per output folder ----------------------------------------------------------------------------------
class RunLock:
    """
    One training run per output folder: an exclusive `flock` on `out/.otter-train.lock`, a file holding the pid and
    host of the run that holds it. The operating system drops the lock when that process ends, however it ends, so
    a lock file nobody holds is what a killed run left: it is taken over, with a warning. `release` removes it.
    """

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.file = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            logger.warning("cannot lock %s on this system: make sure no other run writes there", self.path.parent)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            file = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = file.read().strip() or "a process that has not written its pid yet"
                file.close()
                raise ValueError(
                    f"output folder {self.path.parent} is in use by another training run ({holder}); wait for it to "
                    "end, or choose another output folder"
                ) from None
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(file.fileno()).st_ino:
                break
            file.close()  # its holder removed the file between our open and our lock: lock the new one
        file.seek(0)
        stale = file.read().strip()
        if stale:
            logger.warning("%s: taking over the lock of a training run that is no longer running (%s)",
                           self.path.parent, stale)
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)
            self.file.close()
            self.file = None


def _main_process_decides(accelerator: Accelerator, work):
    """
    Runs `work` on the main process only and returns its result there (None elsewhere). When it fails with a user
    error (ValueError, OSError), every process raises it, so that none waits for the main one at the next collective.
    """
    result, failure = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except (ValueError, OSError) as error:
            failure = error
    message = [None if failure is None else str(failure)]
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise ValueError(message[0])
    return result


# -- records not trained on -------------------------------------------------------------------------------------
def _percent(share: float) -> str:
    return f"{share * 100:.3g}%"


class _SkippedRecords:
    """
    Whether the run trains on enough of its data. It counts, on all processes, the records of the run's first pass
    over the data (instruction data: the first epoch, in which each record comes up once; web data: every record) that
    were trained on and skipped, with the malformed records found when the files were read, and stops the run with a
    `SkippedRecordsError` on every process at once (the counts are global, so all decide alike) when it would train
    on nothing, or skip more than `max_skipped_share`: as soon as that is certain, when the first epoch is done, and
    at the end. Web data whose first `WEB_EARLY_RECORDS` records were all skipped stop too.

    The skipped share is `1 - (records read well / records read) * (trained / came up in training)`: for a whole epoch,
    the share of the data's records that are not trained on.
    """

    def __init__(self, config: TrainingConfig, data, total_steps: int, num_processes: int, saved: dict | None):
        self.limit, self.grad_accum = config.max_skipped_share, config.grad_accum
        self.malformed = data.malformed
        self.read_well = len(data.examples) if isinstance(data, InstructionData) else 0
        self.read = self.read_well + len(self.malformed)
        self.first_pass_batches = data.batches_per_epoch  # None: web data, where every micro-batch counts
        planned = total_steps * config.grad_accum * config.batch_size * num_processes
        self.planned = planned if data.records_per_epoch is None else min(planned, data.records_per_epoch)
        first_pass = (saved or {}).get("first_pass", {})
        self.examples, self.skipped = first_pass.get("examples", 0), first_pass.get("skipped", 0)
        self.reasons_before = Counter(first_pass.get("reasons", {}))
        self.reasons, self.details = Counter(), []  # this process's, since the run (re)started
        self.step_counts = [0, 0]
        self.decided = False

    def count(self, batch: dict, position: int) -> None:
        """Counts a micro-batch of this process, at `position` micro-batches from the start of training."""
        if self.first_pass_batches is not None and position >= self.first_pass_batches:
            return
        self.step_counts[0] += batch["num_examples"]
        self.step_counts[1] += sum(batch["skipped"].values())
        self.reasons.update(batch["skipped"])
        self.details += batch["skipped_details"][: 3 - len(self.details)]

    def take_step_counts(self) -> list[int]:
        """This process's first-pass (examples, skipped) since the last call: reduce them and pass them to `add`."""
        counts, self.step_counts = self.step_counts, [0, 0]
        return counts

    def add(self, examples: float, skipped: float) -> None:
        self.examples += int(examples)
        self.skipped += int(skipped)

    def check(self, step: int, end: bool = False) -> None:
        """A collective: every process calls it after the same step (`end`: the run's last)."""
        if self.decided:
            return
        first_pass_done = self.first_pass_batches is not None and step * self.grad_accum >= self.first_pass_batches
        problem = self._problem(final=end or first_pass_done)
        self.decided = first_pass_done
        if problem is not None:
            self._fail(problem)

    def _usable(self) -> float:
        return self.read_well / self.read if self.read else 1.0

    def _problem(self, final: bool) -> str | None:
        seen = self.examples + self.skipped
        if self.limit < 1 and self.planned:
            # the share this run skips at the least, whatever its records still to come hold
            least = 1 - self._usable() * (self.planned - self.skipped) / self.planned
            if least > self.limit:
                return self._share(least, f"{self.skipped} of the {self.planned} records this run reads were skipped "
                                          "already")
        if final and seen and self.examples == 0:
            malformed = (f", and {len(self.malformed)} of the {self.read} records in the data files are malformed"
                         if self.malformed else "")
            return (f"every record was skipped, so this run trains nothing: none of the {seen} records that came up in "
                    f"training could be used{malformed}")
        if final and seen and self.limit < 1:
            share = 1 - self._usable() * self.examples / seen
            if share > self.limit:
                return self._share(share, f"{self.skipped} of the {seen} records that came up in training were skipped")
        if self.first_pass_batches is None and self.examples == 0 and seen >= WEB_EARLY_RECORDS:
            return f"the first {seen} records were all skipped, so this run would train nothing"
        return None

    def _share(self, share: float, in_training: str) -> str:
        parts = [f"{len(self.malformed)} of the {self.read} records in the data files are malformed"] \
            if self.malformed else []
        if self.skipped:
            parts.append(in_training)
        return (f"{_percent(share)} of the records were skipped, more than max_skipped_share "
                f"({_percent(self.limit)}) allows: {'; '.join(parts)} (--max-skipped-share sets the share a run may "
                "skip)")

    def _fail(self, problem: str) -> None:
        reasons = Counter(skipped.reason for skipped in self.malformed) + self.reasons_before
        details = [skipped.detail for skipped in self.malformed[:3]]
        for part in gather_object([{"reasons": dict(self.reasons), "details": self.details}]):
            reasons.update(part["reasons"])
            details += part["details"]
        listed = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
        examples = f", for example: {'; '.join(details[:3])}" if details else ""
        raise SkippedRecordsError(f"{problem}. Skipped ({listed}){examples}. The log names every skipped record")

    def state(self, gathered_reasons: Counter) -> dict:
        return {"examples": self.examples, "skipped": self.skipped,
                "reasons": dict(self.reasons_before + gathered_reasons)}


# -- the run ------------------------------------------------------------------------------------------------------
def _check_output_folder(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, if any; refuses to write into a used folder without `resume`."""
    found = checkpoints_in(out)
    if resume:
        if not found:
            logger.warning("resume: no checkpoint in %s, starting from the beginning", out / "checkpoints")
        return found[-1] if found else None
    if out.exists() and any(entry.name != LOCK_FILE for entry in out.iterdir()):
        raise ValueError(f"output folder {out} is not empty: pass resume to continue its run, or choose another folder")
    return None


def _build_data(config: TrainingConfig, processor, accelerator: Accelerator):
    collator = Collator(processor, max_length=config.max_length, web=config.web, augment=config.augment,
                        seed=config.seed)
    common = dict(batch_size=config.batch_size, seed=config.seed, rank=accelerator.process_index,
                  world_size=accelerator.num_processes, num_workers=config.num_workers)
    if config.objective == INSTRUCTION:
        return InstructionData(config.data, collator, resample_frames=config.resample_frames,
                               video_sets=config.video_sets, **common)
    return WebData(config.data, collator, config.web, processor.tokenizer.eos_token or "", **common)


def _total_steps(config: TrainingConfig, batches_per_epoch: int | None) -> int:
    steps = [config.max_steps] if config.max_steps is not None else []
    if batches_per_epoch is not None and (config.epochs is not None or not steps):
        steps.append(math.ceil((config.epochs or 1) * batches_per_epoch / config.grad_accum))
    return min(steps)


def _shards_parameters(accelerator: Accelerator) -> bool:
    """Whether each process holds a shard of the parameters only (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return accelerator.distributed_type == DistributedType.FSDP


def _same_modules_everywhere(accelerator: Accelerator) -> bool:
    """
    Whether every process must run the same modules in each micro-batch. FSDP gathers a shard unit's parameters
    from all processes in its forward, ZeRO-3 a module's; every ZeRO stage reduces the gradients in buckets filled as
    the parameters get theirs, so a parameter without a gradient on one process (the perceiver's, after a micro-batch
    without images) shifts the buckets after it. DDP (`find_unused_parameters`) accounts for unused parameters.
    """
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _configure_backend(accelerator: Accelerator, config: TrainingConfig) -> None:
    asked = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(variable, "false").lower() == "true"]
    if asked and accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED) \
            and accelerator.is_main_process:
        logger.warning("the launch configuration asks for %s, but accelerate runs %s: it runs FSDP and DeepSpeed on "
                       "accelerators only, not on the CPU (use_cpu, ACCELERATE_USE_CPU); every process holds the "
                       "whole model", asked[0], accelerator.distributed_type)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        # the DataLoaders are ours, not accelerate's: tell DeepSpeed the micro-batch and the clipping
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm
    if _shards_parameters(accelerator) and (config.lora or config.train_embeddings):
        raise ValueError(
            "lora and train_embeddings need whole parameters on each process (DDP or DeepSpeed ZeRO-1/2); "
            "this launch shards them (FSDP or ZeRO-3)"
        )


def _check_sharded_model(model_config: OtterConfig) -> None:
    """
    Under FSDP and ZeRO-3 every process must run the same modules, as many times, in each micro-batch: each forward
    gathers the module's parameters from all processes. With `vision_chunk_size`, the vision tower runs once per
    chunk, and processes whose micro-batches hold different numbers of frames would run it a different number of times.
    """
    if model_config.vision_chunk_size is not None:
        raise ValueError(
            f"the model encodes images vision_chunk_size={model_config.vision_chunk_size} at a time; under FSDP or "
            "ZeRO-3 every process must run the vision tower as many times per micro-batch: set vision_chunk_size to "
            "null in the model's config.json to train it sharded (it is an inference setting), or use DDP or ZeRO-2"
        )


def _unread_images(rows: int, image_shape: tuple[int, int, int], device) -> torch.Tensor:
    """
    `pixel_values` `(rows, 1, 1, C, H, W)` of black images for a micro-batch without images, which no token reads
    (there is no `<image>` marker: the cross-attention output is multiplied by 0, so the loss and the gradients are
    those of the text alone). Under FSDP and DeepSpeed, a process whose micro-batch holds no image runs the vision
    tower, the perceiver and the cross-attention on them when another process's micro-batch holds images, as every
    process must run the same modules (`_same_modules_everywhere`).
    """
    return torch.zeros(rows, 1, 1, *image_shape, device=device)


def _gather_for_media_key_values(accelerator: Accelerator, model) -> None:
    """
    FSDP gathers a shard unit's parameters around its `forward` only, but the model computes each cross-attention
    block's media keys and values (`MaskedCrossAttention.media_key_values`, its `to_kv`) once per call, before the
    language model runs, not in a forward of the block: under FSDP2 each `MaskedCrossAttention` is a shard unit of
    its own (`fsdp_transformer_layer_cls_to_wrap` in train/configs/fsdp.yaml), and that method is registered as one
    of its forward methods, so that it gathers `to_kv` (and, in the backward, reduces its gradient) as a forward does.
    """
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    attention = [block.attn for block in model.cross_attention_blocks()]
    if not accelerator.is_fsdp2 or not all(isinstance(module, FSDPModule) for module in attention):
        raise ValueError(
            "under FSDP, each MaskedCrossAttention must be a shard unit of FSDP2 (fsdp_version: 2 and "
            "MaskedCrossAttention in fsdp_transformer_layer_cls_to_wrap, as train/configs/fsdp.yaml has them): the "
            "model computes the media keys and values outside the blocks' forward"
        )
    for module in attention:
        register_fsdp_forward_method(module, "media_key_values")


def _check_video_frames(config: TrainingConfig, model_config: OtterConfig, data) -> None:
    """Videos in the data need a model that takes `resample_frames` frames per medium."""
    if not data.has_videos:
        return
    max_frames = model_config.max_num_frames
    if max_frames is None:
        logger.warning("the data holds videos but %s has no frame embeddings (max_num_frames): a video's frames are "
                       "read as one set of tokens, without their order", config.model)
    elif config.resample_frames > max_frames:
        raise ValueError(f"resample_frames is {config.resample_frames}, but {config.model} takes at most "
                         f"{max_frames} frames per video (its max_num_frames); pass --resample-frames {max_frames} "
                         "or fewer")


def _model_to_train(config: TrainingConfig):
    """The model (with `<answer>` for instruction data) set up to train as `config` says, and its processor."""
    model = OtterForConditionalGeneration.from_pretrained(config.model, dtype=torch.float32)
    processor = OtterProcessor.from_pretrained(config.model)
    if config.objective == INSTRUCTION and add_answer_token(model, processor.tokenizer):
        use_answer_chat_template(processor)
    new_tokens = [processor.image_token_id, processor.eoc_token_id]
    if ANSWER_TOKEN in processor.tokenizer.get_vocab():
        new_tokens.append(processor.tokenizer.convert_tokens_to_ids(ANSWER_TOKEN))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return configure_training(model, config, new_tokens), processor


def _load_checkpoint(accelerator: Accelerator, checkpoint: Path, saved: dict, config: TrainingConfig, optimizer,
                     scheduler) -> None:
    """Loads `checkpoint` (weights, optimizer, RNG states; the scheduler from its JSON state), unpickling no object."""
    _check_pickled_files(checkpoint)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        logger.warning("resuming under %s, whose own checkpoint files are read with pickle: resume only checkpoints "
                       "you trust (see train/README.md)", accelerator.distributed_type)
    accelerator.load_state(checkpoint)
    scheduler_state = saved.get("scheduler")
    if not isinstance(scheduler_state, dict) or set(scheduler_state) != set(scheduler.state_dict()):
        raise ValueError(f"cannot resume from {checkpoint}: its scheduler state {scheduler_state!r} is not the state "
                         f"of this run's {config.schedule} schedule")
    scheduler.load_state_dict(json.loads(json.dumps(scheduler_state)))  # a copy: load_state_dict pops from it
    if saved["config"]["lr"] != config.lr:  # the new peak lr, at the schedule's current point
        scheduler.base_lrs = [config.lr] * len(scheduler.base_lrs)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = config.lr * factor(scheduler.last_epoch)
    logger.info("resumed from %s at step %d", checkpoint, saved["step"])


def train(config: TrainingConfig) -> Path:
    """Runs the training `config` describes and returns the output folder, an Otter folder (see module doc)."""
    out = Path(config.out)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("tensorboard logging needs the tensorboard package: pip install 'otter-flamingo[train]'")
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=PRECISIONS[config.precision] if config.precision else None,
        log_with="tensorboard" if config.tensorboard else None,
        project_dir=out,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    _configure_backend(accelerator, config)
    lock = RunLock(out) if accelerator.is_main_process else None
    try:
        _main_process_decides(accelerator, lambda: lock.acquire())
        return _run(config, accelerator, out)
    finally:
        if lock is not None:
            lock.release()


def _run(config: TrainingConfig, accelerator: Accelerator, out: Path) -> Path:
    main = accelerator.is_main_process
    resume_from = _check_output_folder(out, config.resume)
    accelerator.wait_for_everyone()  # every process looked at `out` before anything is written there
    saved = _read_checkpoint(resume_from) if resume_from is not None else None
    if saved is not None:
        _check_resumable(saved, config, resume_from, accelerator.num_processes)
    set_seed(config.seed)

    trained, processor = _model_to_train(config)
    # under ZeRO-3, transformers loads the weights already partitioned: `ds_numel` is a parameter's whole size
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trained.parameters() if p.requires_grad)

    data = _build_data(config, processor, accelerator)
    model_config = (trained.get_base_model() if config.lora else trained).config
    _check_video_frames(config, model_config, data)
    if _shards_parameters(accelerator):
        _check_sharded_model(model_config)
    same_modules = _same_modules_everywhere(accelerator)
    vision = model_config.vision_config
    image_shape = (vision.num_channels, vision.image_size, vision.image_size)
    if data.has_videos:  # the trained folder's processor samples videos as they were trained
        processor.num_frames = config.resample_frames
    data_files = _main_process_decides(accelerator, lambda: _check_data(data.files, saved, config, resume_from))
    total_steps = _total_steps(config, data.batches_per_epoch)
    optimizer = torch.optim.AdamW(parameter_groups(trained, config.weight_decay), lr=config.lr)
    scheduler = get_scheduler(SCHEDULES[config.schedule], optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=total_steps)
    trained, optimizer = accelerator.prepare(trained, optimizer)
    if accelerator.distributed_type == DistributedType.FSDP:
        _gather_for_media_key_values(accelerator, trained)
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise ValueError(
            f"the launch configuration accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
            f"grad_accum is {config.grad_accum}; leave gradient_accumulation_steps out of the launch configuration"
        )
    # the scheduler steps once per optimizer step: not prepared (accelerate would step it once per process), nor
    # registered with accelerate (which pickles it): its state is JSON in trainer_state.json
    accelerator.register_save_state_pre_hook(_keep_trainable_weights)
    accelerator.register_load_state_pre_hook(_load_trainable_weights)

    step, skipped_before = 0, Counter()
    if saved is not None:
        _load_checkpoint(accelerator, resume_from, saved, config, optimizer, scheduler)
        step, skipped_before = saved["step"], Counter(saved["skipped"])

    malformed = Counter(skipped.reason for skipped in data.malformed)
    records = _SkippedRecords(config, data, total_steps, accelerator.num_processes, saved)
    records.check(step)  # the malformed records alone may be too many
    if main:
        logger.info(
            "training %s parameters of %s for %d steps: %d process(es) x batch %d x %d accumulation = %d examples/step",
            f"{trainable:,}", config.model, total_steps, accelerator.num_processes, config.batch_size,
            config.grad_accum, accelerator.num_processes * config.batch_size * config.grad_accum,
        )
        if malformed:
            logger.warning("%d malformed records in the data files are not trained on", sum(malformed.values()))
    if config.tensorboard:
        accelerator.init_trackers("logs", config={k: str(v) for k, v in dataclasses.asdict(config).items()})
    metrics = _main_process_decides(accelerator, lambda: _MetricsFile(out / "metrics.jsonl", keep_until=step))

    def trainer_state() -> dict:
        return _trainer_state(step, config, skipped_before, skipped, records, accelerator.num_processes,
                              scheduler, data_files)

    skipped = Counter()
    stream = data.stream(start=step * config.grad_accum)
    progress = tqdm(total=total_steps, initial=step, disable=not main, desc=f"otter train ({config.objective})",
                    dynamic_ncols=True)
    with progress as bar:  # closed also when the run stops with an error, whose message then starts a line
        trained.train()
        while step < total_steps:
            started = time.perf_counter()
            group = [next(stream) for _ in range(config.grad_accum)]
            for index, batch in enumerate(group):
                skipped.update(batch["skipped"])
                records.count(batch, step * config.grad_accum + index)
            labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group if b["num_examples"])
            with_images = [int(b.get("pixel_values") is not None) for b in group]
            local = torch.tensor([labelled, sum(b["num_examples"] for b in group), *records.take_step_counts(),
                                  *with_images], device=accelerator.device)
            tokens, examples, first_pass_examples, first_pass_skipped, *images_anywhere = \
                accelerator.reduce(local, "sum").tolist()
            records.add(first_pass_examples, first_pass_skipped)
            loss_sum = torch.zeros((), device=accelerator.device)
            for batch, images_elsewhere in zip(group, images_anywhere):
                # FSDP, DeepSpeed: every process runs the vision tower when one does (see _unread_images)
                unread = same_modules and images_elsewhere and batch.get("pixel_values") is None
                with accelerator.accumulate(trained):
                    if batch["num_examples"]:
                        if unread:
                            batch = {**batch, "pixel_values": _unread_images(len(batch["input_ids"]), image_shape,
                                                                             accelerator.device)}
                        batch_loss = token_loss_sum(trained, _to_device(batch, accelerator.device))
                        # accelerate divides by grad_accum and DDP averages over processes: undo both, so the gradient
                        # is that of the mean over the global batch's tokens
                        scale = accelerator.num_processes * config.grad_accum / max(tokens, 1)
                        accelerator.backward(batch_loss * scale)
                        loss_sum += batch_loss.detach()
                    else:  # every record of this micro-batch was skipped; DDP, FSDP and DeepSpeed still expect a
                        # forward and a backward from this process: a one-token forward, with a zero loss
                        padding = torch.full((1, 1), processor.tokenizer.pad_token_id, device=accelerator.device)
                        pixel_values = _unread_images(1, image_shape, accelerator.device) if unread else None
                        logits = trained(input_ids=padding, attention_mask=torch.ones_like(padding),
                                         pixel_values=pixel_values, use_cache=False).logits
                        accelerator.backward(logits.sum() * 0.0)
            loss = accelerator.reduce(loss_sum, "sum").item() / tokens if tokens else None  # None: nothing to learn
            if loss is not None and not math.isfinite(loss):
                last = checkpoints_in(out)
                raise NonFiniteLossError(
                    f"the loss is {loss} at step {step + 1}; training stopped before applying it. "
                    + (f"The last good checkpoint is {last[-1]}: continue from it with --resume (a lower --lr, or "
                       "--precision bf16 instead of fp16, often helps)." if last else "No checkpoint was saved yet.")
                )
            grad_norm = None
            if tokens:
                grad_norm = accelerator.clip_grad_norm_(trained.parameters(), config.max_grad_norm)
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
            else:
                logger.warning("step %d: every record of the global batch was skipped; no update", step + 1)
            optimizer.zero_grad(set_to_none=True)
            step += 1

            lr = scheduler.get_last_lr()[0]
            samples_per_s = examples / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss="-" if loss is None else f"{loss:.4f}", lr=f"{lr:.2e}",
                            samples_s=f"{samples_per_s:.1f}")
            record = {"step": step, "loss": loss, "lr": lr, "examples": int(examples), "tokens": int(tokens),
                      "samples_per_s": samples_per_s,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None}
            if metrics is not None:
                metrics.write(record)
            if config.tensorboard:
                accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
            if main and (step % config.log_every == 0 or step == total_steps):
                logger.info("step %d/%d loss %s lr %.2e %.1f samples/s", step, total_steps,
                            "-" if loss is None else f"{loss:.4f}", lr, samples_per_s)
            records.check(step)
            if step % config.save_every == 0:
                save_checkpoint(accelerator, out, step, trainer_state(), config.keep_checkpoints)

    records.check(step, end=True)
    state = trainer_state()
    summary = {"step": step, "num_processes": accelerator.num_processes, "skipped": state["skipped"],
               "malformed_when_read": dict(malformed), "config": dataclasses.asdict(config)}
    _save_output(accelerator, trained, processor, config, out, summary)
    if main:
        counts = Counter(state["skipped"]) + malformed
        if counts:
            logger.warning("records not trained on (counted each time they came up): %s (total %d)",
                           ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())), sum(counts.values()))
        logger.info("wrote %s after %d steps", out, step)
    if config.tensorboard:
        accelerator.end_training()
    return out


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _trainer_state(step: int, config: TrainingConfig, before: Counter, local: Counter, records: _SkippedRecords,
                   num_processes: int, scheduler, data_files: dict | None) -> dict:
    """
    What a checkpoint records besides the tensors: the step (hence the data position: `step * grad_accum`
    micro-batches per process), the records skipped while training, on all processes (in all, and in the first pass
    over the data), the scheduler's state, the data files' fingerprint, and the config (see `_checkpoint_config`).
    """
    skipped, first_pass = Counter(before), Counter()
    # a collective: every process calls this at the same step
    for counts in gather_object([{"skipped": dict(local), "first_pass": dict(records.reasons)}]):
        skipped.update(counts["skipped"])
        first_pass.update(counts["first_pass"])
    scheduler_state = scheduler.state_dict()
    if json.loads(json.dumps(scheduler_state)) != scheduler_state:
        raise TypeError(f"the scheduler's state is not plain JSON data: {scheduler_state!r}")
    return {"format": CHECKPOINT_FORMAT, "step": step, "num_processes": num_processes, "skipped": dict(skipped),
            "first_pass": records.state(first_pass), "scheduler": scheduler_state, "data_files": data_files,
            "config": _checkpoint_config(config)}


class _MetricsFile:
    """
    `metrics.jsonl`, one JSON line per optimizer step; on resume, lines past the checkpoint are dropped, and so is an
    incomplete last line (the run stopped while writing it). A line in the middle that is not JSON is damage.
    """

    def __init__(self, path: Path, keep_until: int):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
        written = [number for number, line in enumerate(lines, 1) if line.strip()]
        kept = []
        for number in written:
            try:
                record = json.loads(lines[number - 1])
                step = record["step"] if isinstance(record, dict) else None
            except (json.JSONDecodeError, KeyError):
                step = None
            if not isinstance(step, int):
                if number == written[-1]:
                    logger.warning("%s: dropping its incomplete last line %d (the run stopped while writing it)",
                                   path, number)
                    continue
                raise ValueError(f"{path}: line {number} is not valid JSON with a step; only the last line may be cut "
                                 "short (by a run that stopped while writing it). Repair or remove that line to resume")
            if step <= keep_until:
                kept.append(lines[number - 1])
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


def _keep_used_weight_conversions(model) -> None:
    """
    `save_pretrained` writes the weights under their names in the folder the model was loaded from, reverting the
    weight conversions `from_pretrained` applied (`model._weight_conversions`). transformers (5.x) keeps only those
    that matched a weight, except when it loads under DeepSpeed ZeRO-3, where it keeps all of its model types' (its
    `_load_state_dict_into_zero3_model`): reverting unused ones renames weights that were never renamed
    (`vision_model.embeddings.*` was written `vision_model.vision_model.embeddings.*`). Keep the used ones only, as
    the other loading path does.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]


def _save_output(accelerator: Accelerator, trained, processor, config: TrainingConfig, out: Path, summary: dict):
    """
    The final Otter folder: written beside `out` in a temporary folder, then its files moved into `out`. Its
    tokenizer's `model_max_length` is the language model's limit, and its model card says how it was trained.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(trained)
    state_dict = None if config.lora else accelerator.get_state_dict(trained)  # a collective under FSDP / ZeRO-3
    if accelerator.is_main_process:
        temporary = out / ".final.partial"
        shutil.rmtree(temporary, ignore_errors=True)
        if config.lora and config.lora_output == "adapter":
            unwrapped.save_pretrained(temporary / "lora-adapter")
            unwrapped.unload().save_pretrained(temporary)
        elif config.lora:
            unwrapped.merge_and_unload().save_pretrained(temporary)
        else:
            _keep_used_weight_conversions(unwrapped)
            unwrapped.save_pretrained(temporary, state_dict=state_dict)
        model_config = OtterConfig.from_pretrained(temporary)
        limit_tokenizer_length(processor.tokenizer, model_config.text_config)  # also when the start folder had none
        processor.save_pretrained(temporary)
        (temporary / "training_summary.json").write_text(json.dumps(summary, indent=2))
        training_card(config, summary, model_config, processor, out).save(temporary / "README.md")
        honour_umask(temporary)
        for entry in temporary.iterdir():
            destination = out / entry.name
            if destination.is_dir():
                shutil.rmtree(destination)
            os.replace(entry, destination)
        temporary.rmdir()
    accelerator.wait_for_everyone()


SUBCOMMANDS = {INSTRUCTION: "finetune", PRETRAINING: "pretrain"}
RUN_ONLY = ("out", "resume")  # options of the run, not of the model it makes


def _what_trained(config: TrainingConfig) -> str:
    if config.full:
        return "every parameter" + (" but the vision encoder's" if config.freeze_vision else "")
    trained = "the perceiver and the gated cross-attention"
    if config.train_embeddings:
        trained += ", and the embedding rows of the tokens Otter adds"
    if config.lora:
        trained += (f", with LoRA adapters (rank {config.lora_rank}) on the language model, "
                    + ("merged into its weights" if config.lora_output == "merged" else "saved in lora-adapter/"))
    return trained


def training_card(config: TrainingConfig, summary: dict, model_config, processor, out: Path):
    """
    The trained folder's model card: the model it started from (its base model when that is a hub id, else the base
    model its card names; its license carries over), what trained, and the configuration that trains it again.
    """
    import yaml

    source = source_card(config.model)
    source_data = source.data if source is not None else None
    license = source_data.license if source_data is not None and source_data.license != "other" else None
    subcommand = SUBCOMMANDS[config.objective]
    settings = {name: value for name, value in dataclasses.asdict(config).items() if name not in RUN_ONLY}
    chat = ANSWER_TOKEN in processor.tokenizer.get_vocab()
    training = (
        f"Trained by Otter (`otter train {subcommand}`, {config.objective} objective) from `{config.model}`: "
        f"{summary['step']} optimizer steps on {summary['num_processes']} process(es), training "
        f"{_what_trained(config)}. `training_summary.json` beside this card records the run (skipped records "
        "included).\n\nTo train it again, save the configuration below as `config.yaml` and run "
        f"`otter train {subcommand} --config config.yaml --out NEW_FOLDER`:\n\n"
        f"```yaml\n{yaml.safe_dump(settings, sort_keys=False).rstrip()}\n```"
    )
    return model_card(
        f"{out.name}: an Otter model trained from {Path(config.model).name}",
        describe(model_config),
        usage(out.name, CHAT_PROMPT if chat else CAPTION_PROMPT),
        base_model=hub_id(config.model) or (source_data.base_model if source_data is not None else None),
        license=license,
        license_note=None if license else (f"Not stated: the license of {config.model} and of the training data "
                                           "apply."),
        sections={"Training": training},
    )


__all__ = ["TrainingConfig", "train", "NonFiniteLossError", "SkippedRecordsError", "RunLock", "add_answer_token",
           "use_answer_chat_template",
           "configure_training", "parameter_groups", "save_checkpoint", "checkpoints_in", "data_fingerprint",
           "training_card"]
