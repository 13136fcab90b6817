"""The physical-block allocator behind the paged KV cache (Kwon et al., SOSP 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention", §4.2-4.4; prefix caching as in
vLLM v1's ``docs/design/prefix_caching.md``).

This module only does the bookkeeping, on block *ids*; the key/value tensors live in
:class:`llmlab.inference.paged.PagedKVCache`. Three pieces of state:

* **reference counts**, one per physical block: how many sequences' block tables point at it
  (``fork`` shares a parent's blocks instead of copying them; a block is free again at 0);
* a **free list** (a deque): freed blocks go to the tail and are taken from the head, so the block
  freed longest ago is reused first;
* with prefix caching, a **hash table** ``key -> block`` for FULL blocks whose K/V are written, the
  key of logical block ``j`` being ``(hash of block j-1's key, block j's token ids)``: equal keys
  mean equal token prefixes up to and including this block, hence equal keys/values (a causal
  model's K/V at a position depend only on the tokens up to it). A cached block whose ref count
  drops to 0 is not wiped: it waits in an LRU of *evictable* blocks, and a later sequence with the
  same prefix takes it back (a hit). It is evicted (its hash dropped, its slots reused) only when
  the free list is empty. Keys store the token tuple itself, so a hash collision cannot alias two
  different blocks.

Out of memory is a typed :class:`KVCacheOOM`, raised *before* any state changes: an allocation
either fully succeeds or leaves everything as it was (the seed returned ``None`` from one call and
raised ``MemoryError`` from another, after partial changes).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Hashable


class KVCacheOOM(RuntimeError):
    """The block pool cannot hold what was asked: ``needed`` blocks, ``free`` available.

    Nothing was allocated or changed. The caller (a scheduler) preempts a sequence, e.g. frees it and
    recomputes it later (vLLM's ``preemption_mode="recompute"``), then retries.
    """

    def __init__(self, needed: int, free: int, what: str = "") -> None:
        self.needed = needed
        self.free = free
        detail = f" for {what}" if what else ""
        super().__init__(f"KV cache out of memory: need {needed} free block(s){detail}, have {free}")


class BlockPool:
    """Ref counts, free list and (optional) prefix-cache hash table of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, not cached; head = freed longest ago
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached; first = least recent
        self._cached: dict[Hashable, int] = {}  # prefix key -> block
        self._key_of: dict[int, Hashable] = {}  # block -> its prefix key
        self.hits = 0  # prefix-cache lookups that found a block
        self.queries = 0  # prefix-cache lookups

    # ------------------------------------------------------------------ counts
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never used / freed, plus cached ones with no user."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks currently registered in the prefix cache (in use or evictable)."""
        return len(self._key_of)

    # ------------------------------------------------------------------ allocation
    def check(self, needed: int, *, taken: int = 0, what: str = "") -> None:
        """Raise :class:`KVCacheOOM` unless ``needed`` blocks can be allocated after ``taken``
        evictable blocks have been claimed back by prefix-cache hits."""
        free = self.num_free - taken
        if needed > free:
            raise KVCacheOOM(needed, free, what)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks with ref count 1 (all or nothing)."""
        self.check(n)
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:  # free list empty: evict the least recently used cached block
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._key_of.pop(block)]
            self.ref_counts[block] = 1
            out.append(block)
        return out

    def incref(self, block: int) -> None:
        """One more table points at ``block`` (fork, or a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            self._evictable.pop(block)  # only cached blocks can be revived at ref 0
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        """One table fewer; at 0 the block is free (kept for reuse if it is cached)."""
        if self.ref_counts[block] < 1:
            raise RuntimeError(f"block {block} freed more often than allocated")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self._key_of:
                self._evictable[block] = None  # most recently used end
            else:
                self._free.append(block)

    # ------------------------------------------------------------------ prefix cache
    @staticmethod
    def block_key(parent_hash: int | None, tokens: tuple[int, ...]) -> tuple:
        """Prefix-cache key of a full block: its parent's hash and its own token ids."""
        return (parent_hash, tokens)

    def lookup(self, key: Hashable) -> int | None:
        """The cached block with this key, or None (counts hits and queries)."""
        self.queries += 1
        block = self._cached.get(key)
        self.hits += block is not None
        return block

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def register(self, block: int, key: Hashable) -> None:
        """Publish a full, written block under ``key`` (no-op if the key already has a block or
        prefix caching is off: duplicates are tolerated until freed, as in vLLM)."""
        if self.enable_prefix_caching and key not in self._cached and block not in self._key_of:
            self._cached[key] = block
            self._key_of[block] = key

    def uncache(self, block: int) -> None:
        """Drop ``block``'s hash before its only owner overwrites it (its contents change)."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._cached[key]
            if self.ref_counts[block] == 0:  # not expected (owners write), but keep the lists right
                self._evictable.pop(block)
                self._free.append(block)
