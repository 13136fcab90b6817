"""Paged KV cache (Kwon et al. 2023): block arithmetic, copy-on-write, OOM, prefix caching, paged attention,
and GPT on a paged cache computing exactly what it computes on a contiguous one (spec §3.4 targets)."""

from __future__ import annotations

import pytest
import torch

from llmlab.errors import UserError
from llmlab.inference.beam import beam_search
from llmlab.inference.generate import generate
from llmlab.inference.paged import KVCacheOOM, PagedKVCache, PagedLM, paged_attention, ragged_mask
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.nn.attention import attention

NL, NH, HS = 2, 2, 4  # layers, heads, head size of the model-free caches


def cache(num_blocks: int = 16, block_size: int = 16, **kw) -> PagedKVCache:
    return PagedKVCache(NL, NH, HS, num_blocks, block_size, dtype=torch.float32, **kw)


def write(c: PagedKVCache, seq_ids: list, T: int, seed: int = 0) -> list[torch.Tensor]:
    """One forward pass feeding T tokens to each sequence: random K/V per layer, as GPT would; returns
    the (B, 2, nh, T, hs) K/V written in each layer."""
    g = torch.Generator().manual_seed(seed)
    view = c.view(seq_ids)
    written = []
    for layer in range(NL):
        k, v = torch.randn(2, len(seq_ids), NH, T, HS, generator=g)
        view.update(layer, k, v)
        written.append(torch.stack([k, v], 1))
    view.advance(T)
    return written


def state(c: PagedKVCache):
    """Everything an operation could change."""
    return ({s: (list(q.table), q.length, list(q.hashes)) for s, q in c.seqs.items()}, list(c.blocks.ref_counts),
            list(c.blocks._free), list(c.blocks._evictable), c.pool.clone())


def same_state(a, b) -> bool:
    return a[:4] == b[:4] and torch.equal(a[4], b[4])


def tiny_gpt(seed: int = 0, sharp: bool = True, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(vocab_size=61, block_size=48, n_layer=2, n_head=2, n_embd=16), **kw}))
    if sharp:
        with torch.no_grad():
            model.transformer.wte.weight.mul_(20)  # peaky logits: no near-ties on greedy paths
    return model.eval()


# ------------------------------------------------------------------ block arithmetic (spec §3.4)
def test_37_tokens_take_3_blocks_then_11_appends_fit_and_the_12th_takes_one():
    c = cache(num_blocks=8)
    assert c.add_sequence("a", list(range(37))) == 0
    assert len(c.block_table("a")) == 3 and c.num_free_blocks == 5
    write(c, ["a"], 37)
    assert c.length("a") == 37
    for i in range(11):  # slots 37 .. 47 of the third block
        write(c, ["a"], 1, seed=i)
        assert len(c.block_table("a")) == 3, i
    write(c, ["a"], 1)
    assert len(c.block_table("a")) == 4 and c.num_free_blocks == 4 and c.length("a") == 49


def test_fork_then_append_copies_only_the_partial_last_block():
    c = cache(num_blocks=8)
    c.add_sequence("parent", list(range(37)))
    write(c, ["parent"], 37)
    before = [c.kv("parent", layer) for layer in range(NL)]
    c.fork("parent", "child")
    assert c.block_table("child") == c.block_table("parent") and c.num_free_blocks == 5
    assert [c.blocks.ref_counts[b] for b in c.block_table("parent")] == [2, 2, 2]
    written = write(c, ["child"], 1, seed=7)
    assert c.num_free_blocks == 4  # exactly one new block: the copy of the shared partial block
    p, ch = c.block_table("parent"), c.block_table("child")
    assert p[:2] == ch[:2] and p[2] != ch[2]
    assert [c.blocks.ref_counts[b] for b in p] == [2, 2, 1] and c.blocks.ref_counts[ch[2]] == 1
    for layer in range(NL):
        k, v = c.kv("parent", layer)  # the parent's K/V are untouched
        assert torch.equal(k, before[layer][0]) and torch.equal(v, before[layer][1])
        k, v = c.kv("child", layer)  # the child has the parent's 37 then its own one
        assert torch.equal(k[:, :37], before[layer][0]) and torch.equal(v[:, :37], before[layer][1])
        assert torch.equal(k[:, 37], written[layer][0, 0, :, 0]) and torch.equal(v[:, 37], written[layer][0, 1, :, 0])
    c.free("parent")
    c.free("child")
    assert c.num_free_blocks == 8 and c.blocks_in_use == 0 and not any(c.blocks.ref_counts)


