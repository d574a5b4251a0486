"""
The order in which examples reach each process, and where a resumed run picks it up.

Both kinds of data become one endless stream of this process's micro-batches, epoch after epoch, so that a run is a
number of optimizer steps and a data position is a number of micro-batches:

- `InstructionData` (map-style: custom JSONL, MIMIC-IT): each epoch is a seeded permutation of all examples, dealt
  to the processes as `DistributedSampler` does, so the global batch of a step holds the same examples whatever the
  number of processes (with the per-process batch size scaled to match). Resuming skips sampler indices, without
  reading the skipped examples.
- `WebData` (iterable: webdataset shards): each epoch shuffles the shard list (seeded), deals the shards to the
  processes and their DataLoader workers, and shuffles samples in a seeded buffer. Resuming skips raw samples before
  they are decoded.

Random choices made per example (augmentation, OpenFlamingo's coin for single-image documents) are seeded by the
example's key and epoch, never by the process or worker that reads it.
"""

import bisect
import itertools
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from .collate import Collator
from .data import (RESAMPLE_FRAMES, MimicItInstructions, Skipped, WebDataOptions, instruction_source, is_video_set,
                   web_example)

logger = logging.getLogger(__name__)


class InstructionExamples(Dataset):
    """
    All examples of the instruction files, in file order; item `i` is encoded (or a `Skipped`). Videos are sampled to
    `resample_frames`; `video_sets` names the MIMIC-IT subsets of videos (None: Otter's, `data.OTTER_VIDEO_SETS`).
    """

    def __init__(self, paths: list[str], collator: Collator, resample_frames: int = RESAMPLE_FRAMES,
                 video_sets: list[str] | None = None):
        self.sources = [instruction_source(path, resample_frames, video_sets) for path in paths]
        subsets = [source.name for source in self.sources if isinstance(source, MimicItInstructions)]
        unknown = [name for name in video_sets or [] if not any(is_video_set(subset, [name]) for subset in subsets)]
        if unknown:
            raise ValueError(f"video_sets names {unknown}, which are not among the MIMIC-IT subsets of the data "
                             f"({subsets or 'none'}); a subset's name is the <name> of <name>_instructions.json")
        self.collator = collator
        self.epoch = 0
        self.starts = list(itertools.accumulate((len(source) for source in self.sources), initial=0))

    @property
    def malformed(self) -> list[Skipped]:
        """Records rejected when the files were read (every process reads them alike)."""
        return [skipped for source in self.sources for skipped in source.malformed]

    @property
    def files(self) -> list[Path]:
        return [path for source in self.sources for path in source.files]

    @property
    def has_videos(self) -> bool:
        return any(source.has_videos for source in self.sources)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int):
        source = bisect.bisect_right(self.starts, index) - 1
        example = self.sources[source].example(index - self.starts[source])
        return example if isinstance(example, Skipped) else self.collator.encode(example, self.epoch)


