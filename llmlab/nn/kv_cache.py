"""A preallocated key/value cache for autoregressive decoding.

Without a cache, generating token ``t`` re-runs the model over all ``t`` previous tokens. Keys and
values of earlier positions never change in a causal model, so we store them once and each new
step only computes its own. The buffers are allocated up front (``max_len`` positions) and filled
in place: no ``torch.cat`` per step, no reallocation.

Protocol used by a model (see :class:`llmlab.models.gpt.GPT`): each layer calls
``update(layer_idx, k_new, v_new)``, which writes at ``[length, length + T)`` and returns views of
everything cached so far *plus* the new entries; after the last layer the model calls
``advance(T)`` once. Until then ``length`` still says how many tokens were cached *before* this
forward pass, which is also the position of the first new token.
"""

from __future__ import annotations

import torch

from llmlab.errors import UserError


class KVCache:
    """Keys and values of every layer: two ``(n_layer, B, nh, max_len, hs)`` buffers."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if min(n_layer, batch_size, n_head, head_dim, max_len) < 1:
            raise UserError(
                f"KVCache sizes must be positive, got n_layer={n_layer}, batch_size={batch_size}, "
                f"n_head={n_head}, head_dim={head_dim}, max_len={max_len}"
            )
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layer = n_layer
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # tokens cached by completed forward passes

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` (``(B, nh, T, hs)``) after the cached ones; return all ``length + T``."""
        start = self.length
        end = start + k.size(2)
        if end > self.max_len:
            raise UserError(
                f"KV cache overflow: {start} cached + {k.size(2)} new tokens > max_len={self.max_len}; "
                "allocate a bigger cache or reset() it and re-run on a shorter context"
            )
        if k.size(0) != self.batch_size:
            raise UserError(
                f"KV cache was allocated for batch size {self.batch_size} but got {k.size(0)} rows; "
                "create a new cache with the right batch_size"
            )
        self.k[layer_idx, :, :, start:end] = k
        self.v[layer_idx, :, :, start:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]  # (B, nh, end, hs)

    def advance(self, n: int) -> None:
        """Commit ``n`` tokens written by the forward pass that just finished (all layers)."""
        if self.length + n > self.max_len:
            raise UserError(f"cannot advance the KV cache past max_len={self.max_len}")
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens (e.g. rejected speculative drafts)."""
        if not 0 <= length <= self.length:
            raise UserError(f"cannot truncate a KV cache of length {self.length} to {length}")
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``index[i]`` (beam search: each beam keeps its parent's keys/values)."""
        if index.dim() != 1 or index.numel() != self.batch_size:
            raise UserError(f"KV cache reorder needs {self.batch_size} row indices, got shape {tuple(index.shape)}")
        index = index.to(self.k.device)
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)

    def reset(self) -> None:
        """Empty the cache (the buffers are kept and overwritten by the next prefill)."""
        self.length = 0

    @property
    def remaining(self) -> int:
        """How many more tokens fit."""
        return self.max_len - self.length

    def __repr__(self) -> str:
        n_layer, b, nh, max_len, hs = self.k.shape
        return (
            f"KVCache(n_layer={n_layer}, batch_size={b}, n_head={nh}, head_dim={hs}, "
            f"length={self.length}/{max_len}, dtype={self.k.dtype}, device={self.k.device})"
        )
