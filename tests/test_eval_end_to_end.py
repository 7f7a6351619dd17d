"""
`videorefer eval bench-q` end to end with a tiny random checkpoint on a 2-item benchmark in the released layout:
a DAVIS-style JPEG frame folder and an mp4 written with PyAV, RLE masks; one process and two processes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from transformers_videorefer.evaluation import bench_q_requests, load_bench_q, load_predictions, score_bench_q
from transformers_videorefer.evaluation.cli import main
from transformers_videorefer.evaluation.inference import _Collator
from transformers_videorefer.evaluation.prompts import video_user_message


av = pytest.importorskip("av")
tiny = pytest.importorskip("transformers_videorefer.tiny")

HEIGHT, WIDTH, FRAMES = 48, 64, 10


def moving_box_rle(frame: int) -> dict:
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[5 + frame : 20 + frame, 10:30] = 1
    encoded = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [HEIGHT, WIDTH], "counts": encoded["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    checkpoint = tiny.save_tiny_checkpoint(root / "checkpoint")
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    folder = root / "videos" / "DAVIS" / "JPEGImages" / "480p" / "clip"
    folder.mkdir(parents=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}.jpg")
    with av.open(str(root / "videos" / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    items = [
        {
            "video": "DAVIS/JPEGImages/480p/clip",
            "Question": "What is <object1><region> doing?",
            "type": "Basic Questions",
            "options": ["(A) walking", "(B) sitting"],
            "Answer": "(A) walking",
            "frame_idx": "2",
            "annotation": [{str(f): {"segmentation": moving_box_rle(f)} for f in (0, 2, 5)}],
        },
        {
            "video": "clip.mp4",
            "Question": "Does <object1><region> touch <object2><region>?",
            "type": "Reasoning Questions",
            "options": ["(A) yes", "(B) no"],
            "Answer": "(B) no",
            "frame_idx": "3",
            "annotation": [
                {str(f): {"segmentation": moving_box_rle(f)} for f in (3, 6)},
                {"3": {"segmentation": moving_box_rle(1)}},
            ],
        },
    ]
    annotations = root / "VideoRefer-Bench-Q.json"
    annotations.write_text(json.dumps(items))
    (root / "videos" / "broken.mp4").write_bytes(b"not a video")
    return {
        "root": root,
        "checkpoint": checkpoint,
        "annotations": annotations,
        "videos": root / "videos",
        "items": items,
    }


def inference_arguments(benchmark, output, *extra, annotations=None):
    return [
        "eval",
        "bench-q",
        "--model",
        benchmark["checkpoint"],
        "--annotations",
        str(annotations or benchmark["annotations"]),
        "--video-root",
        str(benchmark["videos"]),
        "--output",
        str(output),
        "--max-new-tokens",
        "6",
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]


def read_predictions(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_bench_q_with_tiny_checkpoint_is_batch_invariant_and_scores(benchmark, tmp_path, mode):
    one_by_one, batched = tmp_path / "b1.jsonl", tmp_path / "b2.jsonl"
    assert main(inference_arguments(benchmark, one_by_one, "--mode", mode, "--batch-size", "1")) == 0
    assert main(inference_arguments(benchmark, batched, "--mode", mode, "--batch-size", "2")) == 0
    records = read_predictions(batched)
    assert [record["id"] for record in records] == [0, 1]
    assert [record["mode"] for record in records] == [mode, mode]
    assert records[1]["question"] == (
        "Does <object1>[<region>] touch <object2>[<region>]? (A) yes (B) no. "
        "Answer with the option's letter from the given choices directly."
    )
    # left-padded batches answer exactly as one item at a time
    assert [r["prediction"] for r in records] == [r["prediction"] for r in read_predictions(one_by_one)]

    report_path = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                "score",
                "bench-q",
                "--predictions",
                str(batched),
                "--annotations",
                str(benchmark["annotations"]),
                "--report",
                str(report_path),
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    expected = score_bench_q(load_bench_q(benchmark["annotations"]), load_predictions(batched))
    assert report == expected and report["total"] == 2


def test_two_processes_with_tiny_checkpoint(benchmark, tmp_path):
    reference = tmp_path / "single.jsonl"
    assert main(inference_arguments(benchmark, reference, "--batch-size", "1")) == 0
    output = tmp_path / "shared.jsonl"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "transformers_videorefer.evaluation",
                *inference_arguments(benchmark, output, "--batch-size", "1"),
            ],
            env={
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "CUDA_VISIBLE_DEVICES": "",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    by_id = {record["id"]: record for record in read_predictions(output)}
    assert len(read_predictions(output)) == 2
    assert [by_id[record["id"]] for record in read_predictions(reference)] == read_predictions(reference)
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("shared")) == ["shared.jsonl"]


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_items_prepared_alone_are_padded_as_the_processor_pads_a_batch(benchmark, mode):
    """The collator prepares each item alone; its batch must equal the processor's own batch of the same items."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(benchmark["checkpoint"])
    requests = bench_q_requests(load_bench_q(benchmark["annotations"]), benchmark["videos"], mode)
    batch = _Collator(processor, num_frames=4)(requests)
    assert batch.requests == requests and batch.failures == []
    texts = [
        processor.tokenizer.apply_chat_template(
            [video_user_message(request.question)], tokenize=False, add_generation_prompt=True
        )
        for request in requests
    ]
    expected = processor(
        videos=[request.video for request in requests],
        masks=[request.masks for request in requests],
        text=texts,
        num_frames=4,
        padding=True,
        return_tensors="pt",
    )
    assert batch.inputs.keys() == expected.keys()
    assert batch.inputs["input_ids"].shape[1] > min(batch.inputs["attention_mask"].sum(dim=1))  # padding happened
    for key, value in expected.items():
        assert batch.inputs[key].dtype == value.dtype and torch.equal(batch.inputs[key], value), key


