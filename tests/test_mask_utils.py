import sys

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_videorefer.mask_utils import decode_mask, encode_rle


pycocotools_mask = pytest.importorskip("pycocotools.mask")

# pycocotools' own decode (the reference here) trips numpy 2's copy-keyword deprecation
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# A 3x4 mask used throughout; in column-major order its pixels read 000 110 011 000, so its COCO counts (runs
# alternating outside/inside, starting outside) are [3, 2, 2, 2, 3], and its compressed string, worked out by hand
# from COCO's format (one character 48 + value per small count, counts from the fourth on stored as the difference
# to the count two places before: 3, 2, 2, 2-2=0, 3-2=1), is "32201".
SMALL_MASK = np.array(
    [
        [0, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 0],
    ],
    dtype=bool,
)
SMALL_COUNTS = [3, 2, 2, 2, 3]
SMALL_STRING = "32201"


def random_masks(count=60, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        height, width = rng.integers(1, 30, size=2)
        yield rng.random((height, width)) < rng.random()


def coco_encode(mask):
    return pycocotools_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


# ---------------------------------------------------------------- arrays and tensors


@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int64, np.float32, np.float64])
def test_numpy_arrays_nonzero_is_inside(dtype):
    values = np.array([[0, 2, 0, 0], [0, -1, 0.5, 0], [0, 0, 1, 0]])
    if dtype is np.uint8:
        values = np.abs(values).round()
    expected = values.astype(dtype) != 0
    np.testing.assert_array_equal(decode_mask(values.astype(dtype), 3, 4), expected)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.float32, torch.bfloat16])
def test_torch_tensors_nonzero_is_inside(dtype):
    tensor = torch.from_numpy(SMALL_MASK.astype(np.uint8) * 3).to(dtype)
    decoded = decode_mask(tensor, 3, 4)
    assert decoded.dtype == np.bool_ and isinstance(decoded, np.ndarray)
    np.testing.assert_array_equal(decoded, SMALL_MASK)


@pytest.mark.parametrize("shape", [(3, 4, 1), (1, 3, 4)])
def test_singleton_channel_axis_is_dropped(shape):
    np.testing.assert_array_equal(decode_mask(SMALL_MASK.reshape(shape), 3, 4), SMALL_MASK)
    np.testing.assert_array_equal(decode_mask(torch.from_numpy(SMALL_MASK.reshape(shape)), 3, 4), SMALL_MASK)


def test_all_empty_mask_is_not_an_error():
    assert not decode_mask(np.zeros((3, 4)), 3, 4).any()
    assert not decode_mask({"size": [3, 4], "counts": [12]}, 3, 4).any()


def test_array_of_wrong_size_names_both_sizes():
    with pytest.raises(ValueError, match=r"^masks\[1\]\[12\]: the mask is 4x3 .* frame is 3x4"):
        decode_mask(np.zeros((4, 3)), 3, 4, name="masks[1][12]")


@pytest.mark.parametrize("shape", [(3, 4, 3), (2, 3, 4), (12,) * 3, (1, 1, 3, 4)])
def test_array_of_wrong_rank_or_channels(shape):
    with pytest.raises(ValueError, match=r"^m: expected a mask of shape \[H, W\]"):
        decode_mask(np.zeros(shape), 3, 4, name="m")


def test_array_of_unsupported_dtype():
    with pytest.raises(TypeError, match=r"^m: mask arrays must be bool, integer or float"):
        decode_mask(np.full((3, 4), "a"), 3, 4, name="m")


# ---------------------------------------------------------------- PIL images


