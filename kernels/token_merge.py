"""Temporal token merge in Triton: one launch, one program per object, no host synchronisation.

Each program streams its object's tokens three times over channel blocks: squared norms, cosine similarity of adjacent
tokens (normalise, then dot, as F.normalize does), and finally the averages of the merged groups. In between it ranks
the similarities in registers: the k-th largest of the k - u candidates is the smallest similarity that fewer than
k - u others exceed, which keeps the release's tie behaviour (every pair equal to it merges). The backward pass is a
gather in PyTorch: each token receives its group's output gradient divided by the group size.
"""

import torch
import triton
import triton.language as tl


_NORM_EPS: tl.constexpr = tl.constexpr(1e-12)  # F.normalize's default eps
# Upper bound on the [slots, tokens, channels] product the averaging step holds in registers.
_AVERAGING_TILE = 8192


@triton.jit
def _load_token_pair(token_base, token, channel, length, channels):
    """Tokens `token` and `token + 1` for a channel block, float32, zero outside the object."""
    channel_ok = channel < channels
    current = tl.load(
        token_base + token[:, None] * channels + channel[None, :],
        mask=(token < length)[:, None] & channel_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    following = tl.load(
        token_base + (token + 1)[:, None] * channels + channel[None, :],
        mask=(token + 1 < length)[:, None] & channel_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    return current, following


@triton.jit
def _token_merge_kernel(
    tokens_ptr,
    lengths_ptr,
    merged_ptr,
    counts_ptr,
    group_ptr,
    token_weight_ptr,
    max_length,
    channels,
    num_tokens,
    num_slots,
    BLOCK_K: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    obj = tl.program_id(0).to(tl.int64)
    length = tl.load(lengths_ptr + obj)
    token = tl.arange(0, BLOCK_K)
    token_ok = token < length
    pair_ok = token + 1 < length  # pair i = tokens (i, i + 1)
    token_base = tokens_ptr + obj * max_length * channels

    squared_norm = tl.zeros((BLOCK_K,), dtype=tl.float32)
    squared_norm_next = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for channel_start in range(0, channels, BLOCK_C):
        channel = channel_start + tl.arange(0, BLOCK_C)
        current, following = _load_token_pair(token_base, token, channel, length, channels)
        squared_norm += tl.sum(current * current, axis=1)
        squared_norm_next += tl.sum(following * following, axis=1)
    norm = tl.maximum(tl.sqrt(squared_norm), _NORM_EPS)
    norm_next = tl.maximum(tl.sqrt(squared_norm_next), _NORM_EPS)

    similarity = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for channel_start in range(0, channels, BLOCK_C):
        channel = channel_start + tl.arange(0, BLOCK_C)
        current, following = _load_token_pair(token_base, token, channel, length, channels)
        similarity += tl.sum((current / norm[:, None]) * (following / norm_next[:, None]), axis=1)

    num_removed = length - num_tokens
    candidate = tl.where(pair_ok, similarity, float("-inf"))
    num_greater = tl.sum((candidate[None, :] > candidate[:, None]).to(tl.int32), axis=1)
    kth_largest = tl.min(tl.where(pair_ok & (num_greater < num_removed), candidate, float("inf")), axis=0)
    boundary = (pair_ok & ((num_removed <= 0) | (similarity < kth_largest))).to(tl.int32)
    group = tl.cumsum(boundary, axis=0) - boundary  # number of boundaries before each token
    tl.store(counts_ptr + obj, (tl.sum(boundary, axis=0) + 1).to(tl.int64))

    slot = tl.arange(0, BLOCK_U)
    member = ((group[None, :] == slot[:, None]) & token_ok[None, :]).to(tl.float32)  # [U, K]
    averaging = member / tl.maximum(tl.sum(member, axis=1), 1.0)[:, None]
    token_in_range = token < max_length
    tl.store(group_ptr + obj * max_length + token, group.to(tl.int64), mask=token_in_range)
    tl.store(token_weight_ptr + obj * max_length + token, tl.sum(averaging, axis=0), mask=token_in_range)

    merged_base = merged_ptr + obj * num_slots * channels
    for channel_start in range(0, channels, BLOCK_C):
        channel = channel_start + tl.arange(0, BLOCK_C)
        channel_ok = channel < channels
        tokens = tl.load(
            token_base + token[:, None] * channels + channel[None, :],
            mask=token_ok[:, None] & channel_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        merged = tl.sum(averaging[:, :, None] * tokens[None, :, :], axis=1)
        tl.store(
            merged_base + slot[:, None] * channels + channel[None, :],
            merged.to(merged_ptr.dtype.element_ty),
            mask=(slot < num_slots)[:, None] & channel_ok[None, :],
        )


class _TokenMerge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, lengths, num_tokens):
        num_objects, max_length, channels = tokens.shape
        num_slots = min(max_length, num_tokens)
        merged = torch.empty(num_objects, num_slots, channels, device=tokens.device, dtype=tokens.dtype)
        counts = torch.empty(num_objects, device=tokens.device, dtype=torch.long)
        group = torch.empty(num_objects, max_length, device=tokens.device, dtype=torch.long)
        token_weight = torch.empty(num_objects, max_length, device=tokens.device, dtype=torch.float32)
        if num_objects > 0:
            block_k = triton.next_power_of_2(max_length)
            block_u = triton.next_power_of_2(num_slots)
            block_c = min(128, max(16, triton.next_power_of_2(_AVERAGING_TILE // (block_k * block_u))))
            _token_merge_kernel[(num_objects,)](
                tokens,
                lengths,
                merged,
                counts,
                group,
                token_weight,
                max_length,
                channels,
                num_tokens,
                num_slots,
                BLOCK_K=block_k,
                BLOCK_U=block_u,
                BLOCK_C=block_c,
                num_warps=4,
            )
        ctx.save_for_backward(group, token_weight)
        ctx.tokens_dtype = tokens.dtype
        ctx.mark_non_differentiable(counts)
        return merged, counts

    @staticmethod
    def backward(ctx, grad_merged, grad_counts):
        group, token_weight = ctx.saved_tensors
        channels = grad_merged.shape[-1]
        spread = grad_merged.to(torch.float32).gather(1, group[:, :, None].expand(-1, -1, channels))
        return (spread * token_weight[:, :, None]).to(ctx.tokens_dtype), None, None


def triton_temporal_token_merge(
    tokens: torch.Tensor, lengths: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token merge of validated inputs (`lengths` int64 within [1, K]); see `region_ops.temporal_token_merge`."""
    return _TokenMerge.apply(tokens.contiguous(), lengths.contiguous(), num_tokens)
