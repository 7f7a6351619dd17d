"""Fused mask pooling in Triton.

Two forward launches and one backward launch, none of which materialises a resized mask stack or a per-mask copy of
the features:

1. `_mask_weights_kernel`, one program per mask: for each cell of the h x w patch grid it reads the four mask pixels of
   the cell's bilinear stencil (taps computed by `region_ops`, identical to F.interpolate's), thresholds the
   interpolated value at > 0 and writes `1 / (area + 1e-8)` or 0, giving pooling weights [P, h*w] in float32.
2. `_pool_forward_kernel`, one program per (frame, channel block): the masks are grouped by frame (a stable sort on
   the device), and each program streams its frame's features once through `tl.dot` with the weights of all the masks
   on that frame (16 at a time), so each feature tile is read once per frame instead of once per mask.
3. `_pool_backward_kernel`, one program per (frame, patch block, channel block): grad features of a frame =
   weights of its masks transposed @ their output gradients, again one `tl.dot` stream per frame; it is a Triton kernel
   too, reusing the weights saved by the forward.

Every load is cast to float32 right away (the Triton interpreter mis-computes bfloat16 arithmetic) and the dots run in
IEEE float32, as the release pools in float32.
"""

import torch
import triton
import triton.language as tl


_INTERPRETER = triton.knobs.runtime.interpret
# tl.dot needs every block dimension >= 16; this is also the number of masks of one frame pooled per dot.
_MASKS_PER_DOT = 16
_AREA_EPS: tl.constexpr = tl.constexpr(1e-8)  # the release divides by area + 1e-8


def _autotune_configs(block_choices: list[dict[str, int]]) -> list[triton.Config]:
    """The GPU candidates, or the first one alone under the interpreter (which cannot time anything)."""
    if _INTERPRETER:
        block_choices = block_choices[:1]
    return [triton.Config(blocks, num_warps=4, num_stages=3) for blocks in block_choices]


_BLOCK_CHOICES = [
    {"BLOCK_CELLS": 32, "BLOCK_C": 64},
    {"BLOCK_CELLS": 64, "BLOCK_C": 64},
    {"BLOCK_CELLS": 32, "BLOCK_C": 128},
    {"BLOCK_CELLS": 64, "BLOCK_C": 128},
]


@triton.jit
def _mask_weights_kernel(
    masks_ptr,
    row_index0_ptr,
    row_index1_ptr,
    row_weight0_ptr,
    row_weight1_ptr,
    col_index0_ptr,
    col_index1_ptr,
    col_weight0_ptr,
    col_weight1_ptr,
    weights_ptr,
    mask_numel,
    canvas_width,
    grid_h,
    grid_w,
    BLOCK_GRID: tl.constexpr,
):
    mask_id = tl.program_id(0).to(tl.int64)
    cells = tl.arange(0, BLOCK_GRID)
    in_grid = cells < grid_h * grid_w
    row = mask_id * grid_h + cells // grid_w
    col = mask_id * grid_w + cells % grid_w
    row0 = tl.load(row_index0_ptr + row, mask=in_grid, other=0)
    row1 = tl.load(row_index1_ptr + row, mask=in_grid, other=0)
    row_weight0 = tl.load(row_weight0_ptr + row, mask=in_grid, other=0.0)
    row_weight1 = tl.load(row_weight1_ptr + row, mask=in_grid, other=0.0)
    col0 = tl.load(col_index0_ptr + col, mask=in_grid, other=0)
    col1 = tl.load(col_index1_ptr + col, mask=in_grid, other=0)
    col_weight0 = tl.load(col_weight0_ptr + col, mask=in_grid, other=0.0)
    col_weight1 = tl.load(col_weight1_ptr + col, mask=in_grid, other=0.0)

    mask_base = masks_ptr + mask_id * mask_numel
    pixel00 = tl.load(mask_base + row0 * canvas_width + col0, mask=in_grid, other=0).to(tl.float32)
    pixel01 = tl.load(mask_base + row0 * canvas_width + col1, mask=in_grid, other=0).to(tl.float32)
    pixel10 = tl.load(mask_base + row1 * canvas_width + col0, mask=in_grid, other=0).to(tl.float32)
    pixel11 = tl.load(mask_base + row1 * canvas_width + col1, mask=in_grid, other=0).to(tl.float32)
    resized = row_weight0 * (col_weight0 * pixel00 + col_weight1 * pixel01) + row_weight1 * (
        col_weight0 * pixel10 + col_weight1 * pixel11
    )
    inside = ((resized > 0) & in_grid).to(tl.float32)
    area = tl.sum(inside, axis=0)
    tl.store(weights_ptr + mask_id * grid_h * grid_w + cells, inside / (area + _AREA_EPS), mask=in_grid)


