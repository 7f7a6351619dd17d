"""Training data: upstream samples, dataset mixing, single/multi-frame choice, labels, bad samples, batching."""

import json
import logging

import numpy as np
import pytest
import torch

from conftest import box_mask, make_frames
from transformers_videorefer.mask_utils import encode_rle
from transformers_videorefer.training.data import (
    IGNORE_INDEX,
    VideoReferDataCollator,
    build_mixture,
    chat_labels,
    pad_and_stack,
    parse_dataset_sources,
    prepare_sample,
)
from transformers_videorefer.video_utils import write_video


NUM_VIDEO_FRAMES = 10
HEIGHT, WIDTH = 40, 48


def rle(top, left, bottom, right):
    return {"segmentation": encode_rle(box_mask(HEIGHT, WIDTH, top, left, bottom, right))}


def region_sample(
    sample_id: str, video: str, question: str = "What colour is <region>?", answer: str = "red", **extra
):
    return {
        "id": sample_id,
        "video": video,
        "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}],
        "annotation": [{"2": rle(2, 2, 20, 20), "7": rle(4, 4, 22, 22)}],
        **extra,
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_data")
    (root / "videos").mkdir()
    write_video(root / "videos" / "clip.mp4", make_frames(NUM_VIDEO_FRAMES, HEIGHT, WIDTH), fps=8)
    (root / "videos" / "broken.mp4").write_bytes(b"this is not a video")
    return root


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return str(path)


def mixture_of(tmp_path, samples, data_dir, multi_frame_ratio=1.0):
    path = write_json(tmp_path / "samples.json", samples)
    sources = parse_dataset_sources([{"path": path, "data_folder": str(data_dir)}])
    return build_mixture(sources, multi_frame_ratio=multi_frame_ratio, seed=0, cache_dir=str(tmp_path / "cache"))


def collator_for(processor, dataset, **kwargs):
    return VideoReferDataCollator(processor, dataset, **kwargs), list(dataset)


def test_chat_labels_match_a_hand_built_conversation(tiny_processor):
    tokenizer = tiny_processor.tokenizer

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    # Each piece of the rendered chat and whether its tokens are trained (the assistant contents and their end token).
    pieces = [
        (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is it?<|im_end|>\n",
            False,
        ),
        ("<|im_start|>assistant\n", False),
        ("A red square.<|im_end|>", True),
        ("\n<|im_start|>user\nWhich direction does it move?<|im_end|>\n<|im_start|>assistant\n", False),
        ("It moves left.<|im_end|>", True),
        ("\n", False),
    ]
    input_ids, expected = [], []
    for text, trained in pieces:
        ids = encode(text)
        input_ids += ids
        expected += ids if trained else [IGNORE_INDEX] * len(ids)
    rendered = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "What is it?"},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "Which direction does it move?"},
            {"role": "assistant", "content": "It moves left."},
        ],
        chat_template=tiny_processor.chat_template,
        tokenize=False,
    )
    assert encode(rendered) == input_ids
    labels = chat_labels(input_ids, tokenizer, ["system", "user", "assistant", "user", "assistant"])
    assert labels == expected


def test_collator_labels_only_the_answer_and_moves_the_placeholder(tiny_processor, data_dir, tmp_path):
    sample = region_sample("a", "videos/clip.mp4")
    sample["conversations"][0]["value"] = "What colour is <region>? <video>"
    collator, rows = collator_for(tiny_processor, mixture_of(tmp_path, [sample], data_dir))
    batch = collator(rows)
    tokenizer = tiny_processor.tokenizer
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == "red<|im_end|>"
    # The <video> placeholder leads the user turn, as the release places it.
    text = tokenizer.decode(batch["input_ids"][0])
    assert "<|im_start|>user\n<video>" in text and text.count("<video>") == tiny_processor.num_visual_tokens()
    assert batch["skipped_samples"] == []
    # Multi-frame region: one region token per annotated frame, and both frames are passed.
    assert (batch["input_ids"] == tokenizer.convert_tokens_to_ids("<region>")).sum() == 2
    assert (batch["region_frame_ids"][0] >= 0).sum() == 2


