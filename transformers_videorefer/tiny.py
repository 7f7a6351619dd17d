"""Tiny random VideoRefer checkpoints built offline, for tests, demos and the quickstart."""

import json
import os

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from .configuration_videorefer import VideoReferConfig
from .modeling_videorefer import VideoReferForCausalLM
from .processing_videorefer import CHAT_TEMPLATE, VideoReferProcessor


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<region>", "<image>", "<video>"]

TOKENIZER_CORPUS = """
You are a helpful assistant. What colour is the object? Describe the object in the video in detail.
What is <region> doing? How does <region> interact with <region>? Which direction does it move?
The object is red. The object is green. The object is blue. The object is yellow. The object is white.
It is purple, orange, cyan, pink, black, grey, brown. It turns into another colour halfway through the video.
It moves left, right, up, down. It stays still. A square, a circle, a triangle, a rectangle, a person, a dog.
Answer with the option's letter from the given choices directly. (A) (B) (C) (D) yes no one two three four.
The man walks to the door, picks up a cup and drinks. A cat jumps onto the table next to a small car.
"""


def build_tiny_tokenizer(vocab_size: int = 512) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer in Qwen2's format, trained on a built-in corpus (no download)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"], merges=[tuple(pair) for pair in trained["merges"]], eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def processor_for_config(config: VideoReferConfig, tokenizer) -> VideoReferProcessor:
    """The processor that matches a model config: SigLIP pixels at the tower's size, placeholder counts of the model."""
    image_size = config.vision_config.image_size
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    return VideoReferProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_frames=config.num_frames,
        num_region_tokens=config.num_region_tokens,
        patches_per_side=config.patches_per_side,
        connector_downsample=config.connector_downsample,
        connector_type=config.connector_type,
    )


def tiny_config(tokenizer, **overrides) -> VideoReferConfig:
    """A VideoRefer config small enough for unit tests on a CPU; `overrides` replace any top-level field."""
    token_id = tokenizer.convert_tokens_to_ids
    fields = {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        "text_config": {
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "pad_token_id": token_id("<|endoftext|>"),
            "eos_token_id": token_id("<|im_end|>"),
        },
        "num_frames": 4,
        "num_region_tokens": 4,
        "connector_depth": 1,
        "image_token_id": token_id("<image>"),
        "video_token_id": token_id("<video>"),
        "region_token_id": token_id("<region>"),
    }
    fields.update(overrides)
    return VideoReferConfig(**fields)


def generation_config_for(config: VideoReferConfig, tokenizer) -> GenerationConfig:
    """Greedy decoding that stops at the end of the assistant turn and never emits a placeholder token."""
    return GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        suppress_tokens=[
            token_id for token_id in config.placeholder_token_ids if token_id < config.text_config.vocab_size
        ],
        do_sample=False,
    )


def build_tiny_model_and_processor(seed: int = 0, **overrides) -> tuple[VideoReferForCausalLM, VideoReferProcessor]:
    """A randomly initialised tiny model (seeded) with its processor and tokenizer."""
    import torch

    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, **overrides)
    torch.manual_seed(seed)
    model = VideoReferForCausalLM(config).eval()
    model.generation_config = generation_config_for(config, tokenizer)
    return model, processor_for_config(config, tokenizer)


def save_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, **overrides) -> str:
    """Writes a tiny random checkpoint (model, processor, tokenizer, chat template) loadable by the Auto classes."""
    model, processor = build_tiny_model_and_processor(seed, **overrides)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return str(out_dir)
