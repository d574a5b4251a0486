"""
Training data: where examples come from, before tokenization.

Every source turns its records into `Example`s (text with `<image>` markers, the images those markers stand for, and
the kind of text, which decides the labels) or, for a record it cannot use, a `Skipped` that says why. Nothing is
dropped silently: the trainer counts every `Skipped` and reports the counts.

- `JsonlInstructions`: the custom instruction format, one JSON object per line (see train/README.md); images, video
  files and videos given as lists of frame files.
- `MimicItInstructions`: MIMIC-IT's instruction JSON, its images (base64 JSON or parquet), its optional train config;
  in a video subset, each instruction's images are the frames of one video.
- `web_examples`: MMC4-style interleaved documents and LAION-style image-text pairs from webdataset shards, following
  OpenFlamingo's preprocessing rules (open_flamingo/train/data.py).
"""

import base64
import binascii
import importlib.util
import io
import json
import logging
import mmap
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from otter.processing_otter import UnreadableImageError, load_image
from otter.prompts import ANSWER_TOKEN, END_OF_CHUNK, IMAGE_TOKEN, VIDEO_TOKEN, chat_messages, render_chat
from otter.video import UnreadableVideoError, read_video, uniform_indices

logger = logging.getLogger(__name__)

# what the text of a record may not hold: the markers and the tokens that structure a sequence (a literal <video> would
# be read as a video's marker)
SPECIAL_TOKENS = (IMAGE_TOKEN, VIDEO_TOKEN, END_OF_CHUNK, ANSWER_TOKEN)
RESAMPLE_FRAMES = 16  # a video's frames, sampled uniformly (Otter's resample_frames default)
# the MIMIC-IT subsets whose instructions the Otter project reads as videos (its mimicit_dataset.py: video_data_list)
OTTER_VIDEO_SETS = ("DC", "E4D", "TVC", "FunQA", "VideoQA")
# what a broken or unreadable image raises in PIL (UnidentifiedImageError and truncation errors are OSErrors)
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

INSTRUCTION = "instruction"  # labels: answer tokens and <|endofchunk|>
INTERLEAVED = "interleaved"  # labels: OpenFlamingo's MMC4 rule
PAIR = "pair"                # labels: OpenFlamingo's LAION rule
KINDS = (INSTRUCTION, INTERLEAVED, PAIR)


@dataclass
class Example:
    """
    One training sequence before tokenization: `text` holds one `<image>` marker per entry of `images` (PIL images,
    in marker order) and one `<video>` marker per entry of `videos` (each a list of PIL frames, sampled already, in
    marker order). `kind` is one of `KINDS`. `key` names the record in messages and seeds its random choices
    (augmentation, OpenFlamingo's single-image coin) so they do not depend on the process or worker that reads it.
    """

    text: str
    images: list
    kind: str
    key: str
    videos: list = field(default_factory=list)


@dataclass
class Skipped:
    """A record that was not trained on: `reason` is what the trainer counts, `detail` says which record and why."""

    reason: str
    detail: str


@dataclass
class Turn:
    """
    One instruction and its answer, with the media it refers to, loaded lazily: `images` (file paths or image ids) and
    `videos`, each a video file's path or a list of its frames (file paths or image ids), before sampling.
    """

    instruction: str
    answer: str
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)

    @property
    def media_kinds(self) -> list[str]:
        """The turn's media in the order the text shows them: its images, then its videos."""
        return ["image"] * len(self.images) + ["video"] * len(self.videos)


def instruction_text(turns: list[Turn]) -> str:
    """
    Otter's training text: the turns as a conversation rendered by Otter's chat template (`otter.prompts.chat_template`,
    what `processor.apply_chat_template` and `otter chat` render): `<image>User: {instruction} GPT:<answer> {answer}`
    and `<|endofchunk|>` per turn, in-context turns first, joined by newlines. A video's marker is `<video>`. A turn
    with several media shows each before its own label (`<image>Image 1. <video>Video 2. User: ...`), a turn with
    none has no marker (`otter.prompts.with_images`).
    """
    return render_chat(chat_messages([(turn.instruction, turn.media_kinds, turn.answer) for turn in turns]))


