"""Loading the model a training stage starts from: a VideoRefer checkpoint, or a vision tower and an LLM (stage 1)."""

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from ..configuration_videorefer import VideoReferConfig
from ..modeling_videorefer import VideoReferForCausalLM
from ..tiny import generation_config_for, processor_for_config


# Added to the LLM's tokenizer in this order, which gives the ids of the release (region 151646, image 151647 and
# video 151648 after Qwen2's 151646 tokens).
PLACEHOLDER_TOKENS = ("<region>", "<image>", "<video>")


def _dtype(name: str | None):
    if name in (None, "auto"):
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'bfloat16', got {name!r}")
    return dtype


def build_from_parts(
    vision_tower_name_or_path: str,
    language_model_name_or_path: str,
    num_frames: int = 16,
    dtype: str | None = None,
    **config_overrides,
) -> tuple[VideoReferForCausalLM, object]:
    """
    A VideoRefer whose vision tower and language model come from pre-trained checkpoints (a SigLIP model or vision
    model, and a Qwen2 causal LM) and whose connector and object encoder are newly initialised: the start of stage 1.
    The LLM's tokenizer gets the `<region>`, `<image>` and `<video>` tokens (the embeddings grow when needed).
    """
    vision_config = AutoConfig.from_pretrained(vision_tower_name_or_path)
    vision_config = getattr(vision_config, "vision_config", vision_config)
    text_config = AutoConfig.from_pretrained(language_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(language_model_name_or_path)
    tokenizer.add_tokens(list(PLACEHOLDER_TOKENS), special_tokens=True)
    token_ids = dict(
        zip(
            ("region_token_id", "image_token_id", "video_token_id"),
            tokenizer.convert_tokens_to_ids(list(PLACEHOLDER_TOKENS)),
        )
    )
    config = VideoReferConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        num_frames=num_frames,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
        **token_ids,
        **config_overrides,
    )
    model = VideoReferForCausalLM(config)
    vision = AutoModel.from_pretrained(vision_tower_name_or_path)
    vision = getattr(vision, "vision_model", vision)
    model.model.vision_tower.load_state_dict(
        _without_prefix(vision.state_dict(), model.model.vision_tower), strict=True
    )
    del vision
    language_model = AutoModelForCausalLM.from_pretrained(language_model_name_or_path)
    model.model.language_model.load_state_dict(language_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    del language_model
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    if dtype not in (None, "auto"):
        model = model.to(_dtype(dtype))
    model.generation_config = generation_config_for(config, tokenizer)
    return model, processor_for_config(config, tokenizer)


def _without_prefix(state_dict: dict, target: torch.nn.Module) -> dict:
    """A SigLIP vision state dict keyed like `target` (drops a `vision_model.` prefix when `target` has none)."""
    expected = set(target.state_dict())
    return {
        (key if key in expected else key.removeprefix("vision_model.")): value
        for key, value in state_dict.items()
        if key in expected or key.removeprefix("vision_model.") in expected
    }


def load_model_and_processor(
    model_name_or_path: str | None = None,
    vision_tower_name_or_path: str | None = None,
    language_model_name_or_path: str | None = None,
    num_frames: int | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
):
    """The model and processor a stage starts from: a VideoRefer checkpoint (`model_name_or_path`, the previous
    stage's output), or else a vision tower and an LLM assembled by [`build_from_parts`] with `num_frames` frames
    per video (16 by default)."""
    if model_name_or_path is not None:
        kwargs = {"dtype": _dtype(dtype)} if dtype is not None else {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)
        return model, AutoProcessor.from_pretrained(model_name_or_path)
    if vision_tower_name_or_path is None or language_model_name_or_path is None:
        raise ValueError(
            "Give model_name_or_path (a VideoRefer checkpoint), or both vision_tower_name_or_path and "
            "language_model_name_or_path (stage 1 from a SigLIP model and a Qwen2 LLM)"
        )
    model, processor = build_from_parts(
        vision_tower_name_or_path, language_model_name_or_path, num_frames or 16, dtype=dtype
    )
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model, processor


__all__ = ["PLACEHOLDER_TOKENS", "build_from_parts", "load_model_and_processor"]
