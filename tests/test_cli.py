"""The `videorefer` command: tiny checkpoints and describe."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from transformers import AutoModelForCausalLM, AutoProcessor
from transformers_videorefer.cli import main, parse_region


def test_tiny_then_describe(tmp_path, capsys):
    checkpoint, example = tmp_path / "tiny", tmp_path / "example"
    assert main(["tiny", str(checkpoint), "--example", str(example)]) == 0
    assert type(AutoModelForCausalLM.from_pretrained(checkpoint)).__name__ == "VideoReferForCausalLM"
    assert type(AutoProcessor.from_pretrained(checkpoint)).__name__ == "VideoReferProcessor"
    capsys.readouterr()

    code = main(
        ["describe", "--model", str(checkpoint), str(example / "clip.mp4"), "--mask", f"3:{example / 'square_3.png'}",
         "--mask", f"3:{example / 'disc_3.png'},9:{example / 'disc_3.png'}", "--max-new-tokens", "5",
         "How does <region> move relative to <region>?"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    config = json.loads((checkpoint / "config.json").read_text())
    assert "tokens: prompt" in printed and "generated 5" in printed
    visual_tokens = (config["num_frames"] // 2) * ((config["vision_config"]["image_size"] // 14 - 2) // 2 + 1) ** 2
    assert f"(visual {visual_tokens}, region 3)" in printed
    assert "tokens/s" in printed


def test_mask_files_of_every_kind(tmp_path):
    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:6] = True
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    np.save(tmp_path / "m.npy", mask)
    (tmp_path / "box.json").write_text(json.dumps([2, 1, 6, 4]))
    region = parse_region(f"0:{tmp_path / 'm.png'},4:{tmp_path / 'm.npy'},7:{tmp_path / 'box.json'}")
    assert sorted(region) == [0, 4, 7]
    assert np.array_equal(np.asarray(region[0]) > 0, mask) and np.array_equal(region[4], mask)
    assert region[7] == [2, 1, 6, 4]
    with pytest.raises(ValueError, match="FRAME:MASK_FILE"):
        parse_region("m.png")
    with pytest.raises(ValueError, match="no such file"):
        parse_region(f"0:{tmp_path / 'missing.png'}")


def test_console_script_reports_bad_input(tmp_path):
    executable = shutil.which("videorefer")
    if executable is None:
        pytest.skip("the videorefer console script is not installed")
    result = subprocess.run(
        [executable, "describe", "--model", str(tmp_path), str(tmp_path / "clip.mp4"), "--mask", "x", "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "--mask" in result.stderr or "error" in result.stderr
