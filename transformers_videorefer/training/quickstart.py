"""
The offline quickstart: synthetic videos in the upstream format -> a tiny VideoRefer trained from scratch with
`recipes/quickstart/config_full.yaml` -> accuracy on held-out videos.
"""

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .synthetic import EVAL_TASKS, SyntheticVideoSpec, build_synthetic_dataset


# The tiny model: 64x64 frames in 8x8-pixel patches (an 8x8 grid, an object covers about 3x3 patches), one vision
# layer whose output is the feature layer, and a small Qwen2.
QUICKSTART_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "image_size": 64,
    "patch_size": 8,
}
QUICKSTART_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
QUICKSTART_MODEL = {"num_frames": 4, "num_region_tokens": 4, "vision_feature_layer": -1, "connector_depth": 1}


@dataclass
class QuickstartSize:
    """How much data and training the quickstart uses."""

    train_videos: int = 600
    eval_videos: int = 50
    max_steps: int | None = None  # the recipe's by default


FULL = QuickstartSize()
FAST = QuickstartSize(train_videos=12, eval_videos=4, max_steps=4)


def default_recipe() -> Path:
    """`recipes/quickstart/config_full.yaml` of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "config_full.yaml"


def smooth_position_embeddings(side: int, dim: int) -> torch.Tensor:
    """
    `[side * side, dim]` position embeddings that vary smoothly over the patch grid: a quarter of the channels is the
    column coordinate and a quarter the row coordinate (both in [-1, 1]), the rest 2D sine-cosine waves of periods
    from twice the grid down. Averaged over the patches of a mask, they give the mask's centroid, which is what
    telling directions of motion apart needs; random position embeddings average to noise.
    """
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    quarter = dim // 4
    ramps = [cols.flatten()[:, None].expand(-1, quarter), rows.flatten()[:, None].expand(-1, quarter)]
    num_waves = (dim - 2 * quarter) // 4
    frequencies = math.pi / 2 * torch.arange(1, num_waves + 1, dtype=torch.float32)
    waves = []
    for coordinate in (cols.flatten(), rows.flatten()):
        angles = (coordinate[:, None] + 1) * frequencies[None, :]
        waves += [angles.sin(), angles.cos()]
    embeddings = torch.cat(ramps + waves, dim=1)
    return torch.nn.functional.pad(embeddings, (0, dim - embeddings.shape[1]))


def build_quickstart_model(output_dir: str | os.PathLike, seed: int = 0) -> str:
    """Saves a random tiny VideoRefer (with smooth position embeddings) and its processor; returns the path."""
    from ..modeling_videorefer import VideoReferForCausalLM
    from ..tiny import build_tiny_tokenizer, generation_config_for, processor_for_config, tiny_config

    tokenizer = build_tiny_tokenizer()
    text_config = {
        **QUICKSTART_TEXT,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    config = tiny_config(tokenizer, vision_config=QUICKSTART_VISION, text_config=text_config, **QUICKSTART_MODEL)
    torch.manual_seed(seed)
    model = VideoReferForCausalLM(config)
    position_embedding = model.model.vision_tower.embeddings.position_embedding
    with torch.no_grad():
        position_embedding.weight.copy_(
            smooth_position_embeddings(config.patches_per_side, QUICKSTART_VISION["hidden_size"])
        )
    model.generation_config = generation_config_for(config, tokenizer)
    model.save_pretrained(output_dir)
    processor_for_config(config, tokenizer).save_pretrained(output_dir)
    return str(output_dir)


def first_word(text: str) -> str:
    """The first word of a generated answer, lower-cased, without punctuation."""
    words = text.strip().split()
    return words[0].strip(".,!?;:").lower() if words else ""


def evaluate(
    model, processor, items: list[dict], data_folder: str | Path, batch_size: int = 32, progress: bool = True
):
    """
    Greedy generation on each held-out item, scored by exact match of the first generated word with the answer.

    Returns:
        accuracy per task (`mask_swap`: share of pairs where both masks get their own object's colour) and the
        number of scored questions (pairs for `mask_swap`) per task.
    """
    correct = {}
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc="Evaluating", disable=not progress):
        batch = items[start : start + batch_size]
        prompts = [
            processor.tokenizer.apply_chat_template(
                [{"role": "user", "content": item["conversations"][0]["value"]}],
                chat_template=processor.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
            for item in batch
        ]
        masks = [
            [{int(f): a["segmentation"] for f, a in region.items()} for region in item["annotation"]] for item in batch
        ]
        videos = [os.path.join(data_folder, item["video"]) for item in batch]
        inputs = processor(text=prompts, videos=videos, masks=masks, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=4)
        answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for item, answer in zip(batch, answers):
            correct[item["id"]] = first_word(answer) == item["conversations"][1]["value"]
    scores = defaultdict(list)
    pairs = defaultdict(list)
    for item in items:
        if item["task"] == "mask_swap":
            pairs[item["pair"]].append(correct[item["id"]])
        else:
            scores[item["task"]].append(correct[item["id"]])
    scores["mask_swap"] = [all(results) for results in pairs.values()]
    accuracy = {task: float(np.mean(scores[task])) if scores[task] else float("nan") for task in EVAL_TASKS}
    counts = {task: len(scores[task]) for task in EVAL_TASKS}
    return accuracy, counts


def format_table(accuracy: dict[str, float], counts: dict[str, int], seconds: float) -> str:
    rows = [f"{'task':<15}{'accuracy':>10}{'questions':>11}"]
    rows += [f"{task:<15}{accuracy[task]:>10.3f}{counts[task]:>11d}" for task in EVAL_TASKS]
    rows.append(f"{'seconds':<15}{seconds:>10.1f}")
    return "\n".join(rows)


def run_quickstart(
    output_dir: str | os.PathLike,
    seed: int = 0,
    size: QuickstartSize = FULL,
    recipe: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """
    Makes the synthetic data, trains the tiny model with the quickstart recipe, evaluates it on held-out videos,
    prints the table and writes the report. Returns the report: accuracy per task (`colour`, `colour_change`,
    `mask_swap`, `direction`, `shape`), `seconds` in all, and details.
    """
    from transformers import AutoModelForCausalLM, AutoProcessor

    from .sft import make_parser, train

    start = time.perf_counter()
    output_dir = Path(output_dir)
    recipe = Path(recipe) if recipe is not None else default_recipe()
    if not recipe.is_file():
        raise ValueError(f"recipe: no such file {recipe} (run from a source checkout, or pass --recipe)")
    data = build_synthetic_dataset(
        output_dir / "data",
        size.train_videos,
        size.eval_videos,
        seed=seed,
        spec=SyntheticVideoSpec(),
        progress=progress,
    )
    data_seconds = time.perf_counter() - start
    initial = build_quickstart_model(output_dir / "initial_model", seed=seed)
    datasets = [{"path": str(data.single_frame)}, {"path": str(data.multi_frame)}]
    arguments = [
        "--config", str(recipe),
        "--model_name_or_path", initial,
        "--datasets", json.dumps(datasets),
        "--output_dir", str(output_dir / "model"),
        "--dataset_cache_dir", str(output_dir / "cache"),
        "--seed", str(seed),
        "--disable_tqdm", str(not progress),
    ]  # fmt: skip
    if size.max_steps is not None:
        arguments += ["--max_steps", str(size.max_steps)]
    train_start = time.perf_counter()
    train(*make_parser().parse_args_and_config(arguments))
    train_seconds = time.perf_counter() - train_start

    eval_start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(output_dir / "model")
    processor = AutoProcessor.from_pretrained(output_dir / "model")
    items = json.loads(data.eval.read_text())
    accuracy, counts = evaluate(model, processor, items, data.root, progress=progress)
    seconds = time.perf_counter() - start
    result = {
        **accuracy,
        "seconds": seconds,
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        "questions": counts,
        "seed": seed,
        "recipe": str(recipe),
    }
    print(format_table(accuracy, counts, seconds))
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps(result, indent=2))
    return result


__all__ = [
    "QuickstartSize",
    "FULL",
    "FAST",
    "smooth_position_embeddings",
    "build_quickstart_model",
    "evaluate",
    "run_quickstart",
]
