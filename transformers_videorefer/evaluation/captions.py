"""
Caption metrics for referring-caption sets such as HC-STVG: BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D), computed
by the COCO caption evaluation toolkit (`pycocoevalcap`) after its Stanford PTB tokenisation, as in the papers.
METEOR and the tokenizer are Java programs shipped inside `pycocoevalcap`: they need `java` on the PATH, no network.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .records import read_jsonl, record_key


METRICS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")


def _require_toolkit():
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java (METEOR and the PTB tokenizer are Java programs): install a JRE")
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptbtokenizer
    except ImportError as error:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'transformers-videorefer[eval]'") from error
    return ptbtokenizer


def ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """
    Lower-cases and tokenises captions with the Stanford PTB tokenizer shipped in pycocoevalcap and drops the
    punctuation tokens the COCO evaluation drops. Works from a temporary folder (the package's own folder may be
    read-only).
    """
    ptbtokenizer = _require_toolkit()
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    keys = [key for key, texts in captions.items() for _ in texts]
    lines = [text.replace("\n", " ").replace("\r", " ") for texts in captions.values() for text in texts]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "captions.txt")
        source.write_text("\n".join(lines), encoding="utf-8")
        completed = subprocess.run(
            [
                "java",
                "-cp",
                str(jar),
                "edu.stanford.nlp.process.PTBTokenizer",
                "-preserveLines",
                "-lowerCase",
                str(source),
            ],
            capture_output=True,
            check=False,
        )
    if completed.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer failed: {completed.stderr.decode('utf-8', 'replace')[-500:]}")
    tokenized_lines = completed.stdout.decode("utf-8").split("\n")
    tokenized = {key: [] for key in captions}
    for key, line in zip(keys, tokenized_lines):
        tokenized[key].append(" ".join(word for word in line.split() if word not in ptbtokenizer.PUNCTUATIONS))
    for key, texts in captions.items():
        tokenized[key] += [""] * (len(texts) - len(tokenized[key]))
    return tokenized


def caption_metrics(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str], metrics: Sequence[str] = METRICS
) -> dict[str, float]:
    """
    Corpus-level caption metrics, times 100 as papers report them.

    Args:
        references: item key -> one or more reference captions.
        predictions: item key -> the predicted caption; must cover exactly the keys of `references`.
        metrics: any of `BLEU` (BLEU-1 to BLEU-4), `METEOR`, `ROUGE-L`, `CIDEr` (CIDEr-D); all by default.

    Returns:
        `dict` with `BLEU-1`..`BLEU-4`, `METEOR`, `ROUGE-L` and `CIDEr` (those asked for).
    """
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty selection of {METRICS}, got {list(metrics)}")
    if set(references) != set(predictions):
        missing, extra = set(references) - set(predictions), set(predictions) - set(references)
        raise ValueError(
            f"predictions and references must cover the same items: {len(missing)} without prediction "
            f"(first: {sorted(missing)[:3]}), {len(extra)} without reference (first: {sorted(extra)[:3]})"
        )
    if not references:
        raise ValueError("there are no captions to score")
    if any(not texts for texts in references.values()):
        raise ValueError("every item needs at least one reference caption")
    _require_toolkit()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = ptb_tokenize(references)
    res = ptb_tokenize({key: [predictions[key]] for key in references})
    scores = {}
    if "BLEU" in metrics:
        with contextlib.redirect_stdout(io.StringIO()):
            bleu, _ = Bleu(4).compute_score(gts, res)
        scores.update({f"BLEU-{n}": value for n, value in enumerate(bleu, start=1)})
    if "METEOR" in metrics:
        scores["METEOR"] = _meteor(gts, res)
    if "ROUGE-L" in metrics:
        scores["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    if "CIDEr" in metrics:
        scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return {name: 100.0 * float(value) for name, value in scores.items()}


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return scorer.compute_score(gts, res)[0]
    except (ValueError, OSError) as error:
        scorer.meteor_p.kill()
        detail = scorer.meteor_p.stderr.read().decode("utf-8", "replace")[-500:]
        scorer.lock.release()
        raise RuntimeError(f"METEOR failed: {detail}") from error


def load_references(path: str | os.PathLike) -> dict[str, list[str]]:
    """
    Reference captions from a JSON list or a JSON-lines file of objects with `id` and `caption` (a string or a list
    of strings; `captions` or `references` are read too). Items sharing an id pool their references.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        entries = read_jsonl(path)
    else:
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of objects with `id` and `caption`")
    references: dict[str, list[str]] = {}
    for position, entry in enumerate(entries):
        field = next((name for name in ("caption", "captions", "references") if name in entry), None)
        if "id" not in entry or field is None:
            raise ValueError(f"{path}: entry {position} needs `id` and `caption` (a string or a list of strings)")
        texts = [entry[field]] if isinstance(entry[field], str) else entry[field]
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise ValueError(f"{path}: entry {position}: `{field}` must be a string or a list of strings")
        references.setdefault(record_key(entry["id"]), []).extend(texts)
    return references


def format_caption_table(report: dict, name: str) -> str:
    """The report as a Markdown table in the layout of the paper's Table 3 (HC-STVG)."""
    columns = {
        key: title
        for key, title in {"BLEU-4": "BLEU@4", "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}.items()
        if key in report
    }
    return "\n".join(
        [
            "| Method | " + " | ".join(columns.values()) + " |",
            "|" + "---|" * (len(columns) + 1),
            f"| {name} | " + " | ".join(f"{report[key]:.1f}" for key in columns) + " |",
        ]
    )
