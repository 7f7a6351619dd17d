"""Videos (files, frame folders, frame lists, arrays) to uint8 RGB frames, sampled uniformly as the release does."""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.utils import logging


logger = logging.get_logger(__name__)

_PIP_HINT = 'pip install "transformers-videorefer[video]"'

# Files of a frame folder that count as frames; anything else (and hidden files) is ignored.
FRAME_IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# Encoders for `write_video`, best first: lossless RGB H.264, then FFmpeg's built-in MPEG-4 Part 2.
_VIDEO_ENCODERS = (
    ("libx264rgb", "rgb24", {"crf": "0"}, None),
    ("mpeg4", "yuv420p", {}, 8_000_000),
)


@dataclass
class LoadedVideo:
    """
    Frames of one video, all uint8 RGB `[height, width, 3]` at the source resolution.

    Args:
        frames: the `num_frames` sampled frames, in order (a short video repeats frames; repeats share memory).
        frame_indices: the source-video index of each sampled frame.
        extra_frames: the requested extra frames, by source-video index (e.g. frames that carry masks).
        num_video_frames: the number of frames in the source video.
        height: frame height in pixels.
        width: frame width in pixels.
    """

    frames: list[np.ndarray]
    frame_indices: list[int]
    extra_frames: dict[int, np.ndarray]
    num_video_frames: int
    height: int
    width: int


def sample_frame_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """
    The release's uniform sampling: the span `[0, num_video_frames - 1]` is cut into `num_frames` equal segments and
    each segment contributes the frame nearest its centre (`round(centre + 1e-6)`, so exact halves round up). A video
    shorter than `num_frames` yields repeated indices.
    """
    for value, argument in ((num_video_frames, "num_video_frames"), (num_frames, "num_frames")):
        if not _is_integer(value) or value < 1:
            raise ValueError(f"{argument} must be a positive integer, got {value!r}")
    segment = (num_video_frames - 1) / num_frames
    starts = segment * np.arange(num_frames)
    ends = segment * np.arange(1, num_frames + 1)
    return np.round((starts + ends) / 2 + 1e-6).astype(np.int64).tolist()


def load_video(video, num_frames: int, extra_frame_indices: Iterable[int] = (), name: str = "videos") -> LoadedVideo:
    """
    Loads the `num_frames` uniformly sampled frames of a video, plus the frames `extra_frame_indices`.

    `video` may be a path to a video file (any format FFmpeg reads, decoded with PyAV; frame `i` is the `i`-th frame
    the decoder outputs, the numbering decord gives), a path to a folder of frame images (frame `i` is the `i`-th
    image file in `sorted()` file-name order, hidden and non-image files ignored), a list of frames (image paths, PIL
    images, arrays or tensors `[H, W, 3]`), or an array or tensor `[T, H, W, 3]` or `[T, 3, H, W]` (channels-last
    wins when both fit). Pixel values are uint8, any integer type within [0, 255], or floats in [0, 1] (scaled by 255
    and rounded). Only the needed frames are decoded and kept, never the whole video.

    Errors are `ValueError`/`TypeError` whose message starts with `name`.
    """
    extra_indices = _check_frame_indices(extra_frame_indices, name)
    if isinstance(video, (str, os.PathLike)) and Path(video).is_file():
        num_video_frames, frames_by_index = _decode_video_file(Path(video), num_frames, extra_indices, name)
    else:
        num_video_frames, read_frame = _frame_source(video, name)
        wanted = _wanted_indices(num_video_frames, num_frames, extra_indices)
        frames_by_index = {index: read_frame(index) for index in sorted(wanted)}
    for index in extra_indices:
        if index >= num_video_frames:
            raise ValueError(
                f"{name}: frame index {index} is out of range for a video of {num_video_frames} frames "
                f"(valid indices are 0..{num_video_frames - 1})"
            )
    first_index = min(frames_by_index)
    height, width = frames_by_index[first_index].shape[:2]
    for index, frame in frames_by_index.items():
        if frame.shape[:2] != (height, width):
            raise ValueError(
                f"{name}: frames differ in size: frame {first_index} is {height}x{width} (height x width) "
                f"but frame {index} is {frame.shape[0]}x{frame.shape[1]}"
            )
    frame_indices = sample_frame_indices(num_video_frames, num_frames)
    return LoadedVideo(
        frames=[frames_by_index[index] for index in frame_indices],
        frame_indices=frame_indices,
        extra_frames={index: frames_by_index[index] for index in extra_indices},
        num_video_frames=num_video_frames,
        height=height,
        width=width,
    )


