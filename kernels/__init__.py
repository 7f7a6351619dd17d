"""Triton kernels of the VideoRefer object encoder, installed as `transformers_videorefer.kernels`.

Use them through `transformers_videorefer.region_ops.mask_pool` / `temporal_token_merge`, which validate the inputs,
fall back to PyTorch where Triton cannot run, and hold the reference implementations. Importing this package imports
Triton; set `TRITON_INTERPRET=1` before importing it to run the kernels on CPU tensors with Triton's interpreter.
"""

import triton

from .mask_pool import triton_mask_pool
from .token_merge import triton_temporal_token_merge


# The kernels above were compiled for the interpreter iff it was enabled when they were decorated, i.e. now.
_INTERPRETER = bool(triton.knobs.runtime.interpret)


def interpreter_enabled() -> bool:
    """Whether the kernels run in Triton's interpreter (on CPU tensors) rather than compiled for a GPU."""
    return _INTERPRETER


__all__ = ["interpreter_enabled", "triton_mask_pool", "triton_temporal_token_merge"]
