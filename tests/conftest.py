"""Shared fixtures: a tiny random VideoRefer, its processor, and small videos written to disk."""

import numpy as np
import pytest
import torch

from transformers_videorefer.tiny import build_tiny_model_and_processor


@pytest.fixture(scope="session")
def tiny_model_and_processor():
    model, processor = build_tiny_model_and_processor(seed=0)
    return model, processor


@pytest.fixture(scope="session")
def tiny_model(tiny_model_and_processor):
    return tiny_model_and_processor[0]


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_and_processor):
    return tiny_model_and_processor[1]


def make_frames(num_frames: int = 12, height: int = 40, width: int = 60, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB frames [T, H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def chat_prompt(processor, question: str, visual: str = "<video>") -> str:
    return processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{visual}\n{question}"}], tokenize=False, add_generation_prompt=True
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
