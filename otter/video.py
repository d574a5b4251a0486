"""
Videos as the processor takes them: a file (mp4, webm, avi, mkv, gif, ... decoded with PyAV, imported only when a file
is given: `pip install 'otter-flamingo[video]'`), a list of frames (PIL images or image paths), a numpy array
`(T, H, W, C)` or a tensor `(T, C, H, W)` / `(T, H, W, C)`; sampled to a number of frames, or at a rate.
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = {".mp4", ".webm", ".avi", ".mkv", ".mov", ".gif", ".m4v", ".mpg", ".mpeg", ".ogv"}


class UnreadableVideoError(ValueError):
    """A video that cannot be decoded (missing, truncated, not a video, no frames); the message names it."""


def uniform_indices(total: int, num_frames: int | None) -> list[int]:
    """
    `num_frames` indices spread uniformly over `total` frames, first and last included (Otter's `resample_frames`:
    `np.linspace(0, total - 1, num_frames, dtype=int)`); every frame when there are no more than `num_frames`.
    """
    if total < 1:
        raise ValueError("a video needs at least one frame")
    if num_frames is None or total <= num_frames:
        return list(range(total))
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def rate_indices(total: int, video_fps: float, fps: float, num_frames: int | None = None) -> list[int]:
    """The frames at times 0, 1/fps, 2/fps, ... of a `video_fps` video (then at most `num_frames`, uniformly)."""
    if fps <= 0 or video_fps <= 0:
        raise ValueError(f"fps must be positive, got fps={fps} for a video of {video_fps} fps")
    times = np.arange(0, total / video_fps, 1 / fps)
    picked = sorted(set(np.minimum((times * video_fps).astype(int), total - 1).tolist()))
    return [picked[i] for i in uniform_indices(len(picked), num_frames)]


def _decode(path: Path, num_frames: int | None, fps: float | None) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise ImportError("decoding video files needs PyAV: pip install 'otter-flamingo[video]'") from None
    if not path.is_file():
        raise UnreadableVideoError(f"video {path} does not exist" if not path.exists() else f"video {path} is not a file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableVideoError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            video_fps = float(stream.average_rate or stream.guessed_rate or 0) or None
            total = stream.frames
            if total and fps is None:  # the count is known: keep only the frames wanted while decoding
                wanted = set(uniform_indices(total, num_frames))
                frames = {index: frame.to_image() for index, frame in enumerate(container.decode(stream))
                          if index in wanted}
                if len(frames) == len(wanted):
                    return [frames[index].convert("RGB") for index in sorted(frames)]
                container.seek(0)  # the header's count was wrong: decode them all below
            decoded = [frame.to_image() for frame in container.decode(stream)]
    except (av.error.FFmpegError, OSError) as error:
        raise UnreadableVideoError(f"video {path} could not be decoded ({error})") from error
    if not decoded:
        raise UnreadableVideoError(f"video {path} has no frames")
    if fps is not None:
        if video_fps is None:
            raise UnreadableVideoError(f"video {path} states no frame rate: sample it by num_frames instead of fps")
        indices = rate_indices(len(decoded), video_fps, fps, num_frames)
    else:
        indices = uniform_indices(len(decoded), num_frames)
    return [decoded[index].convert("RGB") for index in indices]


def read_video(video, num_frames: int | None = None, fps: float | None = None) -> list:
    """
    A video -> its sampled frames, in order: `num_frames` spread uniformly (every frame when it has no more), or those
    at `fps` frames per second (a file's own rate tells the times; then at most `num_frames`). Frames stay in the form
    they were given (PIL images, paths, arrays), to be preprocessed like images.
    """
    if isinstance(video, (str, os.PathLike)):
        return _decode(Path(video), num_frames, fps)
    if isinstance(video, (list, tuple)):
        frames = list(video)
    elif isinstance(video, np.ndarray) or type(video).__module__.startswith("torch"):
        array = video.detach().cpu().numpy() if not isinstance(video, np.ndarray) else video
        if array.ndim != 4:
            raise ValueError(f"a video array must be (frames, H, W, C) or (frames, C, H, W), got shape {array.shape}")
        frames = list(array)
    else:
        raise ValueError(f"a video is a file path, a list of frames, an array or a tensor; got {type(video).__name__}")
    if not frames:
        raise ValueError("a video needs at least one frame")
    if fps is not None:
        raise ValueError("fps samples a video file by its own frame rate; frames given as a list or array have none: "
                         "use num_frames")
    return [frames[index] for index in uniform_indices(len(frames), num_frames)]


def is_video_file(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() in VIDEO_SUFFIXES


__all__ = ["read_video", "uniform_indices", "rate_indices", "UnreadableVideoError", "is_video_file"]
