"""Tests of the pure-PyTorch region ops and their dispatcher against independent, loop-based re-implementations."""

import math
import types

import pytest
import torch
import torch.nn.functional as F

from transformers_videorefer import region_ops
from transformers_videorefer.region_ops import (
    mask_pool,
    mask_pool_reference,
    temporal_token_merge,
    temporal_token_merge_reference,
)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Tests that leave `backend` unset must not depend on the caller's VIDEOREFER_KERNELS."""
    monkeypatch.delenv(region_ops.KERNELS_ENV_VAR, raising=False)


# ----------------------------------------------------------------------------------------------- naive references


def naive_mask_pool(features, masks, frame_index, mask_sizes=None):
    """One mask at a time, the release's way: crop, F.interpolate, threshold, masked sum / (area + 1e-8), float32."""
    if features.dim() == 3:
        side = math.isqrt(features.shape[1])
        features = features.reshape(features.shape[0], side, side, -1)
    grid_h, grid_w = features.shape[1:3]
    pooled = []
    for p in range(masks.shape[0]):
        height, width = mask_sizes[p].tolist() if mask_sizes is not None else masks.shape[1:]
        mask = masks[p, :height, :width][None, None].float()
        if (height, width) != (grid_h, grid_w):
            mask = F.interpolate(mask, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        mask = (mask[0, 0] > 0).float()[:, :, None]
        frame = features[frame_index[p]].float()
        pooled.append((frame * mask / (mask.sum() + 1e-8)).sum(dim=(0, 1)))
    return torch.stack(pooled)


def naive_token_merge(tokens, num_tokens):
    """The release's per-token loop on one object's [k, C] tokens (float32)."""
    tokens = tokens.float()
    if tokens.shape[0] <= num_tokens:
        return tokens
    similarity = (F.normalize(tokens[:-1], dim=-1) * F.normalize(tokens[1:], dim=-1)).sum(-1)
    kth_largest = torch.topk(similarity, tokens.shape[0] - num_tokens).values[-1]
    groups, current = [], []
    for i in range(similarity.shape[0]):
        current.append(tokens[i])
        if similarity[i] < kth_largest:
            groups.append(torch.stack(current).mean(0))
            current = []
    current.append(tokens[-1])
    groups.append(torch.stack(current).mean(0))
    return torch.stack(groups)


def check_merge_against_naive(tokens, lengths, num_tokens, merged, counts, atol=1e-6, rtol=1e-5):
    num_slots = min(tokens.shape[1], num_tokens)
    assert merged.shape == (tokens.shape[0], num_slots, tokens.shape[2])
    assert merged.dtype == tokens.dtype and counts.dtype == torch.long
    for n, length in enumerate(lengths.tolist()):
        expected = naive_token_merge(tokens[n, :length], num_tokens)
        assert counts[n].item() == expected.shape[0], f"object {n} (k={length})"
        torch.testing.assert_close(merged[n, : expected.shape[0]].float(), expected, atol=atol, rtol=rtol)
        assert (merged[n, expected.shape[0] :] == 0).all()


# ----------------------------------------------------------------------------------------------------- mask pool

RESIZE_CASES = [
    ((384, 384), (27, 27)),  # the release's masks and SigLIP grid
    ((81, 54), (27, 27)),  # source coordinates land on integers (scale 3 and 2)
    ((54, 81), (27, 27)),
    ((27, 27), (27, 27)),  # no resize
    ((5, 7), (27, 27)),  # upscaling
    ((3, 9), (27, 27)),  # sizes where an unfused `scale * x - 0.5` would give a tap weight F.interpolate does not
    ((2, 4), (14, 28)),
    ((33, 257), (13, 13)),
    ((8, 5), (24, 27)),
    ((1, 1), (3, 3)),
    ((100, 37), (27, 13)),  # non-square grid
    ((7, 300), (9, 11)),
    ((240, 426), (27, 27)),
    ((720, 1280), (27, 27)),
]


def random_resize_cases(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(count):
        height, width = torch.randint(1, 200, (2,), generator=generator).tolist()
        grid_h, grid_w = torch.randint(1, 30, (2,), generator=generator).tolist()
        cases.append(((height, width), (grid_h, grid_w)))
    return cases


def identity_features(grid_h, grid_w):
    """One frame whose channel c is 1 on patch c only: pooling then returns the pooling weights themselves."""
    return torch.eye(grid_h * grid_w, dtype=torch.float64).reshape(1, grid_h, grid_w, grid_h * grid_w)


def assert_support_matches_interpolate(masks, grid):
    pooled = mask_pool_reference(identity_features(*grid), masks, torch.zeros(len(masks), dtype=torch.long))
    resized = F.interpolate(masks[None].float(), size=grid, mode="bilinear", align_corners=False)[0] > 0
    resized = resized.reshape(len(masks), -1)
    assert torch.equal(pooled > 0, resized)
    torch.testing.assert_close(pooled, resized / (resized.sum(-1, keepdim=True).double() + 1e-8), rtol=1e-12, atol=0)


@pytest.mark.parametrize("canvas,grid", RESIZE_CASES + random_resize_cases(30))
def test_mask_pool_support_matches_interpolate_exactly(canvas, grid):
    """Which patches a mask covers must equal F.interpolate + (> 0) exactly."""
    height, width = canvas
    # One mask per source row, then per source column: every bilinear tap of both axes is exercised.
    assert_support_matches_interpolate(torch.eye(height, dtype=torch.bool)[:, :, None], grid)
    assert_support_matches_interpolate(torch.eye(width, dtype=torch.bool)[:, None, :], grid)
    # Sparse and dense 2-D masks.
    generator = torch.Generator().manual_seed(height * 1000 + width)
    density = torch.tensor([0.999, 0.99, 0.5])[:, None, None]
    assert_support_matches_interpolate(torch.rand(3, height, width, generator=generator) > density, grid)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32])
