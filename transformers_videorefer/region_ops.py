"""Region operators of the VideoRefer object encoder: mask pooling and temporal token merge.

Each op has a vectorised pure-PyTorch reference and a public dispatcher that runs the Triton kernels of
`transformers_videorefer.kernels` on CUDA tensors when they can be imported. This file is shipped as remote code next
to the modeling file, so it imports nothing from the package: the kernels are looked up lazily and are optional.
"""

import functools
import importlib
import math
import os

import torch
import torch.nn.functional as F


KERNELS_ENV_VAR = "VIDEOREFER_KERNELS"
BACKENDS = ("auto", "torch", "triton")
_KERNELS_MODULE = "transformers_videorefer.kernels"
# The release divides by `mask area + 1e-8`, which keeps empty masks at exactly zero instead of NaN.
_AREA_EPS = 1e-8
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _load_triton_kernels():
    """Returns `(kernels module, None)`, or `(None, reason)` when Triton or the kernels cannot be imported."""
    try:
        return importlib.import_module(_KERNELS_MODULE), None
    except Exception as error:  # a missing package, a missing Triton or a broken Triton install all mean "no kernels"
        return None, f"{type(error).__name__}: {error}"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16 (as the release computes), float64 for float64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _resolve_backend(backend: str | None, reference: torch.Tensor):
    """Returns the kernels module when the Triton path must run, `None` for the PyTorch path.

    `reference` is the features/tokens tensor: its device and dtype decide what "auto" picks.
    """
    source = "the `backend` argument"
    if backend is None:
        source = f"the environment variable {KERNELS_ENV_VAR}"
        backend = os.environ.get(KERNELS_ENV_VAR, "").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}.")
    if backend == "torch":
        return None
    kernels, reason = _load_triton_kernels()
    if backend == "auto":
        usable = kernels is not None and reference.is_cuda and reference.dtype in _TRITON_DTYPES
        return kernels if usable else None
    if kernels is None:
        raise RuntimeError(
            f"backend 'triton' was requested through {source} but the Triton kernels cannot be imported ({reason})."
        )
    if not reference.is_cuda and not kernels.interpreter_enabled():
        raise ValueError(
            f"backend 'triton' was requested through {source} for tensors on {reference.device}; the Triton kernels "
            "need CUDA tensors (or TRITON_INTERPRET=1). Use backend 'auto' or 'torch' on CPU."
        )
    if reference.dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend 'triton' supports float32, float16 and bfloat16 inputs, got {reference.dtype}.")
    return kernels


