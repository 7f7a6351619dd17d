"""
VideoRefer-Bench-D scoring against a real HTTP judge on 127.0.0.1 that fails some requests (500, 429, broken
bodies) and answers some with malformed text: retries, failure reporting, means by hand, resumption.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from transformers_videorefer.evaluation import (
    JudgeConfigurationError,
    JudgeError,
    OpenAICompatibleJudge,
    judge_bench_d,
    load_bench_d,
    load_predictions,
    parse_judge_scores,
)
from transformers_videorefer.evaluation import judge as judge_module
from transformers_videorefer.evaluation.cli import main


def benchmark_layout(sc, ad, td, hd):
    return (
        f"1. Subject Correspondence: {sc}\nExplanation: the subject matches.\n"
        f"2. Appearance Description: {ad}\nExplanation: colours are partly right.\n"
        f"3. Temporal Description: {td}\nExplanation: the motion is described.\n"
        f"4. Hallucination Detection: {hd}\nExplanation: little is invented."
    )


@pytest.mark.parametrize(
    "reply, expected",
    [
        (benchmark_layout(5, 4, 3, 2), [5, 4, 3, 2]),
        # the example layout of the instructions, with its literal "\n"
        (
            "1. Subject Correspondence: 4\\nExplanation: ok\n2. Appearance Description: 3\\nExplanation: ok\n"
            "3. Temporal Description: 2\\nExplanation: ok\n4. Hallucination Detection: 1\\nExplanation: ok",
            [4, 3, 2, 1],
        ),
        (
            "**Subject Correspondence:** 5\n**Appearance Description:** 4\n**Temporal Description**: 4\n"
            "**Hallucination Detection** - 3",
            [5, 4, 4, 3],
        ),
        (
            "### Subject Correspondence (SC)\nScore: 3\n### Appearance Description (AD)\nScore: 2\n"
            "### Temporal Description (TD)\nScore: 1\n### Hallucination Detection (HD)\nScore: 0",
            [3, 2, 1, 0],
        ),
        (
            "| Dimension | Score |\n|---|---|\n| Subject Correspondence | 4 |\n| Appearance Description | 4 |\n"
            "| Temporal Description | 2 |\n| Hallucination Detection | 5 |",
            [4, 4, 2, 5],
        ),
        (
            "Here is my assessment.\nSC: 4/5\nAD: 3/5\nTD: 2 out of 5\nHD: 4\nOverall the description is fine.",
            [4, 3, 2, 4],
        ),
        (
            '{"Subject Correspondence": 5, "Appearance Description": "4", "Temporal Description": 3, '
            '"Hallucination Detection": {"score": 2, "explanation": "x"}}',
            [5, 4, 3, 2],
        ),
        ('Sure:\n```json\n{"sc": 1, "ad": 2, "td": 3, "hd": 4}\n```', [1, 2, 3, 4]),
        (
            "1. Subject Correspondence: 4.5\n2. Appearance Description: 3\n3. Temporal Description: 3\n"
            "4. Hallucinaton Detection: 2",
            [4.5, 3, 3, 2],
        ),
        # a reasoning model's thinking is ignored
        (
            "<think>Subject Correspondence: maybe 1? The colours differ.</think>\n" + benchmark_layout(4, 2, 3, 3),
            [4, 2, 3, 3],
        ),
        # the dimensions named in prose first: only a name followed by its score counts
        (
            "I will rate Subject Correspondence, Appearance Description, Temporal Description and "
            "Hallucination Detection.\n" + benchmark_layout(2, 2, 1, 1),
            [2, 2, 1, 1],
        ),
    ],
)
def test_parse_judge_scores_accepts_variations(reply, expected):
    assert list(parse_judge_scores(reply).values()) == pytest.approx(expected)
    assert list(parse_judge_scores(reply)) == ["SC", "AD", "TD", "HD"]


@pytest.mark.parametrize(
    "reply, message",
    [
        ("", "empty"),
        ("<think>SC: 4, AD: 4, TD: 4, HD: 4</think>", "empty"),
        ("I cannot evaluate this description.", "no score"),
        ("1. Subject Correspondence: 5\n2. Appearance Description: 4\n3. Temporal Description: 3", "Hallucination"),
        (benchmark_layout(6, 4, 3, 2), "outside the 0-5 scale"),
        ("SC: 8/10\nAD: 3\nTD: 3\nHD: 3", "out of 10"),
        ("SC: -1\nAD: 3\nTD: 3\nHD: 3", "no score for Subject Correspondence"),
        ('{"sc": "high", "ad": 2, "td": 3, "hd": 4}', "not a number"),
    ],
)
def test_parse_judge_scores_rejects(reply, message):
    with pytest.raises(ValueError, match=message):
        parse_judge_scores(reply)


class ScriptedJudgeServer:
    """
    An OpenAI-compatible `/v1/chat/completions` on 127.0.0.1. The predicted description names a script: a list of
    responses given in turn to that item's requests, the last one repeating. A response is ("ok", text),
    ("status", code) or ("status", code, retry_after), or ("body", raw bytes).
    """

    def __init__(self, scripts):
        self.scripts = scripts
        self.requests = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prediction = body["messages"][1]["content"].split("##Predicted answer: ")[1].strip()
                with server.lock:
                    count = sum(1 for request in server.requests if request["prediction"] == prediction)
                    server.requests.append(
                        {
                            "path": self.path,
                            "prediction": prediction,
                            "body": body,
                            "authorization": self.headers.get("Authorization"),
                        }
                    )
                script = server.scripts[prediction]
                response = script[min(count, len(script) - 1)]
                if response[0] == "status":
                    self.send_response(response[1])
                    if len(response) > 2:
                        self.send_header("Retry-After", str(response[2]))
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "scripted failure"}}')
                    return
                if response[0] == "ok":
                    payload = json.dumps(
                        {"choices": [{"index": 0, "message": {"role": "assistant", "content": response[1]}}]}
                    ).encode()
                else:
                    payload = response[1]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def count(self, prediction):
        return sum(1 for request in self.requests if request["prediction"] == prediction)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.httpd.shutdown()
        self.httpd.server_close()


OK = {
    "pred-0": (5, 4, 3, 2),
    "pred-1": (4, 4, 4, 4),
    "pred-2": (3, 2, 1, 0),
    "pred-3": (2, 3, 4, 5),
}


def scripts():
    """Per item: what the judge server does with each of its requests."""
    return {
        "pred-0": [("ok", benchmark_layout(*OK["pred-0"]))],
        "pred-1": [("status", 500), ("status", 503), ("ok", benchmark_layout(*OK["pred-1"]))],
        "pred-2": [("status", 429, 0), ("body", b"<html>bad gateway</html>"), ("ok", benchmark_layout(*OK["pred-2"]))],
        # malformed text first, then a valid reply in a markdown variant: the re-ask gets it
        "pred-3": [("ok", "I am not sure."), ("ok", "**SC**: 2\n**AD**: 3\n**TD**: 4\n**HD**: 5")],
        "pred-4": [("ok", "The description is decent overall.")],  # never parsable: failed
        "pred-5": [("status", 500)],  # never answers: failed after the retries
        "pred-6": [("ok", benchmark_layout(7, 4, 4, 4))],  # off the scale: failed
        "pred-7": [("status", 400)],  # a request the endpoint rejects: failed at once
    }


@pytest.fixture
def bench_d_files(tmp_path):
    annotations = tmp_path / "VideoRefer-Bench-D.json"
    entries = [
        {
            "id": index,
            "video": f"clip_{index}.mp4",
            "caption": f"reference caption {index}",
            "frame_idx": "0",
            "annotation": [{"0": {"segmentation": {"size": [4, 4], "counts": "04L4"}}}],
        }
        for index in range(9)
    ]
    annotations.write_text(json.dumps(entries))
    predictions = tmp_path / "preds.jsonl"
    # item 8 has no prediction
    predictions.write_text("".join(json.dumps({"id": i, "prediction": f"pred-{i}"}) + "\n" for i in range(8)))
    return annotations, predictions


@pytest.fixture
def fast_retries(monkeypatch):
    """Records the waits between attempts instead of sleeping through them."""
    waits = []
    monkeypatch.setattr(judge_module.time, "sleep", waits.append)
    return waits


def expected_means(ids):
    rows = [OK[f"pred-{i}"] for i in ids]
    means = [sum(row[d] for row in rows) / len(rows) for d in range(4)]
    return means, sum(means) / 4


def test_judge_over_http_retries_reports_failures_and_means(bench_d_files, tmp_path, fast_retries):
    annotations, predictions = bench_d_files
    with ScriptedJudgeServer(scripts()) as server:
        judge = OpenAICompatibleJudge(server.base_url, "judge-model", api_key="sk-test", max_attempts=4)
        report = judge_bench_d(
            load_bench_d(annotations),
            load_predictions(predictions),
            judge,
            tmp_path / "j.jsonl",
            concurrency=3,
            progress=False,
        )
        counts = {f"pred-{i}": server.count(f"pred-{i}") for i in range(8)}
        sample = server.requests[0]

    means, average = expected_means([0, 1, 2, 3])
    assert [report[key] for key in ("SC", "AD", "TD", "HD")] == pytest.approx(means)
    assert report["average"] == pytest.approx(average)
    assert (report["scored"], report["total"]) == (4, 9)
    failed = {entry["id"]: entry["reason"] for entry in report["failed"]}
    assert set(failed) == {4, 5, 6, 7, 8}
    assert "unparsable" in failed[4] and "no score" in failed[4]
    assert "gave up after 4 attempts" in failed[5] and "HTTP 500" in failed[5]
    assert "outside the 0-5 scale" in failed[6]
    assert "HTTP 400" in failed[7]
    assert "no prediction" in failed[8]
    # retries: 500/503 then ok (3); 429 then a broken body then ok (3); malformed text re-asked once (2 each);
    # a dead item uses all 4 attempts; 400 is not retried
    assert counts == {
        "pred-0": 1,
        "pred-1": 3,
        "pred-2": 3,
        "pred-3": 2,
        "pred-4": 2,
        "pred-5": 4,
        "pred-6": 2,
        "pred-7": 1,
    }
    assert sample["path"] == "/v1/chat/completions"
    assert sample["authorization"] == "Bearer sk-test"
    assert sample["body"]["model"] == "judge-model" and sample["body"]["temperature"] == 0
    assert sample["body"]["messages"][0]["content"].startswith("You are an advanced intelligent chatbot")
    # the judgements file: one line per judged item, raw reply beside the scores
    lines = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(8))
    assert lines[0]["scores"] == dict(zip(("SC", "AD", "TD", "HD"), OK["pred-0"]))
    assert lines[0]["raw"] == benchmark_layout(*OK["pred-0"])
    assert lines[4]["scores"] is None and lines[4]["raw"] == "The description is decent overall."


def test_items_that_could_not_be_preprocessed_are_not_judged(bench_d_files, tmp_path, fast_retries):
    annotations, _ = bench_d_files
    items = load_bench_d(annotations)[:4]
    error = "masks[0][0]: the region has no pixels on any of its frames [0]"
    predictions = {str(i): {"id": i, "prediction": f"pred-{i}"} for i in (0, 1)}
    predictions["2"] = {"id": 2, "prediction": "", "error": error}
    predictions["3"] = {"id": 3, "prediction": "", "error": "item 3: no video or frame folder at /data/clip_3.mp4"}
    judgements = tmp_path / "j.jsonl"
    # a judgement left by an earlier run, when item 2 still had a prediction
    judgements.write_text(
        json.dumps(
            {
                "id": 2,
                "judge": "judge-model",
                "reference": "reference caption 2",
                "prediction": "pred-2",
                "scores": dict(zip(("SC", "AD", "TD", "HD"), OK["pred-2"])),
                "raw": benchmark_layout(*OK["pred-2"]),
                "error": None,
            }
        )
        + "\n"
    )
    with ScriptedJudgeServer(scripts()) as server:
        judge = OpenAICompatibleJudge(server.base_url, "judge-model", max_attempts=4)
        report = judge_bench_d(items, predictions, judge, judgements, concurrency=2, progress=False)
        asked = {request["prediction"] for request in server.requests}
    assert asked == {"pred-0", "pred-1"}  # pred-1 is retried after server errors
    means, average = expected_means([0, 1])
    assert [report[key] for key in ("SC", "AD", "TD", "HD")] == pytest.approx(means)
    assert report["average"] == pytest.approx(average)
    assert (report["scored"], report["total"]) == (2, 4)
    assert report["failed"] == [
        {"id": 2, "reason": f"could not be preprocessed: {error}"},
        {"id": 3, "reason": "could not be preprocessed: item 3: no video or frame folder at /data/clip_3.mp4"},
    ]
    # the judgements file keeps the judged items only
    assert [json.loads(line)["id"] for line in judgements.read_text().splitlines()] == [0, 1]


def test_backoff_grows_exponentially_and_honours_retry_after(fast_retries):
    server_scripts = {"x": [("status", 500), ("status", 502), ("status", 429, 7), ("status", 504), ("ok", "done")]}
    with ScriptedJudgeServer(server_scripts) as server:
        judge = OpenAICompatibleJudge(server.base_url, "m", max_attempts=5, backoff_base=0.5, backoff_max=60)
        assert (
            judge.complete([{"role": "system", "content": "s"}, {"role": "user", "content": "##Predicted answer: x"}])
            == "done"
        )
    assert len(fast_retries) == 4
    assert 0.25 <= fast_retries[0] <= 0.5  # jittered within [base/2, base] * 2**attempt
    assert 0.5 <= fast_retries[1] <= 1.0
    assert fast_retries[2] == 7.0  # Retry-After
    assert 2.0 <= fast_retries[3] <= 4.0


def test_content_parts_are_joined(fast_retries):
    parts = [{"type": "text", "text": "SC: 1 AD: 2 "}, {"type": "text", "text": "TD: 3 HD: 4"}]
    body = json.dumps({"choices": [{"message": {"content": parts}}]}).encode()
    with ScriptedJudgeServer({"x": [("body", body)]}) as server:
        judge = OpenAICompatibleJudge(server.base_url, "m")
        reply = judge.complete(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "##Predicted answer: x"}]
        )
    assert reply == "SC: 1 AD: 2 TD: 3 HD: 4"
    assert fast_retries == []


def test_unauthorised_judge_stops_the_run(bench_d_files, tmp_path, fast_retries):
    annotations, predictions = bench_d_files
    with ScriptedJudgeServer({f"pred-{i}": [("status", 401)] for i in range(8)}) as server:
        judge = OpenAICompatibleJudge(server.base_url, "m")
        with pytest.raises(JudgeConfigurationError, match="401"):
            judge_bench_d(
                load_bench_d(annotations),
                load_predictions(predictions),
                judge,
                tmp_path / "j.jsonl",
                concurrency=1,
                progress=False,
            )


def test_unreachable_judge_fails_after_its_attempts(fast_retries):
    with ScriptedJudgeServer({}) as server:
        base_url = server.base_url
    judge = OpenAICompatibleJudge(base_url, "m", max_attempts=3, timeout=5)
    with pytest.raises(JudgeError, match="gave up after 3 attempts.*cannot reach"):
        judge.complete([{"role": "user", "content": "hi"}])
    assert len(fast_retries) == 2


def test_judge_arguments_are_checked():
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompatibleJudge("localhost:8000", "m")
    with pytest.raises(ValueError, match="max_attempts"):
        OpenAICompatibleJudge("http://127.0.0.1:1/v1", "m", max_attempts=0)


def test_rerun_reuses_successes_and_retries_failures(bench_d_files, tmp_path, fast_retries):
    annotations, predictions = bench_d_files
    items, preds = load_bench_d(annotations), load_predictions(predictions)
    judgements = tmp_path / "j.jsonl"
    with ScriptedJudgeServer(scripts()) as server:
        judge = OpenAICompatibleJudge(server.base_url, "judge-model", max_attempts=3)
        first = judge_bench_d(items, preds, judge, judgements, concurrency=2, progress=False)
    assert first["scored"] == 4

    # an interrupted later run left half a line behind
    with open(judgements, "a") as handle:
        handle.write('{"id": 4, "judge": "judge-model", "sco')
    fixed = {key: [("ok", benchmark_layout(1, 1, 1, 1))] for key in scripts()}
    with ScriptedJudgeServer(fixed) as server:
        judge = OpenAICompatibleJudge(server.base_url, "judge-model", max_attempts=2)
        second = judge_bench_d(items, preds, judge, judgements, concurrency=2, progress=False)
        asked = sorted(request["prediction"] for request in server.requests)
    assert asked == ["pred-4", "pred-5", "pred-6", "pred-7"]  # only the failed items are judged again
    assert [entry["id"] for entry in second["failed"]] == [8]
    assert second["SC"] == pytest.approx((sum(OK[f"pred-{i}"][0] for i in range(4)) + 4 * 1) / 8)
    lines = [json.loads(line) for line in judgements.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(8))  # one line per item once finished

    # a different prediction for an item is judged again; the others are reused
    preds["0"] = {"id": 0, "prediction": "pred-changed"}
    with ScriptedJudgeServer({"pred-changed": [("ok", benchmark_layout(0, 0, 0, 0))]}) as server:
        judge = OpenAICompatibleJudge(server.base_url, "judge-model", max_attempts=2)
        third = judge_bench_d(items, preds, judge, judgements, concurrency=2, progress=False)
        assert [request["prediction"] for request in server.requests] == ["pred-changed"]
    assert third["SC"] == pytest.approx((sum(OK[f"pred-{i}"][0] for i in range(1, 4)) + 4 * 1 + 0) / 8)


def test_cli_score_bench_d(bench_d_files, tmp_path, monkeypatch, capsys, fast_retries):
    annotations, predictions = bench_d_files
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-env")
    report_path = tmp_path / "report.json"
    with ScriptedJudgeServer(scripts()) as server:
        code = main(
            [
                "eval",
                "score",
                "bench-d",
                "--predictions",
                str(predictions),
                "--annotations",
                str(annotations),
                "--judge-base-url",
                server.base_url,
                "--judge-model",
                "gpt-4o",
                "--judge-api-key-env",
                "MY_JUDGE_KEY",
                "--judge-max-attempts",
                "4",
                "--report",
                str(report_path),
                "--no-progress",
                "--name",
                "VideoRefer-7B",
            ]
        )
        assert {request["authorization"] for request in server.requests} == {"Bearer sk-env"}
    assert code == 0
    report = json.loads(report_path.read_text())
    means, average = expected_means([0, 1, 2, 3])
    assert [report[key] for key in ("SC", "AD", "TD", "HD")] == pytest.approx(means)
    assert report["average"] == pytest.approx(average)
    assert sorted(entry["id"] for entry in report["failed"]) == [4, 5, 6, 7, 8]
    assert (tmp_path / "report.judgements.jsonl").exists()
    out = capsys.readouterr().out
    assert "| Method | SC | AD | TD | HD | Avg. |" in out
    assert (
        f"| VideoRefer-7B | {means[0]:.2f} | {means[1]:.2f} | {means[2]:.2f} | {means[3]:.2f} | {average:.2f} |" in out
    )


@pytest.fixture(scope="module")
def local_judge_path(tmp_path_factory):
    """A tiny random Qwen2 chat model saved to disk (tokenizer with a chat template, no download)."""
    tiny = pytest.importorskip("transformers_videorefer.tiny")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny.build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("judge")
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_local_transformers_judge_from_the_cli(bench_d_files, tmp_path, local_judge_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers_videorefer.evaluation import judge_messages

    annotations, predictions = bench_d_files
    report_path = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                "score",
                "bench-d",
                "--predictions",
                str(predictions),
                "--annotations",
                str(annotations),
                "--judge-local",
                "--judge-model",
                str(local_judge_path),
                "--judge-max-tokens",
                "5",
                "--judge-parse-attempts",
                "1",
                "--report",
                str(report_path),
                "--no-progress",
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    # a random model writes no scores: every item is reported failed, none silently dropped
    assert report["scored"] == 0 and report["average"] is None
    assert sorted(entry["id"] for entry in report["failed"]) == list(range(9))
    judgements = {line["id"]: line for line in map(json.loads, (tmp_path / "report.judgements.jsonl").open())}

    # the raw reply kept is the model's greedy continuation of the benchmark's judge chat
    tokenizer = AutoTokenizer.from_pretrained(local_judge_path)
    model = AutoModelForCausalLM.from_pretrained(local_judge_path)
    inputs = tokenizer.apply_chat_template(
        judge_messages("reference caption 2", "pred-2"),
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert judgements[2]["raw"] == expected
    assert judgements[2]["judge"] == str(local_judge_path)