def sampled(frames: list, resample_frames: int) -> list:
    """A video's frames (or their ids) sampled uniformly as Otter does (`otter.video.uniform_indices`)."""
    return [frames[index] for index in uniform_indices(len(frames), resample_frames)]


def _special_token_in(*texts: str) -> str | None:
    for text in texts:
        for token in SPECIAL_TOKENS:
            if token in text:
                return token
    return None


def _check_turn(record, where: str) -> str | None:
    """Why `record` is not a valid turn (a problem description), or None when it is."""
    if not isinstance(record, dict):
        return f"{where} is a {type(record).__name__}, expected a JSON object"
    for name in ("instruction", "answer"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            return f"{where} needs a non-empty string {name!r}, got {record.get(name)!r}"
    token = _special_token_in(record["instruction"], record["answer"])
    if token is not None:
        return f"{where} holds the special token {token!r} in its text"
    return None


def decode_image_bytes(data: bytes, name: str | None = None) -> Image.Image:
    """
    Encoded image bytes -> upright RGB PIL image, fully decoded (so a truncated file fails here, not later). Bytes
    that are no readable image raise `UnreadableImageError` naming the image as `name` (e.g. its id).
    """
    label = "image" if name is None else f"image {name}"
    try:
        opened = Image.open(io.BytesIO(data))
    except IMAGE_ERRORS as error:
        raise UnreadableImageError(f"{label} could not be read (not an image format PIL reads)") from error
    with opened:
        try:
            return load_image(opened)
        except UnreadableImageError as error:  # its message names the image "(in memory)": say which one it is
            raise UnreadableImageError(f"{label} could not be read ({error.__cause__ or error})") from error


def decode_base64(text: str | bytes) -> bytes:
    """Standard or url-safe base64 (MIMIC-IT's parquet files use the url-safe alphabet), padding optional."""
    if isinstance(text, str):
        text = text.encode("ascii")
    text = text.strip().translate(bytes.maketrans(b"-_", b"+/"))
    return base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)