def load_image(image, name: str = "images") -> np.ndarray:
    """
    Loads one image as uint8 RGB `[H, W, 3]`: a path, a PIL image (any mode, converted to RGB), or an array or tensor
    `[H, W, 3]`, `[3, H, W]` or `[H, W]` (grey, repeated over the channels) of uint8, integers in [0, 255] or floats
    in [0, 1].
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{name}: no such image file: {path}")
        try:
            with Image.open(path) as opened:
                return np.array(opened.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{name}: cannot read image file {path}: {error}") from error
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))
    if isinstance(image, (np.ndarray, torch.Tensor)):
        array = _to_numpy(image)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        elif array.ndim == 3 and array.shape[-1] != 3 and array.shape[0] == 3:
            array = array.transpose(1, 2, 0)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(
                f"{name}: expected an image of shape [H, W, 3], [3, H, W] or [H, W], got {list(image.shape)}"
            )
        return _to_uint8(array, name)
    raise TypeError(
        f"{name}: unsupported image type {type(image).__name__}; expected a path, a PIL image, or an array or tensor"
    )


def write_video(path, frames: np.ndarray | list[np.ndarray], fps: int = 8) -> None:
    """
    Writes frames (an array `[T, H, W, 3]` or a list of images `load_image` accepts) to a video file whose container
    follows the file suffix (.mp4, .mkv, .avi, ...). Uses lossless RGB H.264 (libx264rgb, crf 0) when this PyAV has
    it, else MPEG-4 Part 2 at a high bit rate (lossy, colour blocks survive).
    """
    av = _import_av("write_video")
    if not _is_integer(fps) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    images = [load_image(frame, name=f"frames[{index}]") for index, frame in enumerate(frames)]
    if not images:
        raise ValueError("frames: got no frames to write")
    height, width = images[0].shape[:2]
    for index, image in enumerate(images):
        if image.shape[:2] != (height, width):
            raise ValueError(
                f"frames[{index}]: is {image.shape[0]}x{image.shape[1]} but frames[0] is {height}x{width} "
                "(height x width)"
            )
    codec, pixel_format, options, bit_rate = next(
        encoder for encoder in _VIDEO_ENCODERS if encoder[0] in av.codecs_available
    )
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt, stream.options = width, height, pixel_format, options
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _import_av(name: str):
    try:
        import av
    except ImportError as error:
        raise ImportError(f"{name}: reading and writing video files needs PyAV: {_PIP_HINT}") from error
    return av


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _check_frame_indices(indices: Iterable[int], name: str) -> list[int]:
    """The extra frame indices as distinct Python ints in their given order; negatives and non-integers raise."""
    checked = []
    for index in indices:
        if not _is_integer(index):
            raise TypeError(f"{name}: frame indices must be integers, got {index!r}")
        if index < 0:
            raise ValueError(f"{name}: frame index {index} is negative; frame indices count from 0")
        checked.append(int(index))
    return list(dict.fromkeys(checked))


def _wanted_indices(num_video_frames: int, num_frames: int, extra_indices: list[int]) -> set[int]:
    """Indices to read: the sampled ones plus the extra ones inside the video (the others raise later)."""
    sampled = sample_frame_indices(num_video_frames, num_frames)
    return set(sampled) | {index for index in extra_indices if index < num_video_frames}


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        return (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    return array


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """uint8 as is; other integers must lie in [0, 255]; floats must lie in [0, 1] and are scaled by 255."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"{name}: integer pixel values must lie in [0, 255], got values in [{array.min()}, {array.max()}]"
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise ValueError(
                f"{name}: float pixel values must lie in [0, 1] (pass uint8 for values in [0, 255]), "
                f"got values in [{array.min()}, {array.max()}]"
            )
        return np.round(array * 255).astype(np.uint8)
    raise TypeError(f"{name}: unsupported pixel dtype {array.dtype}; use uint8, or floats in [0, 1]")


