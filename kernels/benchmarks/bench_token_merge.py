"""Benchmark of the temporal token merge on the release's shapes against the release's per-object, per-token loop.

Shapes: 256 objects x 16 per-frame tokens x 1152 channels, merged to u = 4 tokens each. Paths: `upstream` (a Python
loop over objects, each merged with a loop over its tokens like the release's `token_merge`), `torch` (the reference
path of `region_ops.temporal_token_merge`) and, on CUDA, `triton`. On CUDA the script also runs both library paths
under `torch.cuda.set_sync_debug_mode("error")` to show that they never synchronise with the host.

    python kernels/benchmarks/bench_token_merge.py [--device cpu|cuda]
        [--dtype float32|bfloat16|float16] [--repeats N] [--threads T]
"""

import torch
import torch.nn.functional as F
from common import compare_paths, describe_machine, parse_args, report_child_peak

from transformers_videorefer.region_ops import temporal_token_merge


NUM_OBJECTS, NUM_FRAMES, CHANNELS, NUM_TOKENS = 256, 16, 1152, 4


def upstream_merge_one(tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """One object's [1, k, C] tokens merged the release's way (a loop over adjacent pairs), written for this script."""
    similarity = (F.normalize(tokens[:, :-1], dim=-1) * F.normalize(tokens[:, 1:], dim=-1)).sum(-1)
    kth_largest = torch.topk(similarity.flatten(), tokens.shape[1] - num_tokens).values[-1]
    groups, run = [], []
    for i in range(similarity.shape[1]):
        run.append(tokens[:, i : i + 1])
        if similarity[0, i] < kth_largest:
            groups.append(torch.cat(run, dim=1).mean(dim=1, keepdim=True))
            run = []
    run.append(tokens[:, -1:])
    groups.append(torch.cat(run, dim=1).mean(dim=1, keepdim=True))
    return torch.cat(groups, dim=1)


def upstream_token_merge(tokens: torch.Tensor, lengths: list[int], num_tokens: int) -> list[torch.Tensor]:
    merged = []
    for n, length in enumerate(lengths):
        object_tokens = tokens[n : n + 1, :length].float()
        merged.append(upstream_merge_one(object_tokens, num_tokens) if length > num_tokens else object_tokens)
    return merged


def max_difference(output, expected: list[torch.Tensor]) -> float:
    """Largest deviation of a path's output (a list like the baseline's, or `(merged, counts)`) from the baseline."""
    if isinstance(output, list):
        merged = output
    else:
        merged_padded, counts = output
        merged = [merged_padded[n : n + 1, :count] for n, count in enumerate(counts.tolist())]
    if [tokens.shape for tokens in merged] != [tokens.shape for tokens in expected]:
        return float("inf")
    return max((got.float() - want).abs().max().item() for got, want in zip(merged, expected, strict=True))


def main():
    args = parse_args(__doc__.splitlines()[0], default_repeats=20)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(NUM_OBJECTS, NUM_FRAMES, CHANNELS, generator=generator).to(
        args.device, getattr(torch, args.dtype)
    )
    lengths = torch.full((NUM_OBJECTS,), NUM_FRAMES)
    host_lengths = lengths.tolist()
    lengths = lengths.to(args.device)
    paths = {
        "upstream": lambda: upstream_token_merge(tokens, host_lengths, NUM_TOKENS),
        "torch": lambda: temporal_token_merge(tokens, lengths, NUM_TOKENS, backend="torch"),
    }
    if args.device == "cuda":
        paths["triton"] = lambda: temporal_token_merge(tokens, lengths, NUM_TOKENS, backend="triton")
    if args.memory_of:
        report_child_peak(paths[args.memory_of])
        return

    print(f"temporal token merge: tokens {tuple(tokens.shape)} {args.dtype}, u = {NUM_TOKENS}")
    print(f"machine: {describe_machine(args.device)}")
    expected = paths["upstream"]()
    useful_bytes = tokens.numel() * tokens.element_size() * (1 + NUM_TOKENS / NUM_FRAMES)  # read tokens, write merged
    compare_paths(__file__, paths, args, lambda output: max_difference(output, expected), useful_bytes)

    if args.device == "cuda":
        for name in ("torch", "triton"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                paths[name]()
                verdict = "no host synchronisation"
            except RuntimeError as error:
                verdict = f"synchronises with the host: {error}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            print(f"{name} path under set_sync_debug_mode('error'): {verdict}")


if __name__ == "__main__":
    main()