def test_two_forked_rows_appending_together_copy_the_shared_block_once():
    c = cache(num_blocks=4, block_size=4)
    c.add_sequence("p", [1, 2])
    write(c, ["p"], 2)
    c.fork("p", "q")  # block 0 has ref 2 and 2 free slots; 3 blocks free
    assert c.blocks_needed(["q"]) == 1 and c.blocks_needed(["p", "q"]) == 1 and c.blocks_needed(["p", "q"], 3) == 3
    write(c, ["p", "q"], 1)
    assert c.num_free_blocks == 2  # the first row copied it; the second then owned the old block alone
    assert c.block_table("p") != c.block_table("q")


def test_gathered_kv_equal_contiguous_for_ragged_rows_in_fragmented_blocks():
    c = cache(num_blocks=20, block_size=4)
    lens = {"a": 5, "b": 11, "c": 1}
    ref = {s: [] for s in lens}
    for s in lens:
        c.add_sequence(s)
    for step in range(11):  # interleaved growth: block tables end up non-contiguous
        ids = [s for s in lens if lens[s] > step]
        for layer, kv in enumerate(write(c, ids, 1, seed=step)):
            for i, s in enumerate(ids):
                if layer == 0:
                    ref[s].append([])
                ref[s][-1].append(kv[i])
    for s, n in lens.items():
        for layer in range(NL):
            expect = torch.cat([ref[s][t][layer] for t in range(n)], dim=2)  # (2, nh, n, hs)
            k, v = c.kv(s, layer)
            assert torch.equal(k, expect[0]) and torch.equal(v, expect[1])
    # update() gathers each row right-aligned behind padding (masked out, finite), then the new token
    view = c.view(["a", "b", "c"])
    knew, vnew = torch.randn(2, 3, NH, 1, HS)
    k, v = view.update(0, knew, vnew)
    assert k.shape == (3, NH, 12, HS)
    mask = view.attention_mask(1)
    assert mask.tolist() == [[0] * 6 + [1] * 6, [1] * 12, [0] * 10 + [1] * 2]
    for i, s in enumerate(["a", "b", "c"]):
        n = lens[s]
        ck, cv = c.kv(s, 0)  # only committed tokens
        assert torch.equal(k[i, :, 11 - n : 11], ck) and torch.equal(v[i, :, 11 - n : 11], cv)
        assert torch.equal(k[i, :, 11], knew[i, :, 0]) and torch.equal(v[i, :, 11], vnew[i, :, 0])
        assert torch.isfinite(k[i, :, : 11 - n]).all() and torch.isfinite(v[i, :, : 11 - n]).all()


def _old_plan_mask(lengths: list[int], counts: list[int], T: int) -> torch.Tensor:
    """The mask as the view's index plan built it before ``ragged_mask`` (the reference)."""
    lens, new = torch.tensor(lengths), torch.tensor(counts)
    L = int(lens.max())
    col = torch.arange(L + T)[None, :]
    pad_new = (L + T - new)[:, None]
    cached_pos = col - (L - lens)[:, None]
    return torch.where(col < L, cached_pos >= 0, col >= pad_new).long()


@pytest.mark.parametrize("lengths,counts,T", [([5, 11, 1, 0], None, 1), ([5, 11, 1, 0], [1, 3, 0, 2], 3),
                                              ([0, 0, 0], [2, 5, 1], 5), ([3, 7, 4, 9], [4, 1, 2, 2], 4)])
def test_attention_mask_from_lengths_equals_the_index_plans(lengths, counts, T):
    """``attention_mask`` is derived from lengths and new-token counts alone, bit for bit the plan's mask."""
    c = cache(num_blocks=32, block_size=4)
    for i, n in enumerate(lengths):
        c.add_sequence(i)
        if n:
            write(c, [i], n, seed=i)
    view = c.view(list(range(len(lengths))), counts)
    news = counts or [T] * len(lengths)
    mask = view.attention_mask(T)
    assert mask.dtype == torch.long and torch.equal(mask, _old_plan_mask(lengths, news, T))
    assert torch.equal(mask, ragged_mask(lengths, news, T).long())
    knew, vnew = torch.randn(2, len(lengths), NH, T, HS)
    view.update(0, knew, vnew)  # the plan of the forward pass in progress agrees
    assert torch.equal(view._plan.valid.long(), mask) and torch.equal(view.attention_mask(T), mask)


