"""VideoRefer-Bench annotation files, read as released (paper Sec. 3.3)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .records import record_key


MASK_MODES = ("single", "multi")


@dataclass(frozen=True)
class BenchItem:
    """
    One benchmark item. Scoring needs only the answer fields; `video`, `frame_idx` and `annotation` are checked when
    inference asks for the item's masks (`region_masks`).

    Args:
        id: the item's `id` in the file, or its 0-based position in the file when the file has no `id` fields.
        video: the video as written in the file (an mp4 for Bench-D, a folder of JPEG frames for Bench-Q),
            relative to the benchmark's video root.
        frame_idx: the frame whose masks single-frame mode uses, as written in the file.
        annotation: one dict per referred object, in `<region>` order: `{frame index: {"segmentation": RLE}}`.
        question, options, answer, type: the multiple-choice fields of Bench-Q (None for Bench-D).
        caption: the reference description of Bench-D (None for Bench-Q).
    """

    id: int | str
    video: str | None = None
    frame_idx: int | str | None = None
    annotation: list | None = None
    question: str | None = None
    options: tuple[str, ...] | None = None
    answer: str | None = None
    type: str | None = None
    caption: str | None = None

    @property
    def key(self) -> str:
        return record_key(self.id)


def _string(entry: dict, field: str, position: int, path: Path) -> str:
    if not isinstance(entry.get(field), str):
        raise ValueError(f"{path}: item {position} needs `{field}`, a string (got {entry.get(field)!r:.80})")
    return entry[field]


def _load_entries(path: str | os.PathLike) -> tuple[Path, list[dict]]:
    path = Path(path)
    with open(path, encoding="utf-8") as handle:
        entries = json.load(handle)
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{path}: expected a JSON list of benchmark items (objects)")
    return path, entries


def _common_fields(entries: list[dict], path: Path) -> list[dict]:
    """Each item's id (its `id`, else its position) and its inference fields, as written."""
    fields, seen = [], {}
    for position, entry in enumerate(entries):
        item_id = entry.get("id", position)
        key = record_key(item_id)
        if key in seen:
            raise ValueError(f"{path}: items {seen[key]} and {position} share the id {item_id!r}; ids must be unique")
        seen[key] = position
        fields.append(
            {
                "id": item_id,
                "video": entry.get("video"),
                "frame_idx": entry.get("frame_idx"),
                "annotation": entry.get("annotation", entry.get("masks")),
            }
        )
    return fields


def load_bench_q(path: str | os.PathLike) -> list[BenchItem]:
    """
    Reads VideoRefer-Bench-Q (`id?, video, Question, type, options, Answer, frame_idx, annotation`). Items without an
    `id` get their 0-based position in the file as id.
    """
    path, entries = _load_entries(path)
    items = []
    for position, (common, entry) in enumerate(zip(_common_fields(entries, path), entries)):
        options = entry.get("options")
        if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
            raise ValueError(f"{path}: item {position} needs `options`, a list of strings")
        items.append(
            BenchItem(
                **common,
                question=_string(entry, "Question", position, path),
                options=tuple(options),
                answer=_string(entry, "Answer", position, path),
                type=_string(entry, "type", position, path),
            )
        )
    return items


def load_bench_d(path: str | os.PathLike) -> list[BenchItem]:
    """Reads VideoRefer-Bench-D (`id, video, caption, frame_idx, annotation`)."""
    path, entries = _load_entries(path)
    return [
        BenchItem(**common, caption=_string(entry, "caption", position, path))
        for position, (common, entry) in enumerate(zip(_common_fields(entries, path), entries))
    ]


def _frame_index(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit():
        raise ValueError(f"{what}: expected a frame index (a non-negative integer or string of digits), got {value!r}")
    return int(value)


def item_objects(item: BenchItem) -> list[dict[int, dict | None]]:
    """Each object's masks `{frame index: COCO RLE, or None where the object is not visible}`, in `<region>` order."""
    what = f"item {item.id!r}"
    if not isinstance(item.annotation, list) or not item.annotation:
        raise ValueError(f"{what} needs `annotation`, a non-empty list with one dict per object")
    objects = []
    for number, frames in enumerate(item.annotation):
        if not isinstance(frames, dict) or not frames:
            raise ValueError(
                f"{what}, annotation[{number}]: expected a non-empty dict {{frame: {{'segmentation': RLE}}}}"
            )
        masks = {}
        for frame, value in frames.items():
            where = f"{what}, annotation[{number}][{frame!r}]"
            if not isinstance(value, dict) or "segmentation" not in value:
                raise ValueError(f"{where}: expected {{'segmentation': RLE or null}}, got {value!r:.80}")
            segmentation = value["segmentation"]
            if segmentation is not None and not (
                isinstance(segmentation, dict) and "size" in segmentation and "counts" in segmentation
            ):
                raise ValueError(f"{where}: the segmentation must be a COCO RLE dict with `size` and `counts`")
            masks[_frame_index(frame, f"{where} key")] = segmentation
        objects.append(dict(sorted(masks.items())))
    return objects


def _empty_rle(height: int, width: int) -> dict:
    """An all-background mask as uncompressed COCO RLE."""
    return {"size": [height, width], "counts": [height * width]}


def region_masks(item: BenchItem, mode: str) -> list[dict[int, dict]]:
    """
    The masks of each object in `<region>` order, as `{source frame index: COCO RLE}` for the processor.

    `mode="single"` keeps each object's mask at the item's `frame_idx`; `mode="multi"` keeps all of its masks. A null
    segmentation (the object is not visible on that frame) becomes an empty mask of the video's size, as in the
    release's evaluation. The processor rejects an object whose masks are all empty (such as a null segmentation at
    `frame_idx` in single mode); inference then writes that item unanswered, with its error.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    objects = item_objects(item)
    sizes = [tuple(rle["size"]) for frames in objects for rle in frames.values() if rle is not None]
    if not sizes:
        raise ValueError(f"item {item.id!r}: no object has a mask on any frame")
    height, width = sizes[0]
    if mode == "single":
        frame_idx = _frame_index(item.frame_idx, f"item {item.id!r}: frame_idx")
        for number, frames in enumerate(objects):
            if frame_idx not in frames:
                raise ValueError(
                    f"item {item.id!r}: object {number} has no annotation on frame_idx {frame_idx} "
                    f"(annotated frames: {sorted(frames)})"
                )
        objects = [{frame_idx: frames[frame_idx]} for frames in objects]
    return [
        {frame: rle if rle is not None else _empty_rle(height, width) for frame, rle in frames.items()}
        for frames in objects
    ]