# -- custom instruction JSONL -------------------------------------------------------------------------------------
class JsonlInstructions:
    """
    Instruction data in JSON Lines, one example per line::

        {"images": ["img/cat.jpg"], "instruction": "What animal is this?", "answer": "A cat.",
         "context": [{"images": ["img/dog.jpg"], "instruction": "What animal is this?", "answer": "A dog."}]}
        {"videos": ["clips/jump.mp4"], "instruction": "What does the dog do?", "answer": "It jumps."}
        {"frames": [["f/0.png", "f/1.png", "f/2.png"]], "instruction": "What moves?", "answer": "The ball."}

    `images` (default none) are paths relative to the JSONL file; `videos` video files (decoded with PyAV) and
    `frames` videos given as lists of frame files, each inner list one video, both relative to the file too; a video's
    frames are sampled uniformly to `resample_frames` (Otter's resampling; a shorter video keeps all its frames).
    A turn shows its images, then its videos, then its frame lists. `context` (optional) lists in-context examples with
    the same fields, placed before the query. Records are checked when the file is read: a malformed one (a line that
    is not UTF-8 or not valid JSON included) is listed in `malformed` and not trained on; a UTF-8 byte order mark at
    the start of the file is ignored. Media are read when an example is asked for; an unreadable one skips the
    example (`Skipped` "unreadable image" or "unreadable video", naming the file).
    """

    FIELDS = {"images", "videos", "frames", "instruction", "answer", "context"}

    def __init__(self, path: str | os.PathLike, resample_frames: int = RESAMPLE_FRAMES):
        self.path = Path(path)
        self.resample_frames = resample_frames
        self.examples: list[list[Turn]] = []
        self.line_numbers: list[int] = []
        self.malformed: list[Skipped] = []
        with open(self.path, "rb") as lines:
            for line_number, raw in enumerate(lines, 1):
                turns = self._read_line(raw, line_number)
                if turns is None:
                    continue
                if isinstance(turns, Skipped):
                    logger.warning("skipping %s (%s)", turns.detail, turns.reason)
                    self.malformed.append(turns)
                else:
                    self.examples.append(turns)
                    self.line_numbers.append(line_number)
        video_files = any(not isinstance(video, list) for turns in self.examples for turn in turns
                          for video in turn.videos)
        if video_files and importlib.util.find_spec("av") is None:
            raise ValueError(f"{self.path} holds video files; decoding them needs PyAV: "
                             "pip install 'otter-flamingo[video]'")

    @property
    def has_videos(self) -> bool:
        return any(turn.videos for turns in self.examples for turn in turns)

    def _read_line(self, raw: bytes, line_number: int) -> list[Turn] | Skipped | None:
        """The turns of one line of the file (None for a blank line)."""
        where = f"{self.path}:{line_number}"
        try:
            line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            return Skipped("malformed record", f"{where}: not UTF-8 ({error})")
        return self._parse(line, where) if line.strip() else None

    def _parse(self, line: str, where: str) -> list[Turn] | Skipped:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return Skipped("malformed record", f"{where}: not valid JSON ({error})")
        problem = _check_turn(record, where)
        if problem is None and set(record) - self.FIELDS:
            problem = f"{where} has unexpected keys {sorted(set(record) - self.FIELDS)}; expected {sorted(self.FIELDS)}"
        context = record.get("context", []) if problem is None else []
        if problem is None and not isinstance(context, list):
            problem = f"{where}: 'context' must be a list of examples, got {type(context).__name__}"
        for index, item in enumerate(context if problem is None else []):
            problem = _check_turn(item, f"{where} context[{index}]")
            if problem is None and set(item) - (self.FIELDS - {"context"}):
                problem = (f"{where} context[{index}] has unexpected keys "
                           f"{sorted(set(item) - (self.FIELDS - {'context'}))}")
            if problem is not None:
                break
        turns = []
        for item in [*context, record] if problem is None else []:
            problem = self._media_problem(item, where)
            if problem is not None:
                break
            folder = self.path.parent
            turns.append(Turn(item["instruction"], item["answer"], [folder / image for image in item.get("images", [])],
                              [folder / video for video in item.get("videos", [])]
                              + [[folder / frame for frame in frames] for frames in item.get("frames", [])]))
        if problem is not None:
            return Skipped("malformed record", problem)
        return turns

    @staticmethod
    def _media_problem(item: dict, where: str) -> str | None:
        """Why the media fields of `item` are malformed, or None."""
        for name, what in (("images", "image files"), ("videos", "video files")):
            paths = item.get(name, [])
            if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
                return f"{where}: {name!r} must be a list of {what}' paths, got {paths!r}"
        frames = item.get("frames", [])
        if not isinstance(frames, list) or not all(
                isinstance(video, list) and video and all(isinstance(frame, str) for frame in video) for video in frames):
            return (f"{where}: 'frames' must be a list of videos, each a non-empty list of frame files' paths, got "
                    f"{frames!r}")
        return None

    @property
    def files(self) -> list[Path]:
        """The files this source reads (what a resumed run checks for changes)."""
        return [self.path]

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, index: int) -> Example | Skipped:
        turns = self.examples[index]
        key = f"{self.path}:{self.line_numbers[index]}"
        images, videos = [], []
        for path in (path for turn in turns for path in turn.images):
            image = _image_file(path, key)
            if isinstance(image, Skipped):
                return image
            images.append(image)
        for video in (video for turn in turns for video in turn.videos):
            if isinstance(video, list):  # frame files: only the sampled ones are read
                frames = []
                for path in sampled(video, self.resample_frames):
                    frame = _image_file(path, key)
                    if isinstance(frame, Skipped):
                        return frame
                    frames.append(frame)
            else:
                try:
                    frames = read_video(video, num_frames=self.resample_frames)
                except UnreadableVideoError as error:  # its message names the file
                    return Skipped("unreadable video", f"{key}: {error}")
            videos.append(frames)
        return Example(instruction_text(turns), images, INSTRUCTION, key, videos)


