"""The processor: frame sampling, pixels, every mask format, placeholder expansion, chat template, batching, errors."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from conftest import box_mask, chat_prompt, make_frames
from transformers import AutoProcessor
from transformers_videorefer.video_utils import write_video


def release_sample_indices(num_video_frames: int, num_frames: int) -> list[int]:
    segment = (num_video_frames - 1) / num_frames
    return [int(np.round((segment * i + segment * (i + 1)) / 2 + 1e-6)) for i in range(num_frames)]


def siglip_pixels(frame: np.ndarray, size: int) -> np.ndarray:
    """The release's SigLIP preprocessing written out: PIL bicubic resize, rescale, normalise with mean = std = 0.5."""
    resized = np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC), dtype=np.float32)
    return ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def test_frames_sampled_and_normalised_like_the_release(tiny_processor):
    frames = make_frames(23, 40, 60)
    inputs = tiny_processor(videos=frames, text=chat_prompt(tiny_processor, "Describe."), return_tensors="pt")
    size = tiny_processor.image_processor.size["height"]
    expected = np.stack([siglip_pixels(frames[i], size) for i in release_sample_indices(23, tiny_processor.num_frames)])
    np.testing.assert_allclose(inputs["pixel_values_videos"][0].numpy(), expected, atol=1e-5, rtol=0)


def test_frames_folder_and_array_and_mp4(tiny_processor, tmp_path):
    frames = make_frames(9, 32, 48)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}.png")
    mask = {4: box_mask(32, 48, 2, 2, 20, 30)}
    prompt = chat_prompt(tiny_processor, "What is <region>?")
    from_array = tiny_processor(videos=frames, masks=[mask], text=prompt, return_tensors="pt")
    from_folder = tiny_processor(videos=str(folder), masks=[mask], text=prompt, return_tensors="pt")
    for key in from_array:
        torch.testing.assert_close(from_folder[key], from_array[key])

    # Smooth content survives lossy coding; the mp4 path samples the same frames.
    smooth = np.repeat(np.linspace(0, 255, 9, dtype=np.uint8)[:, None, None, None], 32 * 48 * 3, axis=1)
    smooth = smooth.reshape(9, 32, 48, 3)
    video_path = tmp_path / "clip.mp4"
    write_video(video_path, smooth, fps=8)
    from_mp4 = tiny_processor(videos=str(video_path), masks=[mask], text=prompt, return_tensors="pt")
    from_smooth = tiny_processor(videos=smooth, masks=[mask], text=prompt, return_tensors="pt")
    assert (from_mp4["pixel_values_videos"] - from_smooth["pixel_values_videos"]).abs().mean() < 0.05
    torch.testing.assert_close(from_mp4["region_masks"], from_smooth["region_masks"])


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE by hand: run lengths of the column-major flattening, starting with a zero run."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def test_every_mask_format_gives_the_same_mask(tiny_processor):
    height, width = 30, 40
    frames = make_frames(6, height, width)
    binary = box_mask(height, width, 5, 8, 17, 25)
    rle = coco_mask.encode(np.asfortranarray(binary.astype(np.uint8)))
    formats = {
        "bool array": binary,
        "uint8 array": binary.astype(np.uint8) * 255,
        "float tensor": torch.from_numpy(binary.astype(np.float32)),
        "PIL image": Image.fromarray(binary.astype(np.uint8) * 255),
        "compressed RLE (str)": {"size": rle["size"], "counts": rle["counts"].decode()},
        "compressed RLE (bytes)": {"size": rle["size"], "counts": rle["counts"]},
        "uncompressed RLE": uncompressed_rle(binary),
    }
    prompt = chat_prompt(tiny_processor, "What is <region>?")
    for name, mask in formats.items():
        inputs = tiny_processor(videos=frames, masks=[{2: mask}], text=prompt, return_tensors="pt")
        np.testing.assert_array_equal(inputs["region_masks"][0, 0].numpy(), binary, err_msg=name)

    # A box [x0, y0, x1, y1] in pixel corners covers columns x0..x1-1 and rows y0..y1-1.
    inputs = tiny_processor(videos=frames, masks=[{2: [8, 5, 25, 17]}], text=prompt, return_tensors="pt")
    np.testing.assert_array_equal(inputs["region_masks"][0, 0].numpy(), binary)

    polygon = [[8.0, 5.0, 30.0, 5.0, 19.0, 20.0]]
    expected = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygon, height, width))).astype(bool)
    inputs = tiny_processor(videos=frames, masks=[{2: polygon}], text=prompt, return_tensors="pt")
    np.testing.assert_array_equal(inputs["region_masks"][0, 0].numpy(), expected)
    assert expected[10, 19] and not expected[2, 2]


