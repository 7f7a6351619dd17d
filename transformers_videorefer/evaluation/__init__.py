"""Evaluation on VideoRefer-Bench (Bench-Q accuracy, Bench-D judge scores) and caption metrics (paper Sec. 3.3)."""

from .bench_d import DIMENSIONS, format_bench_d_table, judge_bench_d, parse_judge_scores
from .bench_q import QUESTION_TYPES, answer_letter, format_bench_q_table, parse_choice_letter, score_bench_q
from .captions import caption_metrics, format_caption_table, load_references, ptb_tokenize
from .cli import add_eval_parser
from .data import BenchItem, load_bench_d, load_bench_q, region_masks
from .inference import (
    DistributedContext,
    GenerationRequest,
    bench_d_requests,
    bench_q_requests,
    generate_predictions,
)
from .judge import ChatJudge, JudgeConfigurationError, JudgeError, LocalTransformersJudge, OpenAICompatibleJudge
from .prompts import bench_q_question, judge_messages, judge_system_prompt
from .records import load_predictions


__all__ = [
    "DIMENSIONS",
    "QUESTION_TYPES",
    "BenchItem",
    "ChatJudge",
    "DistributedContext",
    "GenerationRequest",
    "JudgeConfigurationError",
    "JudgeError",
    "LocalTransformersJudge",
    "OpenAICompatibleJudge",
    "add_eval_parser",
    "answer_letter",
    "bench_d_requests",
    "bench_q_question",
    "bench_q_requests",
    "caption_metrics",
    "format_bench_d_table",
    "format_bench_q_table",
    "format_caption_table",
    "generate_predictions",
    "judge_bench_d",
    "judge_messages",
    "judge_system_prompt",
    "load_bench_d",
    "load_bench_q",
    "load_predictions",
    "load_references",
    "parse_choice_letter",
    "parse_judge_scores",
    "ptb_tokenize",
    "region_masks",
    "score_bench_q",
]