def test_pil_single_channel_modes():
    values = SMALL_MASK.astype(np.uint8) * 200
    assert Image.fromarray(SMALL_MASK).mode == "1"
    np.testing.assert_array_equal(decode_mask(Image.fromarray(SMALL_MASK), 3, 4), SMALL_MASK)
    np.testing.assert_array_equal(decode_mask(Image.fromarray(values, mode="L"), 3, 4), SMALL_MASK)
    np.testing.assert_array_equal(decode_mask(Image.fromarray(values.astype(np.int32)), 3, 4), SMALL_MASK)
    np.testing.assert_array_equal(decode_mask(Image.fromarray(values.astype(np.float32)), 3, 4), SMALL_MASK)
    sixteen_bit = Image.fromarray(values.astype(np.uint16) * 300)
    assert sixteen_bit.mode.startswith("I;16")
    np.testing.assert_array_equal(decode_mask(sixteen_bit, 3, 4), SMALL_MASK)


def test_pil_palette_uses_the_index_not_the_colour():
    # palette index 0 is white and index 1 is black: the black pixels (index 1) are the inside ones
    image = Image.fromarray(SMALL_MASK.astype(np.uint8), mode="L").convert("P")
    image.putdata(SMALL_MASK.astype(np.uint8).ravel().tolist())
    image.putpalette([255, 255, 255, 0, 0, 0] + [0] * (254 * 3))
    assert image.mode == "P" and np.asarray(image.convert("RGB"))[0, 0].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(decode_mask(image, 3, 4), SMALL_MASK)


def test_pil_rgb_any_channel_nonzero_is_inside():
    pixels = np.zeros((3, 4, 3), dtype=np.uint8)
    pixels[0, 1, 2] = 1  # only blue
    pixels[1, 1, 0] = 255  # only red
    pixels[1, 2] = (0, 7, 0)
    pixels[2, 2] = (255, 255, 255)
    np.testing.assert_array_equal(decode_mask(Image.fromarray(pixels), 3, 4), SMALL_MASK)


def test_pil_alpha_modes_need_colour_and_alpha():
    pixels = np.zeros((3, 4, 4), dtype=np.uint8)
    pixels[..., 3] = 255  # opaque black background: outside
    pixels[0, 3] = (255, 0, 0, 0)  # coloured but fully transparent: outside
    for row, col in zip(*np.nonzero(SMALL_MASK), strict=True):
        pixels[row, col] = (0, 90, 0, 128)
    np.testing.assert_array_equal(decode_mask(Image.fromarray(pixels, mode="RGBA"), 3, 4), SMALL_MASK)
    grey_alpha = np.stack([SMALL_MASK * 255, np.full((3, 4), 255)], axis=-1).astype(np.uint8)
    np.testing.assert_array_equal(decode_mask(Image.fromarray(grey_alpha, mode="LA"), 3, 4), SMALL_MASK)


def test_pil_wrong_size_and_unsupported_mode():
    with pytest.raises(ValueError, match=r"^m: the mask is 3x4 .* frame is 4x3"):
        decode_mask(Image.fromarray(SMALL_MASK), 4, 3, name="m")
    with pytest.raises(ValueError, match=r"^m: unsupported PIL image mode 'CMYK'"):
        decode_mask(Image.new("CMYK", (4, 3)), 3, 4, name="m")


# ---------------------------------------------------------------- COCO RLE


def test_rle_small_mask_by_hand():
    assert encode_rle(SMALL_MASK, compressed=False) == {"size": [3, 4], "counts": SMALL_COUNTS}
    assert encode_rle(SMALL_MASK) == {"size": [3, 4], "counts": SMALL_STRING}
    for counts in (SMALL_COUNTS, tuple(SMALL_COUNTS), np.array(SMALL_COUNTS), SMALL_STRING, SMALL_STRING.encode()):
        np.testing.assert_array_equal(decode_mask({"size": [3, 4], "counts": counts}, 3, 4), SMALL_MASK)


def test_rle_mask_starting_inside_has_leading_zero_count():
    mask = np.array([[1, 1, 0]], dtype=bool)
    assert encode_rle(mask, compressed=False) == {"size": [1, 3], "counts": [0, 2, 1]}
    np.testing.assert_array_equal(decode_mask({"size": [1, 3], "counts": [0, 2, 1]}, 1, 3), mask)