@triton.autotune(configs=_autotune_configs(_BLOCK_CHOICES), key=["num_patches", "channels"])
@triton.jit
def _pool_forward_kernel(
    features_ptr,
    weights_ptr,
    order_ptr,
    frame_start_ptr,
    out_ptr,
    num_patches,
    channels,
    MASKS_PER_DOT: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    frame = tl.program_id(0)
    channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < channels
    first_mask = tl.load(frame_start_ptr + frame)
    end_mask = tl.load(frame_start_ptr + frame + 1)
    frame_features = features_ptr + frame.to(tl.int64) * num_patches * channels
    for group_start in range(first_mask, end_mask, MASKS_PER_DOT):
        slot = group_start + tl.arange(0, MASKS_PER_DOT)
        slot_ok = slot < end_mask
        mask_id = tl.load(order_ptr + slot, mask=slot_ok, other=0)
        pooled = tl.zeros((MASKS_PER_DOT, BLOCK_C), dtype=tl.float32)
        for cell_start in range(0, num_patches, BLOCK_CELLS):
            cell = cell_start + tl.arange(0, BLOCK_CELLS)
            cell_ok = cell < num_patches
            weights = tl.load(
                weights_ptr + mask_id[:, None] * num_patches + cell[None, :],
                mask=slot_ok[:, None] & cell_ok[None, :],
                other=0.0,
            )
            features = tl.load(
                frame_features + cell[:, None] * channels + channel[None, :],
                mask=cell_ok[:, None] & channel_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            pooled = tl.dot(weights, features, pooled, input_precision="ieee")
        tl.store(
            out_ptr + mask_id[:, None] * channels + channel[None, :],
            pooled.to(out_ptr.dtype.element_ty),
            mask=slot_ok[:, None] & channel_ok[None, :],
        )


@triton.autotune(configs=_autotune_configs(_BLOCK_CHOICES), key=["num_patches", "channels"])
@triton.jit
def _pool_backward_kernel(
    grad_out_ptr,
    weights_ptr,
    order_ptr,
    frame_start_ptr,
    grad_features_ptr,
    num_patches,
    channels,
    MASKS_PER_DOT: tl.constexpr,
    BLOCK_CELLS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    frame = tl.program_id(0)
    cell = tl.program_id(1) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)
    channel = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    cell_ok = cell < num_patches
    channel_ok = channel < channels
    first_mask = tl.load(frame_start_ptr + frame)
    end_mask = tl.load(frame_start_ptr + frame + 1)
    grad = tl.zeros((BLOCK_CELLS, BLOCK_C), dtype=tl.float32)
    for group_start in range(first_mask, end_mask, MASKS_PER_DOT):
        slot = group_start + tl.arange(0, MASKS_PER_DOT)
        slot_ok = slot < end_mask
        mask_id = tl.load(order_ptr + slot, mask=slot_ok, other=0)
        weights = tl.load(
            weights_ptr + mask_id[:, None] * num_patches + cell[None, :],
            mask=slot_ok[:, None] & cell_ok[None, :],
            other=0.0,
        )
        grad_out = tl.load(
            grad_out_ptr + mask_id[:, None] * channels + channel[None, :],
            mask=slot_ok[:, None] & channel_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        grad = tl.dot(tl.trans(weights), grad_out, grad, input_precision="ieee")
    tl.store(
        grad_features_ptr + frame.to(tl.int64) * num_patches * channels + cell[:, None] * channels + channel[None, :],
        grad.to(grad_features_ptr.dtype.element_ty),
        mask=cell_ok[:, None] & channel_ok[None, :],
    )


class _FramePooling(torch.autograd.Function):
    """out[p] = weights[p] @ features[frame of p], with the masks grouped by frame; differentiable w.r.t. features."""

    @staticmethod
    def forward(ctx, features, weights, order, frame_start, out_dtype):
        num_frames, num_patches, channels = features.shape
        out = torch.empty(weights.shape[0], channels, device=features.device, dtype=out_dtype)

        def grid(meta):
            return (num_frames, triton.cdiv(channels, meta["BLOCK_C"]))

        _pool_forward_kernel[grid](
            features, weights, order, frame_start, out, num_patches, channels, MASKS_PER_DOT=_MASKS_PER_DOT
        )
        ctx.save_for_backward(weights, order, frame_start)
        ctx.features_shape = features.shape
        ctx.features_dtype = features.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weights, order, frame_start = ctx.saved_tensors
        num_frames, num_patches, channels = ctx.features_shape
        grad_features = torch.empty(ctx.features_shape, device=grad_out.device, dtype=ctx.features_dtype)

        def grid(meta):
            return (num_frames, triton.cdiv(num_patches, meta["BLOCK_CELLS"]), triton.cdiv(channels, meta["BLOCK_C"]))

        _pool_backward_kernel[grid](
            grad_out.contiguous(),
            weights,
            order,
            frame_start,
            grad_features,
            num_patches,
            channels,
            MASKS_PER_DOT=_MASKS_PER_DOT,
        )
        return grad_features, None, None, None, None


def triton_mask_pool(
    features: torch.Tensor,
    masks: torch.Tensor,
    frame_index: torch.Tensor,
    row_taps: tuple[torch.Tensor, ...],
    col_taps: tuple[torch.Tensor, ...],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Mask pooling of validated inputs; called by `region_ops.mask_pool`, which computes the bilinear taps.

    Args:
        features: `[F, h*w, C]` float32/float16/bfloat16.
        masks: `[P, H, W]` bool, integer or float masks.
        frame_index: `[P]` integer frame of each mask, in range.
        row_taps, col_taps: `(index0, index1, weight0, weight1)` each `[P, h]` / `[P, w]`, from `region_ops`.
        out_dtype: dtype of the `[P, C]` result.
    """
    num_frames, num_patches, channels = features.shape
    num_masks, _, canvas_width = masks.shape
    if num_masks == 0:
        return features.new_zeros(0, channels, dtype=out_dtype)
    grid_h, grid_w = row_taps[0].shape[1], col_taps[0].shape[1]
    masks = masks.contiguous()
    if masks.dtype == torch.bool:
        masks = masks.view(torch.uint8)
    row_taps = [tap.contiguous() for tap in row_taps]
    col_taps = [tap.contiguous() for tap in col_taps]
    weights = torch.empty(num_masks, num_patches, device=features.device, dtype=torch.float32)
    _mask_weights_kernel[(num_masks,)](
        masks,
        *row_taps,
        *col_taps,
        weights,
        masks[0].numel(),
        canvas_width,
        grid_h,
        grid_w,
        BLOCK_GRID=triton.next_power_of_2(num_patches),
    )

    frame_index = frame_index.long()
    order = torch.argsort(frame_index, stable=True)
    masks_per_frame = torch.zeros(num_frames + 1, device=features.device, dtype=torch.long)
    masks_per_frame.index_add_(0, frame_index + 1, torch.ones_like(frame_index))
    frame_start = masks_per_frame.cumsum(0)  # masks of frame f are order[frame_start[f]:frame_start[f + 1]]
    return _FramePooling.apply(features.contiguous(), weights, order, frame_start, out_dtype)