def _image_file(path: Path, key: str) -> Image.Image | Skipped:
    """An image file, upright RGB; an unreadable one is a `Skipped` naming it."""
    try:
        return load_image(path)
    except IMAGE_ERRORS as error:  # load_image's UnreadableImageError names the file
        named = isinstance(error, UnreadableImageError)
        return Skipped("unreadable image", f"{key}: {error}" if named else
                       f"{key}: image {path} could not be read ({error})")


# -- MIMIC-IT -----------------------------------------------------------------------------------------------------
class JsonImageStore:
    """
    MIMIC-IT images as one JSON object `{image_id: base64}`, read lazily: the file is memory-mapped and indexed once
    (id -> byte span of its base64 string), so a process holds offsets, not images, and the OS shares the pages.
    """

    # a JSON string member `"key": "value"`; the value's span is what the index keeps
    MEMBER = re.compile(rb'"((?:[^"\\]|\\.)*)"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"', re.DOTALL)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.spans: dict[str, tuple[int, int]] = {}
        self._map = None
        with open(self.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            start = re.match(rb"\s*", mapped).end()
            if mapped[start:start + 1] != b"{":
                raise ValueError(f"{self.path} is not a MIMIC-IT image JSON: expected an object {{image_id: base64}}")
            for match in self.MEMBER.finditer(mapped):
                self.spans[json.loads(b'"' + match.group(1) + b'"')] = match.span(2)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.spans

    def __getstate__(self):  # DataLoader workers reopen the map themselves
        return {**self.__dict__, "_map": None}

    def base64(self, image_id: str) -> bytes:
        if self._map is None:
            with open(self.path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        start, end = self.spans[image_id]
        value = self._map[start:end]
        return json.loads(b'"' + value + b'"').encode("ascii") if b"\\" in value else value


class ParquetImageStore:
    """
    MIMIC-IT images in parquet: a `base64` column (url-safe base64) indexed by image id, as pandas writes a DataFrame
    whose index holds the ids (the index column is found through the pandas metadata, else a column named `id`).
    Only the id column is read up front; a row group is read when one of its images is asked for, and the last few
    row groups are cached. Write files with small row groups (e.g. 64-256 rows) for fast random access.
    """

    CACHED_ROW_GROUPS = 4

    def __init__(self, path: str | os.PathLike):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            parquet = pq.ParquetFile(self.path)
        except pa.ArrowException as error:
            raise ValueError(f"{self.path} is not a readable parquet file ({error})") from error
        names = parquet.schema_arrow.names
        id_column = "id"
        pandas_meta = (parquet.schema_arrow.metadata or {}).get(b"pandas")
        if pandas_meta is not None:
            index_columns = [c for c in json.loads(pandas_meta).get("index_columns", []) if isinstance(c, str)]
            if index_columns:
                id_column = index_columns[0]
        if "base64" not in names or id_column not in names:
            raise ValueError(
                f"{self.path} has columns {names}; a MIMIC-IT image parquet needs a 'base64' column and the image ids "
                "as its pandas index (or an 'id' column)"
            )
        self.locations: dict[str, tuple[int, int]] = {}
        for group in range(parquet.num_row_groups):
            ids = parquet.read_row_group(group, columns=[id_column]).column(0).to_pylist()
            for row, image_id in enumerate(ids):
                self.locations[str(image_id)] = (group, row)
        self._parquet = None
        self._cache: OrderedDict[int, list] = OrderedDict()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.locations

    def __getstate__(self):
        return {**self.__dict__, "_parquet": None, "_cache": OrderedDict()}

    def base64(self, image_id: str) -> str:
        group, row = self.locations[image_id]
        if group not in self._cache:
            if self._parquet is None:
                import pyarrow.parquet as pq

                self._parquet = pq.ParquetFile(self.path)
            self._cache[group] = self._parquet.read_row_group(group, columns=["base64"]).column(0).to_pylist()
            if len(self._cache) > self.CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(group)
        return self._cache[group][row]


def image_store(path: str | os.PathLike) -> JsonImageStore | ParquetImageStore:
    path = Path(path)
    if path.suffix == ".parquet":
        return ParquetImageStore(path)
    if path.suffix == ".json":
        return JsonImageStore(path)
    raise ValueError(f"MIMIC-IT images must be a .json or .parquet file, got {path}")


class MimicItInstructions:
    """
    A MIMIC-IT subset: `<name>_instructions.json` (`{"meta": ..., "data": {ins_id: {"instruction", "answer",
    "image_ids", "rel_ins_ids"}}}`), its images `<name>.parquet` or `<name>.json` beside it, and, when present,
    `<name>_train.json` (`{ins_id: [in-context ins_ids]}`): then each key is one example, its in-context instructions
    first. Without a train config every instruction is an example on its own.

    In an image subset each image id becomes one `<image>`. In a video subset (`video=True`) an instruction's image ids
    are the frames of one video, one `<video>`, sampled uniformly to `resample_frames` as Otter does (only the sampled
    frames are decoded); a turn about the same video as the turn before it shows no marker again (Otter's video
    conversations show the video once, before the first turn), so the text after it reads that video.
    """

    SUFFIX = "_instructions.json"

    def __init__(self, instructions_path: str | os.PathLike, video: bool = False,
                 resample_frames: int = RESAMPLE_FRAMES):
        self.path = Path(instructions_path)
        if not self.path.name.endswith(self.SUFFIX):
            raise ValueError(f"a MIMIC-IT instruction file is named <name>{self.SUFFIX}, got {self.path.name}")
        self.name = self.path.name.removesuffix(self.SUFFIX)
        self.video, self.resample_frames = video, resample_frames
        candidates = [self.path.with_name(self.name + suffix) for suffix in (".parquet", ".json")]
        found = [candidate for candidate in candidates if candidate.exists()]
        if len(found) != 1:
            raise ValueError(
                f"{self.path} needs exactly one image file beside it, {candidates[0].name} or {candidates[1].name}; "
                f"found {[f.name for f in found] or 'none'}"
            )
        self.images = image_store(found[0])
        self.train_config_path = self.path.with_name(self.name + "_train.json")
        document = _read_json(self.path)
        if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
            raise ValueError(f"{self.path} is not a MIMIC-IT instruction file: expected {{'meta': ..., 'data': {{...}}}}")
        instructions = document["data"]
        if self.train_config_path.exists():
            train_config = _read_json(self.train_config_path)
            if not isinstance(train_config, dict):
                raise ValueError(f"{self.train_config_path} must map instruction ids to lists of in-context ids")
        else:
            train_config = {ins_id: [] for ins_id in instructions}
        self.examples: list[tuple[str, list[Turn]]] = []
        self.malformed: list[Skipped] = []
        for ins_id, context_ids in train_config.items():
            turns = self._turns(instructions, ins_id, context_ids)
            if isinstance(turns, Skipped):
                logger.warning("skipping %s (%s)", turns.detail, turns.reason)
                self.malformed.append(turns)
            else:
                self.examples.append((ins_id, turns))
        if video:
            logger.info("%s: a video subset; each instruction's image ids are the frames of one video, sampled to %d",
                        self.path, resample_frames)
        most = max((len(turn.images) for _, turns in self.examples for turn in turns), default=0)
        if most > resample_frames:  # a video subset read as images would show each frame as an <image>
            logger.warning("%s: an instruction has %d images, each read as an <image>; if they are the frames of a "
                           "video, list %r in video_sets", self.path, most, self.name)

    def _turns(self, instructions: dict, ins_id: str, context_ids) -> list[Turn] | Skipped:
        where = f"{self.path.name}:{ins_id}"
        if not isinstance(context_ids, list):
            return Skipped("malformed record", f"{where}: in-context ids must be a list, got {context_ids!r}")
        turns, previous_video = [], None
        for turn_id in [*context_ids, ins_id]:
            record = instructions.get(turn_id)
            if record is None:
                return Skipped("malformed record", f"{where}: instruction {turn_id!r} is not in the instruction file")
            problem = _check_turn(record, f"{where} ({turn_id})")
            image_ids = record.get("image_ids", []) if isinstance(record, dict) else None
            if problem is None and (not isinstance(image_ids, list) or not all(isinstance(i, str) for i in image_ids)):
                problem = f"{where} ({turn_id}): 'image_ids' must be a list of ids, got {image_ids!r}"
            missing = [i for i in image_ids if i not in self.images] if problem is None else []
            if missing:
                problem = f"{where} ({turn_id}): image ids {missing[:3]} are not in {self.images.path.name}"
            if problem is None and self.video and not image_ids:
                problem = f"{where} ({turn_id}): an instruction of the video subset {self.name} has no frames (image_ids)"
            if problem is not None:
                return Skipped("malformed record", problem)
            if not self.video:
                turns.append(Turn(record["instruction"], record["answer"], list(image_ids)))
                continue
            turns.append(Turn(record["instruction"], record["answer"],
                              videos=[] if image_ids == previous_video else [list(image_ids)]))
            previous_video = image_ids
        return turns

    @property
    def has_videos(self) -> bool:
        return self.video and bool(self.examples)

    @property
    def files(self) -> list[Path]:
        """The files this source reads: instructions, images, and the train config when there is one."""
        return [self.path, self.images.path] + ([self.train_config_path] if self.train_config_path.exists() else [])

    def __len__(self) -> int:
        return len(self.examples)

    def _images(self, image_ids: list[str], key: str) -> list[Image.Image] | Skipped:
        """The images of `image_ids`, decoded; the first that cannot be read makes the example a `Skipped`."""
        images = []
        for image_id in image_ids:
            try:
                encoded = decode_base64(self.images.base64(image_id))
            except (binascii.Error, ValueError) as error:
                return Skipped("unreadable image", f"{key}: image {image_id} is not base64 ({error})")
            try:
                images.append(decode_image_bytes(encoded, image_id))
            except IMAGE_ERRORS as error:
                return Skipped("unreadable image", f"{key}: {error}")
        return images

    def example(self, index: int) -> Example | Skipped:
        ins_id, turns = self.examples[index]
        key = f"{self.path.name}:{ins_id}"
        images = self._images([image_id for turn in turns for image_id in turn.images], key)
        if isinstance(images, Skipped):
            return images
        videos = []
        for frame_ids in (frame_ids for turn in turns for frame_ids in turn.videos):
            frames = self._images(sampled(frame_ids, self.resample_frames), key)  # only the sampled frames
            if isinstance(frames, Skipped):
                return frames
            videos.append(frames)
        return Example(instruction_text(turns), images, INSTRUCTION, key, videos)


def _read_json(path: Path):
    """A JSON file's content; a file that is not UTF-8 JSON (a byte order mark is fine) raises a ValueError."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            return json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a UTF-8 JSON file ({error})") from error


def is_video_set(name: str, video_sets: list[str] | None = None) -> bool:
    """
    Whether the MIMIC-IT subset `name` (the `<name>` of `<name>_instructions.json`) holds videos: it is one of
    `video_sets`, or, when that is None, one of the subsets the Otter project reads as videos (`OTTER_VIDEO_SETS`:
    DC, E4D, TVC, FunQA, VideoQA). Names compare case-insensitively.
    """
    names = OTTER_VIDEO_SETS if video_sets is None else video_sets
    return name.casefold() in {video_set.casefold() for video_set in names}


def instruction_source(path: str | os.PathLike, resample_frames: int = RESAMPLE_FRAMES,
                       video_sets: list[str] | None = None) -> JsonlInstructions | MimicItInstructions:
    """
    A data file given to `otter train finetune`: custom JSONL (`*.jsonl`) or MIMIC-IT (`*_instructions.json`), whose
    videos are sampled to `resample_frames`; `video_sets` names the MIMIC-IT subsets of videos (see `is_video_set`).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        return JsonlInstructions(path, resample_frames=resample_frames)
    if path.name.endswith(MimicItInstructions.SUFFIX):
        name = path.name.removesuffix(MimicItInstructions.SUFFIX)
        return MimicItInstructions(path, video=is_video_set(name, video_sets), resample_frames=resample_frames)
    raise ValueError(
        f"cannot tell the format of {path}: instruction data is custom JSONL (*.jsonl) or MIMIC-IT "
        f"(<name>{MimicItInstructions.SUFFIX} with its images beside it)"
    )


# -- web data (OpenFlamingo's MMC4 and LAION preprocessing) -------------------------------------------------------
@dataclass
class WebDataOptions:
    """
    OpenFlamingo's preprocessing knobs for web data (defaults as its README's training command).

    similarity_threshold: an MMC4 image is kept when its best CLIP similarity to a sentence reaches this.
    max_images / min_images: an MMC4 document keeps its first `max_images` images; one left with fewer than
        `min_images` `<image>` markers after truncation is skipped.
    min_image_bytes: MMC4 images smaller than this are dropped (OpenFlamingo keeps images with `bytes // 1000 > 10`).
    single_image_keep_prob: OpenFlamingo keeps half of the MMC4 documents that end up with a single image.
    max_tokens_interleaved / max_tokens_pair: truncation lengths (256 for MMC4, 32 for LAION).
    shuffle_buffer: samples shuffled in a buffer of this size after the shards are shuffled.
    """

    similarity_threshold: float = 0.24
    max_images: int = 6
    min_images: int = 1
    min_image_bytes: int = 11_000
    single_image_keep_prob: float = 0.5
    max_tokens_interleaved: int = 256
    max_tokens_pair: int = 32
    shuffle_buffer: int = 1000


def mmc4_example(document: dict, key: str, options: WebDataOptions, eos_token: str) -> Example | Skipped:
    """
    An MMC4 document (`text_list`, `image_info[i].image_base64`, `similarity_matrix` images x sentences) as
    OpenFlamingo builds it: each image goes before the sentence it is most similar to, as `<|endofchunk|><image>`,
    if that similarity reaches the threshold and the image is large enough; the first `<|endofchunk|>` is removed,
    spaces around markers are trimmed, and the text ends with `<|endofchunk|>` and the eos token.

    One change from OpenFlamingo: images are ordered by the sentence they precede, so the i-th marker always gets the
    i-th image (OpenFlamingo keeps `image_info` order, which pairs markers with the wrong images when that order
    differs from the text's).
    """
    if not document.get("image_info"):
        return Skipped("no usable images", f"{key}: the document has no images")
    try:
        sentences = list(document["text_list"])
        image_info = list(document["image_info"])
        similarity = np.asarray(document["similarity_matrix"], dtype=np.float64).reshape(len(image_info), -1)
        if not all(isinstance(sentence, str) for sentence in sentences):
            raise TypeError("text_list must hold strings")
        if image_info and similarity.shape[1] != len(sentences):
            raise ValueError(f"similarity_matrix has {similarity.shape[1]} columns for {len(sentences)} sentences")
    except (KeyError, TypeError, ValueError) as error:
        return Skipped("malformed record", f"{key}: not an MMC4 document ({error!r})")
    if _special_token_in(*sentences):
        return Skipped("malformed record", f"{key}: the text holds the special token {_special_token_in(*sentences)!r}")
    placed = []  # (sentence index, order in image_info, image)
    for order, (info, scores) in enumerate(zip(image_info, similarity)):
        if not isinstance(info, dict) or "image_base64" not in info:
            continue
        try:
            raw = decode_base64(info["image_base64"])
        except (binascii.Error, ValueError, TypeError) as error:
            return Skipped("unreadable image", f"{key}: image {order} is not base64 ({error})")
        sentence = int(np.argmax(scores))
        if len(raw) < options.min_image_bytes or scores[sentence] < options.similarity_threshold:
            continue
        try:
            placed.append((sentence, order, decode_image_bytes(raw, str(order))))
        except IMAGE_ERRORS as error:
            return Skipped("unreadable image", f"{key}: {error}")
    if not placed:
        return Skipped("no usable images", f"{key}: no image passed the size and similarity filters")
    placed = sorted(placed[: options.max_images], key=lambda item: (item[0], item[1]))
    for sentence, _, _ in placed:
        sentences[sentence] = f"{END_OF_CHUNK}{IMAGE_TOKEN}{sentences[sentence]}"
    text = " ".join(sentences).replace(END_OF_CHUNK, "", 1)
    text = text.replace(f" {END_OF_CHUNK}", END_OF_CHUNK).replace(f"{IMAGE_TOKEN} ", IMAGE_TOKEN)
    text = text.replace(f" {IMAGE_TOKEN}", IMAGE_TOKEN)
    return Example(f"{text}{END_OF_CHUNK}{eos_token}", [image for _, _, image in placed], INTERLEAVED, key)


def laion_example(image_bytes: bytes, caption: bytes, key: str, eos_token: str) -> Example | Skipped:
    """An image-caption pair as OpenFlamingo builds it: `<image>{caption}<|endofchunk|>{eos}`."""
    try:
        caption = caption.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        return Skipped("malformed record", f"{key}: caption is not UTF-8 ({error})")
    if _special_token_in(caption):
        return Skipped("malformed record", f"{key}: the caption holds the special token {_special_token_in(caption)!r}")
    try:
        image = decode_image_bytes(image_bytes)
    except IMAGE_ERRORS as error:
        return Skipped("unreadable image", f"{key}: {error}")
    return Example(f"{IMAGE_TOKEN}{caption}{END_OF_CHUNK}{eos_token}", [image], PAIR, key)


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def web_example(sample: dict, options: WebDataOptions, eos_token: str) -> Example | Skipped:
    """One webdataset sample: `json` holding an MMC4 document, or an image (`jpg`/`jpeg`/`png`/`webp`) with `txt`."""
    key = f"{sample.get('__url__')}:{sample.get('__key__')}"
    if "json" in sample:
        try:
            document = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return Skipped("malformed record", f"{key}: json is not valid JSON ({error})")
        if not isinstance(document, dict):
            return Skipped("malformed record", f"{key}: json holds a {type(document).__name__}, not an MMC4 document")
        if "is_gpt" in document:
            return Skipped("unsupported record", f"{key}: ChatGPT-generated sequences (is_gpt) are not supported")
        return mmc4_example(document, key, options, eos_token)
    image_key = next((extension for extension in IMAGE_EXTENSIONS if extension in sample), None)
    if image_key is not None and "txt" in sample:
        return laion_example(sample[image_key], sample["txt"], key, eos_token)
    fields = sorted(name for name in sample if not name.startswith("__"))
    return Skipped("malformed record", f"{key}: neither an MMC4 document (json) nor an image-text pair; has {fields}")
