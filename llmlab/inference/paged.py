"""A paged KV cache: PagedAttention's memory manager (Kwon et al., SOSP 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention", §4; vLLM's block pool design).

A contiguous cache reserves ``max_len`` slots per sequence up front; most of them stay empty (on
uniform lengths about half, see :mod:`llmlab.bench.kv`). Here keys and values live in fixed-size
**blocks** of ``block_size`` tokens taken from one pool per layer, shaped
``[num_blocks, 2 (K, V), n_head, block_size, head_dim]`` in the model's dtype. Each sequence has a
**block table**: logical block ``j`` (tokens ``j*B .. j*B + B - 1``) is physical block ``table[j]``,
so token ``t`` lives in slot ``(table[t // B], t % B)``. How full the last block is follows from the
sequence length, it is never stored on the (possibly shared) block. A sequence takes a new block only
when its last one is full, so at most ``B - 1`` slots per sequence are wasted.

Sharing (§4.4): :meth:`PagedKVCache.fork` copies a table and increments the blocks' reference counts
(parallel samples and beams share the prompt's blocks). Writing into a block that another table
also points at first copies it (**copy-on-write**: a fresh block gets the filled slots, the old
one loses a reference, the table points at the copy), so only full prefix blocks stay shared. With
``enable_prefix_caching`` full prompt blocks are also found by hash across requests (see
:mod:`llmlab.inference.block_pool`). Running out of blocks raises :class:`KVCacheOOM` before anything
changes; the scheduler preempts and retries.

:meth:`PagedKVCache.view` gives a batch of sequences the KV-cache protocol of
:class:`llmlab.nn.kv_cache.KVCache`, so :class:`llmlab.models.gpt.GPT` runs on it unchanged:
``update`` writes each row's new keys/values into its slots and returns the rows gathered into a
padded ``(B, nh, L + T, hs)`` tensor (``L`` = the longest row; a shorter row's cached tokens are
right-aligned behind masked padding), and :meth:`PagedBatch.attention_mask` gives the matching 0/1 mask, with
which GPT computes every row exactly as if it were alone (positions count real tokens only). So a
ragged batch of decodes is one forward pass. :func:`paged_attention` is the reference kernel that
reads K/V straight through the block tables instead (index_select + tail mask), as vLLM's CUDA
kernel does, and equals contiguous attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
import torch.nn as nn

from llmlab.errors import UserError
from llmlab.inference.block_pool import BlockPool, KVCacheOOM

__all__ = ["KVCacheOOM", "PagedBatch", "PagedKVCache", "PagedLM", "paged_attention", "ragged_mask"]


@dataclass
class _Sequence:
    """One sequence's view of the pool."""

    table: list[int] = field(default_factory=list)  # physical block of each logical block
    length: int = 0  # tokens whose K/V are written (committed by a finished forward pass)
    tokens: list[int] = field(default_factory=list)  # known token ids (prompt, extend_tokens): for prefix hashes
    hashes: list[int] = field(default_factory=list)  # prefix hash of each leading full block already published

    def copy(self) -> _Sequence:
        return _Sequence(list(self.table), self.length, list(self.tokens), list(self.hashes))