def test_rle_compressed_negative_difference_and_multi_chunk_counts():
    # counts [1, 5, 1, 2]: the fourth is stored as 2 - 5 = -3, one 5-bit chunk 0b11101 = 29 with the sign bit set,
    # character 48 + 29 = "M"
    expected = np.array([[0, 1, 1, 1, 1, 1, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(decode_mask({"size": [1, 9], "counts": "151M"}, 1, 9), expected)
    np.testing.assert_array_equal(pycocotools_mask.decode({"size": [1, 9], "counts": b"151M"}).astype(bool), expected)
    # counts [40, 10]: 40 = 0b1_01000 takes two chunks, 8 | continuation 32 = 40 -> "X", then 1 -> "1"; 10 -> ":"
    expected = np.arange(50)[None] >= 40
    np.testing.assert_array_equal(decode_mask({"size": [1, 50], "counts": "X1:"}, 1, 50), expected)
    assert encode_rle(expected)["counts"] == "X1:"


def test_rle_round_trips_against_pycocotools():
    for mask in random_masks():
        height, width = mask.shape
        coco_rle = coco_encode(mask)
        np.testing.assert_array_equal(decode_mask(coco_rle, height, width), mask)
        compressed = encode_rle(mask)
        assert isinstance(compressed["counts"], str)
        np.testing.assert_array_equal(pycocotools_mask.decode({**compressed, "counts": compressed["counts"]}), mask)
        uncompressed = encode_rle(mask, compressed=False)
        assert all(isinstance(count, int) for count in uncompressed["counts"])
        # pycocotools compresses our uncompressed counts into exactly the string it writes for the mask
        assert pycocotools_mask.frPyObjects(uncompressed, height, width)["counts"] == coco_rle["counts"]
        np.testing.assert_array_equal(decode_mask(uncompressed, height, width), mask)


def test_rle_torch_input_to_encode():
    assert encode_rle(torch.from_numpy(SMALL_MASK).float())["counts"] == SMALL_STRING
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        encode_rle(SMALL_MASK.tolist())


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ({"size": [4, 3], "counts": "32201"}, r"the RLE size is 4x3 .* frame is 3x4"),
        ({"counts": "32201"}, r"needs the keys 'size' and 'counts' \(missing \['size'\]\)"),
        ({"size": [3, 4]}, r"missing \['counts'\]"),
        ({"size": [3.0, 4.0], "counts": "32201"}, r"'size' must be \[height, width\]"),
        ({"size": [3, 4, 1], "counts": "32201"}, r"'size' must be \[height, width\]"),
        ({"size": [3, 4], "counts": ""}, r"RLE counts cover 0 pixels but the size 3x4 has 12"),
        ({"size": [3, 4], "counts": "32200"}, r"RLE counts cover 11 pixels"),
        ({"size": [3, 4], "counts": [3, 2, 2, 2, 4]}, r"RLE counts cover 13 pixels"),
        ({"size": [3, 4], "counts": [3, 2, -2, 9]}, r"must not be negative"),
        ({"size": [3, 4], "counts": [3.0, 9.0]}, r"must be a list of integers"),
        ({"size": [3, 4], "counts": "32 01"}, r"characters outside '0'..'o'"),
        ({"size": [3, 4], "counts": "322~1"}, r"characters outside '0'..'o'"),
        ({"size": [3, 4], "counts": "3220X"}, r"ends in the middle of a count"),
        ({"size": [3, 4], "counts": "3220é"}, r"non-ASCII"),
        ({"size": [3, 4], "counts": "X" * 13 + "1"}, r"count too large"),
    ],
)
def test_rle_errors(rle, message):
    with pytest.raises(ValueError, match=r"^masks\[0\]\[3\]: .*" + message):
        decode_mask(rle, 3, 4, name="masks[0][3]")


def test_rle_counts_of_wrong_type():
    with pytest.raises(TypeError, match=r"^m: RLE 'counts' must be a str, bytes or a list of ints"):
        decode_mask({"size": [3, 4], "counts": 12}, 3, 4, name="m")


# ---------------------------------------------------------------- polygons


# Worked out by hand: with integer vertices pycocotools keeps the pixels whose unit square [c, c+1] x [r, r+1]
# lies inside the polygon.
L_SHAPE = [0, 0, 3, 0, 3, 1, 1, 1, 1, 3, 0, 3]
L_SHAPE_MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
TRIANGLE = [0, 0, 4, 0, 0, 4]  # x + y <= 4: squares with (c + 1) + (r + 1) <= 4
TRIANGLE_MASK = np.array(
    [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ],
    dtype=bool,
)


def test_polygons_by_hand():
    np.testing.assert_array_equal(decode_mask([L_SHAPE], 3, 4), L_SHAPE_MASK)
    np.testing.assert_array_equal(decode_mask([TRIANGLE], 5, 5), TRIANGLE_MASK)
    rectangle = [1, 1, 3, 1, 3, 2, 1, 2]
    expected = np.zeros((3, 4), dtype=bool)
    expected[1, 1:3] = True
    np.testing.assert_array_equal(decode_mask([rectangle], 3, 4), expected)


def test_single_flat_polygon_and_array_forms():
    np.testing.assert_array_equal(decode_mask(L_SHAPE, 3, 4), L_SHAPE_MASK)
    np.testing.assert_array_equal(decode_mask(tuple(L_SHAPE), 3, 4), L_SHAPE_MASK)
    np.testing.assert_array_equal(decode_mask(np.array(L_SHAPE, dtype=np.float32), 3, 4), L_SHAPE_MASK)
    np.testing.assert_array_equal(decode_mask([np.array(L_SHAPE)], 3, 4), L_SHAPE_MASK)
    np.testing.assert_array_equal(decode_mask([torch.tensor(L_SHAPE)], 3, 4), L_SHAPE_MASK)


def test_several_polygons_are_united():
    right_column = [3, 0, 4, 0, 4, 3, 3, 3]
    expected = L_SHAPE_MASK.copy()
    expected[:, 3] = True
    np.testing.assert_array_equal(decode_mask([L_SHAPE, right_column], 3, 4), expected)


def test_polygon_integer_rectangle_matches_the_box():
    rng = np.random.default_rng(1)
    for _ in range(50):
        x0, x1 = np.sort(rng.choice(9, size=2, replace=False))
        y0, y1 = np.sort(rng.choice(8, size=2, replace=False))
        polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
        np.testing.assert_array_equal(
            decode_mask([polygon], 7, 8), decode_mask([int(x0), int(y0), int(x1), int(y1)], 7, 8)
        )


@pytest.mark.parametrize(
    ("polygons", "message"),
    [
        ([[0, 0, 3, 0, 3]], r"polygon 0 has an odd number of coordinates \(5\)"),
        ([L_SHAPE, [0, 0, 3, 0, 3, 1, 1]], r"polygon 1 has an odd number of coordinates"),
        ([[0, 0, 3, 3]], r"polygon 0 has 2 points; a polygon needs at least 3"),
        ([0, 0, 1, 1, 2], r"polygon 0 has an odd number"),
        ([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5], r"polygon 0 has an odd number"),
        ([[0, 0, "3", 0, 3, 3]], r"polygon 0 must be a flat list of numbers"),
        ([[0, 0, True, 0, 3, 3]], r"polygon 0 must be a flat list of numbers"),
        ([[[0, 0], [3, 0], [3, 3]]], r"polygon 0 must be a flat list of numbers"),
        ([[0, 0, float("nan"), 0, 3, 3]], r"polygon 0 has non-finite coordinates"),
        ([], r"got an empty list"),
    ],
)
def test_polygon_errors(polygons, message):
    with pytest.raises(ValueError, match=r"^masks\[2\]\[0\]: .*" + message):
        decode_mask(polygons, 3, 4, name="masks[2][0]")


def test_mixed_list_is_rejected():
    with pytest.raises(TypeError, match=r"^m: expected COCO polygons .* or a box"):
        decode_mask([L_SHAPE, 3], 3, 4, name="m")


# ---------------------------------------------------------------- boxes


def test_integer_box_covers_x1_minus_x0_columns():
    expected = np.zeros((3, 4), dtype=bool)
    expected[1:3, 1:4] = True
    for box in ([1, 1, 4, 3], (1, 1, 4, 3), np.array([1, 1, 4, 3]), torch.tensor([1.0, 1.0, 4.0, 3.0])):
        np.testing.assert_array_equal(decode_mask(box, 3, 4), expected)


def test_fractional_box_keeps_every_overlapped_pixel():
    # rows floor(0.2)=0 .. ceil(1.0)-1=0, columns floor(0.5)=0 .. ceil(2.1)-1=2
    expected = np.zeros((3, 4), dtype=bool)
    expected[0, 0:3] = True
    np.testing.assert_array_equal(decode_mask([0.5, 0.2, 2.1, 1.0], 3, 4), expected)
    # a box smaller than a pixel still marks the pixel it lies in
    expected = np.zeros((3, 4), dtype=bool)
    expected[2, 3] = True
    np.testing.assert_array_equal(decode_mask([3.4, 2.4, 3.6, 2.6], 3, 4), expected)


def test_box_is_clipped_to_the_frame():
    expected = np.zeros((3, 4), dtype=bool)
    expected[:2, 2:] = True
    np.testing.assert_array_equal(decode_mask([2, -5, 10, 2], 3, 4), expected)
    assert not decode_mask([5, 5, 8, 8], 3, 4).any()


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([3, 0, 3, 2], r"needs x1 > x0 and y1 > y0 \(boxes are corners"),
        ([3, 1, 1, 2], r"needs x1 > x0"),
        ([0, 2, 3, 1], r"needs x1 > x0 and y1 > y0"),
        ([0, 0, float("inf"), 2], r"non-finite"),
    ],
)
def test_box_errors(box, message):
    with pytest.raises(ValueError, match=r"^m: box .*" + message):
        decode_mask(box, 3, 4, name="m")