def test_mask_pool_matches_release_formula(mask_dtype):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(4, 49, 24, generator=generator)
    masks = torch.rand(9, 60, 45, generator=generator) > 0.6
    masks[0] = False  # empty
    masks[1] = True  # full frame
    masks[2] = False
    masks[2, 30, 20] = True  # a single pixel
    frame_index = torch.tensor([0, 1, 2, 3, 3, 3, 0, 1, 1])
    masks = masks.to(mask_dtype)
    if mask_dtype == torch.float32:
        masks = masks * torch.rand(masks.shape, generator=generator)  # soft non-negative masks
    pooled = mask_pool(features, masks, frame_index, backend="torch")

    expected = naive_mask_pool(features, masks, frame_index)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(pooled[0], torch.zeros(24)), "an empty mask pools to exact zeros"
    torch.testing.assert_close(pooled[1], features[1].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mask_pool_feature_dtypes(dtype):
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(3, 36, 16, generator=generator).to(dtype)
    masks = torch.rand(5, 24, 24, generator=generator) > 0.5
    frame_index = torch.tensor([2, 0, 1, 2, 2])
    expected = naive_mask_pool(features, masks, frame_index)  # pools the upcast features in float32

    pooled = mask_pool(features, masks, frame_index, backend="torch")
    assert pooled.dtype == dtype and pooled.shape == (5, 16)
    torch.testing.assert_close(pooled, expected.to(dtype))
    as_float = mask_pool(features, masks, frame_index, out_dtype=torch.float32, backend="torch")
    assert as_float.dtype == torch.float32
    torch.testing.assert_close(as_float, expected, rtol=1e-5, atol=1e-6)


def test_mask_pool_padded_canvas_reads_only_each_mask_region():
    generator = torch.Generator().manual_seed(3)
    sizes = torch.tensor([[40, 30], [17, 50], [40, 50], [9, 9], [1, 50], [40, 1]])
    canvas = torch.zeros(len(sizes), 40, 50, dtype=torch.bool)
    for p, (height, width) in enumerate(sizes.tolist()):
        canvas[p, :height, :width] = torch.rand(height, width, generator=generator) > 0.7
    canvas[3, 4, 4] = True  # keep the tiny masks non-empty
    features = torch.randn(2, 7, 5, 12, generator=generator)  # [F, h, w, C]: a non-square grid
    frame_index = torch.tensor([0, 1, 1, 0, 1, 0])
    expected = naive_mask_pool(features, canvas, frame_index, sizes)

    pooled = mask_pool(features, canvas, frame_index, sizes, backend="torch")
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
    # Whatever lies outside a mask's region must not matter.
    padding = torch.ones_like(canvas)
    for p, (height, width) in enumerate(sizes.tolist()):
        padding[p, :height, :width] = False
    torch.testing.assert_close(mask_pool(features, canvas | padding, frame_index, sizes, backend="torch"), pooled)
    # Without sizes the whole canvas is the mask, which differs here.
    assert not torch.allclose(mask_pool(features, canvas, frame_index, backend="torch"), pooled)


def test_mask_pool_feature_layouts_agree():
    generator = torch.Generator().manual_seed(4)
    grid_features = torch.randn(2, 6, 6, 8, generator=generator)
    masks = torch.rand(3, 20, 20, generator=generator) > 0.5
    frame_index = torch.tensor([1, 0, 1])
    torch.testing.assert_close(
        mask_pool(grid_features, masks, frame_index, backend="torch"),
        mask_pool(grid_features.reshape(2, 36, 8), masks, frame_index, backend="torch"),
    )


def test_mask_pool_without_masks():
    pooled = mask_pool(torch.randn(2, 9, 5), torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert pooled.shape == (0, 5) and pooled.dtype == torch.float32


def test_mask_pool_gradcheck():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 9, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    masks = torch.rand(4, 7, 8, generator=generator) > 0.4
    frame_index = torch.tensor([0, 1, 1, 0])
    sizes = torch.tensor([[7, 8], [5, 8], [7, 3], [6, 6]])
    assert torch.autograd.gradcheck(lambda x: mask_pool_reference(x, masks, frame_index, sizes), (features,))


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda f, m, i: mask_pool(f[0], m, i), ValueError, "features"),
        (lambda f, m, i: mask_pool(f[:, :8], m, i), ValueError, "square patch grid"),
        (lambda f, m, i: mask_pool(f.long(), m, i), TypeError, "floating point"),
        (lambda f, m, i: mask_pool(f, m[0], i), ValueError, r"masks.*\[P, H, W\]"),
        (lambda f, m, i: mask_pool(f, m, i[:1]), ValueError, r"frame_index.*\[P\]"),
        (lambda f, m, i: mask_pool(f, m, i.float()), TypeError, "frame_index.*integer"),
        (lambda f, m, i: mask_pool(f, m, torch.tensor([0, 2])), ValueError, r"frame_index.*\[0, 2\)"),
        (lambda f, m, i: mask_pool(f, m, torch.tensor([-1, 0])), ValueError, r"frame_index.*\[0, 2\)"),
        (lambda f, m, i: mask_pool(f, m, i, torch.tensor([[4, 4]])), ValueError, r"mask_sizes.*\[P, 2\]"),
        (lambda f, m, i: mask_pool(f, m, i, torch.tensor([[4, 4], [5, 4]])), ValueError, "mask_sizes.*canvas"),
        (lambda f, m, i: mask_pool(f, m, i, torch.tensor([[4, 4], [0, 4]])), ValueError, "mask_sizes.*canvas"),
        (lambda f, m, i: mask_pool(f, m, i, backend="cuda"), ValueError, "`backend` argument must be one of"),
    ],
)
def test_mask_pool_rejects_bad_inputs(call, error, message):
    features = torch.randn(2, 9, 4)
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    frame_index = torch.tensor([0, 1])
    with pytest.raises(error, match=message):
        call(features, masks, frame_index)


