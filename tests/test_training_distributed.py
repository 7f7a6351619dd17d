"""Two processes (accelerate, CPU, gloo): each rank trains on its own share of the data and all end identical.

The test launches this file with `accelerate launch`; run as a script, it is one rank of that run.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "videorefer-7b" / "stage3" / "config_full.yaml"
STEPS = 3


def run_rank(workdir: Path) -> None:
    """One rank: trains stage 3 for a few steps, recording the ids of the samples its batches were made from."""
    from transformers_videorefer.training import sft

    seen = []

    class RecordingCollator(sft.VideoReferDataCollator):
        def __call__(self, rows):
            seen.extend(row["id"] for row in rows)
            return super().__call__(rows)

    sft.VideoReferDataCollator = RecordingCollator
    datasets = [{"path": str(workdir / "data" / "train_single_frame.json")}]
    arguments = [
        "--config", str(RECIPE),
        "--model_name_or_path", str(workdir / "tiny"),
        "--datasets", json.dumps(datasets),
        "--output_dir", str(workdir / "run"),
        "--dataset_cache_dir", str(workdir / "cache"),
        "--use_cpu", "true",
        "--dtype", "float32",
        "--bf16", "false",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-3",
        "--max_steps", str(STEPS),
        "--warmup_steps", "0",
        "--dataloader_num_workers", "0",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    trainer = sft.train(*sft.make_parser().parse_args_and_config(arguments))
    rank = trainer.accelerator.process_index
    (workdir / f"rank{rank}.json").write_text(
        json.dumps({"seen": seen, "world_size": trainer.accelerator.num_processes})
    )
    state = {
        name: tensor.detach().cpu()
        for name, tensor in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()
    }
    torch.save(state, workdir / f"rank{rank}.pt")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
def test_two_processes_see_different_data_and_end_identical(tmp_path):
    from safetensors.torch import load_file

    from transformers_videorefer.tiny import save_tiny_checkpoint
    from transformers_videorefer.training.synthetic import SyntheticVideoSpec, build_synthetic_dataset

    spec = SyntheticVideoSpec(size=48, num_video_frames=8, object_size=(10, 12), travel=(12, 16), max_objects=2)
    build_synthetic_dataset(tmp_path / "data", num_train_videos=4, num_eval_videos=0, spec=spec, progress=False)
    save_tiny_checkpoint(tmp_path / "tiny")
    command = [
        shutil.which("accelerate"), "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
        __file__, str(tmp_path),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, check=False)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    seen = [rank["seen"] for rank in ranks]
    # The loader may fetch one batch ahead, so a rank can have made more batches than it trained on.
    assert len(seen[0]) >= 2 * STEPS and len(seen[1]) >= 2 * STEPS
    assert not set(seen[0]) & set(seen[1])  # each rank got its own samples

    states = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    initial = load_file(tmp_path / "tiny" / "model.safetensors")
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0, msg=name)
    assert not torch.equal(states[0]["lm_head.weight"], initial["lm_head.weight"])  # and they did train


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
