"""
Benchmark inference with a fake model and processor: batching, the benchmark prompts, the model's frame count,
exactly-once resumable writing after crashes (including a killed process and a half-written line), and two real
processes sharing one evaluation through RANK/WORLD_SIZE.
"""

import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from transformers.feature_extraction_utils import BatchFeature

from transformers_videorefer.evaluation import (
    DistributedContext,
    bench_d_requests,
    bench_q_requests,
    generate_predictions,
    load_bench_d,
    load_bench_q,
    load_predictions,
    score_bench_q,
)
from transformers_videorefer.evaluation.records import JsonlAppender


THIS_FILE = Path(__file__).resolve()
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


class FakeTokenizer:
    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"


def render(text, video, masks, num_frames) -> str:
    """
    What the fake processor feeds the fake model: everything the real processor would receive, as text. Like the real
    processor, it rejects a video that does not exist and a region without pixels with a `ValueError`.
    """
    if not os.path.exists(video):
        raise ValueError(f"videos[0]: no such video file or frame folder: {video}")
    areas = [
        {
            str(frame): int(
                mask_utils.decode(
                    mask_utils.frPyObjects(rle, *rle["size"]) if isinstance(rle["counts"], list) else rle
                ).sum()
            )
            for frame, rle in sorted(region.items())
        }
        for region in masks
    ]
    for number, region in enumerate(areas):
        if not any(region.values()):
            raise ValueError(f"masks[0][{number}]: the region has no pixels on any of its frames {sorted(region)}")
    return json.dumps({"text": text, "video": os.path.basename(video), "areas": areas, "num_frames": num_frames})


class FakeProcessor:
    """Encodes each rendered sample as bytes (+1, 0 = left padding) in `input_ids`."""

    def __init__(self):
        self.tokenizer = FakeTokenizer()

    def __call__(self, videos, masks, text, num_frames, padding, return_tensors):
        assert return_tensors == "pt"
        rows = [list(render(t, v, m, num_frames).encode()) for t, v, m in zip(text, videos, masks)]
        width = max(len(row) for row in rows)
        ids = torch.tensor([[0] * (width - len(row)) + [b + 1 for b in row] for row in rows])
        return BatchFeature(
            {"input_ids": ids, "attention_mask": (ids > 0).long(), "pixel_values_videos": torch.zeros(len(rows), 1)}
        )

    def batch_decode(self, ids, skip_special_tokens):
        return [bytes(int(i) - 1 for i in row if i > 0).decode() for row in ids]


class FakeModel:
    """Replies "  REPLY:<rendered prompt>  "; can crash after some calls, sleep, and log what it answered."""

    def __init__(self, num_frames=5, crash_after=None, delay=0.0, log=None):
        self.config = SimpleNamespace(num_frames=num_frames)
        self.dtype = torch.float64
        self.crash_after = crash_after
        self.delay = delay
        self.log = log
        self.batches = []

    def generate(self, input_ids, attention_mask, pixel_values_videos, max_new_tokens, do_sample):
        assert do_sample is False and pixel_values_videos.dtype == torch.float64
        if self.crash_after is not None and len(self.batches) == self.crash_after:
            raise RuntimeError("simulated crash")
        time.sleep(self.delay)
        prompts = [bytes(int(i) - 1 for i in row if i > 0).decode() for row in input_ids]
        self.batches.append(prompts)
        if self.log:
            with open(self.log, "a") as handle:
                handle.writelines(json.loads(prompt)["video"] + "\n" for prompt in prompts)
        replies = [list(f"  REPLY:{prompt}  ".encode()) for prompt in prompts]
        width = max(len(reply) for reply in replies)
        new = torch.tensor([[b + 1 for b in reply] + [0] * (width - len(reply)) for reply in replies])
        return torch.cat([input_ids, new], dim=1)


def rle(mask):
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def square(size, side):
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:side, :side] = 1
    return mask