def test_region_layout_and_placeholder_expansion(tiny_processor, tiny_model):
    frames = make_frames(30, 24, 32)
    first, second = box_mask(24, 32, 0, 0, 10, 10), box_mask(24, 32, 10, 10, 24, 32)
    masks = [{20: first}, {"3": second, "1": first, "9": second}, {k: second for k in range(0, 30, 5)}]
    inputs = tiny_processor(
        videos=frames, masks=masks, text=chat_prompt(tiny_processor, "<region>, <region> and <region>?"),
        return_tensors="pt",
    )
    ids = inputs["input_ids"][0]
    config = tiny_model.config
    assert int((ids == config.video_token_id).sum()) == config.num_visual_tokens == tiny_processor.num_visual_tokens()
    region_positions = (ids == config.region_token_id).nonzero().flatten().tolist()
    assert len(region_positions) == 1 + 3 + 4
    runs = np.split(region_positions, np.flatnonzero(np.diff(region_positions) > 1) + 1)
    assert [len(run) for run in runs] == [1, 3, 4]

    # Frames are the distinct annotated source frames in order; masks go object by object in time order.
    frame_order = [0, 1, 3, 5, 9, 10, 15, 20, 25]
    assert inputs["region_pixel_values"].shape[1] == len(frame_order)
    object_frames = [[20], [1, 3, 9], [0, 5, 10, 15, 20, 25]]
    expected_slots = [frame_order.index(f) for frames_of_object in object_frames for f in frames_of_object]
    assert inputs["region_frame_ids"][0].tolist() == expected_slots
    assert inputs["region_object_ids"][0].tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert inputs["region_mask_sizes"][0].tolist() == [[24, 32]] * 10
    size = tiny_processor.image_processor.size["height"]
    np.testing.assert_allclose(
        inputs["region_pixel_values"][0, frame_order.index(15)].numpy(), siglip_pixels(frames[15], size), atol=1e-5
    )


def test_chat_template_with_video_and_masks(tiny_processor, tmp_path):
    frames = make_frames(10, 32, 32)
    folder = tmp_path / "frames"
    folder.mkdir()
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    masks = [{4: box_mask(32, 32, 0, 0, 16, 16)}]
    conversation = [
        {"role": "user", "content": [{"type": "video", "video": str(folder)}, {"type": "text", "text": "Describe <region>."}]}
    ]
    templated = tiny_processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"masks": masks},
    )
    manual = tiny_processor(
        videos=str(folder), masks=masks, text=chat_prompt(tiny_processor, "Describe <region>."), return_tensors="pt"
    )
    assert set(templated) == set(manual)
    for key in manual:
        torch.testing.assert_close(templated[key], manual[key])


def test_batch_is_left_padded_and_decodes(tiny_processor):
    texts = [chat_prompt(tiny_processor, "Hi <region>, a longer question here?"), chat_prompt(tiny_processor, "<region>?")]
    videos = [make_frames(8, 20, 20, seed=1), make_frames(5, 30, 40, seed=2)]
    masks = [[{0: box_mask(20, 20, 0, 0, 5, 5)}], [{4: box_mask(30, 40, 5, 5, 25, 35)}]]
    batch = tiny_processor(videos=videos, masks=masks, text=texts, return_tensors="pt")
    attention = batch["attention_mask"]
    assert attention[0].all() and not attention[1, 0] and attention[1, -1]
    # Masks of different resolutions share one zero-padded canvas, with their real sizes beside them.
    assert batch["region_masks"].shape[-2:] == (30, 40)
    assert batch["region_mask_sizes"][:, 0].tolist() == [[20, 20], [30, 40]]
    assert not batch["region_masks"][0, 0, 20:].any()
    decoded = tiny_processor.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert "a longer question here?" in decoded[0] and "<region>" not in decoded[0]


