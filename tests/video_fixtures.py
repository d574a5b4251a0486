"""Short videos the tests write themselves (PyAV encodes them; GIFs through PIL), and how to tell their frames apart."""

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av", reason="pip install 'otter-flamingo[video]'")

# container -> (codec, pixel format): lossy and lossless, with a frame count in the header (mp4, avi) or not (mkv, webm)
CODECS = {"mp4": ("libx264", "yuv420p"), "webm": ("libvpx-vp9", "yuv420p"), "avi": ("png", "rgb24"),
          "mkv": ("ffv1", "bgr0")}
FORMATS = [*CODECS, "gif"]


def colour(index: int) -> tuple[int, int, int]:
    """Frame `index`'s colour: far from every other frame's, so a lossy codec keeps them apart."""
    return ((index * 20) % 256, (255 - index * 20) % 256, (60 + index * 50) % 256)


def colour_frames(count: int, size=(40, 30)) -> list[Image.Image]:
    return [Image.new("RGB", size, colour(index)) for index in range(count)]


def write_video(path, frames: list[Image.Image], fps: int = 10):
    """`frames` as a video file in the format of `path`'s suffix."""
    suffix = path.suffix.lstrip(".")
    if suffix == "gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
        return path
    codec, pixel_format = CODECS[suffix]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = pixel_format
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_indices(decoded, count: int) -> list[int]:
    """Which of the `count` coloured frames each decoded frame is (nearest colour)."""
    palette = np.array([colour(index) for index in range(count)], dtype=np.float64)
    arrays = [np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame, dtype=np.float64)
              for frame in decoded]
    means = [(array.transpose(1, 2, 0) if array.shape[0] == 3 else array).reshape(-1, 3).mean(0) for array in arrays]
    return [int(np.abs(palette - mean).sum(1).argmin()) for mean in means]