class PagedKVCache:
    """Block pools of every layer plus the block tables of the sequences using them.

    Args:
        n_layer, n_head, head_dim: the model's attention shape (``n_head`` = KV heads).
        num_blocks: physical blocks per layer (vLLM ``num_gpu_blocks``).
        block_size: tokens per block (vLLM default 16).
        device, dtype: of the pools (the model's).
        enable_prefix_caching: find full prompt blocks of earlier sequences by hash and share them.
    """

    def __init__(
        self,
        n_layer: int,
        n_head: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        enable_prefix_caching: bool = False,
    ) -> None:
        sizes = dict(n_layer=n_layer, n_head=n_head, head_dim=head_dim, num_blocks=num_blocks, block_size=block_size)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise UserError(f"paged KV cache sizes must be positive integers, got {', '.join(bad)}")
        self.n_layer, self.n_head, self.head_dim = n_layer, n_head, head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        # pool[layer] is that layer's [num_blocks, 2, n_head, block_size, head_dim]
        self.pool = torch.zeros(n_layer, num_blocks, 2, n_head, block_size, head_dim, device=device, dtype=dtype)
        self.blocks = BlockPool(num_blocks, enable_prefix_caching)
        self.seqs: dict[Hashable, _Sequence] = {}
        self.peak_blocks_in_use = 0

    @classmethod
    def for_model(cls, model: nn.Module, num_blocks: int, block_size: int = 16, *,
                  enable_prefix_caching: bool = False) -> PagedKVCache:
        """A cache shaped for ``model`` (a GPT: ``config.n_layer / n_head / head_dim``), on its device and dtype."""
        c = model.config
        ref = next(model.parameters())
        return cls(c.n_layer, c.n_head, c.n_embd // c.n_head, num_blocks, block_size, device=ref.device,
                   dtype=ref.dtype, enable_prefix_caching=enable_prefix_caching)

    # ------------------------------------------------------------------ accounting
    @property
    def enable_prefix_caching(self) -> bool:
        return self.blocks.enable_prefix_caching

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def blocks_in_use(self) -> int:
        return self.blocks.num_used

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers: 2 x n_layer x n_head x block_size x head_dim x elem."""
        return self.pool[:, 0].numel() * self.pool.element_size()

    def can_append(self, n_seqs: int = 1) -> bool:
        """Whether ``n_seqs`` sequences can each append one token in the worst case (one new block each)."""
        return self.num_free_blocks >= n_seqs

    def stats(self) -> dict[str, int]:
        """Blocks in use / free / cached, the peak, and prefix-cache hits and lookups."""
        return {"blocks_in_use": self.blocks_in_use, "free_blocks": self.num_free_blocks,
                "cached_blocks": self.blocks.num_cached, "peak_blocks_in_use": self.peak_blocks_in_use,
                "prefix_cache_hits": self.blocks.hits, "prefix_cache_queries": self.blocks.queries}

    def _track_peak(self) -> None:
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.blocks_in_use)

    # ------------------------------------------------------------------ sequences
    def _seq(self, seq_id: Hashable) -> _Sequence:
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise UserError(f"no sequence {seq_id!r} in the paged KV cache: add_sequence() it first") from None

    def add_sequence(self, seq_id: Hashable, token_ids: Sequence[int] | None = None) -> int:
        """Register a sequence and reserve blocks for its prompt ``token_ids``; returns how many
        leading tokens already have their K/V cached (prefix-cache hits; 0 without prefix caching),
        which the caller skips in the prefill (it feeds ``token_ids[cached:]``).

        A fully cached prompt still recomputes its last token (the caller needs its logits), so
        at most ``len(token_ids) - 1`` tokens are reported cached.
        """
        if seq_id in self.seqs:
            raise UserError(f"sequence {seq_id!r} is already in the paged KV cache: free() it or use another id")
        tokens = [int(t) for t in token_ids] if token_ids is not None else []
        B = self.block_size
        hits, hashes, parent = [], [], None
        if self.enable_prefix_caching:
            for j in range(len(tokens) // B):
                key = self.blocks.block_key(parent, tuple(tokens[j * B : (j + 1) * B]))
                block = self.blocks.lookup(key)
                if block is None:
                    break
                hits.append(block)
                parent = hash(key)
                hashes.append(parent)
        needed = math.ceil(len(tokens) / B) - len(hits)
        revived = sum(self.blocks.ref_counts[b] == 0 for b in hits)  # evictable hits leave the free count
        self.blocks.check(needed, taken=revived, what=f"a prompt of {len(tokens)} tokens")
        for b in hits:
            self.blocks.incref(b)
        table = hits + self.blocks.allocate(needed)
        cached = min(len(hits) * B, max(len(tokens) - 1, 0))
        self.seqs[seq_id] = _Sequence(table, cached, tokens, hashes)
        self._track_peak()
        return cached

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """``child_id`` starts as a copy of ``parent_id`` sharing all its blocks (ref counts + 1)."""
        parent = self._seq(parent_id)
        if child_id in self.seqs:
            raise UserError(f"sequence {child_id!r} is already in the paged KV cache: fork into a new id")
        for b in parent.table:
            self.blocks.incref(b)
        self.seqs[child_id] = parent.copy()

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence; each of its blocks loses a reference and is free again at 0."""
        self._release(self._seq(seq_id).table)
        del self.seqs[seq_id]

    def free_all(self) -> None:
        for seq_id in list(self.seqs):
            self.free(seq_id)

    def _release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # tail blocks first: they become the first evicted (vLLM's order)
            self.blocks.decref(b)

    def length(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).length

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id).table)

    def extend_tokens(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Tell the cache token ids appended after the prompt, so that blocks filled while decoding
        can be published in the prefix cache too (optional; only the prompt's otherwise)."""
        self._seq(seq_id).tokens.extend(int(t) for t in token_ids)

    def truncate_sequence(self, seq_id: Hashable, length: int) -> None:
        """Keep the first ``length`` tokens of a sequence (speculative rollback); later blocks are freed."""
        s = self._seq(seq_id)
        if not 0 <= length <= s.length:
            raise UserError(f"cannot truncate sequence {seq_id!r} of length {s.length} to {length}")
        keep = math.ceil(length / self.block_size)
        self._release(s.table[keep:])
        del s.table[keep:]
        del s.hashes[length // self.block_size :]
        del s.tokens[length:]
        s.length = length

    def kv(self, seq_id: Hashable, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's cached keys and values of one layer, contiguous ``(n_head, length, head_dim)`` each."""
        s = self._seq(seq_id)
        pos = torch.arange(s.length, device=self.pool.device)
        table = torch.tensor(s.table, dtype=torch.long, device=self.pool.device)
        kv = self.pool[layer_idx][table[pos // self.block_size], :, :, pos % self.block_size]  # (len, 2, nh, hs)
        return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)

    # ------------------------------------------------------------------ writing
    def blocks_needed(self, seq_ids: Sequence[Hashable], num_new: int | Sequence[int] = 1) -> int:
        """Exactly how many free blocks writing ``num_new`` more tokens to each sequence takes: new blocks
        past the tables' ends plus copies of shared blocks about to be written (a block shared by two
        of these sequences is copied by the first only; the second then owns it)."""
        if isinstance(num_new, int):
            num_new = [num_new] * len(seq_ids)
        B = self.block_size
        refs: dict[int, int] = {}
        needed = 0
        for seq_id, t in zip(seq_ids, num_new):
            s = self._seq(seq_id)
            if t == 0:
                continue
            first, last = s.length // B, (s.length + t - 1) // B
            for j in range(first, min(last + 1, len(s.table))):
                b = s.table[j]
                ref = refs.get(b, self.blocks.ref_counts[b])
                if ref > 1:
                    needed += 1
                    refs[b] = ref - 1
            needed += max(0, last + 1 - len(s.table))
        return needed

    def _reserve(self, seq_ids: Sequence[Hashable], num_new: Sequence[int]) -> None:
        """Make room for ``num_new[i]`` tokens after sequence ``i``'s committed ones: copy-on-write
        of shared blocks about to be written, and new blocks past the table's end. All or nothing:
        :meth:`blocks_needed` are counted first and :class:`KVCacheOOM` leaves everything as it was."""
        B = self.block_size
        needed = self.blocks_needed(seq_ids, num_new)
        self.blocks.check(needed, what=f"{sum(num_new)} new token(s) of {len(seq_ids)} sequence(s)")
        for seq_id, t in zip(seq_ids, num_new):
            s = self.seqs[seq_id]
            if t == 0:
                continue
            first, last = s.length // B, (s.length + t - 1) // B
            del s.hashes[first:]  # blocks from `first` on change: their published hashes no longer apply
            for j in range(first, min(last + 1, len(s.table))):
                old = s.table[j]
                if self.blocks.ref_counts[old] > 1:  # copy-on-write
                    (new,) = self.blocks.allocate(1)
                    filled = min(B, s.length - j * B)  # slots of this sequence written so far
                    if filled > 0:
                        self.pool[:, new, :, :, :filled] = self.pool[:, old, :, :, :filled]
                    self.blocks.decref(old)
                    s.table[j] = new
                elif self.blocks.is_cached(old):  # our own cached block: it is about to change
                    self.blocks.uncache(old)
            s.table.extend(self.blocks.allocate(max(0, last + 1 - len(s.table))))
        self._track_peak()

    def _commit(self, seq_ids: Sequence[Hashable], num_new: Sequence[int]) -> None:
        """The new tokens' K/V are written in every layer: count them, publish newly full blocks."""
        B = self.block_size
        for seq_id, t in zip(seq_ids, num_new):
            s = self.seqs[seq_id]
            s.length += t
            if not self.enable_prefix_caching:
                continue
            parent = s.hashes[-1] if s.hashes else None
            for j in range(len(s.hashes), min(s.length, len(s.tokens)) // B):
                key = self.blocks.block_key(parent, tuple(s.tokens[j * B : (j + 1) * B]))
                self.blocks.register(s.table[j], key)
                parent = hash(key)
                s.hashes.append(parent)

    # ------------------------------------------------------------------ batches
    def view(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int] | None = None) -> PagedBatch:
        """These sequences as one batch with the KV-cache protocol (see :class:`PagedBatch`)."""
        return PagedBatch(self, seq_ids, num_new_tokens)

    def as_kv_cache(self, batch_size: int, prefix: str = "row") -> PagedBatch:
        """``batch_size`` new empty sequences (``"row0"``, ...) viewed as one cache, like
        :class:`~llmlab.nn.kv_cache.KVCache` (for :func:`~llmlab.inference.generate.generate`)."""
        ids = [f"{prefix}{i}" for i in range(batch_size)]
        for seq_id in ids:
            self.add_sequence(seq_id)
        return self.view(ids)

    def __repr__(self) -> str:
        return (f"PagedKVCache(n_layer={self.n_layer}, n_head={self.n_head}, head_dim={self.head_dim}, "
                f"num_blocks={self.num_blocks}, block_size={self.block_size}, free={self.num_free_blocks}, "
                f"sequences={len(self.seqs)}, prefix_caching={self.enable_prefix_caching}, dtype={self.pool.dtype})")


class PagedBatch:
    """Sequences of a :class:`PagedKVCache` as one KV cache for a model's forward pass.

    Row ``b`` is ``seq_ids[b]`` with ``len_b`` cached tokens; ``length`` = ``L`` = the longest. The
    forward feeds ``(B, T)`` tokens; row ``b``'s new tokens are the LAST ``num_new_tokens[b]`` of
    them (default all ``T``: a decode step or equal prompts; fewer: a left-padded ragged prefill,
    the pad tokens are not stored). :meth:`update` returns keys/values laid out as
    ``[L - len_b padding | len_b cached | T - t_b padding | t_b new]`` per row (padding holds some
    finite value of the pool), and
    :meth:`attention_mask` marks exactly the real ones. Pass that mask to the model.
    """

    def __init__(self, cache: PagedKVCache, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int] | None = None):
        for seq_id in seq_ids:
            cache._seq(seq_id)
        if len(set(seq_ids)) != len(seq_ids):
            raise UserError("a paged batch cannot hold the same sequence twice: fork() it into a new id")
        self.cache = cache
        self.seq_ids = list(seq_ids)
        self.num_new_tokens = None if num_new_tokens is None else [int(t) for t in num_new_tokens]
        if self.num_new_tokens is not None and len(self.num_new_tokens) != len(self.seq_ids):
            raise UserError(f"num_new_tokens has {len(self.num_new_tokens)} entries for {len(self.seq_ids)} sequences")
        self._plan: _Plan | None = None  # index tensors of the forward pass in progress

    # the KVCache protocol -------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    @property
    def lengths(self) -> list[int]:
        return [self.cache.seqs[s].length for s in self.seq_ids]

    @property
    def length(self) -> int:
        """Tokens cached before the current forward pass, of the longest row."""
        return max(self.lengths, default=0)

    @property
    def k(self) -> torch.Tensor:
        """The pools (GPT reads ``.k.dtype`` when a prefix tuner writes into the cache)."""
        return self.cache.pool

    v = k

    def _new_counts(self, T: int) -> list[int]:
        if self.num_new_tokens is None:
            return [T] * self.batch_size
        if max(self.num_new_tokens, default=0) > T:
            raise UserError(f"num_new_tokens={self.num_new_tokens} but the forward pass feeds only {T} tokens per row")
        return self.num_new_tokens

    def attention_mask(self, T: int) -> torch.Tensor:
        """``(B, L + T)`` long, 1 on each row's cached and new tokens, 0 on the padding (from the rows'
        lengths and new-token counts alone: no block tables are read)."""
        return ragged_mask(self.lengths, self._new_counts(T), T, self.cache.pool.device).long()

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new ``k``/``v`` (``(B, nh, T, hs)``) into its slots; return the gathered
        ``(B, nh, L + T, hs)`` keys and values (layout in the class docstring). The first call of a
        forward pass reserves the blocks of every row (copy-on-write, new blocks; or
        :class:`KVCacheOOM` with nothing changed)."""
        Bn, _, T, _ = k.shape
        if Bn != self.batch_size:
            raise UserError(f"paged batch has {self.batch_size} sequences but the forward pass has {Bn} rows")
        if self._plan is None:
            counts = self._new_counts(T)
            self.cache._reserve(self.seq_ids, counts)
            self._plan = _Plan.build(self, T)
        plan = self._plan
        if plan.T != T:
            raise UserError(f"update() with {T} tokens in a forward pass of {plan.T}")
        pool = self.cache.pool[layer_idx]  # (num_blocks, 2, nh, bs, hs)
        new = torch.stack([k, v], dim=2).permute(0, 3, 2, 1, 4)  # (B, T, 2, nh, hs)
        pool[plan.w_block, :, :, plan.w_offset] = new[plan.w_row, plan.w_col].to(pool.dtype)
        # padding columns read some written slot of the pool (finite: the pool starts at zero and only
        # ever receives real keys/values); the attention mask hides them, so no masked_fill is needed
        kv = pool[plan.r_block, :, :, plan.r_offset].permute(2, 0, 3, 1, 4)  # (2, B, nh, L + T, hs)
        return kv[0], kv[1]

    def advance(self, n: int) -> None:
        """Commit the forward pass that just wrote ``n`` tokens per row (each row its own count)."""
        if self._plan is None:
            if n:
                raise UserError(f"advance({n}) without a forward pass writing into the paged cache")
            return
        if n != self._plan.T:
            raise UserError(f"advance({n}) after a forward pass of {self._plan.T} tokens")
        self.cache._commit(self.seq_ids, self._plan.counts)
        self._plan = None

    def truncate(self, length: int) -> None:
        """Forget the last ``self.length - length`` tokens of every row (speculative rollback)."""
        drop = self.length - length
        if drop < 0 or any(n < drop for n in self.lengths):
            raise UserError(f"cannot truncate a paged batch with lengths {self.lengths} to {length}")
        for seq_id, n in zip(self.seq_ids, self.lengths):
            self.cache.truncate_sequence(seq_id, n - drop)

    def reorder(self, index: torch.Tensor | Sequence[int]) -> None:
        """Row ``i`` continues old row ``index[i]``'s sequence (beam search): block tables are copied
        and ref counts moved, no K/V is copied; shared blocks are copied on the next write only."""
        index = [int(i) for i in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        if len(index) != self.batch_size or not all(0 <= i < self.batch_size for i in index):
            raise UserError(f"paged batch reorder needs {self.batch_size} row indices in range, got {index}")
        seqs = self.cache.seqs
        old = [seqs[s] for s in self.seq_ids]
        for seq_id, i in zip(self.seq_ids, index):
            for b in old[i].table:
                self.cache.blocks.incref(b)
            seqs[seq_id] = old[i].copy()
        for s in old:
            self.cache._release(s.table)

    def reset(self) -> None:
        """Empty every row (their blocks are freed; the sequences stay registered)."""
        for seq_id in self.seq_ids:
            self.cache.free(seq_id)
            self.cache.add_sequence(seq_id)
        self._plan = None

    def __repr__(self) -> str:
        return f"PagedBatch(seq_ids={self.seq_ids}, lengths={self.lengths})"


@dataclass
class _Plan:
    """Index tensors of one forward pass over a :class:`PagedBatch`."""

    T: int
    counts: list[int]
    valid: torch.Tensor  # (B, L + T) bool: a real cached or new token
    r_block: torch.Tensor  # (B, L + T) physical block to read each column from
    r_offset: torch.Tensor  # (B, L + T) slot in that block
    w_row: torch.Tensor  # (N,) input row of each new token
    w_col: torch.Tensor  # (N,) input column (0 .. T-1)
    w_block: torch.Tensor  # (N,) destination block
    w_offset: torch.Tensor  # (N,) destination slot

    @staticmethod
    def build(batch: PagedBatch, T: int) -> _Plan:
        cache = batch.cache
        dev, bs = cache.pool.device, cache.block_size
        counts = batch._new_counts(T)
        lens = torch.tensor(batch.lengths, dtype=torch.long, device=dev)  # (B,)
        new = torch.tensor(counts, dtype=torch.long, device=dev)  # (B,)
        L = int(lens.max()) if len(lens) else 0
        col = torch.arange(L + T, device=dev)[None, :]  # (1, L + T)
        pad_new = (L + T - new)[:, None]  # first column of each row's new tokens
        cached_pos = col - (L - lens)[:, None]
        pos = torch.where(col < L, cached_pos, lens[:, None] + col - pad_new)  # token position per column
        valid = ragged_mask(batch.lengths, counts, T, dev)
        pos = torch.where(valid, pos, torch.zeros_like(pos))
        tables = [cache.seqs[s].table for s in batch.seq_ids]
        width = max((len(t) for t in tables), default=0) or 1
        table = torch.zeros(len(tables), width, dtype=torch.long)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        table = table.to(dev)
        blk_idx = (pos // bs).clamp(max=width - 1)  # the clamp only touches invalid (masked) columns
        r_block = table.gather(1, blk_idx)
        r_offset = pos % bs
        w_row, w_colk = (valid & (col >= L)).nonzero(as_tuple=True)  # new tokens: columns >= L
        return _Plan(T, counts, valid, r_block, r_offset, w_row, w_colk - L, r_block[w_row, w_colk],
                     r_offset[w_row, w_colk])


def ragged_mask(lengths: Sequence[int], num_new: Sequence[int], T: int, device=None) -> torch.Tensor:
    """``(B, L + T)`` bool mask of a forward pass over a :class:`PagedBatch` whose row ``b`` holds
    ``lengths[b]`` cached tokens and feeds ``num_new[b]`` new ones in ``T`` columns: the row's layout
    ``[L - len_b padding | len_b cached | T - t_b padding | t_b new]`` (``L`` = the longest row), True on
    the cached and new tokens. :meth:`PagedBatch.attention_mask` is this as 0/1 long."""
    lens = torch.tensor(list(lengths), dtype=torch.long, device=device)  # (B,)
    new = torch.tensor(list(num_new), dtype=torch.long, device=device)  # (B,)
    L = int(lens.max()) if len(lens) else 0
    col = torch.arange(L + T, device=device)[None, :]  # (1, L + T)
    return torch.where(col < L, col >= (L - lens)[:, None], col >= (L + T - new)[:, None])


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each sequence's last queries over its K/V read through its block table.

    Args:
        q: ``(B, nh, hs)`` one query per sequence (decode), or ``(B, nh, Tq, hs)``: the last ``Tq``
            positions of each context, causal among themselves.
        k_pool, v_pool: ``(num_blocks, nh, block_size, hs)``, e.g. ``pool[layer][:, 0]`` and ``[:, 1]``.
        block_tables: ``(B, max_blocks)`` long, each row's table padded with any valid block id.
        context_lens: ``(B,)`` tokens of each sequence, the queries' own included.
        scale: score multiplier, default ``1 / sqrt(hs)``.

    Returns ``softmax(q kᵀ · scale + mask) v`` of shape ``q.shape``. The keys are gathered with
    ``index_select`` over the flattened tables and reshaped to ``(B, nh, max_blocks * bs, hs)``; the
    mask hides the tail beyond each context (and the future of each query).
    """
    squeeze = q.dim() == 3
    if squeeze:
        q = q.unsqueeze(2)
    Bn, nh, Tq, hs = q.shape
    n_blk = block_tables.size(1)
    bs = k_pool.size(2)

    def gather(p: torch.Tensor) -> torch.Tensor:  # (B, nh, n_blk * bs, hs)
        g = p.index_select(0, block_tables.reshape(-1)).view(Bn, n_blk, nh, bs, -1)
        return g.permute(0, 2, 1, 3, 4).reshape(Bn, nh, n_blk * bs, -1)

    k, v = gather(k_pool), gather(v_pool)
    key_pos = torch.arange(n_blk * bs, device=q.device)  # (S,)
    q_pos = context_lens[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]  # (B, Tq) absolute positions
    visible = key_pos[None, None, :] <= q_pos[:, :, None]  # (B, Tq, S): inside the context and not in the future
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(hs))  # (B, nh, Tq, S)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, nh, Tq, hs)
    return out.squeeze(2) if squeeze else out


class PagedLM(nn.Module):
    """``model`` whose ``new_kv_cache`` returns a paged view, so that
    :func:`~llmlab.inference.generate.generate` and :func:`~llmlab.inference.beam.beam_search` run on a
    :class:`PagedKVCache` unchanged (each call frees the previous call's sequences)."""

    def __init__(self, model: nn.Module, cache: PagedKVCache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache
        self.config = model.config

    @property
    def num_virtual_tokens(self) -> int:
        return int(getattr(self.model, "num_virtual_tokens", 0) or 0)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> PagedBatch:
        self.cache.free_all()
        return self.cache.as_kv_cache(batch_size)
