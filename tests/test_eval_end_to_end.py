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
from PIL import Image

from transformers_videorefer.evaluation import load_bench_q, load_predictions, score_bench_q
from transformers_videorefer.evaluation.cli import main


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
    return {"root": root, "checkpoint": checkpoint, "annotations": annotations, "videos": root / "videos"}


def inference_arguments(benchmark, output, *extra):
    return [
        "eval",
        "bench-q",
        "--model",
        benchmark["checkpoint"],
        "--annotations",
        str(benchmark["annotations"]),
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
