"""A saved checkpoint loads with trust_remote_code=True in a process that cannot import transformers_videorefer."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

from conftest import box_mask, chat_prompt, make_frames


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "transformers_videorefer":
                raise ImportError("transformers_videorefer is blocked in this process")

    sys.meta_path.insert(0, BlockPackage())
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    checkpoint, frames_path, masks_path, prompt = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    masks = np.load(masks_path)
    inputs = processor(videos=np.load(frames_path), masks=[{2: masks[0]}, {1: masks[1], 6: masks[0]}], text=prompt,
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print(json.dumps({
        "model_module": type(model).__module__,
        "processor_module": type(processor).__module__,
        "image_processor": type(processor.image_processor).__name__,
        "tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
    }))
    """
)


def test_remote_code_loads_without_the_package(tiny_model, tiny_processor, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    tiny_model.save_pretrained(checkpoint)
    tiny_processor.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_videorefer.VideoReferForCausalLM"
    for name in ("modeling_videorefer.py", "configuration_videorefer.py", "processing_videorefer.py", "region_ops.py"):
        assert (checkpoint / name).is_file(), name

    frames = make_frames(10, 30, 40)
    masks = np.stack([box_mask(30, 40, 0, 0, 15, 20), box_mask(30, 40, 10, 10, 30, 40)])
    np.save(tmp_path / "frames.npy", frames)
    np.save(tmp_path / "masks.npy", masks)
    prompt = chat_prompt(tiny_processor, "Does <region> touch <region>?")
    inputs = tiny_processor(
        videos=frames, masks=[{2: masks[0]}, {1: masks[1], 6: masks[0]}], text=prompt, return_tensors="pt"
    )
    with torch.no_grad():
        expected = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]

    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(checkpoint), str(tmp_path / "frames.npy"), str(tmp_path / "masks.npy"), prompt],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["model_module"].startswith("transformers_modules.")
    assert remote["processor_module"].startswith("transformers_modules.")
    assert remote["image_processor"] == "SiglipImageProcessorPil"
    assert remote["tokens"] == expected.tolist()