# ------------------------------------------------------------------ paged attention kernel
@pytest.mark.parametrize("Tq", [1, 3])
def test_paged_attention_equals_contiguous_attention(Tq):
    torch.manual_seed(0)
    c = cache(num_blocks=24, block_size=4)
    lens = [3, 13, 8]
    ids = list(range(3))
    for s in ids:
        c.add_sequence(s)
    for step in range(max(lens)):  # interleaved: scattered blocks
        write(c, [s for s in ids if lens[s] > step], 1, seed=step)
    width = max(len(c.block_table(s)) for s in ids)
    tables = torch.tensor([c.block_table(s) + [0] * (width - len(c.block_table(s))) for s in ids])
    context = torch.tensor(lens)
    for layer in range(NL):
        q = torch.randn(3, NH, Tq, HS)
        out = paged_attention(q if Tq > 1 else q[:, :, 0], c.pool[layer][:, 0], c.pool[layer][:, 1], tables, context)
        for i, s in enumerate(ids):
            k, v = c.kv(s, layer)
            ref = attention(q[i : i + 1], k[None], v[None], causal=True, impl="eager",
                            q_offset=lens[i] - Tq)[0]
            got = out[i] if Tq > 1 else out[i][:, None]
            assert torch.allclose(got, ref, atol=1e-5, rtol=0), (layer, s)


# ------------------------------------------------------------------ out of memory
def test_oom_is_typed_and_changes_nothing():
    c = cache(num_blocks=3, block_size=4)
    c.add_sequence("a", list(range(6)))
    write(c, ["a"], 6)
    c.fork("a", "b")
    snap = state(c)
    with pytest.raises(KVCacheOOM) as e:
        c.add_sequence("big", list(range(9)))  # 3 blocks, 1 free
    assert (e.value.needed, e.value.free) == (3, 1)
    assert same_state(snap, state(c)) and "big" not in c.seqs
    # a decode step that needs a CoW copy for "b" and a new block for "a" after filling it
    write(c, ["a"], 2)  # fills block 1 of "a": CoW takes the last free block
    snap = state(c)
    view = c.view(["a", "b"])
    with pytest.raises(KVCacheOOM) as e:  # "a" needs a new block, "b" is alone on its block now: 1 > 0
        view.update(0, torch.randn(2, NH, 1, HS), torch.randn(2, NH, 1, HS))
    assert e.value.free == 0 and same_state(snap, state(c))
    assert not c.can_append(1)
    c.free("b")
    assert c.can_append(1)
    write(c, ["a"], 1)  # now it fits
    assert c.length("a") == 9


def test_bad_ids_are_user_errors():
    c = cache()
    c.add_sequence("a")
    with pytest.raises(UserError, match="already"):
        c.add_sequence("a")
    with pytest.raises(UserError, match="no sequence"):
        c.view(["zz"])
    with pytest.raises(UserError, match="positive"):
        PagedKVCache(1, 1, 1, 0)


