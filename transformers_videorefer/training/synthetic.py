"""Synthetic videos of moving coloured shapes in VideoRefer's training format, made offline for the quickstart."""

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..mask_utils import encode_rle
from ..video_utils import write_video


# Colour names whose first BPE token of the tiny tokenizer differs, so the first generated token names the colour.
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (235, 225, 40),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "cyan": (40, 215, 225),
    "purple": (150, 50, 210),
}
# (dx, dy) of each direction, in image coordinates (y grows downwards).
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SHAPES = ("square", "circle", "triangle")

COLOUR_QUESTION = "What colour is <region>?"
COLOUR_CHANGE_QUESTION = "What colour does <region> turn into?"
DIRECTION_QUESTION = "Which direction does <region> move?"
SHAPE_QUESTION = "What shape is <region>?"
POSITION_QUESTION = "Where is <region>?"

EVAL_TASKS = ("colour", "colour_change", "mask_swap", "direction", "position", "shape")


@dataclass
class SyntheticVideoSpec:
    """
    Look of the synthetic videos.

    Args:
        size: frame height and width in pixels.
        num_video_frames: frames per video.
        object_size: (min, max) side of an object in pixels.
        travel: (min, max) distance an object moves over the video, in pixels.
        max_objects: objects per video (2 to this many, each moving in its own direction).
        change_probability: chance that an object changes colour halfway through the video.
        fps: frame rate of the written mp4 files.
    """

    size: int = 64
    num_video_frames: int = 16
    object_size: tuple[int, int] = (14, 18)
    travel: tuple[int, int] = (24, 32)
    max_objects: int = 3
    change_probability: float = 0.5
    fps: int = 8


@dataclass
class SyntheticObject:
    """One object of a synthetic video: its look, its motion, and its visible mask on every frame."""

    shape: str
    colours: tuple[str, str]
    direction: str
    masks: np.ndarray

    @property
    def changes_colour(self) -> bool:
        return self.colours[0] != self.colours[1]


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """A [side, side] boolean stencil of the shape."""
    rows, cols = np.mgrid[0:side, 0:side] + 0.5
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        centre = side / 2
        return (rows - centre) ** 2 + (cols - centre) ** 2 <= centre**2
    if shape == "triangle":
        # Apex at the top centre, base along the bottom row.
        return np.abs(cols - side / 2) <= rows / 2
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _trajectories(rng: np.random.Generator, spec: SyntheticVideoSpec, sides: list[int], directions: list[str]):
    """Top-left corners [objects, frames, 2] (y, x) of objects that stay inside the frame and never overlap."""
    steps = np.arange(spec.num_video_frames) / (spec.num_video_frames - 1)
    for _ in range(200):
        corners = []
        for side, direction in zip(sides, directions):
            travel = rng.integers(spec.travel[0], spec.travel[1] + 1)
            dx, dy = DIRECTIONS[direction]
            y_range = spec.size - side - (travel if dy else 0)
            x_range = spec.size - side - (travel if dx else 0)
            start_y = rng.integers(0, y_range + 1) + (travel if dy < 0 else 0)
            start_x = rng.integers(0, x_range + 1) + (travel if dx < 0 else 0)
            path_y = np.round(start_y + dy * travel * steps).astype(int)
            path_x = np.round(start_x + dx * travel * steps).astype(int)
            corners.append(np.stack([path_y, path_x], axis=1))
        corners = np.stack(corners)
        if not _any_overlap(corners, np.asarray(sides)):
            return corners
    return None


def _any_overlap(corners: np.ndarray, sides: np.ndarray, margin: int = 2) -> bool:
    """Whether the boxes of any two objects come closer than `margin` pixels on any frame."""
    for first in range(len(sides)):
        for second in range(first + 1, len(sides)):
            gap_y = np.abs(corners[first, :, 0] - corners[second, :, 0]) - np.maximum(sides[first], sides[second])
            gap_x = np.abs(corners[first, :, 1] - corners[second, :, 1]) - np.maximum(sides[first], sides[second])
            if np.any((gap_y < margin) & (gap_x < margin)):
                return True
    return False


