"""Caption metrics (pycocoevalcap) on tiny examples, checked against nltk's BLEU and hand-computed ROUGE-L/CIDEr."""

import json
import shutil

import pytest

from transformers_videorefer.evaluation import caption_metrics, load_references, ptb_tokenize
from transformers_videorefer.evaluation import captions as captions_module
from transformers_videorefer.evaluation.cli import main


pytest.importorskip("pycocoevalcap")
pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")


REFERENCES = {
    "0": ["the man in a red shirt walks to the door and opens it", "a man walks to the door"],
    "1": ["a small brown dog runs across the green field"],
    "2": ["the woman on the left picks up a cup and drinks from it"],
}
PREDICTIONS = {
    "0": "a man in a red shirt walks to the door",
    "1": "a brown dog runs across the field",
    "2": "the woman picks up a cup and drinks",
}


def test_ptb_tokenization_lowercases_and_drops_punctuation():
    tokenized = ptb_tokenize({"a": ["A man, in RED, walks.", ""], "b": ["It's done!"], "c": [""]})
    assert tokenized == {"a": ["a man in red walks", ""], "b": ["it 's done"], "c": [""]}


def test_bleu_matches_nltk_corpus_bleu():
    from nltk.translate.bleu_score import corpus_bleu

    scores = caption_metrics(REFERENCES, PREDICTIONS, metrics=["BLEU"])
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]
    keys = sorted(REFERENCES)
    references = [[text.split() for text in REFERENCES[key]] for key in keys]
    hypotheses = [PREDICTIONS[key].split() for key in keys]
    for n in range(1, 5):
        weights = tuple([1.0 / n] * n)
        assert scores[f"BLEU-{n}"] == pytest.approx(
            100 * corpus_bleu(references, hypotheses, weights=weights), rel=1e-6
        )


def test_rouge_l_and_cider_by_hand():
    # one item, one reference: LCS("a man walks to the door", "the man walks to a red door") = "man walks to door"
    references = {"x": ["the man walks to a red door"], "y": ["four green birds sit on a wire"]}
    predictions = {"x": "a man walks to the door", "y": "four green birds sit on a wire"}
    scores = caption_metrics(references, predictions, metrics=["ROUGE-L"])

    def rouge_l(lcs, candidate_length, reference_length, beta=1.2):
        precision, recall = lcs / candidate_length, lcs / reference_length
        return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)

    assert scores["ROUGE-L"] == pytest.approx(100 * (rouge_l(4, 6, 7) + 1.0) / 2)

    # CIDEr-D of a prediction equal to its only reference is 10 when its n-grams occur in no other reference
    identical = caption_metrics(
        {"x": ["a red car drives down the road"], "y": ["four green birds sit on a wire"]},
        {"x": "a red car drives down the road", "y": "four green birds sit on a wire"},
        metrics=["BLEU", "ROUGE-L", "CIDEr"],
    )
    assert identical["CIDEr"] == pytest.approx(1000.0)
    assert identical["BLEU-4"] == pytest.approx(100.0)
    assert identical["ROUGE-L"] == pytest.approx(100.0)


def test_meteor_orders_identical_partial_and_unrelated():
    reference = {"x": ["a man in a red shirt walks to the door"], "y": ["a dog runs on the grass"]}
    identical = caption_metrics(
        reference, {"x": "a man in a red shirt walks to the door", "y": "a dog runs on the grass"}, metrics=["METEOR"]
    )
    partial = caption_metrics(reference, {"x": "a man walks to a door", "y": "blue sky"}, metrics=["METEOR"])
    assert list(identical) == ["METEOR"]
    assert 100.0 >= identical["METEOR"] > partial["METEOR"] > 0.0


def test_mismatched_items_and_missing_java_raise(monkeypatch):
    with pytest.raises(ValueError, match="same items"):
        caption_metrics({"a": ["x"]}, {"b": "x"})
    with pytest.raises(ValueError, match="metrics"):
        caption_metrics({"a": ["x"]}, {"a": "x"}, metrics=["SPICE"])
    monkeypatch.setattr(captions_module.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Java"):
        caption_metrics({"a": ["x"]}, {"a": "x"})


def test_cli_score_captions(tmp_path, capsys):
    references = tmp_path / "hcstvg.jsonl"
    references.write_text(
        "".join(json.dumps({"id": key, "caption": texts}) + "\n" for key, texts in REFERENCES.items())
    )
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(
        "".join(json.dumps({"id": key, "prediction": text}) + "\n" for key, text in PREDICTIONS.items())
    )
    assert load_references(references) == REFERENCES
    report_path = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                "score",
                "captions",
                "--predictions",
                str(predictions),
                "--references",
                str(references),
                "--report",
                str(report_path),
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    assert list(report) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "failed"]
    assert report["failed"] == []
    without_meteor = caption_metrics(REFERENCES, PREDICTIONS, metrics=["BLEU", "ROUGE-L", "CIDEr"])
    assert {key: report[key] for key in without_meteor} == pytest.approx(without_meteor)
    assert 0.0 < report["METEOR"] < 100.0
    out = capsys.readouterr().out
    assert "| Method | BLEU@4 | METEOR | ROUGE_L | CIDEr |" in out
    assert f"| preds | {report['BLEU-4']:.1f} | {report['METEOR']:.1f} |" in out


def test_cli_scores_items_that_could_not_be_preprocessed_as_empty_captions(tmp_path):
    references = tmp_path / "references.json"
    references.write_text(json.dumps([{"id": key, "caption": texts} for key, texts in REFERENCES.items()]))
    error = "videos[0]: cannot read video file clip.mp4"
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text(
        json.dumps({"id": "0", "prediction": PREDICTIONS["0"]})
        + "\n"
        + json.dumps({"id": "1", "prediction": "", "error": error})
        + "\n"
        + json.dumps({"id": "2", "prediction": PREDICTIONS["2"]})
        + "\n"
    )
    report_path = tmp_path / "report.json"
    arguments = ["--predictions", str(predictions), "--references", str(references), "--report", str(report_path)]
    assert main(["eval", "score", "captions", *arguments, "--metrics", "BLEU", "CIDEr"]) == 0
    report = json.loads(report_path.read_text())
    assert report.pop("failed") == [{"id": "1", "reason": f"could not be preprocessed: {error}"}]
    with_empty_caption = caption_metrics(REFERENCES, {**PREDICTIONS, "1": ""}, metrics=["BLEU", "CIDEr"])
    assert report == pytest.approx(with_empty_caption)
    assert report["CIDEr"] < caption_metrics(REFERENCES, PREDICTIONS, metrics=["CIDEr"])["CIDEr"]