# --------------------------------------------------------------------------------------------------- token merge


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 8])
def test_token_merge_matches_release_loop_for_every_length(num_tokens):
    generator = torch.Generator().manual_seed(num_tokens)
    max_length = 32
    tokens = torch.randn(max_length, max_length, 16, generator=generator)
    lengths = torch.arange(1, max_length + 1)
    # Padding must be ignored: fill it with large values.
    padding = torch.arange(max_length)[None, :] >= lengths[:, None]
    tokens[padding] = 1e3
    merged, counts = temporal_token_merge(tokens, lengths, num_tokens, backend="torch")
    check_merge_against_naive(tokens, lengths, num_tokens, merged, counts)
    passthrough = lengths <= num_tokens
    assert torch.equal(counts[passthrough], lengths[passthrough])
    assert (counts <= num_tokens).all()


def test_token_merge_ties_follow_the_release():
    generator = torch.Generator().manual_seed(7)
    a, b, c, d = torch.randn(4, 8, generator=generator)
    tokens = torch.stack(
        [
            torch.stack([a] * 10),  # identical frames: every pair ties, everything merges into one token
            torch.stack([a, a, a, b, b, b, c, d, d, d]),  # several tied pairs on the same vectors
            torch.stack([a, a, b, b, c, c, d, d, a, b]),
            torch.stack([a, b, c, d, a, b, c, d, a, a]),
        ]
    )
    lengths = torch.tensor([10, 10, 10, 7])
    merged, counts = temporal_token_merge(tokens, lengths, 4, backend="torch")
    check_merge_against_naive(tokens, lengths, 4, merged, counts)
    assert counts[0].item() == 1
    torch.testing.assert_close(merged[0, 0], a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_merge_dtypes(dtype):
    generator = torch.Generator().manual_seed(8)
    tokens = torch.randn(6, 12, 32, generator=generator).to(dtype)
    lengths = torch.tensor([12, 1, 5, 6, 9, 4])
    merged, counts = temporal_token_merge(tokens, lengths, 4, backend="torch")
    tolerance = {
        torch.float32: {},
        torch.float16: dict(atol=1e-3, rtol=1e-3),
        torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    }
    check_merge_against_naive(tokens, lengths, 4, merged, counts, **tolerance[dtype])
    # Objects that keep all their tokens come back bit for bit.
    assert torch.equal(merged[1, :1], tokens[1, :1]) and torch.equal(merged[5], tokens[5, :4])


def test_token_merge_short_inputs():
    tokens = torch.randn(3, 2, 5)
    merged, counts = temporal_token_merge(tokens, torch.tensor([2, 1, 2]), 4, backend="torch")
    assert merged.shape == (3, 2, 5) and counts.tolist() == [2, 1, 2]
    assert torch.equal(merged[0], tokens[0]) and (merged[1, 1] == 0).all()
    single = torch.randn(2, 1, 5)
    merged, counts = temporal_token_merge(single, torch.tensor([1, 1]), 4, backend="torch")
    assert torch.equal(merged, single) and counts.tolist() == [1, 1]
    merged, counts = temporal_token_merge(torch.randn(0, 6, 5), torch.zeros(0, dtype=torch.long), 4)
    assert merged.shape == (0, 4, 5) and counts.shape == (0,)


def test_token_merge_gradcheck():
    generator = torch.Generator().manual_seed(9)
    tokens = torch.randn(3, 7, 4, dtype=torch.float64, generator=generator)
    lengths = torch.tensor([7, 3, 6])
    similarity = (F.normalize(tokens[:, :-1], dim=-1) * F.normalize(tokens[:, 1:], dim=-1)).sum(-1)
    gaps = similarity.sort(dim=1).values.diff(dim=1)
    assert gaps.min() > 1e-3, "the ranking must not flip under gradcheck's perturbations"
    tokens.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: temporal_token_merge_reference(x, lengths, 2)[0], (tokens,))


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda t, n: temporal_token_merge(t[0], n, 4), ValueError, r"tokens.*\[N, K, C\]"),
        (lambda t, n: temporal_token_merge(t.long(), n, 4), ValueError, "floating point"),
        (lambda t, n: temporal_token_merge(t, n[:1], 4), ValueError, r"lengths.*\[N\]"),
        (lambda t, n: temporal_token_merge(t, n.float(), 4), TypeError, "lengths.*integer"),
        (lambda t, n: temporal_token_merge(t, torch.tensor([0, 3]), 4), ValueError, r"lengths.*\[1, 5\]"),
        (lambda t, n: temporal_token_merge(t, torch.tensor([6, 3]), 4), ValueError, r"lengths.*\[1, 5\]"),
        (lambda t, n: temporal_token_merge(t, n, 0), ValueError, "num_tokens"),
        (lambda t, n: temporal_token_merge(t, n, 2.0), ValueError, "num_tokens"),
        (lambda t, n: temporal_token_merge(t, n, True), ValueError, "num_tokens"),
    ],
)
def test_token_merge_rejects_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.randn(2, 5, 3), torch.tensor([5, 2]))