def _check_same_device(reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(f"`{name}` is on {tensor.device} but the features/tokens are on {reference.device}.")


def _check_integer(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"`{name}` must be an integer tensor (int64), got dtype {tensor.dtype}.")


# ----------------------------------------------------------------------------------------------------- mask pooling


def _prepare_mask_pool(features, masks, frame_index, mask_sizes, out_dtype):
    """Validates the mask pooling inputs.

    Returns features as [F, h*w, C], the grid (h, w), the region sizes [P, 2] int64 and the output dtype.
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError("`features` must be a floating point tensor of shape [F, h*w, C] or [F, h, w, C].")
    if features.dtype not in (*_TRITON_DTYPES, torch.float64):
        raise TypeError(f"`features` must be float32, float16, bfloat16 (or float64), got {features.dtype}.")
    if features.dim() == 4:
        num_frames, grid_h, grid_w, channels = features.shape
        features = features.reshape(num_frames, grid_h * grid_w, channels)
    elif features.dim() == 3:
        num_frames, num_patches, channels = features.shape
        grid_h = grid_w = math.isqrt(num_patches)
        if grid_h * grid_w != num_patches:
            raise ValueError(
                f"`features` of shape [F, h*w, C] must hold a square patch grid, got {num_patches} patches per frame; "
                "pass [F, h, w, C] for a non-square grid."
            )
    else:
        raise ValueError(f"`features` must have shape [F, h*w, C] or [F, h, w, C], got {tuple(features.shape)}.")
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"`masks` must be a tensor of shape [P, H, W], got {shape}.")
    if masks.is_complex():
        raise TypeError(f"`masks` must be bool, integer or floating point, got {masks.dtype}.")
    num_masks, height, width = masks.shape
    if not isinstance(frame_index, torch.Tensor) or frame_index.shape != (num_masks,):
        shape = tuple(frame_index.shape) if isinstance(frame_index, torch.Tensor) else type(frame_index).__name__
        raise ValueError(f"`frame_index` must be a tensor of shape [P] = [{num_masks}], got {shape}.")
    _check_integer("frame_index", frame_index)
    _check_same_device(features, masks=masks, frame_index=frame_index, mask_sizes=mask_sizes)
    if mask_sizes is None:
        sizes = torch.tensor([height, width], device=masks.device).expand(num_masks, 2)
    else:
        if not isinstance(mask_sizes, torch.Tensor) or mask_sizes.shape != (num_masks, 2):
            shape = tuple(mask_sizes.shape) if isinstance(mask_sizes, torch.Tensor) else type(mask_sizes).__name__
            raise ValueError(f"`mask_sizes` must be a tensor of shape [P, 2] = [{num_masks}, 2], got {shape}.")
        _check_integer("mask_sizes", mask_sizes)
        sizes = mask_sizes.long()
    if num_masks > 0:
        # One read-back for every value check (a host sync on GPU).
        canvas = torch.tensor([height, width], device=masks.device)
        frame_ok, sizes_ok = torch.stack(
            [((frame_index >= 0) & (frame_index < num_frames)).all(), ((sizes >= 1) & (sizes <= canvas)).all()]
        ).tolist()
        if not frame_ok:
            raise ValueError(
                f"`frame_index` values must lie in [0, {num_frames}) for features of {num_frames} frames."
            )
        if not sizes_ok:
            raise ValueError(
                f"`mask_sizes` (height, width) must lie in [1, {height}] x [1, {width}], the mask canvas."
            )
    if out_dtype is None:
        out_dtype = features.dtype
    elif not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"`out_dtype` must be a floating point torch.dtype or None, got {out_dtype!r}.")
    return features, (grid_h, grid_w), sizes, out_dtype


def _bilinear_taps(input_sizes: torch.Tensor, output_size: int):
    """Source taps of a 1-D bilinear resize (align_corners=False) from each of `input_sizes` to `output_size`.

    Returns `index0, index1` (int64) and `weight0, weight1` (float32), each [P, output_size]. The float32 formulas are
    PyTorch's `upsample_bilinear2d`, whose source coordinate `scale * (i + 0.5) - 0.5` is a fused multiply-add: it is
    evaluated exactly in float64 and rounded once, so the taps (and which weights are exactly 0) match F.interpolate.
    """
    sizes = input_sizes.to(torch.float32)[:, None]
    scale = (sizes / output_size).double()
    centers = torch.arange(output_size, device=input_sizes.device, dtype=torch.float32).add_(0.5).double()
    source = (scale * centers - 0.5).float().clamp_min_(0.0)
    last = input_sizes[:, None] - 1
    index0 = torch.minimum(source.floor().long(), last)
    weight1 = (source - index0).clamp_(0.0, 1.0)
    index1 = index0 + (index0 < last).long()
    return index0, index1, 1.0 - weight1, weight1


def _mask_taps(sizes: torch.Tensor, grid: tuple[int, int]):
    """Row and column bilinear taps of every mask's real region resized to the feature grid."""
    return _bilinear_taps(sizes[:, 0], grid[0]), _bilinear_taps(sizes[:, 1], grid[1])


def _pooling_weights(masks: torch.Tensor, row_taps, col_taps, dtype: torch.dtype) -> torch.Tensor:
    """Per-mask pooling weights [P, h*w] in `dtype`: 1 / area (+1e-8) where the resized mask is > 0, else 0.

    Reads only the four mask pixels of each output cell's bilinear stencil, never a resized or float copy of the masks.
    """
    num_masks, _, width = masks.shape
    row0, row1, row_weight0, row_weight1 = (tap[:, :, None] for tap in row_taps)
    col0, col1, col_weight0, col_weight1 = (tap[:, None, :] for tap in col_taps)
    flat_masks = masks.reshape(num_masks, -1)

    def pixels(rows, cols):
        index = (rows * width + cols).reshape(num_masks, -1)
        return flat_masks.gather(1, index).to(torch.float32).view(num_masks, rows.shape[1], cols.shape[2])

    resized = row_weight0 * (col_weight0 * pixels(row0, col0) + col_weight1 * pixels(row0, col1)) + row_weight1 * (
        col_weight0 * pixels(row1, col0) + col_weight1 * pixels(row1, col1)
    )
    inside = (resized > 0).reshape(num_masks, -1).to(dtype)
    return inside / (inside.sum(dim=1, keepdim=True) + _AREA_EPS)


def _mask_pool_torch(features, masks, frame_index, grid, sizes, out_dtype):
    """Mask pooling of validated inputs (features [F, h*w, C]) with PyTorch ops."""
    num_frames, num_patches, channels = features.shape
    if masks.shape[0] == 0:
        return features.new_zeros(0, channels, dtype=out_dtype)
    row_taps, col_taps = _mask_taps(sizes, grid)
    compute_dtype = _compute_dtype(features.dtype)
    weights = _pooling_weights(masks, row_taps, col_taps, compute_dtype)

    # Pool the masks of each frame with one batched matmul against that frame's features, padding every frame to the
    # largest number of masks on one frame: no [P, h*w, C] gather and no [P, F*h*w] matrix.
    frame_index = frame_index.long()
    frame_one_hot = F.one_hot(frame_index, num_frames)
    slot = frame_one_hot.cumsum(0).gather(1, frame_index[:, None]).squeeze(1) - 1  # rank of the mask on its frame
    max_masks_per_frame = int(frame_one_hot.sum(0).max())
    frame_weights = weights.new_zeros(num_frames, max_masks_per_frame, num_patches)
    frame_weights[frame_index, slot] = weights
    pooled = torch.bmm(frame_weights, features.to(compute_dtype))
    return pooled[frame_index, slot].to(out_dtype)


def mask_pool_reference(
    features: torch.Tensor,
    masks: torch.Tensor,
    frame_index: torch.Tensor,
    mask_sizes: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-PyTorch mask pooling; same contract as [`mask_pool`] (float64 features are pooled in float64).

    Vectorised: the resize reads only the 4 stencil pixels of each output cell, and the masks of each frame are pooled
    with one batched matmul against that frame's features (finding the largest number of masks on one frame costs one
    host read). Differentiable w.r.t. `features`.
    """
    flat_features, grid, sizes, out_dtype = _prepare_mask_pool(features, masks, frame_index, mask_sizes, out_dtype)
    return _mask_pool_torch(flat_features, masks, frame_index, grid, sizes, out_dtype)


def mask_pool(
    features: torch.Tensor,
    masks: torch.Tensor,
    frame_index: torch.Tensor,
    mask_sizes: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean of each mask's frame features under the mask resized to the patch grid (the VideoRefer mask pooling).

    Args:
        features: `[F, h*w, C]` (square grid) or `[F, h, w, C]` patch features, float32/float16/bfloat16.
        masks: `[P, H, W]` bool, integer or float masks at frame resolution (nonzero = inside).
        frame_index: `[P]` int64, the frame of each mask.
        mask_sizes: optional `[P, 2]` int64 `(height, width)` of each mask's real region `masks[p, :height, :width]`
            when masks of different sizes are zero-padded to a common canvas; `None` means the whole canvas.
        out_dtype: dtype of the result, `features.dtype` by default.
        backend: `"auto"`, `"torch"`, `"triton"` or `None` (the `VIDEOREFER_KERNELS` environment variable, else
            `"auto"`: Triton for CUDA tensors when the kernels import).

    Each mask region is resized to `(h, w)` as bilinear `F.interpolate(align_corners=False)` would, thresholded at
    `> 0`, and the frame's features are averaged over it in float32; an empty region gives zeros.

    Returns:
        `[P, C]` pooled features. Differentiable w.r.t. `features`.
    """
    flat_features, grid, sizes, out_dtype = _prepare_mask_pool(features, masks, frame_index, mask_sizes, out_dtype)
    kernels = _resolve_backend(backend, flat_features)
    if kernels is None:
        return _mask_pool_torch(flat_features, masks, frame_index, grid, sizes, out_dtype)
    row_taps, col_taps = _mask_taps(sizes, grid)
    return kernels.triton_mask_pool(flat_features, masks, frame_index, row_taps, col_taps, out_dtype)


# ------------------------------------------------------------------------------------------------------ token merge


def _prepare_token_merge(tokens, lengths, num_tokens):
    """Validates the token merge inputs; returns lengths as int64 clamped to [1, K]."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or not tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"`tokens` must be a floating point tensor of shape [N, K, C], got {shape}.")
    num_objects, max_length, _ = tokens.shape
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (num_objects,):
        shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"`lengths` must be a tensor of shape [N] = [{num_objects}], got {shape}.")
    _check_integer("lengths", lengths)
    _check_same_device(tokens, lengths=lengths)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"`num_tokens` must be a positive int, got {num_tokens!r}.")
    if num_objects > 0 and max_length == 0:
        raise ValueError("`tokens` must hold at least one token per object (K >= 1).")
    # Checking the values needs a host read, which the GPU path must not do; there they are clamped instead.
    if lengths.device.type == "cpu" and num_objects > 0 and not ((lengths >= 1) & (lengths <= max_length)).all():
        low, high = lengths.min().item(), lengths.max().item()
        raise ValueError(f"`lengths` values must lie in [1, K] = [1, {max_length}], got values from {low} to {high}.")
    return lengths.long().clamp(1, max(max_length, 1))


def temporal_token_merge_reference(
    tokens: torch.Tensor, lengths: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch temporal token merge; same contract as [`temporal_token_merge`] (float64 is merged in float64).

    Vectorised over objects and tokens, without host synchronisation: ranking by a sort, groups by a cumulative sum of
    the boundaries, group means by one batched matmul.
    """
    return _token_merge_torch(tokens, _prepare_token_merge(tokens, lengths, num_tokens), num_tokens)


def _token_merge_torch(tokens, lengths, num_tokens):
    """Token merge of validated inputs (`lengths` int64 within [1, K]) with PyTorch ops."""
    max_length = tokens.shape[1]
    num_slots = min(max_length, num_tokens)
    tokens_upcast = tokens.to(_compute_dtype(tokens.dtype))
    normalized = F.normalize(tokens_upcast, p=2, dim=-1)
    similarity = (normalized[:, :-1] * normalized[:, 1:]).sum(dim=-1)  # [N, K-1], pair i = tokens (i, i+1)

    positions = torch.arange(max_length, device=tokens.device)
    valid_pair = positions[None, :-1] < (lengths - 1)[:, None]
    num_removed = lengths - num_tokens
    # A trailing -inf column keeps the gather in range when K == 1; only objects with num_removed >= 1 use the value.
    ranked = F.pad(similarity.masked_fill(~valid_pair, -math.inf), (0, 1), value=-math.inf)
    ranked = ranked.sort(dim=1, descending=True).values
    kth_largest = ranked.gather(1, (num_removed - 1).clamp(min=0)[:, None])
    # A group ends after pair i unless the pair is among the merges; pairs tied with the k-th largest merge too.
    boundary = valid_pair & ((num_removed[:, None] <= 0) | (similarity < kth_largest))
    group = F.pad(boundary.long().cumsum(dim=1), (1, 0))  # [N, K] group of each token
    counts = group.gather(1, (lengths - 1)[:, None]).squeeze(1) + 1

    membership = (group[:, None, :] == torch.arange(num_slots, device=tokens.device)[None, :, None]) & (
        positions[None, None, :] < lengths[:, None, None]
    )
    membership = membership.to(tokens_upcast.dtype)
    averaging = membership / membership.sum(dim=-1, keepdim=True).clamp_min(1.0)  # [N, U, K]
    return torch.bmm(averaging, tokens_upcast).to(tokens.dtype), counts


def temporal_token_merge(
    tokens: torch.Tensor, lengths: torch.Tensor, num_tokens: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal Token Merge of VideoRefer, batched over objects.

    Args:
        tokens: `[N, K, C]` per-frame region tokens of N objects, padded to K.
        lengths: `[N]` int64, the number of valid leading tokens of each object (1 <= k <= K; checked on CPU, clamped
            on GPU where a check would need a host sync).
        num_tokens: u, the most tokens an object keeps.
        backend: `"auto"`, `"torch"`, `"triton"` or `None` (the `VIDEOREFER_KERNELS` environment variable, else
            `"auto"`).

    An object with k <= u is kept as is. Otherwise the cosine similarities of its adjacent tokens are ranked, the
    k - u most similar pairs (and every pair tied with the last of them) are merged, and each run of merged tokens is
    averaged, in float32.

    Returns:
        `merged` `[N, min(K, u), C]` (dtype of `tokens`, zeros in unused slots) and `counts` `[N]` int64, the number
        of valid merged tokens of each object. Differentiable w.r.t. `tokens`.
    """
    lengths = _prepare_token_merge(tokens, lengths, num_tokens)
    kernels = _resolve_backend(backend, tokens)
    if kernels is None:
        return _token_merge_torch(tokens, lengths, num_tokens)
    return kernels.triton_temporal_token_merge(tokens, lengths, num_tokens)
