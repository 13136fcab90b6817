"""Relative position bias (Shaw et al. 2018; in the simplified form of T5, Raffel et al. 2020 §2.1).

T5 has no position embeddings. Instead every attention head adds a learned scalar to the score of
query ``i`` and key ``j`` that depends only on the offset ``j - i``. Offsets are grouped into
``num_buckets`` buckets: small offsets get a bucket each, larger ones share logarithmically wider
buckets, and every offset beyond ``max_distance`` falls into the last one, so the model
generalises to longer sequences than it was trained on. A bidirectional (encoder) bias spends half
of the buckets on keys to the left and half on keys to the right; a unidirectional (decoder) bias
only distinguishes keys in the past (keys in the future are masked anyway and share bucket 0).

One bias is computed in the first layer of a stack and added to the scores of every layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def relative_position_bucket(
    relative_position: torch.Tensor,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """Bucket index (same shape, int64) of each ``relative_position = key_pos - query_pos``.

    Layout (bidirectional, 32 buckets): 0..15 for keys at or left of the query, 16..31 for keys to
    its right. Within each half, the first ``half // 2`` buckets are exact distances 0, 1, 2, ...
    and the rest cover distances up to ``max_distance`` on a log scale; farther distances share the
    last bucket. Unidirectional: all ``num_buckets`` buckets describe distances into the past and
    keys in the future map to bucket 0 (the same as distance 0).
    """
    relative_position = relative_position.long()
    if bidirectional:
        num_buckets //= 2
        offset = (relative_position > 0).long() * num_buckets  # keys to the right: upper half
        distance = relative_position.abs()
    else:
        offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)  # only how far back the key is
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets between max_exact and max_distance; clamp(min=1) only avoids log(0) in
    # the positions that torch.where below takes from the exact branch anyway
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return offset + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias for each relative-position bucket.

    ``forward(q_len, k_len, q_offset)`` returns the additive attention bias ``(1, n_heads, q_len,
    k_len)`` for queries at absolute positions ``q_offset .. q_offset + q_len - 1`` and keys at
    ``0 .. k_len - 1``. With a KV cache holding ``L`` earlier tokens and one new query, call it with
    ``q_len=1, k_len=L + 1, q_offset=L``.
    """

    def __init__(
        self,
        n_heads: int,
        num_buckets: int = 32,
        max_distance: int = 128,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)  # bucket -> one scalar per head

    def forward(
        self, q_len: int, k_len: int, q_offset: int = 0, device: torch.device | str | None = None
    ) -> torch.Tensor:
        device = device if device is not None else self.embedding.weight.device
        q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]  # (Tq, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        buckets = relative_position_bucket(
            k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance
        )  # (Tq, Tk)
        bias = self.embedding(buckets)  # (Tq, Tk, nh)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, nh, Tq, Tk)

    def extra_repr(self) -> str:
        return (
            f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, "
            f"max_distance={self.max_distance}, bidirectional={self.bidirectional}"
        )
