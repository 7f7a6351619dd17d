"""Region masks in every accepted format (arrays, PIL images, COCO RLE, COCO polygons, boxes) to binary masks."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from PIL import Image


_PIP_HINT = 'pip install "transformers-videorefer[video]"'

# PIL modes read as one value per pixel (nonzero = inside); for "P" that value is the palette index.
_SINGLE_CHANNEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "F")
# PIL modes whose last channel is alpha: a pixel is inside when a colour channel and the alpha are nonzero.
_ALPHA_MODES = ("RGBA", "LA", "PA")

# COCO's compressed RLE stores each count in 5-bit chunks written as characters from "0" (48) to "o" (111).
_RLE_CHAR_OFFSET = 48
_RLE_MAX_CHUNKS = 12  # 60 bits: more chunks than that cannot come from a real mask and would overflow int64


def _import_coco_mask(name: str):
    try:
        from pycocotools import mask as coco_mask
    except ImportError as error:
        raise ImportError(
            f"{name}: COCO polygons and compressed RLE encoding need pycocotools: {_PIP_HINT}"
        ) from error
    return coco_mask


def decode_mask(mask, height: int, width: int, name: str = "mask") -> np.ndarray:
    """
    Turns one region mask, in any accepted format, into a boolean array `[height, width]`.

    Accepted formats (the frame size comes from the video, so every format is checked against it):
    - numpy array or torch tensor `[H, W]` (also `[H, W, 1]` or `[1, H, W]`) of bool, integer or float values;
      nonzero is inside.
    - PIL image in mode "1", "L", "P", "I", "I;16" or "F" (nonzero value, for "P" nonzero palette index, is inside),
      "RGB" (nonzero in any channel is inside), "RGBA", "LA" or "PA" (inside = a nonzero colour channel and a
      nonzero alpha, so opaque black and fully transparent pixels are both outside).
    - COCO RLE `{"size": [H, W], "counts": str | bytes | list[int]}`, compressed or uncompressed.
    - COCO polygons: a list of flat `[x0, y0, x1, y1, ...]` lists in pixels (at least 3 points each), or one such
      flat list of at least 6 numbers; rasterised by pycocotools, exactly as the release reads its annotations.
    - A box: a flat list, tuple or 1-D array of exactly 4 numbers `[x0, y0, x1, y1]` in pixels (corners, not COCO's
      `[x, y, width, height]`). Pixel `(row, col)` covers the unit square `[col, col + 1) x [row, row + 1)`; every
      pixel the box overlaps with positive area is inside, i.e. rows `floor(y0) .. ceil(y1) - 1` and columns
      `floor(x0) .. ceil(x1) - 1`, clipped to the frame. Integer corners give exactly `(y1 - y0) x (x1 - x0)` pixels.
    - A dict with a "segmentation" key (the upstream annotation layout) is unwrapped.

    An empty mask is returned as is (whether it is acceptable is the caller's decision). `None` (the upstream
    `segmentation: null`) raises. Errors are `ValueError`/`TypeError` whose message starts with `name`.
    """
    for value, argument in ((height, "height"), (width, "width")):
        if not _is_integer(value) or value < 1:
            raise ValueError(f"{name}: the frame {argument} must be a positive integer, got {value!r}")
    if mask is None:
        raise ValueError(
            f"{name}: got None (an annotation with `segmentation: null`?); give a mask for this frame "
            "or leave the frame out of the region"
        )
    if isinstance(mask, dict):
        if "segmentation" in mask:
            return decode_mask(mask["segmentation"], height, width, name=f"{name}['segmentation']")
        return _rle_to_mask(mask, height, width, name)
    if isinstance(mask, Image.Image):
        return _check_size(_pil_to_mask(mask, name), height, width, name)
    if isinstance(mask, (np.ndarray, torch.Tensor)):
        if mask.ndim == 1:
            return _geometry_to_mask(mask.tolist(), height, width, name)
        return _check_size(_array_to_mask(mask, name), height, width, name)
    if isinstance(mask, (list, tuple)):
        return _geometry_to_mask(mask, height, width, name)
    raise TypeError(
        f"{name}: unsupported mask type {type(mask).__name__}; expected an array or tensor [H, W], a PIL image, "
        "a COCO RLE dict, COCO polygons or a box [x0, y0, x1, y1]"
    )


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """
    Encodes a mask `[H, W]` (array or tensor, nonzero = inside) as COCO RLE `{"size": [H, W], "counts": ...}`.

    Counts are run lengths in column-major order, starting with a (possibly empty) run of outside pixels. With
    `compressed=True` they are COCO's compressed string (as pycocotools writes it), otherwise a list of ints.
    """
    if not isinstance(mask, (np.ndarray, torch.Tensor)):
        raise TypeError(f"mask: encode_rle expects a numpy array or torch tensor [H, W], got {type(mask).__name__}")
    binary = _array_to_mask(mask, "mask")
    height, width = binary.shape
    if compressed:
        coco_mask = _import_coco_mask("encode_rle")
        rle = coco_mask.encode(np.asfortranarray(binary, dtype=np.uint8))
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    flat = binary.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat.size and flat[0]:
        counts = np.concatenate(([0], counts))
    return {"size": [height, width], "counts": counts.tolist()}


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_size(mask: np.ndarray, height: int, width: int, name: str) -> np.ndarray:
    if mask.shape != (height, width):
        raise ValueError(
            f"{name}: the mask is {mask.shape[0]}x{mask.shape[1]} (height x width) but the frame is {height}x{width}"
        )
    return mask


def _array_to_mask(array, name: str) -> np.ndarray:
    shape = tuple(array.shape)
    if len(shape) == 3 and shape[0] == 1:
        array = array[0]
    elif len(shape) == 3 and shape[-1] == 1:
        array = array[..., 0]
    elif len(shape) != 2:
        raise ValueError(f"{name}: expected a mask of shape [H, W] (or [H, W, 1], [1, H, W]), got shape {list(shape)}")
    if isinstance(array, torch.Tensor):
        if array.dtype.is_complex:
            raise TypeError(f"{name}: mask tensors must be bool, integer or float, got {array.dtype}")
        return (array != 0).cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: mask arrays must be bool, integer or float, got dtype {array.dtype}")
    return array != 0


def _pil_to_mask(image: Image.Image, name: str) -> np.ndarray:
    if image.mode in _SINGLE_CHANNEL_MODES:
        return np.asarray(image) != 0
    if image.mode == "RGB":
        return (np.asarray(image) != 0).any(axis=-1)
    if image.mode in _ALPHA_MODES:
        pixels = np.asarray(image)
        return (pixels[..., :-1] != 0).any(axis=-1) & (pixels[..., -1] != 0)
    raise ValueError(
        f"{name}: unsupported PIL image mode {image.mode!r}; use one of "
        f"{', '.join(_SINGLE_CHANNEL_MODES + ('RGB',) + _ALPHA_MODES)} or pass a boolean array"
    )


def _geometry_to_mask(values, height: int, width: int, name: str) -> np.ndarray:
    """A box (4 numbers), one flat polygon (>= 6 numbers) or a list of flat polygons."""
    if len(values) == 0:
        raise ValueError(f"{name}: got an empty list; expected COCO polygons or a box [x0, y0, x1, y1]")
    if all(_is_number(value) for value in values):
        if len(values) == 4:
            return _box_to_mask(values, height, width, name)
        return _polygons_to_mask([values], height, width, name)
    if all(isinstance(value, (list, tuple, np.ndarray, torch.Tensor)) for value in values):
        return _polygons_to_mask(values, height, width, name)
    raise TypeError(
        f"{name}: expected COCO polygons (a list of flat [x0, y0, x1, y1, ...] lists) or a box [x0, y0, x1, y1], "
        f"got a list holding {sorted({type(value).__name__ for value in values})}"
    )


def _box_to_mask(box, height: int, width: int, name: str) -> np.ndarray:
    x0, y0, x1, y1 = (float(value) for value in box)
    if not all(math.isfinite(value) for value in (x0, y0, x1, y1)):
        raise ValueError(f"{name}: box {list(box)} has non-finite coordinates")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(
            f"{name}: box {list(box)} needs x1 > x0 and y1 > y0 (boxes are corners [x0, y0, x1, y1] in pixels, "
            "not COCO's [x, y, width, height])"
        )
    rows = np.clip([math.floor(y0), math.ceil(y1)], 0, height)
    cols = np.clip([math.floor(x0), math.ceil(x1)], 0, width)
    mask = np.zeros((height, width), dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def _polygons_to_mask(polygons, height: int, width: int, name: str) -> np.ndarray:
    coordinates = []
    for index, polygon in enumerate(polygons):
        polygon = polygon.tolist() if isinstance(polygon, (np.ndarray, torch.Tensor)) else polygon
        label = f"{name}: polygon {index}"
        if not isinstance(polygon, (list, tuple)) or not all(_is_number(value) for value in polygon):
            raise ValueError(f"{label} must be a flat list of numbers [x0, y0, x1, y1, ...], got {polygon!r}")
        if len(polygon) % 2:
            raise ValueError(f"{label} has an odd number of coordinates ({len(polygon)}); expected x, y pairs")
        if len(polygon) < 6:
            raise ValueError(f"{label} has {len(polygon) // 2} points; a polygon needs at least 3")
        polygon = [float(value) for value in polygon]
        if not all(math.isfinite(value) for value in polygon):
            raise ValueError(f"{label} has non-finite coordinates")
        coordinates.append(polygon)
    coco_mask = _import_coco_mask(name)
    return _rle_to_mask(coco_mask.merge(coco_mask.frPyObjects(coordinates, height, width)), height, width, name)


def _rle_to_mask(rle: dict, height: int, width: int, name: str) -> np.ndarray:
    missing = [key for key in ("size", "counts") if key not in rle]
    if missing:
        raise ValueError(
            f"{name}: a COCO RLE needs the keys 'size' and 'counts' (missing {missing}); "
            f"got a dict with keys {sorted(map(str, rle))}"
        )
    size = rle["size"]
    if not isinstance(size, (list, tuple, np.ndarray)) or len(size) != 2 or not all(_is_integer(v) for v in size):
        raise ValueError(f"{name}: RLE 'size' must be [height, width] (two integers), got {size!r}")
    if (int(size[0]), int(size[1])) != (height, width):
        raise ValueError(
            f"{name}: the RLE size is {int(size[0])}x{int(size[1])} (height x width) but the frame is {height}x{width}"
        )
    counts = _rle_counts(rle["counts"], name)
    if (counts < 0).any():
        raise ValueError(f"{name}: RLE counts must not be negative")
    if counts.sum() != height * width:
        raise ValueError(
            f"{name}: RLE counts cover {int(counts.sum())} pixels but the size {height}x{width} has {height * width}"
        )
    inside = np.arange(counts.size) % 2 == 1
    return np.ascontiguousarray(np.repeat(inside, counts).reshape(width, height).T)


def _rle_counts(counts, name: str) -> np.ndarray:
    """Validated run lengths (int64) from uncompressed counts or from COCO's compressed string."""
    if isinstance(counts, str):
        if not counts.isascii():
            raise ValueError(f"{name}: the RLE counts string has non-ASCII characters")
        counts = counts.encode("ascii")
    if isinstance(counts, bytes):
        return _parse_compressed_counts(counts, name)
    if isinstance(counts, np.ndarray):
        if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(
                f"{name}: uncompressed RLE counts must be a 1-D integer array, got {counts.dtype} {counts.shape}"
            )
        return counts.astype(np.int64)
    if isinstance(counts, (list, tuple)):
        if not all(_is_integer(value) for value in counts):
            raise ValueError(f"{name}: uncompressed RLE counts must be a list of integers")
        return np.asarray(counts, dtype=np.int64).reshape(-1)
    raise TypeError(f"{name}: RLE 'counts' must be a str, bytes or a list of ints, got {type(counts).__name__}")