def test_image_with_polygon_and_frame_folder_with_masks_key(tiny_processor, data_dir, tmp_path):
    from PIL import Image

    frames = make_frames(6, HEIGHT, WIDTH, seed=1)
    folder = data_dir / "frames"
    folder.mkdir(exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:03d}.png")
    Image.fromarray(frames[0]).save(data_dir / "image.png")
    polygon = [[4.0, 4.0, 30.0, 4.0, 30.0, 20.0, 4.0, 20.0]]  # the box rows 4-19, columns 4-29
    conversation = [{"from": "human", "value": "<image>\nWhat is <region>?"}, {"from": "gpt", "value": "A box."}]
    image_sample = {
        "id": "img",
        "image": "image.png",
        "conversations": conversation,
        "annotation": [{"segmentation": polygon}],
    }
    folder_sample = {
        "id": "frames",
        "video": "frames",
        "conversations": [
            {"from": "human", "value": "<video>\nWhat is <region>?"},
            {"from": "gpt", "value": "A box."},
        ],
        "masks": [{"3": {"segmentation": polygon}}],
    }
    collator, rows = collator_for(tiny_processor, mixture_of(tmp_path, [image_sample, folder_sample], data_dir))
    image_batch, video_batch = collator(rows[:1]), collator(rows[1:])
    assert image_batch["skipped_samples"] == [] and video_batch["skipped_samples"] == []
    expected = torch.from_numpy(box_mask(HEIGHT, WIDTH, 4, 4, 20, 30))
    for batch in (image_batch, video_batch):
        torch.testing.assert_close(batch["region_masks"][0, 0], expected)
    assert "pixel_values" in image_batch and "pixel_values_videos" in video_batch
    direct = tiny_processor(
        videos=frames, masks=[{3: box_mask(HEIGHT, WIDTH, 4, 4, 20, 30)}], text="<video>x<region>", return_tensors="pt"
    )
    torch.testing.assert_close(video_batch["region_pixel_values"], direct["region_pixel_values"])


def test_plain_format_trains_the_caption(tiny_processor, data_dir, tmp_path):
    sample = {
        "id": "c",
        "video": "videos/clip.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\nDescribe the video."},
            {"from": "gpt", "value": "A cat."},
        ],
    }
    collator, rows = collator_for(
        tiny_processor, mixture_of(tmp_path, [sample], data_dir), conversation_format="plain"
    )
    batch = collator(rows)
    tokenizer = tiny_processor.tokenizer
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == "A cat.<|im_end|>"
    assert tokenizer.decode(ids).startswith("<video>" * tiny_processor.num_visual_tokens() + "\nA cat.")


def test_mixture_ratios_positions_and_jsonl(tmp_path):
    first = write_json(tmp_path / "first.json", [{"id": i, "conversations": []} for i in range(10)])
    second = tmp_path / "second.jsonl"
    second.write_text("\n".join(json.dumps({"id": f"s{i}", "conversations": []}) for i in range(4)))
    sources = parse_dataset_sources(
        json.dumps([{"path": first, "ratio": 0.5}, {"path": str(second), "ratio": 2.0, "multi_frame_ratio": 0.0}])
    )
    mixture = build_mixture(sources, multi_frame_ratio=0.25, seed=3, cache_dir=str(tmp_path / "cache"))
    ids = mixture["id"]
    first_ids = [i for i in ids if i.startswith("first/")]
    assert len(first_ids) == 5 and len(set(first_ids)) == 5
    assert sorted(i for i in ids if i.startswith("second/")) == sorted([f"second/s{i}" for i in range(4)] * 2)
    assert mixture["position"] == list(range(len(mixture)))
    assert set(mixture.filter(lambda row: row["source"] == 0)["multi_frame_ratio"]) == {0.25}
    assert set(mixture.filter(lambda row: row["source"] == 1)["multi_frame_ratio"]) == {0.0}
    # The same seed draws the same half; the raw samples stay JSON text until a batch decodes them.
    again = build_mixture(sources, multi_frame_ratio=0.25, seed=3, cache_dir=str(tmp_path / "cache"))
    assert again["id"] == ids
    assert isinstance(mixture[0]["sample"], str)


def test_half_and_half_single_and_multi_frame(tiny_processor, data_dir, tmp_path):
    samples = [region_sample(f"s{i}", "videos/clip.mp4") for i in range(40)]
    collator, rows = collator_for(tiny_processor, mixture_of(tmp_path, samples, data_dir, multi_frame_ratio=0.5))
    region_id = tiny_processor.tokenizer.convert_tokens_to_ids("<region>")
    region_tokens = [int((collator([row])["input_ids"] == region_id).sum()) for row in rows]
    assert set(region_tokens) == {1, 2}
    assert 12 <= region_tokens.count(2) <= 28  # about half multi-frame (binomial, 40 draws)
    # Deterministic per row, so a resumed run makes the same choices.
    assert [int((collator([row])["input_ids"] == region_id).sum()) for row in rows[:8]] == region_tokens[:8]


