"""Every stage recipe, full and LoRA, runs on a tiny model and trains exactly the modules the paper's stage trains;
LoRA merges into a plain checkpoint; saving and resuming continue the same run; stage 1 assembles SigLIP and Qwen2."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformers import AutoModelForCausalLM, AutoProcessor
from transformers_videorefer.tiny import save_tiny_checkpoint
from transformers_videorefer.training.data import VideoReferDataCollator, build_mixture, parse_dataset_sources
from transformers_videorefer.training.lora import merge_lora
from transformers_videorefer.training.sft import make_parser, train
from transformers_videorefer.training.synthetic import SyntheticVideoSpec, build_synthetic_dataset


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STAGE_RECIPES = sorted(RECIPES.glob("videorefer-7b/*/config_*.yaml"))
MODULES = ("model.vision_tower", "model.connector", "model.object_encoder", "model.language_model", "lm_head")
# Modules each stage must change (the others must stay bit-identical).
TRAINED = {
    "stage1": {"model.connector"},
    "stage2": {"model.object_encoder"},
    "stage2_5": {"model.connector", "model.object_encoder", "model.language_model", "lm_head"},
    "stage3": {"model.connector", "model.object_encoder", "model.language_model", "lm_head"},
}
SMALL_SPEC = SyntheticVideoSpec(size=48, num_video_frames=8, object_size=(10, 12), travel=(12, 16), max_objects=2)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    data = build_synthetic_dataset(
        root / "data", num_train_videos=3, num_eval_videos=0, spec=SMALL_SPEC, progress=False
    )
    captions = [
        {
            "id": f"caption{index}",
            "video": f"videos/{index:05d}.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nDescribe the video."},
                {"from": "gpt", "value": "Shapes move."},
            ],
        }
        for index in range(3)
    ]
    (data.root / "captions.json").write_text(json.dumps(captions))
    checkpoint = save_tiny_checkpoint(root / "tiny")
    return {"root": root, "data": data, "checkpoint": checkpoint}


def run_recipe(recipe, workspace, output_dir, *overrides):
    data = workspace["data"]
    stage = Path(recipe).parent.name
    if stage == "stage1":
        datasets = [{"path": str(data.root / "captions.json")}]
    else:
        datasets = [{"path": str(data.single_frame)}, {"path": str(data.multi_frame)}]
    arguments = [
        "--config", str(recipe),
        "--model_name_or_path", workspace["checkpoint"],
        "--datasets", json.dumps(datasets),
        "--output_dir", str(output_dir),
        "--dataset_cache_dir", str(workspace["root"] / "cache"),
        "--dtype", "float32",
        "--bf16", "false",
        "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "1",
        "--max_steps", "2",
        "--warmup_steps", "0",
        "--dataloader_num_workers", "0",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
        *overrides,
    ]  # fmt: skip
    return train(*make_parser().parse_args_and_config(arguments))


def changed_modules(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    return {module for module in MODULES if any(name.startswith(module + ".") for name in changed)}


def test_every_stage_has_its_recipes():
    names = {(path.parent.name, path.stem) for path in STAGE_RECIPES}
    assert {("stage1", "config_full"), ("stage2", "config_full")} <= names
    assert {(stage, kind) for stage in ("stage2_5", "stage3") for kind in ("config_full", "config_lora")} <= names


def test_recipes_keep_the_paper_hyper_parameters():
    for recipe in STAGE_RECIPES:
        # A fresh parser each time: reading a config file sets the parser's defaults.
        # As written (bf16), the recipe also parses without a GPU: training falls back to the CPU.
        data_args, model_args, args = make_parser().parse_args_and_config(["--config", str(recipe)])
        stage = recipe.parent.name
        assert args.stage == stage
        assert args.lr_scheduler_type == "cosine" and args.optim == "adamw_torch" and args.num_train_epochs == 1
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * 8
        paper_lr = 1e-3 if stage in ("stage1", "stage2") else 2e-5
        if model_args.use_peft:
            assert args.new_modules_learning_rate == paper_lr and args.learning_rate > paper_lr
        else:
            assert args.learning_rate == paper_lr and args.new_modules_learning_rate is None
        assert global_batch == (256 if stage in ("stage1", "stage2") else 128)
        assert data_args.multi_frame_ratio == {"stage1": 0.5, "stage2": 0.0}.get(stage, 0.5)
    # Every field can be overridden on the command line, the structured `datasets` too.
    data_args, _, args = make_parser().parse_args_and_config(
        [
            "--config",
            str(STAGE_RECIPES[0]),
            "--bf16",
            "false",
            "--learning_rate",
            "0.5",
            "--datasets",
            '[{"path": "x.json", "ratio": 2}]',
        ]
    )
    assert args.learning_rate == 0.5 and data_args.datasets == [{"path": "x.json", "ratio": 2}]


@pytest.mark.parametrize(
    "recipe", [path for path in STAGE_RECIPES if path.stem == "config_full"], ids=lambda p: p.parent.name
)
def test_full_recipe_trains_only_its_stage_modules(recipe, workspace, tmp_path):
    before = load_file(Path(workspace["checkpoint"]) / "model.safetensors")
    trainer = run_recipe(recipe, workspace, tmp_path / "run")
    after = load_file(tmp_path / "run" / "model.safetensors")
    assert changed_modules(before, after) == TRAINED[recipe.parent.name]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # The output is a plain checkpoint with its processor.
    assert AutoProcessor.from_pretrained(tmp_path / "run").num_frames == 4


@pytest.mark.parametrize(
    "recipe", [path for path in STAGE_RECIPES if path.stem == "config_lora"], ids=lambda p: p.parent.name
)
def test_lora_recipe_trains_adapters_and_new_modules_then_merges(recipe, workspace, tmp_path):
    trainer = run_recipe(recipe, workspace, tmp_path / "run", "--lora_r", "4", "--lora_alpha", "8")
    model = trainer.model
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(
        ("lora_" in name and ".language_model." in name) or ".modules_to_save." in name for name in trainable
    )
    assert any(".connector.modules_to_save." in name for name in trainable)
    assert any(".object_encoder.modules_to_save." in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)
    # The connector and object encoder train at the paper's rate, the adapters at the LoRA rate.
    rates = {}
    for group in trainer.optimizer.param_groups:
        for parameter in group["params"]:
            rates[id(parameter)] = group["initial_lr"]
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for key, rate in rates.items():
        expected = 2e-5 if ".modules_to_save." in names[key] else 2e-4
        assert rate == pytest.approx(expected)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(bool(p.abs().sum() > 0) for p in lora_b)  # LoRA B starts at zero

    merged_dir = merge_lora(tmp_path / "run", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    processor = AutoProcessor.from_pretrained(merged_dir)
    data = workspace["data"]
    sources = parse_dataset_sources([{"path": str(data.multi_frame)}])
    dataset = build_mixture(sources, multi_frame_ratio=1.0, cache_dir=str(workspace["root"] / "cache"))
    batch = VideoReferDataCollator(processor, dataset)([dataset[0], dataset[1]])
    batch.pop("skipped_samples")
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The merged weights are not the base model's: training changed them.
    base = AutoModelForCausalLM.from_pretrained(workspace["checkpoint"])
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, got, atol=1e-5)


def test_lora_needs_a_stage_that_trains_the_llm(workspace, tmp_path):
    recipe = RECIPES / "videorefer-7b" / "stage2" / "config_full.yaml"
    with pytest.raises(ValueError, match="keeps the LLM frozen"):
        run_recipe(recipe, workspace, tmp_path / "run", "--use_peft", "true")


def test_resume_continues_the_same_run(workspace, tmp_path):
    recipe = RECIPES / "videorefer-7b" / "stage3" / "config_full.yaml"
    common = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3"]
    full = run_recipe(recipe, workspace, tmp_path / "full", *common, "--multi_frame_ratio", "0.5")
    resumed = run_recipe(
        recipe,
        workspace,
        tmp_path / "resumed",
        *common,
        "--multi_frame_ratio", "0.5",
        "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2"),
    )  # fmt: skip
    full_losses, resumed_losses = (
        {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
        for trainer in (full, resumed)
    )
    # Steps 1-2 come from the checkpoint's state; 3-4 were computed again after resuming.
    assert sorted(full_losses) == [1, 2, 3, 4] and resumed_losses == full_losses
    assert len(set(full_losses.values())) == 4  # the steps saw different batches
    final, continued = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    for name in final:
        torch.testing.assert_close(continued[name], final[name], rtol=0, atol=0, msg=name)


def test_stage1_assembles_siglip_and_qwen2(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from transformers_videorefer.tiny import build_tiny_tokenizer
    from transformers_videorefer.training.models import load_model_and_processor

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    vision = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
    )
    vision.save_pretrained(tmp_path / "siglip")
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=600,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    llm.save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")

    model, processor = load_model_and_processor(
        vision_tower_name_or_path=str(tmp_path / "siglip"),
        language_model_name_or_path=str(tmp_path / "qwen2"),
        num_frames=4,
    )
    for name, value in vision.state_dict().items():
        torch.testing.assert_close(model.model.vision_tower.state_dict()[name], value)
    for name, value in llm.model.state_dict().items():
        torch.testing.assert_close(model.model.language_model.state_dict()[name], value)
    torch.testing.assert_close(model.lm_head.weight, llm.lm_head.weight)
    ids = processor.tokenizer.convert_tokens_to_ids(["<region>", "<image>", "<video>"])
    assert [model.config.region_token_id, model.config.image_token_id, model.config.video_token_id] == ids
    assert processor.num_frames == 4 and processor.image_processor.size["height"] == 56
