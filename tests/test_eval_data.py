"""VideoRefer-Bench annotation files in the released layout, the benchmark prompts and the JSON-lines records."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from transformers_videorefer.evaluation import (
    bench_q_question,
    judge_messages,
    judge_system_prompt,
    load_bench_d,
    load_bench_q,
    load_predictions,
    region_masks,
)
from transformers_videorefer.evaluation.data import item_objects
from transformers_videorefer.evaluation.records import JsonlAppender, read_jsonl, truncate_incomplete_tail


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def box_mask(height, width, top, left, size):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top : top + size, left : left + size] = 1
    return mask


def bench_q_entry(index, **overrides):
    entry = {
        "id": index,
        "video": "DAVIS/JPEGImages/480p/aerobatics",
        "Question": "What is <object3><region> not wearing?",
        "type": "Basic Questions",
        "options": ["(A) A helmet", "(B) A hat", "(C) Sunglasses", "(D) A watch"],
        "Answer": "(A) A helmet",
        "frame_idx": "3",
        "annotation": [
            {
                "0": {"segmentation": rle(box_mask(12, 16, 1, 1, 4))},
                "3": {"segmentation": rle(box_mask(12, 16, 2, 3, 5))},
                "7": {"segmentation": None},
            }
        ],
    }
    entry.update(overrides)
    return entry


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_bench_q_loads_released_layout_and_keeps_ids(tmp_path):
    path = write_json(tmp_path / "q.json", [bench_q_entry(10), bench_q_entry(11, frame_idx=0)])
    items = load_bench_q(path)
    assert [item.id for item in items] == [10, 11]
    assert items[0].frame_idx == "3" and items[1].frame_idx == 0
    assert items[0].options == ("(A) A helmet", "(B) A hat", "(C) Sunglasses", "(D) A watch")
    objects = item_objects(items[0])
    assert list(objects[0]) == [0, 3, 7] and objects[0][7] is None


def test_scoring_fields_are_enough_to_load(tmp_path):
    entry = {key: bench_q_entry(0)[key] for key in ("Question", "type", "options", "Answer")}
    item = load_bench_q(write_json(tmp_path / "q.json", [entry]))[0]
    assert item.id == 0 and item.answer == "(A) A helmet"
    with pytest.raises(ValueError, match="annotation"):
        region_masks(item, "single")


def test_bench_q_without_ids_uses_the_position_in_the_file(tmp_path):
    entries = [bench_q_entry(0), bench_q_entry(1)]
    for entry in entries:
        del entry["id"]
    items = load_bench_q(write_json(tmp_path / "q.json", entries))
    assert [item.id for item in items] == [0, 1]
    assert [item.key for item in items] == ["0", "1"]


def test_duplicate_ids_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="share the id"):
        load_bench_q(write_json(tmp_path / "q.json", [bench_q_entry(4), bench_q_entry(4)]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"annotation": []}, "annotation"),
        ({"annotation": [{"x": {"segmentation": None}}]}, "frame index"),
        ({"annotation": [{"0": {"mask": None}}]}, "segmentation"),
        ({"annotation": [{"3": {"segmentation": {}}}]}, "COCO RLE"),
        ({"frame_idx": "first"}, "frame index"),
    ],
)
def test_malformed_masks_raise_value_errors_when_inference_asks_for_them(tmp_path, overrides, message):
    item = load_bench_q(write_json(tmp_path / "q.json", [bench_q_entry(0, **overrides)]))[0]
    with pytest.raises(ValueError, match=message):
        region_masks(item, "single")


def test_malformed_options_raise(tmp_path):
    with pytest.raises(ValueError, match="options"):
        load_bench_q(write_json(tmp_path / "q.json", [bench_q_entry(0, options="(A) a")]))


def test_missing_field_names_the_field(tmp_path):
    entry = bench_q_entry(0)
    del entry["Answer"]
    with pytest.raises(ValueError, match="`Answer`"):
        load_bench_q(write_json(tmp_path / "q.json", [entry]))


def test_region_masks_single_and_multi_modes(tmp_path):
    item = load_bench_q(write_json(tmp_path / "q.json", [bench_q_entry(0)]))[0]
    single = region_masks(item, "single")
    assert len(single) == 1 and list(single[0]) == [3]
    np.testing.assert_array_equal(mask_utils.decode(single[0][3]), box_mask(12, 16, 2, 3, 5))

    multi = region_masks(item, "multi")
    assert list(multi[0]) == [0, 3, 7]
    np.testing.assert_array_equal(mask_utils.decode(multi[0][0]), box_mask(12, 16, 1, 1, 4))
    # a null segmentation (object not visible) becomes an empty mask of the frame's size, as in the release
    empty = multi[0][7]
    decoded = mask_utils.decode(mask_utils.frPyObjects(empty, *empty["size"]))
    assert decoded.shape == (12, 16) and not decoded.any()

    with pytest.raises(ValueError, match="mode"):
        region_masks(item, "all")


def test_single_mode_needs_a_mask_at_frame_idx(tmp_path):
    item = load_bench_q(write_json(tmp_path / "q.json", [bench_q_entry(0, frame_idx=5)]))[0]
    with pytest.raises(ValueError, match="frame_idx 5"):
        region_masks(item, "single")


def test_bench_d_loads_released_layout(tmp_path):
    entry = {
        "id": 0,
        "video": "rLlzmcp3J6s_0:01:09.633_0:01:14.333.mp4",
        "caption": "The cub is a smaller, light colored lion.",
        "frame_idx": "36",
        "annotation": [{str(f): {"segmentation": rle(box_mask(8, 8, 1, 1, 3))} for f in (2, 6, 36)}],
    }
    item = load_bench_d(write_json(tmp_path / "d.json", [entry]))[0]
    assert item.caption == entry["caption"] and item.frame_idx == "36" and item.question is None
    assert list(region_masks(item, "single")[0]) == [36]
    assert list(region_masks(item, "multi")[0]) == [2, 6, 36]


def test_bench_q_prompt_matches_the_benchmark_definition():
    prompt = bench_q_question("What is <object3><region> not wearing?", ["(A) A helmet", "(B) A hat"])
    assert prompt == (
        "What is <object3>[<region>] not wearing? (A) A helmet (B) A hat. "
        "Answer with the option's letter from the given choices directly."
    )


def test_judge_prompt_holds_the_four_dimensions_and_the_answers():
    system = judge_system_prompt()
    for dimension in (
        "Subject Correspondence",
        "Appearance Description",
        "Temporal Description",
        "Hallucination Detection",
    ):
        assert dimension in system
    assert "from 0 to 5" in system
    messages = judge_messages("a red car", "a blue car")
    assert messages[0] == {"role": "system", "content": system}
    assert messages[1] == {"role": "user", "content": "##Correct answer: a red car\n##Predicted answer: a blue car\n"}


def test_truncated_last_line_is_skipped_then_cut_by_the_next_writer(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 0, "prediction": "a"}\n{"id": 1, "prediction": "b"}\n{"id": 2, "predi')
    assert [record["id"] for record in read_jsonl(path)] == [0, 1]
    assert "incomplete last line" in caplog.text
    with JsonlAppender(path) as appender:
        appender.write({"id": 2, "prediction": "c"})
    assert [record["id"] for record in read_jsonl(path)] == [0, 1, 2]
    assert path.read_text().endswith('"c"}\n')
    assert not truncate_incomplete_tail(path)


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 0, "prediction": "a"}\n{"id": 1, "prediction": "b"}')
    assert [record["id"] for record in read_jsonl(path)] == [0, 1]
    assert set(load_predictions(path)) == {"0", "1"}
    with JsonlAppender(path) as appender:
        appender.write({"id": 2, "prediction": "c"})
    assert [record["id"] for record in read_jsonl(path)] == [0, 1, 2]


def test_malformed_middle_line_raises(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 0}\nnot json\n{"id": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


def test_second_writer_of_the_same_file_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    with JsonlAppender(path):
        with pytest.raises(RuntimeError, match="another process"):
            JsonlAppender(path)


def test_load_predictions_checks_fields_and_duplicates(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 0, "prediction": "(A)"}\n{"id": "1", "prediction": "B"}\n')
    assert set(load_predictions(path)) == {"0", "1"}
    path.write_text('{"id": 0, "pred": "(A)"}\n')
    with pytest.raises(ValueError, match="prediction"):
        load_predictions(path)
    path.write_text('{"id": 0, "prediction": "A"}\n{"id": "0", "prediction": "B"}\n')
    with pytest.raises(ValueError, match="more than once"):
        load_predictions(path)
    with pytest.raises(FileNotFoundError):
        load_predictions(tmp_path / "missing.jsonl")
