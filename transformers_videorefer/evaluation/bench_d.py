"""VideoRefer-Bench-D scoring: a judge LLM scores each description on four dimensions from 0 to 5."""

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from .data import BenchItem
from .judge import ChatJudge, JudgeError
from .prompts import judge_messages
from .records import JsonlAppender, preprocessing_failure, read_jsonl, record_key, write_jsonl_atomic


logger = logging.getLogger(__name__)

DIMENSIONS = {
    "SC": "Subject Correspondence",
    "AD": "Appearance Description",
    "TD": "Temporal Description",
    "HD": "Hallucination Detection",
}
MAX_SCORE = 5.0

_NAME_PATTERNS = {
    "SC": r"subject[\s_-]*correspondence|(?-i:\bSC\b)",
    "AD": r"appearance[\s_-]*description|(?-i:\bAD\b)",
    "TD": r"temporal[\s_-]*description|(?-i:\bTD\b)",
    "HD": r"hallucinat\w*[\s_-]*detection|(?-i:\bHD\b)",
}
# name, an optional "(SC)", separators (markdown, quotes, colons, dashes, table bars), an optional "score:", the value
# (not right after a minus sign: "-1" is no score) and an optional "/5" or "out of 5".
_SCORE_PATTERNS = {
    key: re.compile(
        rf"(?:{name})(?:\s*\((?-i:SC|AD|TD|HD)\))?[\s*_#:=|>\"'{{\-–—]*"
        r"(?:score[\s*_\"']*(?:[:=\-–]|is)?[\s*_\"']*)?"
        r"(?<!-)(?P<value>\d+(?:\.\d+)?)(?!\d)(?:\s*(?:/|out\s+of)\s*(?P<scale>\d+(?:\.\d+)?))?",
        re.IGNORECASE,
    )
    for key, name in _NAME_PATTERNS.items()
}
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def _checked_score(key: str, value, scale=None) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{DIMENSIONS[key]}: {value!r} is not a number") from None
    if scale is not None and float(scale) != MAX_SCORE:
        raise ValueError(f"{DIMENSIONS[key]}: scored out of {scale}, the scale is 0-5")
    if not 0.0 <= score <= MAX_SCORE:
        raise ValueError(f"{DIMENSIONS[key]}: {score:g} is outside the 0-5 scale")
    return score


def _scores_from_json(reply: str) -> dict[str, float]:
    """Scores from a JSON object in the reply (bare or fenced), keyed by dimension name or abbreviation."""
    candidates = [block for block in _FENCE.findall(reply)] + [reply]
    start, end = reply.find("{"), reply.rfind("}")
    if 0 <= start < end:
        candidates.append(reply[start : end + 1])
    for candidate in candidates:
        try:
            parsed = json.loads(candidate)
        except ValueError:
            continue
        if not isinstance(parsed, dict):
            continue
        scores = {}
        for name, value in parsed.items():
            normalised = re.sub(r"[^a-z]", "", str(name).lower())
            for key, full_name in DIMENSIONS.items():
                if normalised in (key.lower(), full_name.replace(" ", "").lower()):
                    if isinstance(value, dict):
                        value = next((v for k, v in value.items() if str(k).lower() == "score"), None)
                    scores[key] = _checked_score(key, value)
        if scores:
            return scores
    return {}


def parse_judge_scores(reply: str) -> dict[str, float]:
    """
    The four scores (`SC`, `AD`, `TD`, `HD`, each 0-5) in a judge's reply. Reads the layout the instructions ask for
    ("1. Subject Correspondence: 5") and its common variations: markdown bold, headings or tables, "(SC)",
    abbreviations, "Score: 4", "4/5", a JSON object (bare or fenced), prose around them; a reasoning model's
    `<think>...</think>` block is ignored. The first score given for a dimension counts. Raises `ValueError` when a
    dimension is missing or a score is off the 0-5 scale.
    """
    if not isinstance(reply, str):
        raise ValueError(f"the judge's reply must be text, got {type(reply).__name__}")
    reply = _THINKING.sub("", reply)
    if not reply.strip():
        raise ValueError("the judge's reply is empty")
    scores = _scores_from_json(reply)
    for key, pattern in _SCORE_PATTERNS.items():
        if key not in scores:
            match = pattern.search(reply)
            if match:
                scores[key] = _checked_score(key, match.group("value"), match.group("scale"))
    missing = [DIMENSIONS[key] for key in DIMENSIONS if key not in scores]
    if missing:
        raise ValueError(f"no score for {', '.join(missing)}")
    return {key: scores[key] for key in DIMENSIONS}


def _judge_item(judge: ChatJudge, item: BenchItem, prediction: str, parse_attempts: int) -> dict:
    record = {"id": item.id, "judge": judge.name, "reference": item.caption, "prediction": prediction}
    raw, scores, error = None, None, None
    for _ in range(parse_attempts):
        try:
            raw = judge.complete(judge_messages(item.caption, prediction))
        except JudgeError as failure:
            error = f"judge request failed: {failure}"
            break
        try:
            scores, error = parse_judge_scores(raw), None
            break
        except ValueError as failure:
            error = f"unparsable judge reply: {failure}"
    return {**record, "scores": scores, "raw": raw, "error": error}