def with_id(entry, item_id, **overrides):
    return {**entry, "id": item_id, **overrides}


def test_items_the_processor_rejects_do_not_stop_the_run(benchmark, tmp_path, capsys):
    """
    Next to the two good items: an object whose segmentation at frame_idx is null (single mode), a missing video, an
    unreadable video and a mask on a frame past the video's end. The run completes, the bad items carry their error,
    the good items are answered as in a run without the bad items, and scoring counts the bad items as wrong.
    """
    first, second = benchmark["items"]
    null_at_frame_idx = [{**first["annotation"][0], "2": {"segmentation": None}}]
    bad = [
        with_id(first, "null-mask", annotation=null_at_frame_idx),
        with_id(first, "missing-video", video="DAVIS/JPEGImages/480p/gone"),
        with_id(first, "broken-video", video="broken.mp4"),
        with_id(first, "frame-out-of-range", frame_idx="50", annotation=[{"50": {"segmentation": moving_box_rle(0)}}]),
    ]
    good = [with_id(first, "good-0"), with_id(second, "good-1")]
    annotations, reference_annotations = tmp_path / "with-bad-items.json", tmp_path / "good-items.json"
    # batches of 3: the first generates both good items together, the second generates nothing
    annotations.write_text(json.dumps([good[0], bad[0], good[1], bad[1], bad[2], bad[3]]))
    reference_annotations.write_text(json.dumps(good))

    output, reference = tmp_path / "preds.jsonl", tmp_path / "reference.jsonl"
    assert main(inference_arguments(benchmark, output, "--batch-size", "3", annotations=annotations)) == 0
    assert "4 of them have no answer" in capsys.readouterr().out
    assert main(inference_arguments(benchmark, reference, "--batch-size", "2", annotations=reference_annotations)) == 0

    records = {record["id"]: record for record in read_predictions(output)}
    assert len(read_predictions(output)) == 6
    assert [records[record["id"]] for record in read_predictions(reference)] == read_predictions(reference)
    assert all("error" not in records[entry["id"]] for entry in good)
    assert all(records[entry["id"]]["prediction"] == "" for entry in bad)
    assert "the region has no pixels on any of its frames [2]" in records["null-mask"]["error"]
    missing = benchmark["videos"] / "DAVIS/JPEGImages/480p/gone"
    assert records["missing-video"]["error"] == f"item 'missing-video': no video or frame folder at {missing}"
    assert "cannot read video file" in records["broken-video"]["error"]
    assert "frame index 50 is out of range for a video of 10 frames" in records["frame-out-of-range"]["error"]

    report_path = tmp_path / "report.json"
    score = ["eval", "score", "bench-q", "--predictions", str(output), "--annotations", str(annotations)]
    assert main([*score, "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    reference_report = score_bench_q(load_bench_q(reference_annotations), load_predictions(reference))
    assert (report["correct"], report["total"]) == (reference_report["correct"], 6)
    assert report["overall"] == pytest.approx(100 * reference_report["correct"] / 6)
    assert [entry["id"] for entry in report["failed"]] == [entry["id"] for entry in bad]
    assert all(
        entry["reason"] == f"could not be preprocessed: {records[entry['id']]['error']}" for entry in report["failed"]
    )
