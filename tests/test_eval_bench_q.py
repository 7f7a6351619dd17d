"""VideoRefer-Bench-Q scoring: letter parsing with the benchmark's fallbacks, accuracy per type, the CLI report."""

import json

import pytest

from transformers_videorefer.evaluation import load_bench_q, load_predictions, parse_choice_letter, score_bench_q
from transformers_videorefer.evaluation.cli import main


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("(A) A helmet", "A"),
        ("The answer is (C).", "C"),
        ("I think (B) fits better than (D)", "B"),  # the first parenthesised letter counts
        ("C) It jumps", "C"),  # second rule: a letter before ")"
        ("Answer: D) a watch", "D"),
        ("B", "B"),  # third rule: the first character
        ("b.", "B"),  # compared case-insensitively, periods removed
        (".A", "A"),
        ("  (A)", "A"),
        ("D. A watch", "D"),
        ("A helmet", "A"),  # the benchmark's first-character fallback reads this as A
        ("", None),
        ("   ", None),
        ("...", None),
        ("(B", None),  # no rule yields a letter: "(" is not one
        ("42", None),
        ("(a) lower case", None),  # the parenthesised rules take upper case only; "(" then fails
    ],
)
def test_parse_choice_letter(reply, letter):
    assert parse_choice_letter(reply) == letter


def test_parse_choice_letter_rejects_non_strings():
    with pytest.raises(TypeError, match="reply"):
        parse_choice_letter(None)


def entry(index, question_type, answer):
    return {
        "video": f"MeViS/valid_u/JPEGImages/v{index}",
        "Question": "What does <object1><region> do?",
        "type": question_type,
        "options": ["(A) a", "(B) b", "(C) c", "(D) d"],
        "Answer": answer,
        "frame_idx": "0",
        "annotation": [{"0": {"segmentation": {"size": [4, 4], "counts": "04L4"}}}],
    }


# (type, Answer, prediction or None when the item has none, correct?, unparsed?)
CASES = [
    ("Basic Questions", "(A) A helmet", "(A) A helmet", True, False),
    ("Basic Questions", "(B) A hat", "The answer is (C).", False, False),
    ("Sequential Questions", "(C) Jumps", "C) jumps", True, False),
    ("Sequential Questions", "(D) Runs", "d.", True, False),
    ("Relationship Questions", "(A) Left of it", "", False, True),
    ("Reasoning Questions", "(B) Because", "B", True, False),
    ("Future Predictions", "(A) Falls", None, False, False),
    ("Reasoning Questions", "(C) So", "I think it is (C) because it moves", True, False),
    ("Future Predictions", "(B) Stops", "(B", False, True),
]


@pytest.fixture
def bench_q_files(tmp_path):
    """A Bench-Q file without ids (so ids are positions) and predictions for all but one item."""
    annotations = tmp_path / "VideoRefer-Bench-Q.json"
    annotations.write_text(json.dumps([entry(i, t, a) for i, (t, a, *_) in enumerate(CASES)]))
    predictions = tmp_path / "preds.jsonl"
    with open(predictions, "w") as handle:
        for index, (_, _, prediction, *_) in enumerate(CASES):
            if prediction is not None:
                handle.write(json.dumps({"id": index, "prediction": prediction}) + "\n")
    return annotations, predictions


def test_score_bench_q_by_hand(bench_q_files):
    annotations, predictions_path = bench_q_files
    report = score_bench_q(load_bench_q(annotations), load_predictions(predictions_path))
    # by hand: Basic 1/2, Sequential 2/2, Relationship 0/1, Reasoning 2/2, Future 0/2; overall 5/9
    assert report["per_type"] == pytest.approx(
        {
            "Basic Questions": 50.0,
            "Sequential Questions": 100.0,
            "Relationship Questions": 0.0,
            "Reasoning Questions": 100.0,
            "Future Predictions": 0.0,
        }
    )
    assert list(report["per_type"]) == [
        "Basic Questions",
        "Sequential Questions",
        "Relationship Questions",
        "Reasoning Questions",
        "Future Predictions",
    ]
    assert report["overall"] == pytest.approx(100 * 5 / 9)
    assert (report["correct"], report["total"]) == (5, 9)
    assert [entry["id"] for entry in report["unparsed"]] == [4, 8]
    assert report["missing"] == [6]
    assert report["failed"] == []


def test_items_that_could_not_be_preprocessed_count_as_wrong_and_are_listed(bench_q_files):
    annotations, predictions_path = bench_q_files
    predictions = load_predictions(predictions_path)
    # item 0 was answered correctly and item 5 ("B") too; now inference could not preprocess them
    error = "masks[0][0]: the region has no pixels on any of its frames [3]"
    for key in ("0", "5"):
        predictions[key] = {"id": int(key), "prediction": "", "error": error}
    report = score_bench_q(load_bench_q(annotations), predictions)
    assert (report["correct"], report["total"]) == (3, 9)
    assert report["per_type"]["Basic Questions"] == pytest.approx(0.0)
    assert report["per_type"]["Reasoning Questions"] == pytest.approx(50.0)
    assert report["failed"] == [
        {"id": 0, "reason": f"could not be preprocessed: {error}"},
        {"id": 5, "reason": f"could not be preprocessed: {error}"},
    ]
    assert [entry["id"] for entry in report["unparsed"]] == [4, 8]  # the empty predictions are not "unparsed"


def test_load_predictions_checks_the_error_field(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"id": 0, "prediction": "", "error": "bad mask"}) + "\n")
    assert load_predictions(path)["0"]["error"] == "bad mask"
    path.write_text(json.dumps({"id": 0, "prediction": "", "error": {"reason": "bad mask"}}) + "\n")
    with pytest.raises(ValueError, match="`error` must be a string or null"):
        load_predictions(path)


def test_predictions_for_unknown_items_are_rejected(bench_q_files):
    annotations, _ = bench_q_files
    with pytest.raises(ValueError, match="not in the annotations"):
        score_bench_q(load_bench_q(annotations), {"99": {"id": 99, "prediction": "A"}})


def test_unreadable_answer_raises(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([entry(0, "Basic Questions", "a helmet")]))
    with pytest.raises(ValueError, match="Answer"):
        score_bench_q(load_bench_q(path), {"0": {"id": 0, "prediction": "A"}})


def test_cli_score_bench_q_writes_report_and_table(bench_q_files, tmp_path, capsys):
    annotations, predictions = bench_q_files
    report_path = tmp_path / "out" / "report.json"
    code = main(
        [
            "eval",
            "score",
            "bench-q",
            "--predictions",
            str(predictions),
            "--annotations",
            str(annotations),
            "--report",
            str(report_path),
            "--name",
            "VideoRefer-7B",
        ]
    )
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["overall"] == pytest.approx(100 * 5 / 9)
    assert report["per_type"]["Sequential Questions"] == pytest.approx(100.0)
    table = capsys.readouterr().out
    assert (
        "| Method | Basic Questions | Sequential Questions | Relationship Questions | Reasoning Questions | "
        "Future Predictions | Average |"
    ) in table
    assert "| VideoRefer-7B | 50.0 | 100.0 | 0.0 | 100.0 | 0.0 | 55.6 |" in table