class InstructionData:
    """
    This process's micro-batches of instruction data, epoch after epoch.

    `batches_per_epoch` is the same on every process: the sampler pads the permutation (repeating its start) to a
    multiple of the number of processes, as `DistributedSampler` does; `records_per_epoch` counts the padded
    permutation (every example once, a few twice), over all processes.
    """

    def __init__(self, paths: list[str], collator: Collator, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, resample_frames: int = RESAMPLE_FRAMES, video_sets: list[str] | None = None):
        self.examples = InstructionExamples(paths, collator, resample_frames, video_sets)
        if len(self.examples) == 0:
            malformed = self.examples.malformed
            raise ValueError(f"no usable examples in {paths}: " + (
                f"all {len(malformed)} records are malformed, e.g. {malformed[0].detail}" if malformed
                else "the files hold no records"))
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = num_workers
        per_process = -(-len(self.examples) // world_size)
        self.batches_per_epoch = -(-per_process // batch_size)
        self.records_per_epoch = per_process * world_size

    @property
    def malformed(self) -> list[Skipped]:
        return self.examples.malformed

    @property
    def files(self) -> list[Path]:
        """Every file the examples come from (instruction files, MIMIC-IT's image and train-config files)."""
        return self.examples.files

    @property
    def has_videos(self) -> bool:
        """Whether any example holds a video (JSONL `videos` or `frames`, a MIMIC-IT video subset)."""
        return self.examples.has_videos

    def stream(self, start: int = 0) -> Iterator[dict]:
        """Micro-batches from position `start` (micro-batches since the beginning of training) on."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        for epoch in itertools.count(epoch):
            sampler = DistributedSampler(self.examples, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                         seed=self.seed)
            sampler.set_epoch(epoch)
            indices = list(sampler)[skip * self.batch_size:]
            skip = 0
            self.examples.epoch = epoch  # workers are started per epoch and copy it
            loader = DataLoader(self.examples, batch_size=self.batch_size, sampler=indices,
                                collate_fn=self.examples.collator, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader


def expand_shards(patterns: list[str]) -> list[str]:
    """Shard paths or URLs, with brace patterns (`shards-{000..099}.tar`) expanded; local files must exist."""
    shards = [shard for pattern in patterns for shard in braceexpand.braceexpand(pattern)]
    missing = [shard for shard in shards if "://" not in shard and not shard.startswith("pipe:")
               and not os.path.exists(shard)]
    if missing:
        raise ValueError(f"shard files not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if not shards:
        raise ValueError("no shards given")
    return shards


class WebSamples(IterableDataset):
    """
    An endless stream of encoded web examples (or `Skipped`) for one process; each DataLoader worker reads its own
    share of the shards. `skip_batches` is how many micro-batches of this process were already trained on.
    """

    def __init__(self, shards: list[str], collator: Collator, options: WebDataOptions, eos_token: str, seed: int,
                 rank: int, world_size: int, batch_size: int, skip_batches: int = 0):
        self.shards, self.collator, self.options, self.eos_token = shards, collator, options, eos_token
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.skip_batches = skip_batches

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        # the DataLoader takes batches from its workers in turn: this worker made every num_workers-th one
        done = self.skip_batches // num_workers + (worker_id < self.skip_batches % num_workers)
        reader = self.rank * num_workers + worker_id
        raw = itertools.islice(self._raw(reader, self.world_size * num_workers), done * self.batch_size, None)
        for epoch, sample in raw:
            if isinstance(sample, Skipped):
                yield sample
                continue
            example = web_example(sample, self.options, self.eos_token)
            yield example if isinstance(example, Skipped) else self.collator.encode(example, epoch)

    def _raw(self, reader: int, readers: int):
        """(epoch, raw webdataset sample or Skipped) for reader `reader` of `readers`, forever."""
        for epoch in itertools.count():
            shards = list(self.shards)
            random.Random(f"{self.seed}:{epoch}").shuffle(shards)
            mine = shards[reader::readers]
            samples = wds.shuffle(self.options.shuffle_buffer, initial=self.options.shuffle_buffer,
                                  rng=random.Random(f"{self.seed}:{epoch}:{reader}"))(self._read(mine))
            readable = 0
            for sample in samples:
                readable += not isinstance(sample, Skipped)
                yield epoch, sample
            if readable == 0:
                raise ValueError(f"the shards {mine} hold no readable samples (are they webdataset .tar files?)")

    @staticmethod
    def _read(shards: list[str]):
        """The samples of `shards`; a read error becomes a `Skipped` in the stream, and reading goes on."""
        errors = []

        def record(error: Exception) -> bool:
            errors.append(error)
            return True

        def drain():
            while errors:
                yield Skipped("unreadable shard data", f"{errors.pop(0)!r}")

        for sample in wds.tariterators.tarfile_samples(({"url": shard} for shard in shards), handler=record):
            yield from drain()
            yield sample
        yield from drain()


class WebData:
    """This process's micro-batches of web data, endless; see `WebSamples`."""

    batches_per_epoch = None  # unknown without reading the shards: pretraining runs for a number of steps
    records_per_epoch = None

    def __init__(self, patterns: list[str], collator: Collator, options: WebDataOptions, eos_token: str,
                 batch_size: int, seed: int, rank: int, world_size: int, num_workers: int):
        self.shards = expand_shards(patterns)
        readers = world_size * max(num_workers, 1)
        if len(self.shards) < readers:
            raise ValueError(
                f"{len(self.shards)} shards for {world_size} processes x {max(num_workers, 1)} DataLoader workers: "
                "every reader needs at least one shard; pass more shards or fewer workers"
            )
        self.collator, self.options, self.eos_token = collator, options, eos_token
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = num_workers

    @property
    def malformed(self) -> list[Skipped]:
        return []

    has_videos = False

    @property
    def files(self) -> list[Path]:
        """The local shard files (shards read from URLs or `pipe:` commands are not files here)."""
        return [Path(shard) for shard in self.shards if "://" not in shard and not shard.startswith("pipe:")]

    def stream(self, start: int = 0) -> Iterator[dict]:
        samples = WebSamples(self.shards, self.collator, self.options, self.eos_token, self.seed, self.rank,
                             self.world_size, self.batch_size, skip_batches=start)
        return iter(DataLoader(samples, batch_size=self.batch_size, collate_fn=self.collator,
                               num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed)))