def _parse_compressed_counts(data: bytes, name: str) -> np.ndarray:
    """
    Decodes COCO's compressed RLE string. Each count is written as 5-bit chunks, least significant first; bit 5 of a
    chunk says another chunk follows, bit 4 of the last chunk is the sign. From the fourth count on, the stored value
    is the difference to the count two places before.
    """
    codes = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - _RLE_CHAR_OFFSET
    if codes.size == 0:
        return codes
    if codes.min() < 0 or codes.max() > 63:
        raise ValueError(f"{name}: the RLE counts string has characters outside '0'..'o' (not a COCO RLE)")
    continues = (codes & 0x20) != 0
    if continues[-1]:
        raise ValueError(f"{name}: the RLE counts string ends in the middle of a count (truncated?)")
    ends = np.flatnonzero(~continues)
    starts = np.concatenate(([0], ends[:-1] + 1))
    chunk_counts = ends - starts + 1
    if chunk_counts.max() > _RLE_MAX_CHUNKS:
        raise ValueError(f"{name}: the RLE counts string holds a count too large for any mask")
    chunk_positions = np.arange(codes.size) - np.repeat(starts, chunk_counts)
    values = np.add.reduceat((codes & 0x1F) << (5 * chunk_positions), starts)
    is_negative = (codes[ends] & 0x10) != 0
    values = values - (is_negative.astype(np.int64) << (5 * chunk_counts))
    counts = values.copy()
    counts[1::2] = np.cumsum(values[1::2])
    counts[2::2] = np.cumsum(values[2::2])
    return counts