def render_video(rng: np.random.Generator, spec: SyntheticVideoSpec) -> tuple[np.ndarray, list[SyntheticObject]]:
    """
    One synthetic video: 2 to `spec.max_objects` shapes of different colours on a dark background, each moving in a
    different direction; some change colour at the middle frame.

    Returns:
        frames `[num_video_frames, size, size, 3]` uint8 and the objects with their masks `[num_video_frames, size,
        size]`.
    """
    while True:
        num_objects = int(rng.integers(2, spec.max_objects + 1))
        directions = [str(d) for d in rng.choice(list(DIRECTIONS), num_objects, replace=False)]
        sides = [int(rng.integers(spec.object_size[0], spec.object_size[1] + 1)) for _ in range(num_objects)]
        corners = _trajectories(rng, spec, sides, directions)
        if corners is not None:
            break
    palette = [str(c) for c in rng.choice(list(COLOURS), 2 * num_objects, replace=False)]
    frames = np.full((spec.num_video_frames, spec.size, spec.size, 3), 16, dtype=np.uint8)
    change_frame = spec.num_video_frames // 2
    objects = []
    for index, (side, direction) in enumerate(zip(sides, directions)):
        shape = str(rng.choice(SHAPES))
        first_colour = palette[index]
        last_colour = palette[num_objects + index] if rng.random() < spec.change_probability else first_colour
        stencil = _shape_mask(shape, side)
        masks = np.zeros((spec.num_video_frames, spec.size, spec.size), dtype=bool)
        for frame, (top, left) in enumerate(corners[index]):
            masks[frame, top : top + side, left : left + side] = stencil
            colour = first_colour if frame < change_frame else last_colour
            frames[frame][masks[frame]] = COLOURS[colour]
        objects.append(SyntheticObject(shape, (first_colour, last_colour), direction, masks))
    return frames, objects