def _frame_source(video, name: str) -> tuple[int, Callable[[int], np.ndarray]]:
    """The frame count of an in-memory video, a frame folder or a frame list, and a reader of single frames."""
    if isinstance(video, (str, os.PathLike)):
        folder = Path(video)
        if not folder.is_dir():
            raise ValueError(f"{name}: no such video file or frame folder: {folder}")
        files = [
            folder / entry
            for entry in sorted(os.listdir(folder))
            if not entry.startswith(".")
            and Path(entry).suffix.lower() in FRAME_IMAGE_EXTENSIONS
            and (folder / entry).is_file()
        ]
        if not files:
            raise ValueError(
                f"{name}: frame folder {folder} holds no frame images ({', '.join(FRAME_IMAGE_EXTENSIONS)})"
            )
        return len(files), lambda index: load_image(files[index], name=f"{name}[{index}]")
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4 or (video.shape[-1] != 3 and video.shape[1] != 3):
            raise ValueError(
                f"{name}: expected a video of shape [T, H, W, 3] or [T, 3, H, W], got {list(video.shape)}"
            )
        if video.shape[0] == 0:
            raise ValueError(f"{name}: the video array has no frames")
        channels_first = video.shape[-1] != 3

        def read_array_frame(index: int) -> np.ndarray:
            frame = _to_numpy(video[index])
            return _to_uint8(frame.transpose(1, 2, 0) if channels_first else frame, f"{name}[{index}]")

        return video.shape[0], read_array_frame
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{name}: got an empty list of frames")
        frame_types = (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)
        for index, frame in enumerate(video):
            if not isinstance(frame, frame_types):
                raise TypeError(
                    f"{name}[{index}]: unsupported frame type {type(frame).__name__}; "
                    "expected an image path, a PIL image, or an array or tensor [H, W, 3]"
                )
        return len(video), lambda index: load_image(video[index], name=f"{name}[{index}]")
    raise TypeError(
        f"{name}: unsupported video type {type(video).__name__}; expected a video file or frame folder path, "
        "a list of frames, or an array or tensor [T, H, W, 3]"
    )


def _open_video_file(av, path: Path, name: str):
    """Opens a video file and its main video stream, turning PyAV's errors into a `ValueError` naming the path."""
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise ValueError(f"{name}: cannot read video file {path}: {error}") from error
    stream = container.streams.best("video")
    if stream is None:
        container.close()
        raise ValueError(f"{name}: file {path} has no video stream")
    return container, stream


def _count_video_frames(av, path: Path, name: str) -> int:
    """The frame count the container lists, or, when it lists none (e.g. WebM, MKV), the number of video packets."""
    container, stream = _open_video_file(av, path, name)
    with container:
        if stream.frames > 0:
            return stream.frames
        try:
            return sum(1 for packet in container.demux(stream) if packet.size)
        except av.error.FFmpegError as error:
            raise ValueError(f"{name}: cannot read video file {path}: {error}") from error


def _decode_frames(av, path: Path, wanted: set[int], name: str) -> tuple[int, dict[int, np.ndarray]]:
    """Decodes the whole video once, keeping only the frames in `wanted`; returns the decoded frame count too."""
    # keeps PyAV's default (slice) threading: with frame threading, FFmpeg can swallow a corrupt packet's error
    container, stream = _open_video_file(av, path, name)
    frames = {}
    num_decoded = 0
    with container:
        try:
            for frame in container.decode(stream):
                if num_decoded in wanted:
                    frames[num_decoded] = frame.to_ndarray(format="rgb24")
                num_decoded += 1
        except av.error.FFmpegError as error:
            raise ValueError(f"{name}: cannot decode video file {path} (corrupt or truncated?): {error}") from error
    return num_decoded, frames


def _decode_video_file(
    path: Path, num_frames: int, extra_indices: list[int], name: str
) -> tuple[int, dict[int, np.ndarray]]:
    """
    Decodes the needed frames of a video file. The sampled indices depend on the frame count, so it is read first from
    the container (cheap) and checked against the number of frames that actually decode; when they differ, the video
    is decoded once more with the true count.
    """
    av = _import_av(name)
    num_video_frames = _count_video_frames(av, path, name)
    for _ in range(2):
        if num_video_frames == 0:
            raise ValueError(f"{name}: video file {path} has no frames")
        wanted = _wanted_indices(num_video_frames, num_frames, extra_indices)
        num_decoded, frames_by_index = _decode_frames(av, path, wanted, name)
        if num_decoded == num_video_frames:
            return num_video_frames, frames_by_index
        logger.warning(
            f"{name}: video file {path} lists {num_video_frames} frames but {num_decoded} decode; "
            "sampling from the decoded frames"
        )
        num_video_frames = num_decoded
    raise ValueError(f"{name}: video file {path} decodes to a different number of frames on every pass")