# ---------------------------------------------------------------- annotation dicts, None, other types


def test_segmentation_dict_is_unwrapped():
    np.testing.assert_array_equal(decode_mask({"segmentation": {"size": [3, 4], "counts": "32201"}}, 3, 4), SMALL_MASK)
    np.testing.assert_array_equal(decode_mask({"segmentation": [L_SHAPE]}, 3, 4), L_SHAPE_MASK)


def test_none_is_an_error_never_an_empty_mask():
    with pytest.raises(ValueError, match=r"^masks\[0\]\[7\]: got None"):
        decode_mask(None, 3, 4, name="masks[0][7]")
    with pytest.raises(ValueError, match=r"^masks\[0\]\[7\]\['segmentation'\]: got None"):
        decode_mask({"segmentation": None}, 3, 4, name="masks[0][7]")


@pytest.mark.parametrize("mask", ["mask.png", 3, {1, 2}, b"32201"])
def test_unsupported_types(mask):
    with pytest.raises(TypeError, match=r"^m: unsupported mask type"):
        decode_mask(mask, 3, 4, name="m")


@pytest.mark.parametrize(("height", "width"), [(0, 4), (3, -1), (3.0, 4), (True, 4)])
def test_frame_size_must_be_positive_integers(height, width):
    with pytest.raises(ValueError, match=r"^m: the frame (height|width) must be a positive integer"):
        decode_mask(SMALL_MASK, height, width, name="m")


def test_missing_pycocotools_names_the_pip_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(ImportError, match=r'^m: .*pip install "transformers-videorefer\[video\]"'):
        decode_mask([L_SHAPE], 3, 4, name="m")
    # RLE decoding and uncompressed encoding do not need it
    np.testing.assert_array_equal(decode_mask({"size": [3, 4], "counts": SMALL_STRING}, 3, 4), SMALL_MASK)
    assert encode_rle(SMALL_MASK, compressed=False)["counts"] == SMALL_COUNTS