def write_bench_q(root: Path, count: int) -> Path:
    """A Bench-Q file without ids, each item with two objects (areas 1..4) and its frame folder."""
    entries = []
    for index in range(count):
        (root / "frames" / f"v{index}").mkdir(parents=True)
        entries.append(
            {
                "video": f"frames/v{index}",
                "Question": "Does <object1><region> touch <object2><region>?",
                "type": "Basic Questions",
                "options": ["(A) yes", "(B) no"],
                "Answer": "(A) yes",
                "frame_idx": "2",
                "annotation": [
                    {"0": {"segmentation": rle(square(8, 1))}, "2": {"segmentation": rle(square(8, 2))}},
                    {"2": {"segmentation": rle(square(8, 3))}, "4": {"segmentation": None}},
                ],
            }
        )
    path = root / "VideoRefer-Bench-Q.json"
    path.write_text(json.dumps(entries))
    return path


def expected_prediction(request, num_frames=5) -> str:
    text = FakeTokenizer().apply_chat_template(
        [{"role": "user", "content": "<video>\n" + request.question}], False, True
    )
    return "REPLY:" + render(text, request.video, request.masks, num_frames)


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_batched_predictions_carry_the_benchmark_prompt_and_model_frame_count(tmp_path):
    annotations = write_bench_q(tmp_path, 5)
    requests = bench_q_requests(load_bench_q(annotations), tmp_path, "single")
    model = FakeModel(num_frames=5)
    output = tmp_path / "preds.jsonl"
    answered = generate_predictions(
        requests,
        output,
        lambda device: (model, FakeProcessor()),
        batch_size=2,
        num_workers=0,
        context=DistributedContext(),
        progress=False,
    )
    assert answered == 5
    assert [len(batch) for batch in model.batches] == [2, 2, 1]
    records = read_lines(output)
    assert [record["id"] for record in records] == [0, 1, 2, 3, 4]
    first = json.loads(records[0]["prediction"][len("REPLY:") :])
    assert first["text"] == (
        "<|user|><video>\nDoes <object1>[<region>] touch <object2>[<region>]? (A) yes (B) no. "
        "Answer with the option's letter from the given choices directly.<|assistant|>"
    )
    assert first["num_frames"] == 5
    assert first["areas"] == [{"2": 4}, {"2": 9}]  # single mode: each object's mask at frame_idx
    for record, request in zip(records, requests):
        assert record["prediction"] == expected_prediction(request)  # stripped, routed to its own item
        assert record["question"] == request.question
        assert (record["video"], record["mode"], record["type"], record["answer"]) == (
            f"frames/v{record['id']}",
            "single",
            "Basic Questions",
            "(A) yes",
        )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("preds")) == ["preds.jsonl"]


def test_multi_mode_and_frame_count_override(tmp_path):
    annotations = write_bench_q(tmp_path, 1)
    requests = bench_q_requests(load_bench_q(annotations), tmp_path, "multi")
    model = FakeModel(num_frames=5)
    generate_predictions(
        requests,
        tmp_path / "p.jsonl",
        lambda device: (model, FakeProcessor()),
        num_frames=9,
        num_workers=0,
        context=DistributedContext(),
        progress=False,
    )
    rendered = json.loads(model.batches[0][0])
    assert rendered["num_frames"] == 9
    assert rendered["areas"] == [{"0": 1, "2": 4}, {"2": 9, "4": 0}]  # all masks; a null one is empty