def _latest_judgements(path: Path) -> dict[str, dict]:
    """The last judgement written for each item (a rerun appends a new one for items it judges again)."""
    return {record_key(record["id"]): record for record in read_jsonl(path)}


def _is_reusable(record: dict | None, item: BenchItem, prediction: str, judge_name: str) -> bool:
    return (
        record is not None
        and record.get("error") is None
        and isinstance(record.get("scores"), dict)
        and record.get("judge") == judge_name
        and record.get("prediction") == prediction
        and record.get("reference") == item.caption
    )


def judge_bench_d(
    items: Sequence[BenchItem],
    predictions: Mapping[str, dict],
    judge: ChatJudge,
    judgements_path: str | os.PathLike,
    concurrency: int = 4,
    parse_attempts: int = 2,
    progress: bool = True,
) -> dict:
    """
    Scores every Bench-D item with `judge` and returns the report.

    Each judgement (scores, the judge's raw reply, or the reason it failed) is appended to `judgements_path` as soon
    as it arrives; a rerun reuses the successful judgements made by the same judge of the same prediction and judges
    the rest again (so a rerun retries failed items). The finished file holds one line per judged item. Items without
    a prediction, or whose prediction record has an `error` (inference could not preprocess them), are not sent to
    the judge.

    Args:
        items: the benchmark items (`load_bench_d`).
        predictions: item key -> record with a `prediction` string (`load_predictions`).
        judge: an `OpenAICompatibleJudge`, a `LocalTransformersJudge` or any `ChatJudge`.
        judgements_path: the JSON-lines file of judgements.
        concurrency (`int`, defaults to 4): requests in flight at once.
        parse_attempts (`int`, defaults to 2): times an item is put to the judge while its reply cannot be parsed.
        progress (`bool`, defaults to True): show a progress bar.

    Returns:
        `dict` with the mean of each dimension (`SC`, `AD`, `TD`, `HD`, over the scored items), `average` (the mean
        of the four), `scored`, `total`, `judge`, and `failed`: `{"id", "reason"}` for every item that has no score
        (no prediction, the item could not be preprocessed, the judge failed, or its reply could not be parsed).
    """
    if concurrency < 1 or parse_attempts < 1:
        raise ValueError(f"concurrency and parse_attempts must be at least 1, got {concurrency} and {parse_attempts}")
    unknown = sorted(set(predictions) - {item.key for item in items})
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions have ids that are not in the annotations (first: {unknown[:5]}); "
            "check that the predictions and the annotation file belong together"
        )
    judgements_path = Path(judgements_path)
    judgements = _latest_judgements(judgements_path)
    answered = [
        item for item in items if item.key in predictions and preprocessing_failure(predictions[item.key]) is None
    ]
    pending = [
        (item, predictions[item.key]["prediction"])
        for item in answered
        if not _is_reusable(judgements.get(item.key), item, predictions[item.key]["prediction"], judge.name)
    ]
    if len(pending) < len(answered):
        logger.info("reusing %d judgements from %s", len(answered) - len(pending), judgements_path)
    with JsonlAppender(judgements_path) as appender, ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(_judge_item, judge, item, text, parse_attempts) for item, text in pending]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="judging", disable=not progress):
                record = future.result()
                appender.write(record)
                judgements[record_key(record["id"])] = record
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    write_jsonl_atomic(judgements_path, [judgements[item.key] for item in answered])
    return _bench_d_report(items, predictions, judgements, judge.name)


def _bench_d_report(
    items: Sequence[BenchItem], predictions: Mapping[str, dict], judgements: Mapping[str, dict], judge_name: str
) -> dict:
    scored, failed = [], []
    for item in items:
        if item.key not in predictions:
            failed.append({"id": item.id, "reason": "no prediction for this item"})
            continue
        failure = preprocessing_failure(predictions[item.key])
        if failure is not None:
            failed.append({"id": item.id, "reason": failure})
            continue
        record = judgements[item.key]
        if record["error"] is None:
            scored.append(record["scores"])
        else:
            failed.append({"id": item.id, "reason": record["error"]})
    if failed:
        logger.warning("%d of %d items have no score; see the report's `failed` list", len(failed), len(items))
    means = {key: sum(s[key] for s in scored) / len(scored) if scored else None for key in DIMENSIONS}
    average = sum(means.values()) / len(means) if scored else None
    return {
        **means,
        "average": average,
        "scored": len(scored),
        "total": len(items),
        "judge": judge_name,
        "failed": failed,
    }


def format_bench_d_table(report: dict, name: str) -> str:
    """The report as a Markdown table in the layout of the paper's Table 1 (SC, AD, TD, HD, Avg.)."""

    def cell(value):
        return "-" if value is None else f"{value:.2f}"

    columns = [*DIMENSIONS, "average"]
    lines = [
        "| Method | SC | AD | TD | HD | Avg. |",
        "|---|---|---|---|---|---|",
        f"| {name} | " + " | ".join(cell(report[column]) for column in columns) + " |",
    ]
    if report["failed"]:
        lines.append(f"\n{len(report['failed'])} of {report['total']} items have no score (see `failed`).")
    return "\n".join(lines)
