"""LoRA on VideoRefer's language model (connector and object encoder fully trained), and merging the adapter."""

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .stages import LORA_TARGET_MODULES, NEW_MODULES, lora_target_pattern


def videorefer_lora_config(
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    modules_to_save: Sequence[str] = NEW_MODULES,
):
    """A PEFT `LoraConfig` with adapters on the named linear layers of the language model only, and the modules in
    `modules_to_save` (the connector and the object encoder by default) trained in full and saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_pattern(target_modules),
        modules_to_save=list(modules_to_save),
        task_type="CAUSAL_LM",
    )


def merge_lora(adapter_path: str | os.PathLike, output_dir: str | os.PathLike, base_model: str | None = None) -> str:
    """
    Merges a LoRA adapter (and its fully trained modules) into its base VideoRefer and saves a plain checkpoint, with
    the processor, that `AutoModelForCausalLM`/`AutoProcessor` load without PEFT.

    Args:
        adapter_path: folder of the adapter (a training run's output or checkpoint).
        output_dir: where the merged checkpoint goes.
        base_model: the checkpoint the adapter was trained on; read from the adapter's config by default.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoProcessor

    adapter_path = Path(adapter_path)
    config_file = adapter_path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"adapter_path: {adapter_path} has no adapter_config.json; is it a LoRA training output?")
    base_model = base_model or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base_model:
        raise ValueError("base_model: the adapter does not name its base model; pass it explicitly")
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto")
    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    merged.save_pretrained(output_dir)
    processor_source = adapter_path if (adapter_path / "processor_config.json").is_file() else base_model
    AutoProcessor.from_pretrained(processor_source).save_pretrained(output_dir)
    return str(output_dir)


__all__ = ["videorefer_lora_config", "merge_lora"]