# ------------------------------------------------------------------ prefix caching
def test_prefix_caching_shares_full_blocks_and_gives_the_same_logits():
    model = tiny_gpt()
    common = torch.randint(0, 61, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = [common + [1, 2, 3], common + [4, 5]]

    def run(enable: bool):
        c = PagedKVCache.for_model(model, num_blocks=16, block_size=16, enable_prefix_caching=enable)
        logits, skipped = [], []
        for i, p in enumerate(prompts):
            cached = c.add_sequence(i, p)
            skipped.append(cached)
            view = c.view([i])
            logits.append(model(torch.tensor([p[cached:]]), kv_cache=view, last_only=True)[0, -1])
        return c, logits, skipped

    plain, ref, skipped = run(False)
    assert skipped == [0, 0] and plain.blocks_in_use == 6
    c, got, skipped = run(True)
    assert skipped == [0, 32]  # the two full blocks of the 40-token prefix
    assert c.stats()["prefix_cache_hits"] == 2
    assert c.block_table(0)[:2] == c.block_table(1)[:2] and c.block_table(0)[2] != c.block_table(1)[2]
    assert [c.blocks.ref_counts[b] for b in c.block_table(0)] == [2, 2, 1] and c.blocks_in_use == 4
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # a freed sequence's full blocks stay cached (ref 0, counted free) and are hit again
    shared = c.block_table(0)[:2]
    c.free(0)
    c.free(1)
    assert c.num_free_blocks == 16 and c.stats()["cached_blocks"] == 2  # the partial third blocks are not cached
    assert c.add_sequence(2, common) == 32 and c.block_table(2)[:2] == shared


def test_prefix_cache_evicts_lru_only_when_the_free_list_is_empty_and_full_hit_recomputes_last_token():
    c = cache(num_blocks=3, block_size=2, enable_prefix_caching=True)
    c.add_sequence("a", [1, 2, 3, 4])
    write(c, ["a"], 4)
    blocks_a = c.block_table("a")
    c.free("a")  # both blocks cached, ref 0
    assert c.num_free_blocks == 3 and c.stats()["cached_blocks"] == 2
    # fully cached prompt: report 3 cached so the last token is recomputed (its block is copied on write)
    assert c.add_sequence("b", [1, 2, 3, 4]) == 3 and c.block_table("b") == blocks_a
    write(c, ["b"], 1)  # "b" alone owns the block: its hash is dropped, written in place, published again
    assert c.length("b") == 4 and c.block_table("b") == blocks_a and c.stats()["cached_blocks"] == 2
    c.free("b")  # freed tail first: blocks_a[1] becomes the least recently used
    c.add_sequence("x", [9])  # the never-cached block goes first
    assert c.block_table("x") not in ([b] for b in blocks_a) and c.stats()["cached_blocks"] == 2
    c.add_sequence("y", [8, 8, 8, 8])  # free list empty: evict the cached blocks, LRU first
    assert c.block_table("y") == [blocks_a[1], blocks_a[0]] and c.stats()["cached_blocks"] == 0
    with pytest.raises(KVCacheOOM):
        c.add_sequence("w", [1, 2, 3])  # the prefix is gone and no block is left



# ------------------------------------------------------------------ views: truncate, reorder, reset
def test_reorder_moves_tables_without_copying_kv_and_truncate_frees_blocks():
    c = cache(num_blocks=12, block_size=4)
    for s in "abc":
        c.add_sequence(s)
    write(c, list("abc"), 6)
    kv = {s: c.kv(s, 1) for s in "abc"}
    pool = c.pool.clone()
    view = c.view(list("abc"))
    view.reorder(torch.tensor([2, 2, 0]))  # a <- c, b <- c, c <- a
    assert torch.equal(pool, c.pool)  # no K/V copied
    assert c.block_table("a") == c.block_table("b") and c.blocks_in_use == 4  # b's blocks freed, c's shared by 2
    assert torch.equal(c.kv("b", 1)[0], kv["c"][0]) and torch.equal(c.kv("c", 1)[1], kv["a"][1])
    write(c, list("abc"), 1)  # a and b share c's partial block: one copies it
    assert c.blocks_in_use == 5
    view.truncate(4)  # all rows back to 4 tokens: the second blocks go
    assert [c.length(s) for s in "abc"] == [4, 4, 4] and c.blocks_in_use == 2
    view.reset()
    assert c.blocks_in_use == 0 and view.length == 0


# ------------------------------------------------------------------ GPT on a paged cache
def test_ragged_batch_forward_equals_each_row_alone():
    model = tiny_gpt()
    c = PagedKVCache.for_model(model, num_blocks=32, block_size=4)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 9, 6)]
    T = max(map(len, prompts))
    x = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        c.add_sequence(i, p)
        x[i, T - len(p) :] = torch.tensor(p)
    view = c.view([0, 1, 2], num_new_tokens=[len(p) for p in prompts])  # one ragged prefill, pads not stored
    logits = model(x, kv_cache=view, attention_mask=view.attention_mask(T), last_only=True)[:, -1]
    assert [c.length(i) for i in range(3)] == [3, 9, 6]
    for step in range(3):  # ragged decode steps, one forward each
        for i, p in enumerate(prompts):
            assert torch.allclose(logits[i], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=0), (step, i)
        nxt = logits.argmax(-1)
        for i in range(3):
            prompts[i].append(int(nxt[i]))
        view = c.view([0, 1, 2])
        logits = model(nxt[:, None], kv_cache=view, attention_mask=view.attention_mask(1), last_only=True)[:, -1]


def test_generation_on_a_paged_cache_equals_contiguous():
    model = tiny_gpt(seed=1)
    paged = PagedLM(model, PagedKVCache.for_model(model, num_blocks=64, block_size=4))
    x = torch.randint(0, 61, (3, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(generate(model, x, 20, greedy=True), generate(paged, x, 20, greedy=True))
    # a flat model: sampling and beams diverge after the prompt, rows share blocks after each reorder
    # (copy-on-write); uniform rows make the gathered K/V bitwise the contiguous ones, so near-ties resolve the same
    flat = tiny_gpt(seed=1, sharp=False)
    paged_flat = PagedLM(flat, PagedKVCache.for_model(flat, num_blocks=64, block_size=4))
    for seed in (0, 1):
        kw = dict(temperature=1.3, top_k=30)
        a = generate(flat, x, 20, generator=torch.Generator().manual_seed(seed), **kw)
        b = generate(paged_flat, x, 20, generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(a, b)
    a = beam_search(flat, x, 12, num_beams=4, num_return_sequences=4)
    b = beam_search(paged_flat, x, 12, num_beams=4, num_return_sequences=4)
    assert len({tuple(r) for r in a[:4, 5:].tolist()}) == 4  # four different beams
    assert torch.equal(a, b)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # row 0 left-padded: generate() stores the pads as tokens and masks them
    assert torch.equal(generate(model, x, 9, greedy=True, attention_mask=mask),
                       generate(paged, x, 9, greedy=True, attention_mask=mask))
    # past the context: the window slides, generate() resets the cache and re-prefills
    assert torch.equal(generate(model, x, 50, greedy=True), generate(paged, x, 50, greedy=True))