# ------------------------------------------------------------------------------------------------------- dispatch


def fake_kernels(interpreter):
    """A stand-in kernels module that records what reaches the Triton entry points."""
    calls = []

    def triton_mask_pool(features, masks, frame_index, row_taps, col_taps, out_dtype):
        calls.append("mask_pool")
        return torch.full((masks.shape[0], features.shape[-1]), 7.0, dtype=out_dtype)

    def triton_temporal_token_merge(tokens, lengths, num_tokens):
        calls.append("token_merge")
        return tokens[:, :num_tokens], lengths.clamp(max=num_tokens)

    module = types.SimpleNamespace(
        interpreter_enabled=lambda: interpreter,
        triton_mask_pool=triton_mask_pool,
        triton_temporal_token_merge=triton_temporal_token_merge,
    )
    return module, calls


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(10)
    pool_args = (
        torch.randn(2, 9, 4, generator=generator),
        torch.rand(3, 6, 6, generator=generator) > 0.5,
        torch.tensor([0, 1, 1]),
    )
    merge_args = (torch.randn(2, 6, 4, generator=generator), torch.tensor([6, 3]), 2)
    return pool_args, merge_args


def test_dispatch_uses_torch_on_cpu_with_auto(monkeypatch, inputs):
    pool_args, merge_args = inputs
    module, calls = fake_kernels(interpreter=True)
    monkeypatch.setattr(region_ops, "_load_triton_kernels", lambda: (module, None))
    for backend in (None, "auto", "torch"):
        torch.testing.assert_close(mask_pool(*pool_args, backend=backend), mask_pool_reference(*pool_args))
        torch.testing.assert_close(
            temporal_token_merge(*merge_args, backend=backend), temporal_token_merge_reference(*merge_args)
        )
    assert calls == []


