"""
The training entry point: one YAML recipe per stage, every field overridable on the command line.

    accelerate launch --config_file recipes/accelerate_configs/zero2.yaml \\
        -m transformers_videorefer.training.sft --config recipes/videorefer-7b/stage3/config_full.yaml \\
        --output_dir runs/stage3 --per_device_train_batch_size 2
"""

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers.utils import logging
from trl import SFTConfig, TrlParser

from .data import CONVERSATION_FORMATS, VideoReferDataCollator, build_mixture, parse_dataset_sources
from .lora import videorefer_lora_config
from .models import load_model_and_processor
from .stages import LORA_TARGET_MODULES, NEW_MODULES, STAGE_MODULES, check_stage, set_trainable_modules
from .trainer import VideoReferSFTTrainer


logger = logging.get_logger(__name__)

# Stages whose LLM is trained, and so may be trained with LoRA instead.
LORA_STAGES = ("stage2_5", "stage3", "all")


@dataclass
class VideoReferModelArguments:
    """Which model a stage starts from, and LoRA."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "VideoRefer checkpoint to start from (the previous stage's output)."}
    )
    vision_tower_name_or_path: str | None = field(
        default=None, metadata={"help": "Without model_name_or_path: SigLIP checkpoint of the vision tower (stage 1)."}
    )
    language_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Without model_name_or_path: Qwen2 checkpoint of the LLM (stage 1)."}
    )
    num_frames: int | None = field(
        default=None,
        metadata={"help": "Frames sampled per video; the processor's by default (16 when assembling from parts)."},
    )
    dtype: str | None = field(default=None, metadata={"help": "Weights dtype: 'auto', 'float32', 'bfloat16', ..."})
    attn_implementation: str | None = field(default=None, metadata={"help": "'sdpa', 'flash_attention_2', 'eager'."})
    use_peft: bool = field(default=False, metadata={"help": "Train the LLM with LoRA instead of in full."})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        metadata={"help": "Linear layers of the language model that get adapters."},
    )
    lora_modules_to_save: list[str] = field(
        default_factory=lambda: list(NEW_MODULES),
        metadata={"help": "Modules trained in full next to the adapters and saved with them."},
    )


@dataclass
class VideoReferDataArguments:
    """The training mixture."""

    datasets: list | str | None = field(
        default=None,
        metadata={
            "help": "Datasets to mix: a list of {path, data_folder, ratio, multi_frame_ratio, name} (YAML), or the "
            "same list as a JSON string on the command line, or one JSON/JSONL path."
        },
    )
    data_folder: str | None = field(
        default=None, metadata={"help": "Default folder of relative video/image paths (else each JSON's folder)."}
    )
    multi_frame_ratio: float = field(
        default=0.5,
        metadata={"help": "Share of multi-frame regions kept multi-frame; the others keep one random frame."},
    )
    conversation_format: str = field(
        default="chat",
        metadata={"help": "'chat' (Qwen2 chat, loss on assistant turns) or 'plain' (placeholder + caption, stage 1)."},
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the mixture's Arrow files go; the `datasets` cache by default."}
    )

    def __post_init__(self):
        if isinstance(self.datasets, str) and self.datasets.lstrip().startswith(("[", "{")):
            self.datasets = yaml.safe_load(self.datasets)  # the list given as JSON on the command line
        if self.conversation_format not in CONVERSATION_FORMATS:
            raise ValueError(
                f"conversation_format must be one of {CONVERSATION_FORMATS}, got {self.conversation_format!r}"
            )
        if not 0 <= self.multi_frame_ratio <= 1:
            raise ValueError(f"multi_frame_ratio must lie in [0, 1], got {self.multi_frame_ratio}")


@dataclass
class VideoReferSFTConfig(SFTConfig):
    """`SFTConfig` with the stage and the learning rate of the connector and object encoder."""

    stage: str = field(default="stage3", metadata={"help": f"Which modules train: one of {sorted(STAGE_MODULES)}."})
    new_modules_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the connector and object encoder; learning_rate when unset."},
    )
    max_length: int | None = field(
        default=2048,
        metadata={"help": "Longest sample in tokens after placeholder expansion; longer ones are skipped."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads the raw sample columns."}
    )
    dataset_kwargs: dict | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "Must keep skip_prepare_dataset: the collator decodes and tokenizes."},
    )

    def __post_init__(self):
        check_stage(self.stage)
        if not self.use_cpu and not torch.accelerator.is_available():
            logger.warning("No GPU or other accelerator found: training on the CPU (use_cpu=True).")
            self.use_cpu = True
        super().__post_init__()
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False: the collator reads the raw sample columns")


def make_parser() -> TrlParser:
    return TrlParser((VideoReferDataArguments, VideoReferModelArguments, VideoReferSFTConfig))


def _resume_argument(value: str | None) -> str | bool | None:
    """`resume_from_checkpoint`: a checkpoint folder, or true/last for the latest checkpoint in `output_dir`."""
    if value is not None and value.lower() in ("true", "last"):
        return True
    return value


def train(
    data_args: VideoReferDataArguments, model_args: VideoReferModelArguments, training_args: VideoReferSFTConfig
) -> VideoReferSFTTrainer:
    """Runs one training stage and saves the model and processor to `training_args.output_dir`."""
    from accelerate.utils import gather_object
    from transformers import set_seed

    set_seed(training_args.seed)
    if data_args.datasets is None:
        raise ValueError("datasets: give the training data (a list of {path, ratio, ...} or a JSON file)")
    if model_args.use_peft and training_args.stage not in LORA_STAGES:
        raise ValueError(f"use_peft trains the LLM with LoRA; stage {training_args.stage} keeps the LLM frozen")
    model, processor = load_model_and_processor(
        model_args.model_name_or_path,
        model_args.vision_tower_name_or_path,
        model_args.language_model_name_or_path,
        model_args.num_frames,
        model_args.dtype,
        model_args.attn_implementation,
    )
    peft_config = None
    if model_args.use_peft:
        peft_config = videorefer_lora_config(
            model_args.lora_r,
            model_args.lora_alpha,
            model_args.lora_dropout,
            model_args.lora_target_modules,
            model_args.lora_modules_to_save,
        )
    else:
        set_trainable_modules(model, training_args.stage)
    with training_args.main_process_first(desc="building the training mixture"):
        sources = parse_dataset_sources(data_args.datasets, data_args.data_folder)
        dataset = build_mixture(sources, data_args.multi_frame_ratio, training_args.seed, data_args.dataset_cache_dir)
    collator = VideoReferDataCollator(
        processor,
        dataset,
        conversation_format=data_args.conversation_format,
        max_length=training_args.max_length,
        num_frames=model_args.num_frames,
        seed=training_args.seed,
    )
    trainer = VideoReferSFTTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=_resume_argument(training_args.resume_from_checkpoint))
    trainer.save_model()
    skipped = list(trainer.skipped_samples)
    if trainer.accelerator.num_processes > 1:
        skipped = list(dict.fromkeys(gather_object(skipped)))
    if trainer.is_world_process_zero():
        trainer.save_state()
        if skipped:
            logger.warning(f"Skipped {len(skipped)} bad training samples, listed in skipped_samples.json")
        Path(training_args.output_dir, "skipped_samples.json").write_text(json.dumps(skipped, indent=1))
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    data_args, model_args, training_args = make_parser().parse_args_and_config(argv)
    train(data_args, model_args, training_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
