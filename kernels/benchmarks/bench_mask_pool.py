"""Benchmark of mask pooling on the release's shapes against the release's way of computing it.

Shapes: 16 frames x 729 patches (27 x 27) x 1152 channels of SigLIP features; 8 objects with a 384 x 384 mask on each
of the 16 frames (128 masks). Paths: `upstream` (every mask resized with F.interpolate, then the [masks, C, h, w]
product of each resized mask with its frame's feature map, then sums, as the release does), `torch` (the reference
path of `region_ops.mask_pool`) and, on CUDA, `triton`.

    python kernels/benchmarks/bench_mask_pool.py [--device cpu|cuda]
        [--dtype float32|bfloat16|float16] [--repeats N] [--threads T]

Peak memory: on CPU each path runs in its own subprocess, which reports the resident-set high-water mark of one call
above the resident set before it (see `common.cpu_peak_bytes_here`); on CUDA, torch.cuda.max_memory_allocated.
"""

import math

import torch
import torch.nn.functional as F
from common import compare_paths, describe_machine, parse_args, report_child_peak

from transformers_videorefer.region_ops import mask_pool


NUM_FRAMES, GRID, CHANNELS = 16, 27, 1152
NUM_OBJECTS, MASK_SIZE = 8, 384


def build_inputs(device: str, dtype: torch.dtype):
    """Features, one moving ellipse per object and frame, and the frame of each mask (object-major)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(NUM_FRAMES, GRID * GRID, CHANNELS, generator=generator).to(device, dtype)
    frame_index = torch.arange(NUM_FRAMES).repeat(NUM_OBJECTS)
    objects = torch.arange(NUM_OBJECTS).repeat_interleave(NUM_FRAMES)
    center_y = 60 + 30 * objects + 4 * frame_index
    center_x = 80 + 25 * objects + 6 * frame_index
    radius_y = 20 + 5 * objects
    radius_x = 30 + 4 * objects
    coords = torch.arange(MASK_SIZE)
    masks = ((coords[None, :, None] - center_y[:, None, None]) / radius_y[:, None, None]) ** 2 + (
        (coords[None, None, :] - center_x[:, None, None]) / radius_x[:, None, None]
    ) ** 2 <= 1
    return features, masks.to(device), frame_index.to(device)


def upstream_mask_pool(features: torch.Tensor, masks: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    """The release's computation, written for this benchmark: materialises [masks, C, h, w] feature maps."""
    grid = math.isqrt(features.shape[1])
    resized = F.interpolate(masks[None].float(), size=(grid, grid), mode="bilinear", align_corners=False)
    resized = (resized > 0).float().transpose(0, 1)  # [P, 1, h, w]
    area = resized.sum(dim=(-1, -2), keepdim=True) + 1e-8
    feature_maps = features[frame_index].reshape(len(masks), grid, grid, -1).permute(0, 3, 1, 2).float()
    return (feature_maps * resized / area).sum(-1).sum(-1)


def main():
    args = parse_args(__doc__.splitlines()[0], default_repeats=10)
    dtype = getattr(torch, args.dtype)
    features, masks, frame_index = build_inputs(args.device, dtype)
    paths = {
        "upstream": lambda: upstream_mask_pool(features, masks, frame_index),
        "torch": lambda: mask_pool(features, masks, frame_index, out_dtype=torch.float32, backend="torch"),
    }
    if args.device == "cuda":
        paths["triton"] = lambda: mask_pool(features, masks, frame_index, out_dtype=torch.float32, backend="triton")
    if args.memory_of:
        report_child_peak(paths[args.memory_of])
        return

    print(f"mask pooling: features {tuple(features.shape)} {args.dtype}, masks {tuple(masks.shape)} bool")
    print(f"machine: {describe_machine(args.device)}")
    expected = paths["upstream"]()
    # Least memory traffic of one pass: the features once, the 4 stencil pixels per mask and cell, the float32 output.
    useful_bytes = features.numel() * features.element_size() + masks.shape[0] * GRID * GRID * 4 + expected.numel() * 4
    compare_paths(__file__, paths, args, lambda pooled: (pooled - expected).abs().max().item(), useful_bytes)


if __name__ == "__main__":
    main()
