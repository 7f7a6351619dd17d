"""The `videorefer eval` commands: generate benchmark predictions, then score them."""

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from .bench_d import format_bench_d_table, judge_bench_d
from .bench_q import format_bench_q_table, score_bench_q
from .captions import METRICS, caption_metrics, format_caption_table, load_references
from .data import MASK_MODES, load_bench_d, load_bench_q
from .inference import DistributedContext, bench_d_requests, bench_q_requests, generate_predictions
from .judge import LocalTransformersJudge, OpenAICompatibleJudge
from .records import load_predictions, preprocessing_failure, read_jsonl


logger = logging.getLogger(__name__)


def load_model_and_processor(
    model_path: str, device: torch.device, dtype: str = "auto", attn_implementation: str | None = None
):
    """Loads a VideoRefer checkpoint and its processor onto `device`, in evaluation mode."""
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs).to(device).eval()
    return model, AutoProcessor.from_pretrained(model_path)


def _write_report(report: dict, path: str, table: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    print(table)
    print(f"\nreport written to {path}")


def _run_inference(args: argparse.Namespace, load_items: Callable, build_requests: Callable) -> int:
    requests = build_requests(load_items(args.annotations), args.video_root, args.mode)
    context = DistributedContext.from_environment()
    answered = generate_predictions(
        requests,
        args.output,
        lambda device: load_model_and_processor(args.model, device, args.dtype, args.attn_implementation),
        num_frames=args.num_frames,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_workers=args.num_workers,
        context=context,
        progress=not args.no_progress,
    )
    if answered == len(requests):
        print(f"{args.output}: all {answered} items answered")
    else:
        print(f"{args.output}: {answered} of {len(requests)} items answered; the other processes are still running")
    unanswered = [record["id"] for record in read_jsonl(args.output) if preprocessing_failure(record) is not None]
    if unanswered:
        print(
            f"{args.output}: {len(unanswered)} of them have no answer because they could not be preprocessed (first "
            f"ids: {unanswered[:5]}); their `error` field says why, and scoring counts them as wrong or failed"
        )
    return 0


def _score_bench_q(args: argparse.Namespace) -> int:
    report = score_bench_q(load_bench_q(args.annotations), load_predictions(args.predictions))
    _write_report(report, args.report, format_bench_q_table(report, args.name or Path(args.predictions).stem))
    return 0


def _score_bench_d(args: argparse.Namespace) -> int:
    if args.judge_local:
        judge = LocalTransformersJudge(args.judge_model, max_new_tokens=args.judge_max_tokens)
    else:
        api_key = os.environ.get(args.judge_api_key_env)
        if not api_key:
            logger.warning("$%s is not set: calling the judge without an API key", args.judge_api_key_env)
        judge = OpenAICompatibleJudge(
            args.judge_base_url,
            args.judge_model,
            api_key=api_key,
            temperature=args.judge_temperature,
            max_tokens=args.judge_max_tokens,
            max_attempts=args.judge_max_attempts,
            timeout=args.judge_timeout,
        )
    report_path = Path(args.report)
    judgements = args.judgements or report_path.with_name(f"{report_path.stem}.judgements.jsonl")
    report = judge_bench_d(
        load_bench_d(args.annotations),
        load_predictions(args.predictions),
        judge,
        judgements,
        concurrency=1 if args.judge_local else args.judge_concurrency,
        parse_attempts=args.judge_parse_attempts,
        progress=not args.no_progress,
    )
    report["judgements"] = str(judgements)
    _write_report(report, args.report, format_bench_d_table(report, args.name or Path(args.predictions).stem))
    return 0


def _score_captions(args: argparse.Namespace) -> int:
    references = load_references(args.references)
    records = load_predictions(args.predictions)
    # An item that could not be preprocessed keeps its empty prediction: it is scored as an empty caption, so that the
    # corpus metrics cover every reference (skipping it would raise the scores).
    failed = [
        {"id": record["id"], "reason": reason}
        for record in records.values()
        if (reason := preprocessing_failure(record)) is not None
    ]
    if failed:
        logger.warning("%d items could not be preprocessed and are scored as empty captions", len(failed))
    predictions = {key: record["prediction"] for key, record in records.items()}
    report = {**caption_metrics(references, predictions, args.metrics), "failed": failed}
    _write_report(report, args.report, format_caption_table(report, args.name or Path(args.predictions).stem))
    return 0


def _add_inference_parser(subparsers, name: str, description: str, load_items: Callable, build_requests: Callable):
    parser = subparsers.add_parser(name, help=description, description=description)
    parser.add_argument("--model", required=True, help="VideoRefer checkpoint folder or hub id")
    parser.add_argument("--annotations", required=True, help="the benchmark's annotation JSON, as released")
    parser.add_argument("--video-root", required=True, help="folder the annotation's `video` paths are relative to")
    parser.add_argument("--output", required=True, help="predictions file (JSON lines); a rerun resumes it")
    parser.add_argument(
        "--mode", choices=MASK_MODES, default="single", help="single: the mask at frame_idx; multi: all masks"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="items per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=2048, help="default 2048, as the release's evaluation")
    parser.add_argument("--num-frames", type=int, default=None, help="override the model config's num_frames")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding videos (default 2)")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default auto)")
    parser.add_argument("--attn-implementation", default=None, help="e.g. sdpa or flash_attention_2")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=lambda args: _run_inference(args, load_items, build_requests))