def test_dispatch_routes_triton_requests(monkeypatch, inputs):
    pool_args, merge_args = inputs
    module, calls = fake_kernels(interpreter=True)
    monkeypatch.setattr(region_ops, "_load_triton_kernels", lambda: (module, None))
    assert (mask_pool(*pool_args, out_dtype=torch.float16, backend="triton") == 7).all()
    temporal_token_merge(*merge_args, backend="triton")
    monkeypatch.setenv(region_ops.KERNELS_ENV_VAR, "triton")
    mask_pool(*pool_args)
    temporal_token_merge(*merge_args)
    assert calls == ["mask_pool", "token_merge", "mask_pool", "token_merge"]
    # An explicit backend wins over the environment variable.
    torch.testing.assert_close(mask_pool(*pool_args, backend="torch"), mask_pool_reference(*pool_args))
    assert len(calls) == 4
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        mask_pool(pool_args[0].double(), *pool_args[1:])


def test_dispatch_errors_when_triton_cannot_run(monkeypatch, inputs):
    pool_args, merge_args = inputs
    compiled_only, _ = fake_kernels(interpreter=False)
    monkeypatch.setattr(region_ops, "_load_triton_kernels", lambda: (compiled_only, None))
    with pytest.raises(ValueError, match="need CUDA tensors"):
        mask_pool(*pool_args, backend="triton")
    monkeypatch.setattr(
        region_ops, "_load_triton_kernels", lambda: (None, "ModuleNotFoundError: No module named 'triton'")
    )
    with pytest.raises(RuntimeError, match="cannot be imported.*No module named 'triton'"):
        temporal_token_merge(*merge_args, backend="triton")
    monkeypatch.setenv(region_ops.KERNELS_ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match=f"{region_ops.KERNELS_ENV_VAR}.*cannot be imported"):
        mask_pool(*pool_args)
    monkeypatch.setenv(region_ops.KERNELS_ENV_VAR, "auto")
    torch.testing.assert_close(mask_pool(*pool_args), mask_pool_reference(*pool_args))


def test_dispatch_env_var_values(monkeypatch, inputs):
    pool_args, _ = inputs
    monkeypatch.setenv(region_ops.KERNELS_ENV_VAR, "torch")
    torch.testing.assert_close(mask_pool(*pool_args), mask_pool_reference(*pool_args))
    monkeypatch.setenv(region_ops.KERNELS_ENV_VAR, "")
    torch.testing.assert_close(mask_pool(*pool_args), mask_pool_reference(*pool_args))
    monkeypatch.setenv(region_ops.KERNELS_ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"{region_ops.KERNELS_ENV_VAR} must be one of"):
        mask_pool(*pool_args)
