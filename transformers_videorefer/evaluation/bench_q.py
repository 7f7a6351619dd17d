"""VideoRefer-Bench-Q scoring: the option letter parsed from each reply, accuracy per question type and overall."""

import logging
import re
from collections.abc import Mapping, Sequence

from .data import BenchItem
from .records import preprocessing_failure


logger = logging.getLogger(__name__)

# The paper's column order (Table 2); other types found in a file follow in order of appearance.
QUESTION_TYPES = (
    "Basic Questions",
    "Sequential Questions",
    "Relationship Questions",
    "Reasoning Questions",
    "Future Predictions",
)

_PARENTHESISED_LETTER = re.compile(r"\(([A-Z])\)")
_LETTER_BEFORE_PARENTHESIS = re.compile(r"([A-Z])\)")


def parse_choice_letter(reply: str) -> str | None:
    """
    The option letter a reply chooses, as the benchmark reads it: the first `(X)`; else the first `X)`; else the
    reply's first character once periods are removed, compared case-insensitively. Returns the upper-case letter,
    or None when the reply holds none (empty, or its first character is not a letter).
    """
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a string, got {type(reply).__name__}")
    for pattern in (_PARENTHESISED_LETTER, _LETTER_BEFORE_PARENTHESIS):
        match = pattern.search(reply)
        if match:
            return match.group(1)
    first = reply.replace(".", "").strip()[:1]
    return first.upper() if first.isascii() and first.isalpha() else None


def answer_letter(item: BenchItem) -> str:
    """The correct option's letter: the `(X)` of the item's `Answer`, or the answer itself when it is one letter."""
    match = _PARENTHESISED_LETTER.search(item.answer)
    letter = match.group(1) if match else item.answer.strip().upper()
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"item {item.id!r}: cannot read an option letter from Answer {item.answer!r}")
    return letter


def score_bench_q(items: Sequence[BenchItem], predictions: Mapping[str, dict]) -> dict:
    """
    Accuracy (percent) per question type and overall. `predictions` maps item keys (`BenchItem.key`) to records with
    a `prediction` string. A reply with no parsable letter counts as wrong and is listed under `unparsed`; an item
    without a prediction counts as wrong and is listed under `missing`; an item that could not be preprocessed (its
    record has an `error`) counts as wrong and is listed under `failed` as `{"id", "reason"}`.
    """
    known = {item.key for item in items}
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions have ids that are not in the annotations (first: {unknown[:5]}); "
            "check that the predictions and the annotation file belong together"
        )
    type_order = list(QUESTION_TYPES) + [
        t for t in dict.fromkeys(item.type for item in items) if t not in QUESTION_TYPES
    ]
    counts = {question_type: {"correct": 0, "total": 0} for question_type in type_order}
    unparsed, missing, failed = [], [], []
    for item in items:
        record = predictions.get(item.key)
        counts[item.type]["total"] += 1
        if record is None:
            missing.append(item.id)
            continue
        failure = preprocessing_failure(record)
        if failure is not None:
            failed.append({"id": item.id, "reason": failure})
            continue
        chosen = parse_choice_letter(record["prediction"])
        if chosen is None:
            unparsed.append({"id": item.id, "prediction": record["prediction"]})
        elif chosen == answer_letter(item):
            counts[item.type]["correct"] += 1
    if missing:
        logger.warning("%d of %d items have no prediction and count as wrong", len(missing), len(items))
    if failed:
        logger.warning(
            "%d of %d items could not be preprocessed and count as wrong; see the report's `failed` list",
            len(failed),
            len(items),
        )
    counts = {question_type: count for question_type, count in counts.items() if count["total"]}
    correct = sum(count["correct"] for count in counts.values())
    total = sum(count["total"] for count in counts.values())
    return {
        "overall": 100.0 * correct / total if total else 0.0,
        "per_type": {question_type: 100.0 * c["correct"] / c["total"] for question_type, c in counts.items()},
        "counts": counts,
        "correct": correct,
        "total": total,
        "unparsed": unparsed,
        "missing": missing,
        "failed": failed,
    }


def format_bench_q_table(report: dict, name: str) -> str:
    """The report as a Markdown table in the layout of the paper's Table 2 (accuracy per type, then the average)."""
    types = list(report["per_type"])
    header = "| Method | " + " | ".join(types) + " | Average |"
    rule = "|" + "---|" * (len(types) + 2)
    row = f"| {name} | " + " | ".join(f"{report['per_type'][t]:.1f}" for t in types) + f" | {report['overall']:.1f} |"
    return "\n".join([header, rule, row])