def nearest_edge(mask: np.ndarray) -> str:
    """The edge of the frame ("left", "right", "top" or "bottom") nearest to the centroid of a mask."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    distances = {
        "left": cols.mean(),
        "right": width - 1 - cols.mean(),
        "top": rows.mean(),
        "bottom": height - 1 - rows.mean(),
    }
    return min(distances, key=distances.get)


def _spread_frames(rng: np.random.Generator, num_video_frames: int, count: int) -> list[int]:
    """`count` frames in time order, one drawn from each of `count` equal parts of the video."""
    edges = np.linspace(0, num_video_frames, count + 1).astype(int)
    return [int(rng.integers(low, high)) for low, high in itertools.pairwise(edges)]


def _sample(sample_id: str, video: str, question: str, answer: str, region: dict[int, np.ndarray], size: int, **extra):
    """A training sample in the upstream JSON format, with one region given as COCO RLE masks."""
    return {
        "id": sample_id,
        "video": video,
        "conversations": [
            {"from": "human", "value": f"<video>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "annotation": [{str(frame): {"segmentation": encode_rle(mask)} for frame, mask in region.items()}],
        "height": size,
        "width": size,
        **extra,
    }


def video_samples(
    rng: np.random.Generator, video: str, video_id: str, objects: list[SyntheticObject], spec: SyntheticVideoSpec
) -> tuple[list[dict], list[dict]]:
    """
    Questions about each object of a video: single-frame ones (colour on a random frame, the frame edge it is nearest
    to, shape) and multi-frame ones (direction; the new colour of an object that changes colour), with masks on one
    frame from each quarter.
    """
    single, multi = [], []
    change_frame = spec.num_video_frames // 2
    for index, obj in enumerate(objects):
        prefix = f"{video_id}-o{index}"
        frame = int(rng.integers(spec.num_video_frames))
        colour = obj.colours[0] if frame < change_frame else obj.colours[1]
        single.append(
            _sample(f"{prefix}-colour", video, COLOUR_QUESTION, colour, {frame: obj.masks[frame]}, spec.size)
        )
        frame = int(rng.integers(spec.num_video_frames))
        edge = nearest_edge(obj.masks[frame])
        single.append(
            _sample(f"{prefix}-position", video, POSITION_QUESTION, edge, {frame: obj.masks[frame]}, spec.size)
        )
        frame = int(rng.integers(spec.num_video_frames))
        single.append(
            _sample(f"{prefix}-shape", video, SHAPE_QUESTION, obj.shape, {frame: obj.masks[frame]}, spec.size)
        )
        frames = _spread_frames(rng, spec.num_video_frames, 4)
        region = {f: obj.masks[f] for f in frames}
        multi.append(_sample(f"{prefix}-direction", video, DIRECTION_QUESTION, obj.direction, region, spec.size))
        if obj.changes_colour:
            multi.append(_sample(f"{prefix}-change", video, COLOUR_CHANGE_QUESTION, obj.colours[1], region, spec.size))
    return single, multi


def eval_items(
    rng: np.random.Generator, video: str, video_id: str, objects: list[SyntheticObject], spec: SyntheticVideoSpec
) -> list[dict]:
    """Held-out questions, each with a `task` (one of `EVAL_TASKS`); a `mask_swap` pair shares a `pair` id."""
    single, multi = video_samples(rng, video, video_id, objects, spec)
    items = []
    for sample in single + multi:
        kind = sample["id"].rsplit("-", 1)[1]
        task = {"change": "colour_change"}.get(kind, kind)
        items.append({**sample, "task": task})
    # The same question on the same frame, with the mask on two objects of different colours.
    frame = int(rng.integers(spec.num_video_frames))
    change_frame = spec.num_video_frames // 2
    colours = [obj.colours[0] if frame < change_frame else obj.colours[1] for obj in objects]
    first, second = (int(i) for i in rng.choice(len(objects), 2, replace=False))
    if colours[first] != colours[second]:
        for index in (first, second):
            mask = {frame: objects[index].masks[frame]}
            sample_id = f"{video_id}-swap-o{index}"
            items.append(
                {
                    **_sample(sample_id, video, COLOUR_QUESTION, colours[index], mask, spec.size),
                    "task": "mask_swap",
                    "pair": f"{video_id}-swap",
                }
            )
    return items


@dataclass
class SyntheticDataset:
    """Paths of a synthetic dataset: the video folder and the JSON files in the upstream format."""

    root: Path
    single_frame: Path
    multi_frame: Path
    eval: Path


def build_synthetic_dataset(
    output_dir: str | Path,
    num_train_videos: int,
    num_eval_videos: int,
    seed: int = 0,
    spec: SyntheticVideoSpec | None = None,
    progress: bool = True,
) -> SyntheticDataset:
    """
    Writes a synthetic dataset: mp4 videos under `output_dir/videos`, `train_single_frame.json` and
    `train_multi_frame.json` (training samples in the upstream format, video paths relative to `output_dir`) and
    `eval.json` (questions about held-out videos, with their `task`).
    """
    spec = spec or SyntheticVideoSpec()
    root = Path(output_dir)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    single, multi, evaluation = [], [], []
    total = num_train_videos + num_eval_videos
    for index in tqdm(range(total), desc="Making synthetic videos", disable=not progress):
        frames, objects = render_video(rng, spec)
        video = f"videos/{index:05d}.mp4"
        write_video(root / video, frames, fps=spec.fps)
        if index < num_train_videos:
            video_single, video_multi = video_samples(rng, video, f"v{index:05d}", objects, spec)
            single += video_single
            multi += video_multi
        else:
            evaluation += eval_items(rng, video, f"v{index:05d}", objects, spec)
    paths = SyntheticDataset(
        root, root / "train_single_frame.json", root / "train_multi_frame.json", root / "eval.json"
    )
    for path, samples in ((paths.single_frame, single), (paths.multi_frame, multi), (paths.eval, evaluation)):
        path.write_text(json.dumps(samples))
    return paths


__all__ = [
    "COLOURS",
    "DIRECTIONS",
    "SHAPES",
    "EVAL_TASKS",
    "SyntheticVideoSpec",
    "SyntheticObject",
    "SyntheticDataset",
    "render_video",
    "build_synthetic_dataset",
]
