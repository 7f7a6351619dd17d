"""Tests of the Triton kernels against the pure-PyTorch references.

On CPU the kernels run in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before Triton and the
kernels are imported. Other test modules of the same pytest run may already have imported them, so
`test_kernels_under_interpreter` re-runs this file in a fresh interpreter subprocess where the `interpreted` tests
run; in the parent process those are skipped. `test_kernels_compile_for_gpu` compiles every kernel ahead of time for
sm_80 and sm_90 (no GPU needed), which the interpreter does not do. The `cuda` tests run the compiled kernels when a
GPU is present.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from transformers_videorefer.region_ops import (
    mask_pool,
    mask_pool_reference,
    temporal_token_merge,
    temporal_token_merge_reference,
)


_SUBPROCESS_FLAG = "VIDEOREFER_TEST_IN_INTERPRETER"
IN_INTERPRETER_SUBPROCESS = os.environ.get(_SUBPROCESS_FLAG) == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

interpreted = pytest.mark.skipif(
    not IN_INTERPRETER_SUBPROCESS, reason="runs in the interpreter subprocess of test_kernels_under_interpreter"
)
cuda = pytest.mark.skipif(
    IN_INTERPRETER_SUBPROCESS or not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU and Triton"
)


@pytest.mark.skipif(IN_INTERPRETER_SUBPROCESS, reason="this is the parent of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_under_interpreter():
    environment = {**os.environ, "TRITON_INTERPRET": "1", _SUBPROCESS_FLAG: "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"interpreted kernel tests failed:\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout


def _gpu_compile_cases():
    """(kernel name, signature, constexprs) of every kernel, for ahead-of-time compilation."""
    weights = {"masks_ptr": "*u8", "weights_ptr": "*fp32", "mask_numel": "i32", "canvas_width": "i32"}
    weights |= {f"{axis}_index{tap}_ptr": "*i64" for axis in ("row", "col") for tap in (0, 1)}
    weights |= {f"{axis}_weight{tap}_ptr": "*fp32" for axis in ("row", "col") for tap in (0, 1)}
    weights |= {"grid_h": "i32", "grid_w": "i32"}
    frame_pool = {"weights_ptr": "*fp32", "order_ptr": "*i64", "frame_start_ptr": "*i64"}
    frame_pool |= {"num_patches": "i32", "channels": "i32"}
    pool_blocks = {"MASKS_PER_DOT": 16, "BLOCK_CELLS": 64, "BLOCK_C": 128}
    merge = {"lengths_ptr": "*i64", "counts_ptr": "*i64", "group_ptr": "*i64", "token_weight_ptr": "*fp32"}
    merge |= {"max_length": "i32", "channels": "i32", "num_tokens": "i32", "num_slots": "i32"}
    return [
        ("mask_pool._mask_weights_kernel", weights, {"BLOCK_GRID": 1024}),
        ("mask_pool._pool_forward_kernel", frame_pool | {"features_ptr": "*bf16", "out_ptr": "*fp32"}, pool_blocks),
        (
            "mask_pool._pool_backward_kernel",
            frame_pool | {"grad_out_ptr": "*fp32", "grad_features_ptr": "*bf16"},
            pool_blocks,
        ),
        (
            "token_merge._token_merge_kernel",
            merge | {"tokens_ptr": "*bf16", "merged_ptr": "*bf16"},
            {"BLOCK_K": 16, "BLOCK_U": 4, "BLOCK_C": 128},
        ),
        (
            "token_merge._token_merge_kernel",
            merge | {"tokens_ptr": "*fp32", "merged_ptr": "*fp32"},
            {"BLOCK_K": 1, "BLOCK_U": 1, "BLOCK_C": 128},
        ),
    ]


@pytest.mark.skipif(
    IN_INTERPRETER_SUBPROCESS or not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
    reason="compiles the kernels for a GPU, which needs Triton outside the interpreter",
)
@pytest.mark.parametrize("compute_capability", [80, 90])
@pytest.mark.parametrize("kernel_name,signature,constexprs", _gpu_compile_cases())
def test_kernels_compile_for_gpu(kernel_name, signature, constexprs, compute_capability):
    """Ahead-of-time compilation to a cubin (no GPU needed) catches what the interpreter accepts but Triton rejects."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton was installed without its NVIDIA backend")
    module_name, function_name = kernel_name.split(".")
    kernel = getattr(importlib.import_module(f"transformers_videorefer.kernels.{module_name}"), function_name)
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    source = ASTSource(kernel, signature | dict.fromkeys(constexprs, "constexpr"), constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", compute_capability, 32))
    assert compiled.asm["cubin"]


# --------------------------------------------------------------------------------------------------- shared cases


def mask_pool_case(device, feature_dtype=torch.float32, mask_dtype=torch.bool, seed=0):
    """3 frames of a non-square 5x7 grid, 21 masks (18 on frame 0: more than one tl.dot group), padded canvases."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 5, 7, 40, generator=generator).to(feature_dtype)
    frame_index = torch.tensor([0] * 18 + [2, 0, 2])  # frame 1 has no mask
    sizes = torch.randint(1, 24, (21, 2), generator=generator)
    sizes[:3] = torch.tensor([[23, 23], [1, 1], [23, 5]])
    masks = torch.rand(21, 23, 23, generator=generator) > 0.6
    masks[4] = False  # an empty mask
    if mask_dtype == torch.float32:
        masks = masks * torch.rand(masks.shape, generator=generator)
    masks = masks.to(mask_dtype)
    return features.to(device), masks.to(device), frame_index.to(device), sizes.to(device)


def token_merge_case(device, dtype=torch.float32, max_length=9, seed=0):
    """Every length 1..K, ties (identical frames, repeated tokens) and garbage in the padding."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(max_length + 3, max_length, 40, generator=generator)
    lengths = torch.cat([torch.arange(1, max_length + 1), torch.full((3,), max_length)])
    tokens[torch.arange(max_length)[None, :] >= lengths[:, None]] = 100.0
    tokens[-3] = tokens[-3, :1]
    tokens[-2, 2:5] = tokens[-2, 2]
    return tokens.to(dtype).to(device), lengths.to(device)


def output_tolerance(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-3)}.get(
        dtype, dict(rtol=1.6e-2, atol=1e-2)
    )