def test_single_frame_mode_shares_a_frame_between_regions(tiny_processor, data_dir):
    sample = {
        "video": "videos/clip.mp4",
        "conversations": [
            {"from": "human", "value": "<video>\n<region> and <region>?"},
            {"from": "gpt", "value": "x"},
        ],
        "masks": [{"1": [0, 0, 4, 4], "3": [0, 0, 5, 5]}, {"3": [1, 1, 6, 6], "5": [2, 2, 6, 6]}],
    }
    rng = np.random.default_rng(0)
    single = prepare_sample(sample, str(data_dir), tiny_processor, "chat", multi_frame=False, rng=rng)
    assert single.masks == [{3: [0, 0, 5, 5]}, {3: [1, 1, 6, 6]}]  # frame 3 is the only one both regions have
    multi = prepare_sample(sample, str(data_dir), tiny_processor, "chat", multi_frame=True, rng=rng)
    assert multi.masks == [{1: [0, 0, 4, 4], 3: [0, 0, 5, 5]}, {3: [1, 1, 6, 6], 5: [2, 2, 6, 6]}]
    assert multi.roles == ["system", "user", "assistant"]
    assert multi.video == str(data_dir / "videos" / "clip.mp4")


def test_bad_samples_are_skipped_counted_and_replaced(tiny_processor, data_dir, tmp_path, caplog):
    null_mask = region_sample("null", "videos/clip.mp4")
    null_mask["annotation"] = [{"2": {"segmentation": None}}]
    samples = [
        region_sample("good0", "videos/clip.mp4"),
        region_sample("missing", "videos/nowhere.mp4"),
        null_mask,
        region_sample("count", "videos/clip.mp4", question="Compare <region> and <region>."),
        region_sample("broken", "videos/broken.mp4"),
        {**region_sample("late", "videos/clip.mp4"), "annotation": [{"99": rle(2, 2, 9, 9)}]},
        region_sample("good1", "videos/clip.mp4"),
    ]
    dataset = mixture_of(tmp_path, samples, data_dir)
    collator, rows = collator_for(tiny_processor, dataset)
    with caplog.at_level(logging.WARNING):
        batch = collator(rows)
    bad = ["missing", "null", "count", "broken", "late"]
    assert sorted(batch["skipped_samples"]) == sorted(f"samples/{name}" for name in bad)  # each id once
    for name in bad:
        assert f"samples/{name}" in caplog.text
    # Every bad sample was replaced by the next good one, so the batch keeps its size.
    assert batch["input_ids"].shape[0] == len(samples)
    assert batch["labels"].shape == batch["input_ids"].shape

    too_long, rows = collator_for(tiny_processor, dataset, max_length=20)
    with pytest.raises(RuntimeError, match="in a row failed"):
        too_long(rows[:1])


def test_mixed_batch_pads_and_keeps_region_inputs_batch_first(tiny_processor, tiny_model, data_dir, tmp_path):
    no_region = {
        "id": "plain",
        "video": "videos/clip.mp4",
        "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Noise."}],
    }
    samples = [region_sample("r", "videos/clip.mp4", answer="A red thing."), no_region]
    collator, rows = collator_for(tiny_processor, mixture_of(tmp_path, samples, data_dir))
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 2 and batch["region_frame_ids"].shape[0] == 2
    assert (batch["region_frame_ids"][1] == -1).all()
    pad = tiny_processor.tokenizer.pad_token_id
    shorter = int(batch["attention_mask"].sum(1).argmin())
    assert batch["input_ids"][shorter, -1] == pad and batch["labels"][shorter, -1] == IGNORE_INDEX
    batch.pop("skipped_samples")
    loss = tiny_model(**batch).loss
    # The padded batch gives the mean of the per-sample token losses, weighted by their answer lengths.
    singles = [collator([row]) for row in rows]
    sums, counts = [], []
    for single in singles:
        single.pop("skipped_samples")
        count = int((single["labels"][0, 1:] != IGNORE_INDEX).sum())
        sums.append(tiny_model(**single).loss * count)
        counts.append(count)
    torch.testing.assert_close(loss, sum(sums) / sum(counts), rtol=1e-4, atol=1e-5)


def test_pad_and_stack():
    first, second = torch.ones(1, 2, 3), torch.full((1, 1, 4), 2.0)
    stacked = pad_and_stack([first, second], pad_value=-1)
    expected = torch.tensor([[[1, 1, 1, -1], [1, 1, 1, -1]], [[2, 2, 2, 2], [-1, -1, -1, -1]]], dtype=torch.float32)
    torch.testing.assert_close(stacked, expected)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"ratio": 0.5}, "needs a `path`"),
        ({"path": "nowhere.json"}, "no such file"),
        ("[]", "non-empty list"),
    ],
)
def test_dataset_source_errors(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_dataset_sources([entry] if isinstance(entry, dict) else entry)
