"""Which parts of VideoRefer each training stage updates (paper App. B), and the optimizer's parameter groups."""

from collections.abc import Iterable

from torch import nn


# Sub-modules of `VideoReferForCausalLM` trained in each stage; the rest is frozen. `"all"` trains everything,
# vision tower included (a model trained from scratch, as the quickstart does).
STAGE_MODULES = {
    "stage1": ("model.connector",),
    "stage2": ("model.object_encoder",),
    "stage2_5": ("model.connector", "model.object_encoder", "model.language_model", "lm_head"),
    "stage3": ("model.connector", "model.object_encoder", "model.language_model", "lm_head"),
    "all": ("model.vision_tower", "model.connector", "model.object_encoder", "model.language_model", "lm_head"),
}
# Modules that VideoRefer adds on top of the pre-trained vision tower and LLM; they may get their own learning rate.
NEW_MODULES = ("connector", "object_encoder")
# Linear layers of the Qwen2 decoder that LoRA adapts by default.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_stage(stage: str) -> str:
    if stage not in STAGE_MODULES:
        raise ValueError(f"stage must be one of {sorted(STAGE_MODULES)}, got {stage!r}")
    return stage


def set_trainable_modules(model: nn.Module, stage: str) -> list[str]:
    """Freezes every parameter of `model` except those of the stage's modules; returns the trainable names."""
    modules = STAGE_MODULES[check_stage(stage)]
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(name == prefix or name.startswith(f"{prefix}.") for prefix in modules))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


def is_new_module_parameter(name: str) -> bool:
    """Whether a parameter name (plain or PEFT-wrapped) belongs to the connector or the object encoder."""
    return any(f".{module}." in f".{name}" for module in NEW_MODULES)


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    decay_names: Iterable[str],
    weight_decay: float,
    new_modules_learning_rate: float | None = None,
) -> list[dict]:
    """
    AdamW parameter groups of the trainable parameters: with and without weight decay, and, when
    `new_modules_learning_rate` is set, the connector and object encoder apart with that learning rate (the other
    groups use the optimizer's default learning rate).
    """
    decay_names = set(decay_names)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        is_new = new_modules_learning_rate is not None and is_new_module_parameter(name)
        groups.setdefault((is_new, name in decay_names), []).append(parameter)
    result = []
    for (is_new, decays), parameters in sorted(groups.items()):
        group = {"params": parameters, "weight_decay": weight_decay if decays else 0.0}
        if is_new:
            group["lr"] = new_modules_learning_rate
        result.append(group)
    return result


def lora_target_pattern(module_names: Iterable[str]) -> str:
    """A PEFT `target_modules` regex matching the named linear layers of the language model only (not of the vision
    tower, whose attention layers share some names)."""
    names = "|".join(module_names)
    return rf".*\.language_model\..*\.({names})"


__all__ = [
    "STAGE_MODULES",
    "NEW_MODULES",
    "LORA_TARGET_MODULES",
    "check_stage",
    "set_trainable_modules",
    "is_new_module_parameter",
    "parameter_groups",
    "lora_target_pattern",
]