def check_mask_pool(device, feature_dtype, mask_dtype):
    features, masks, frame_index, sizes = mask_pool_case(device, feature_dtype, mask_dtype)
    expected = mask_pool_reference(features, masks, frame_index, sizes, out_dtype=torch.float32)
    pooled = mask_pool(features, masks, frame_index, sizes, out_dtype=torch.float32, backend="triton")
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(pooled[4], torch.zeros_like(pooled[4]))
    same_dtype = mask_pool(features, masks, frame_index, sizes, backend="triton")
    assert same_dtype.dtype == feature_dtype
    torch.testing.assert_close(same_dtype, expected.to(feature_dtype), **output_tolerance(feature_dtype))


def check_mask_pool_backward(device, feature_dtype):
    features, masks, frame_index, sizes = mask_pool_case(device, feature_dtype)
    grad_out = torch.randn(len(masks), features.shape[-1], device=device)
    gradients = []
    for backend in ("torch", "triton"):
        leaf = features.detach().requires_grad_()
        pooled = mask_pool(leaf, masks, frame_index, sizes, out_dtype=torch.float32, backend=backend)
        (pooled * grad_out).sum().backward()
        gradients.append(leaf.grad)
    assert gradients[1].dtype == feature_dtype
    torch.testing.assert_close(gradients[1].float(), gradients[0].float(), **output_tolerance(feature_dtype))
    assert (gradients[1][1] == 0).all(), "a frame without masks gets no gradient"


def check_token_merge(device, dtype, num_tokens):
    tokens, lengths = token_merge_case(device, dtype)
    merged, counts = temporal_token_merge(tokens, lengths, num_tokens, backend="triton")
    expected, expected_counts = temporal_token_merge_reference(tokens, lengths, num_tokens)
    assert merged.dtype == dtype and merged.shape == expected.shape
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(merged, expected, **output_tolerance(dtype))
    if num_tokens < tokens.shape[1]:
        assert counts[-3].item() == 1, "identical frames merge into one token"


def check_token_merge_backward(device):
    tokens, lengths = token_merge_case(device)
    grad_out = torch.randn(tokens.shape[0], 4, tokens.shape[-1], device=device)
    gradients = []
    for backend in ("torch", "triton"):
        leaf = tokens.detach().requires_grad_()
        (temporal_token_merge(leaf, lengths, 4, backend=backend)[0] * grad_out).sum().backward()
        gradients.append(leaf.grad)
    torch.testing.assert_close(gradients[1], gradients[0])


# ------------------------------------------------------------------------------------------- interpreter (CPU)