def _add_score_parsers(subparsers) -> None:
    score = subparsers.add_parser("score", help="score predictions", description="Score a predictions file.")
    tasks = score.add_subparsers(dest="score_task", metavar="{bench-q,bench-d,captions}", required=True)

    def common(parser, annotations: bool = True):
        parser.add_argument("--predictions", required=True, help="JSON lines with at least `id` and `prediction`")
        if annotations:
            parser.add_argument("--annotations", required=True, help="the benchmark's annotation JSON, as released")
        parser.add_argument("--report", required=True, help="where to write the JSON report")
        parser.add_argument("--name", default=None, help="row name in the Markdown table (default: predictions stem)")

    bench_q = tasks.add_parser("bench-q", help="VideoRefer-Bench-Q accuracy per question type")
    common(bench_q)
    bench_q.set_defaults(func=_score_bench_q)

    bench_d = tasks.add_parser("bench-d", help="VideoRefer-Bench-D scores (SC, AD, TD, HD) from a judge LLM")
    common(bench_d)
    bench_d.add_argument(
        "--judge-model", required=True, help="model name at the endpoint, or a local path with --judge-local"
    )
    where = bench_d.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--judge-base-url", default=None, help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1"
    )
    where.add_argument("--judge-local", action="store_true", help="run --judge-model in-process with transformers")
    bench_d.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="variable holding the API key")
    bench_d.add_argument("--judgements", default=None, help="judgements JSON lines (default: beside the report)")
    bench_d.add_argument("--judge-concurrency", type=int, default=4, help="requests in flight (default 4)")
    bench_d.add_argument("--judge-max-attempts", type=int, default=6, help="requests per item on errors (default 6)")
    bench_d.add_argument(
        "--judge-parse-attempts", type=int, default=2, help="asks per item while unparsable (default 2)"
    )
    bench_d.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    bench_d.add_argument("--judge-temperature", type=float, default=0.0, help="default 0")
    bench_d.add_argument("--judge-max-tokens", type=int, default=800, help="longest judge reply (default 800)")
    bench_d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    bench_d.set_defaults(func=_score_bench_d)

    captions = tasks.add_parser("captions", help="BLEU, METEOR, ROUGE-L and CIDEr against reference captions")
    common(captions, annotations=False)
    captions.add_argument("--references", required=True, help="JSON or JSON lines with `id` and `caption`")
    captions.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="default: all")
    captions.set_defaults(func=_score_captions)


def add_eval_parser(subparsers) -> None:
    """Adds the `eval` command tree (bench-q, bench-d, score bench-q|bench-d|captions) to an argparse subparsers."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate on VideoRefer-Bench",
        description="Generate VideoRefer-Bench predictions and score them.",
    )
    commands = parser.add_subparsers(dest="eval_command", metavar="{bench-q,bench-d,score}", required=True)
    _add_inference_parser(
        commands,
        "bench-q",
        "Answer VideoRefer-Bench-Q (multiple choice) with a VideoRefer model.",
        load_bench_q,
        bench_q_requests,
    )
    _add_inference_parser(
        commands,
        "bench-d",
        "Describe the objects of VideoRefer-Bench-D with a VideoRefer model.",
        load_bench_d,
        bench_d_requests,
    )
    _add_score_parsers(commands)


def main(argv: list[str] | None = None) -> int:
    """`python -m transformers_videorefer.evaluation eval ...`: the `eval` commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="videorefer")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
