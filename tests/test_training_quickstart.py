"""The quickstart's pieces: synthetic videos and masks, smooth position embeddings, scoring, the CLI, a smoke run."""

import argparse
import json

import numpy as np
import pytest
import torch

from transformers_videorefer.mask_utils import decode_mask
from transformers_videorefer.training.cli import add_training_parsers
from transformers_videorefer.training.quickstart import (
    FAST,
    default_recipe,
    first_word,
    run_quickstart,
    smooth_position_embeddings,
)
from transformers_videorefer.training.synthetic import (
    COLOURS,
    DIRECTIONS,
    SyntheticVideoSpec,
    build_synthetic_dataset,
    render_video,
)
from transformers_videorefer.video_utils import load_video


def test_rendered_objects_match_their_masks_motion_and_colours():
    spec = SyntheticVideoSpec()
    frames, objects = render_video(np.random.default_rng(1), spec)
    assert frames.shape == (spec.num_video_frames, spec.size, spec.size, 3)
    assert len({obj.direction for obj in objects}) == len(objects)  # every object moves its own way
    for obj in objects:
        assert obj.masks.any(axis=(1, 2)).all()
        rows, cols = np.nonzero(obj.masks[0])
        last_rows, last_cols = np.nonzero(obj.masks[-1])
        dx, dy = DIRECTIONS[obj.direction]
        shift = np.array([last_cols.mean() - cols.mean(), last_rows.mean() - rows.mean()])
        assert np.sign(shift).tolist() == [dx, dy] and np.abs(shift).max() >= spec.travel[0] - 1
        half = spec.num_video_frames // 2
        for frame, colour in ((0, obj.colours[0]), (spec.num_video_frames - 1, obj.colours[1])):
            pixels = frames[frame][obj.masks[frame]]
            assert (pixels == COLOURS[colour]).all()
        assert obj.changes_colour == (obj.colours[0] != obj.colours[1])
        assert (frames[half - 1][obj.masks[half - 1]] == COLOURS[obj.colours[0]]).all()
    # Objects never overlap, so each mask is the object's whole shape.
    total = sum(obj.masks.astype(int) for obj in objects)
    assert total.max() == 1


def test_synthetic_dataset_is_in_the_upstream_format(tmp_path):
    spec = SyntheticVideoSpec(size=48, num_video_frames=8, object_size=(10, 12), travel=(12, 16), max_objects=2)
    data = build_synthetic_dataset(tmp_path, num_train_videos=2, num_eval_videos=2, spec=spec, progress=False)
    single = json.loads(data.single_frame.read_text())
    multi = json.loads(data.multi_frame.read_text())
    evaluation = json.loads(data.eval.read_text())
    for sample in single + multi:
        assert sample["conversations"][0]["from"] == "human" and sample["conversations"][1]["from"] == "gpt"
        assert sample["conversations"][0]["value"].startswith("<video>\n")
        assert len(sample["annotation"]) == sample["conversations"][0]["value"].count("<region>") == 1
    assert all(len(sample["annotation"][0]) == 1 for sample in single)
    assert all(len(sample["annotation"][0]) == 4 for sample in multi)
    # The RLE masks cover the object's pixels in the written (lossless) video.
    sample = next(s for s in single if s["id"].endswith("colour"))
    ((frame, annotation),) = sample["annotation"][0].items()
    mask = decode_mask(annotation["segmentation"], spec.size, spec.size)
    video = load_video(str(tmp_path / sample["video"]), 4, extra_frame_indices=[int(frame)])
    pixels = video.extra_frames[int(frame)][mask]
    assert (pixels == COLOURS[sample["conversations"][1]["value"]]).all()
    tasks = {item["task"] for item in evaluation}
    assert {"colour", "direction", "shape"} <= tasks
    pairs = {}
    for item in evaluation:
        if item["task"] == "mask_swap":
            pairs.setdefault(item["pair"], []).append(item)
    for items in pairs.values():
        assert len(items) == 2 and items[0]["video"] == items[1]["video"]
        assert items[0]["conversations"][0] == items[1]["conversations"][0]
        assert items[0]["conversations"][1]["value"] != items[1]["conversations"][1]["value"]


def test_smooth_position_embeddings_average_to_the_centroid():
    side, dim = 8, 64
    embeddings = smooth_position_embeddings(side, dim)
    assert embeddings.shape == (side * side, dim)
    coordinates = torch.linspace(-1, 1, side)
    mask = torch.zeros(side, side, dtype=torch.bool)
    mask[2:5, 5:8] = True  # rows 2-4, columns 5-7
    pooled = embeddings[mask.flatten()].mean(0)
    torch.testing.assert_close(pooled[0], coordinates[5:8].mean())
    torch.testing.assert_close(pooled[dim // 4], coordinates[2:5].mean())


def test_first_word():
    assert first_word(" Red.") == "red"
    assert first_word("up\nand away") == "up"
    assert first_word("") == ""


def test_cli_parses_the_training_commands():
    parser = argparse.ArgumentParser()
    add_training_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quickstart", "--report", "r.json", "--fast", "--seed", "3"])
    assert args.report == "r.json" and args.fast and args.seed == 3 and callable(args.func)
    args = parser.parse_args(["train", "--config", "x.yaml", "--learning_rate", "1e-4"])
    assert args.arguments == ["--config", "x.yaml", "--learning_rate", "1e-4"]
    args = parser.parse_args(["merge-lora", "adapter", "out", "--base-model", "base"])
    assert (args.adapter, args.output_dir, args.base_model) == ("adapter", "out", "base")


def test_quickstart_smoke_run(tmp_path, capsys):
    assert default_recipe().is_file()
    report = tmp_path / "report.json"
    result = run_quickstart(tmp_path / "run", size=FAST, report=report, progress=False)
    written = json.loads(report.read_text())
    for key in ("colour", "colour_change", "mask_swap", "direction", "shape", "seconds"):
        assert key in written
    assert written["colour"] == result["colour"] and 0 <= written["colour"] <= 1
    assert written["questions"]["colour"] > 0 and written["seconds"] > 0
    assert "colour_change" in capsys.readouterr().out
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("missing", ["recipe.yaml"])
def test_quickstart_needs_its_recipe(tmp_path, missing):
    with pytest.raises(ValueError, match="no such file"):
        run_quickstart(tmp_path, size=FAST, recipe=tmp_path / missing, progress=False)