@interpreted
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_interpreted_mask_pool_feature_dtypes(feature_dtype):
    check_mask_pool("cpu", feature_dtype, torch.bool)


@interpreted
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.float32])
def test_interpreted_mask_pool_mask_dtypes(mask_dtype):
    check_mask_pool("cpu", torch.float32, mask_dtype)


@interpreted
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
def test_interpreted_mask_pool_backward(feature_dtype):
    check_mask_pool_backward("cpu", feature_dtype)


@interpreted
def test_interpreted_mask_pool_square_grid_and_no_masks():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 16, 20, generator=generator)  # [F, h*w, C] with a 4x4 grid
    masks = torch.rand(3, 9, 13, generator=generator) > 0.5
    frame_index = torch.tensor([1, 1, 0])
    torch.testing.assert_close(
        mask_pool(features, masks, frame_index, backend="triton"), mask_pool_reference(features, masks, frame_index)
    )
    empty = mask_pool(features, masks[:0], frame_index[:0], backend="triton")
    assert empty.shape == (0, 20)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_interpreted_token_merge_dtypes(dtype):
    check_token_merge("cpu", dtype, num_tokens=4)


@interpreted
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
def test_interpreted_token_merge_num_tokens(num_tokens):
    check_token_merge("cpu", torch.float32, num_tokens)


@interpreted
def test_interpreted_token_merge_backward_and_edges():
    check_token_merge_backward("cpu")
    single = torch.randn(3, 1, 8)
    merged, counts = temporal_token_merge(single, torch.ones(3, dtype=torch.long), 4, backend="triton")
    assert torch.equal(merged, single) and counts.tolist() == [1, 1, 1]
    merged, counts = temporal_token_merge(torch.randn(0, 5, 8), torch.zeros(0, dtype=torch.long), 4, backend="triton")
    assert merged.shape == (0, 4, 8) and counts.shape == (0,)


# ------------------------------------------------------------------------------------------------------- GPU


@cuda
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16])
def test_cuda_mask_pool(feature_dtype):
    check_mask_pool("cuda", feature_dtype, torch.bool)
    check_mask_pool_backward("cuda", feature_dtype)


@cuda
def test_cuda_mask_pool_release_shapes_and_auto_dispatch():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(16, 729, 1152, generator=generator).to("cuda", torch.bfloat16)
    masks = (torch.rand(128, 384, 384, generator=generator) > 0.7).cuda()
    frame_index = torch.arange(16).repeat(8).cuda()
    expected = mask_pool_reference(features, masks, frame_index, out_dtype=torch.float32)
    pooled = mask_pool(features, masks, frame_index, out_dtype=torch.float32, backend="auto")
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_token_merge(dtype):
    check_token_merge("cuda", dtype, num_tokens=4)
    check_token_merge_backward("cuda")


@cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_token_merge_never_syncs(backend):
    tokens = torch.randn(64, 16, 1152, device="cuda")
    lengths = torch.randint(1, 17, (64,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        merged, counts = temporal_token_merge(tokens, lengths, 4, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected, expected_counts = temporal_token_merge_reference(tokens, lengths, 4)
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(merged, expected)


@interpreted
def test_interpreted_model_region_tokens_match_torch_path():
    """The model's region tokens are the same whichever implementation computes pooling and merge."""
    import numpy as np

    from transformers_videorefer.tiny import build_tiny_model_and_processor

    frames = np.random.default_rng(0).integers(0, 256, (12, 30, 40, 3), dtype=np.uint8)
    first, second = np.zeros((30, 40), bool), np.zeros((30, 40), bool)
    first[2:15, 3:20], second[10:28, 15:38] = True, True
    masks = [{4: first}, {k: second if k % 2 else first for k in (0, 2, 3, 5, 7, 9, 11)}]
    region_tokens = {}
    for backend in ("torch", "triton"):
        model, processor = build_tiny_model_and_processor(seed=0, kernel_backend=backend)
        prompt = "<video>\nCompare <region> with <region>."
        inputs = processor(videos=frames, masks=masks, text=prompt, return_tensors="pt")
        with torch.no_grad():
            region_tokens[backend] = model(**inputs).region_hidden_states
    assert region_tokens["torch"].shape == (1 + 4, model.config.text_config.hidden_size)
    torch.testing.assert_close(region_tokens["triton"], region_tokens["torch"], rtol=1e-5, atol=1e-5)