def test_bench_d_prompt(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    entry = {
        "id": 7,
        "video": "a.mp4",
        "caption": "c",
        "frame_idx": 0,
        "annotation": [{"0": {"segmentation": rle(square(8, 2))}}],
    }
    (tmp_path / "d.json").write_text(json.dumps([entry]))
    requests = bench_d_requests(load_bench_d(tmp_path / "d.json"), tmp_path)
    assert (
        requests[0].question == "Please give a detailed description of the highlighted object [<region>] in the video."
    )
    assert requests[0].video == str(tmp_path / "a.mp4")


def test_unusable_items_get_their_reason_in_the_request(tmp_path):
    annotations = write_bench_q(tmp_path, 4)
    entries = json.loads(annotations.read_text())
    entries[0]["Question"] = "Is <region> red?"
    entries[2]["frame_idx"] = "4"  # single mode: the first object has no annotation on frame 4
    annotations.write_text(json.dumps(entries))
    (tmp_path / "frames" / "v1").rmdir()
    requests = bench_q_requests(load_bench_q(annotations), tmp_path)
    assert "the question has 1 <region> but the annotation has 2 objects" in requests[0].error
    assert requests[1].error == f"item 1: no video or frame folder at {tmp_path / 'frames' / 'v1'}"
    assert "object 0 has no annotation on frame_idx 4" in requests[2].error
    assert [request.masks == [] for request in requests] == [True, True, True, False]
    assert requests[3].error is None
    # in multi mode, frame_idx does not matter
    multi = bench_q_requests(load_bench_q(annotations), tmp_path, "multi")
    assert [request.error is None for request in multi] == [False, False, True, True]


def test_a_wrong_video_root_or_an_unusable_benchmark_stops_before_generation(tmp_path):
    items = load_bench_q(write_bench_q(tmp_path, 2))
    with pytest.raises(FileNotFoundError, match="none of the 2 videos exist under"):
        bench_q_requests(items, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="mode"):
        bench_q_requests(items, tmp_path, "all")
    entries = json.loads((tmp_path / "VideoRefer-Bench-Q.json").read_text())
    for entry in entries:
        entry["frame_idx"] = "4"
    (tmp_path / "VideoRefer-Bench-Q.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="no item of the benchmark can be answered.*frame_idx 4"):
        bench_q_requests(load_bench_q(tmp_path / "VideoRefer-Bench-Q.json"), tmp_path)


def write_bench_q_with_bad_items(root: Path) -> Path:
    """Five items; item 1's first object is null at frame_idx (single mode), item 3's frame folder is missing."""
    annotations = write_bench_q(root, 5)
    entries = json.loads(annotations.read_text())
    entries[1]["annotation"][0]["2"] = {"segmentation": None}
    annotations.write_text(json.dumps(entries))
    (root / "frames" / "v3").rmdir()
    return annotations


def test_items_the_processor_rejects_are_written_with_their_error(tmp_path, caplog):
    annotations = write_bench_q_with_bad_items(tmp_path)
    items = load_bench_q(annotations)
    requests = bench_q_requests(items, tmp_path)
    assert requests[1].error is None  # the empty mask is only rejected by the processor, in the worker
    output = tmp_path / "preds.jsonl"
    model = FakeModel()
    with caplog.at_level(logging.WARNING, logger="transformers_videorefer.evaluation.inference"):
        answered = generate_predictions(
            requests,
            output,
            lambda device: (model, FakeProcessor()),
            batch_size=3,
            num_workers=0,
            context=DistributedContext(),
            progress=False,
        )
    assert answered == 5
    # batches [0, 1, 2] and [3, 4]: the good items of each batch are generated together
    assert [[json.loads(prompt)["video"] for prompt in batch] for batch in model.batches] == [["v0", "v2"], ["v4"]]
    records = {record["id"]: record for record in read_lines(output)}
    assert len(read_lines(output)) == 5 and sorted(records) == list(range(5))
    assert records[1]["prediction"] == "" and records[3]["prediction"] == ""
    assert records[1]["error"] == "masks[0][0]: the region has no pixels on any of its frames ['2']"
    assert records[3]["error"] == f"item 3: no video or frame folder at {tmp_path / 'frames' / 'v3'}"
    assert (records[1]["question"], records[1]["video"], records[1]["answer"]) == (
        requests[1].question,
        "frames/v1",
        "(A) yes",
    )

    # the good items are answered exactly as by a run without the bad items
    reference = tmp_path / "reference.jsonl"
    good = [request for request in requests if request.id in (0, 2, 4)]
    generate_predictions(
        good,
        reference,
        lambda device: (FakeModel(), FakeProcessor()),
        batch_size=3,
        num_workers=0,
        context=DistributedContext(),
        progress=False,
    )
    assert [records[record["id"]] for record in read_lines(reference)] == read_lines(reference)

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings[:2] == [
        f"item 1 could not be preprocessed, written unanswered: {records[1]['error']}",
        f"item 3 could not be preprocessed, written unanswered: {records[3]['error']}",
    ]
    assert warnings[2] == f"2 items could not be preprocessed: 1, 3 (see their `error` in {output})"

    # a rerun does not retry them: nothing is left to answer
    def never_load(device):
        raise AssertionError("a finished evaluation must not load the model")

    lines = output.read_text()
    assert generate_predictions(requests, output, never_load, context=DistributedContext(), progress=False) == 5
    assert output.read_text() == lines

    # scoring: the fake replies quote the question, whose first option "(A)" is the right answer
    report = score_bench_q(items, load_predictions(output))
    assert (report["correct"], report["total"]) == (3, 5)
    assert report["failed"] == [
        {"id": 1, "reason": f"could not be preprocessed: {records[1]['error']}"},
        {"id": 3, "reason": f"could not be preprocessed: {records[3]['error']}"},
    ]
    assert report["unparsed"] == [] and report["missing"] == []


def test_other_preprocessing_errors_stop_the_run(tmp_path):
    class BrokenDiskProcessor(FakeProcessor):
        def __call__(self, videos, *args, **kwargs):
            if videos[0].endswith("v1"):
                raise OSError("input/output error")
            return super().__call__(videos, *args, **kwargs)

    requests = bench_q_requests(load_bench_q(write_bench_q(tmp_path, 3)), tmp_path)
    output = tmp_path / "preds.jsonl"
    with pytest.raises(RuntimeError, match="preparing item 1 failed: input/output error"):
        generate_predictions(
            requests,
            output,
            lambda device: (FakeModel(), BrokenDiskProcessor()),
            batch_size=1,
            num_workers=0,
            context=DistributedContext(),
            progress=False,
        )
    assert [record["id"] for record in read_lines(output)] == [0]  # a transient error is not written: it is retried


def test_crash_then_resume_writes_every_item_exactly_once(tmp_path):
    annotations = write_bench_q(tmp_path, 7)
    requests = bench_q_requests(load_bench_q(annotations), tmp_path)
    output = tmp_path / "preds.jsonl"
    crashing = FakeModel(crash_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_predictions(
            requests,
            output,
            lambda device: (crashing, FakeProcessor()),
            batch_size=2,
            num_workers=0,
            context=DistributedContext(),
            progress=False,
        )
    # the items of the two finished batches are in the output already
    assert [record["id"] for record in read_lines(output)] == [0, 1, 2, 3]
    # a process killed while writing item 4 leaves half a line
    with open(output, "a") as handle:
        handle.write('{"id": 4, "prediction": "REPLY:{\\"te')

    resumed = FakeModel()
    assert (
        generate_predictions(
            requests,
            output,
            lambda device: (resumed, FakeProcessor()),
            batch_size=2,
            num_workers=0,
            context=DistributedContext(),
            progress=False,
        )
        == 7
    )
    answered = [json.loads(prompt)["video"] for batch in resumed.batches for prompt in batch]
    assert answered == ["v4", "v5", "v6"]
    records = read_lines(output)
    assert [record["id"] for record in records] == list(range(7))
    assert all(record["prediction"] == expected_prediction(request) for record, request in zip(records, requests))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("preds")) == ["preds.jsonl"]

    def never_load(device):
        raise AssertionError("a finished evaluation must not load the model")

    assert generate_predictions(requests, output, never_load, context=DistributedContext(), progress=False) == 7
    assert read_lines(output) == records


def test_a_second_process_with_the_same_rank_is_refused(tmp_path):
    requests = bench_q_requests(load_bench_q(write_bench_q(tmp_path, 1)), tmp_path)
    with open(tmp_path / "preds.jsonl.rank1.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another process with rank 1"):
            generate_predictions(requests, tmp_path / "preds.jsonl", None, context=DistributedContext(1, 2))


def test_shared_writers_cut_a_dead_writers_half_line(tmp_path):
    path = tmp_path / "p.jsonl"
    with JsonlAppender(path, shared=True) as first, JsonlAppender(path, shared=True) as second:
        first.write({"id": 0})
        with open(path, "a") as dead:  # a writer killed in the middle of its line
            dead.write('{"id": 1, "predi')
        second.write({"id": 2})
        first.write({"id": 3})
        assert [record["id"] for record in second.records()] == [0, 2, 3]
    assert path.read_text() == '{"id": 0}\n{"id": 2}\n{"id": 3}\n'


def run_fake_evaluation(annotations, root, output, log, delay, batch_size):
    """Entry point of the subprocesses below: a fake-model evaluation in the distributed context of the env."""
    requests = bench_q_requests(load_bench_q(annotations), root)
    model = FakeModel(delay=float(delay), log=log)
    answered = generate_predictions(
        requests,
        output,
        lambda device: (model, FakeProcessor()),
        batch_size=int(batch_size),
        num_workers=0,
        progress=False,
    )
    print(json.dumps({"answered": answered}))


WORKER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("eval_fakes", {str(THIS_FILE)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.run_fake_evaluation(*sys.argv[1:])
"""


def launch(rank, world_size, args, log):
    env = {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "CUDA_VISIBLE_DEVICES": "",
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, *args[:3], str(log), *args[3:]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_two_processes(tmp_path, annotations, output, delay="0", batch_size="2"):
    logs = [tmp_path / f"log{rank}.txt" for rank in range(2)]
    processes = [launch(rank, 2, [annotations, tmp_path, output, delay, batch_size], logs[rank]) for rank in range(2)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1])["answered"])
    answered = [log.read_text().split() if log.exists() else [] for log in logs]
    return results, answered


def check_complete_output(output, requests):
    """Every request answered exactly once, with its own prediction."""
    records = read_lines(output)
    assert sorted(record["id"] for record in records) == list(range(len(requests)))
    by_id = {record["id"]: record for record in records}
    assert all(by_id[request.id]["prediction"] == expected_prediction(request) for request in requests)


def test_two_processes_share_one_evaluation(tmp_path):
    annotations = write_bench_q(tmp_path, 9)
    output = tmp_path / "preds.jsonl"
    counts, answered = run_two_processes(tmp_path, annotations, output, delay="0.05")
    assert max(counts) == 9  # the process that finished last saw every item written
    assert answered[0] == [f"v{i}" for i in range(0, 9, 2)] and answered[1] == [f"v{i}" for i in range(1, 9, 2)]
    check_complete_output(output, bench_q_requests(load_bench_q(annotations), tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("preds")) == ["preds.jsonl"]


def test_two_processes_resume_what_an_earlier_run_left(tmp_path):
    """An earlier run (of three processes) died: its output holds items 0, 4, 5 and half a line of item 7."""
    annotations = write_bench_q(tmp_path, 8)
    requests = bench_q_requests(load_bench_q(annotations), tmp_path)
    output = tmp_path / "preds.jsonl"
    lines = [json.dumps({"id": i, "prediction": expected_prediction(requests[i])}) + "\n" for i in (0, 4, 5)]
    output.write_text("".join(lines) + '{"id": 7, "predic')
    (tmp_path / "preds.jsonl.rank1.lock").touch()  # left by a killed process: no longer locked
    counts, answered = run_two_processes(tmp_path, annotations, output, delay="0.05", batch_size="1")
    assert max(counts) == 8
    assert answered[0] == ["v2", "v6"] and answered[1] == ["v1", "v3", "v7"]
    check_complete_output(output, requests)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("preds")) == ["preds.jsonl"]


def test_killed_process_resumes_without_duplicates(tmp_path):
    annotations = write_bench_q(tmp_path, 8)
    output = tmp_path / "preds.jsonl"
    log = tmp_path / "killed.txt"
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(annotations), str(tmp_path), str(output), str(log), "0.5", "1"],
        env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "CUDA_VISIBLE_DEVICES": ""},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not output.exists() or len(output.read_text().splitlines()) < 2):
        if process.poll() is not None:
            pytest.fail(f"the worker exited before it was killed: {process.stderr.read()[-3000:]!r}")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    written = [record["id"] for record in read_lines(output)]
    assert 2 <= len(written) < 8

    requests = bench_q_requests(load_bench_q(annotations), tmp_path)
    resumed = FakeModel()
    generate_predictions(
        requests,
        output,
        lambda device: (resumed, FakeProcessor()),
        batch_size=2,
        num_workers=0,
        context=DistributedContext(),
        progress=False,
    )
    answered = {int(json.loads(prompt)["video"][1:]) for batch in resumed.batches for prompt in batch}
    assert answered == set(range(8)) - set(written)
    check_complete_output(output, requests)


def test_distributed_context_checks_its_rank():
    with pytest.raises(ValueError, match="rank"):
        DistributedContext(rank=2, world_size=2)
    assert DistributedContext().device.type in ("cpu", "cuda")


def test_bad_batch_size_is_rejected(tmp_path):
    requests = bench_q_requests(load_bench_q(write_bench_q(tmp_path, 1)), tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        generate_predictions(
            requests, tmp_path / "p.jsonl", lambda device: None, batch_size=0, context=DistributedContext()
        )