def test_save_and_load_round_trip(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(tiny_processor)
    assert (loaded.num_frames, loaded.num_region_tokens, loaded.patches_per_side) == (
        tiny_processor.num_frames, tiny_processor.num_region_tokens, tiny_processor.patches_per_side,
    )
    frames = make_frames(8, 20, 20)
    prompt = chat_prompt(tiny_processor, "<region>?")
    masks = [{3: box_mask(20, 20, 0, 0, 9, 9)}]
    expected = tiny_processor(videos=frames, masks=masks, text=prompt, return_tensors="pt")
    actual = loaded(videos=frames, masks=masks, text=prompt, return_tensors="pt")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


def test_image_entry_may_be_a_bare_mask(tiny_processor):
    image = make_frames(1, 20, 30)[0]
    mask = box_mask(20, 30, 2, 2, 10, 10)
    prompt = chat_prompt(tiny_processor, "<region>?", "<image>")
    bare = tiny_processor(images=image, masks=[mask], text=prompt, return_tensors="pt")
    keyed = tiny_processor(images=Image.fromarray(image), masks=[{0: mask}], text=prompt, return_tensors="pt")
    for key in bare:
        torch.testing.assert_close(bare[key], keyed[key])
    assert bare["pixel_values"].shape == (1, 3, 56, 56)


@pytest.mark.parametrize(
    "make_call,message",
    [
        (lambda p, v, m: p(videos=v, masks=[m, m], text=chat_prompt(p, "<region>?")), r"masks\[0\] has 2 entries"),
        (lambda p, v, m: p(videos=v, masks=[], text=chat_prompt(p, "<region>?")), r"masks\[0\] has 0 entries"),
        (lambda p, v, m: p(videos=v, masks=[{1: np.zeros((24, 32))}], text=chat_prompt(p, "<region>?")), "no pixels"),
        (lambda p, v, m: p(videos=v, masks=[{1: np.ones((10, 10))}], text=chat_prompt(p, "<region>?")), r"masks\[0\]\[0\]\[1\]"),
        (lambda p, v, m: p(videos=v, masks=[{99: m[1]}], text=chat_prompt(p, "<region>?")), "99"),
        (lambda p, v, m: p(videos=v, masks=[{1: {"size": [24, 32], "counts": "!!garbage"}}], text=chat_prompt(p, "<region>?")), r"masks\[0\]\[0\]"),
        (lambda p, v, m: p(videos=v, masks=[{1: [[1.0, 2.0, 3.0]]}], text=chat_prompt(p, "<region>?")), r"masks\[0\]\[0\]"),
        (lambda p, v, m: p(videos=v, masks=[{1: None}], text=chat_prompt(p, "<region>?")), r"masks\[0\]\[0\]\[1\]"),
        (lambda p, v, m: p(videos=v, text="Describe the video."), "<video> exactly once"),
        (lambda p, v, m: p(text=chat_prompt(p, "Describe.")), "<video> but no matching input"),
        (lambda p, v, m: p(videos="/nonexistent/clip.mp4", text=chat_prompt(p, "Hi")), "videos"),
    ],
)
def test_bad_input_is_a_clear_value_error(tiny_processor, make_call, message):
    frames = make_frames(12, 24, 32)
    mask = {1: box_mask(24, 32, 0, 0, 8, 8)}
    with pytest.raises(ValueError, match=message):
        make_call(tiny_processor, frames, mask)


def test_unreadable_and_empty_videos(tiny_processor, tmp_path):
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("this is text")
    empty = tmp_path / "empty"
    empty.mkdir()
    for video in (str(not_a_video), str(empty)):
        with pytest.raises(ValueError, match="videos"):
            tiny_processor(videos=video, text=chat_prompt(tiny_processor, "Hi"))


def test_one_empty_frame_inside_a_multi_frame_region_is_allowed(tiny_processor, tiny_model):
    frames = make_frames(12, 24, 32)
    occluded = {1: box_mask(24, 32, 0, 0, 8, 8), 5: np.zeros((24, 32), bool), 9: box_mask(24, 32, 4, 4, 12, 12)}
    inputs = tiny_processor(videos=frames, masks=[occluded], text=chat_prompt(tiny_processor, "<region>?"), return_tensors="pt")
    with torch.no_grad():
        regions = tiny_model.model.get_region_features(
            *(inputs[key] for key in ("region_pixel_values", "region_masks", "region_mask_sizes", "region_frame_ids", "region_object_ids"))
        )
    assert regions.shape[0] == 3 and torch.isfinite(regions).all()
