"""word2vec model: Huffman tree, HS normalisation, noise sampler, subsampling, losses, fused SGD, learning."""

from __future__ import annotations

import copy
import heapq
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmlab.models.word2vec import NoiseSampler, Word2Vec, Word2VecConfig, build_huffman, keep_probabilities

HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

def count_lists(low: int, high: int):
    """Vocabularies of 1..300 words (length drawn first, so long lists are as likely as short)."""
    return st.integers(1, 300).flatmap(lambda n: st.lists(st.integers(low, high), min_size=n, max_size=n))


COUNTS = count_lists(1, 10_000)
TIED_COUNTS = count_lists(1, 4)  # many ties


def code_lists(tree) -> tuple[list[list[int]], list[list[int]]]:
    L = tree.lengths.tolist()
    codes = [tree.codes[w, : L[w]].tolist() for w in range(len(L))]
    points = [tree.points[w, : L[w]].tolist() for w in range(len(L))]
    return codes, points


def heap_reference(counts):
    """The textbook heapq construction with (count, creation counter, node) keys."""
    V = len(counts)
    heap = [(c, w, ("leaf", w)) for w, c in enumerate(counts)]
    heapq.heapify(heap)
    children = {}
    for inner in range(V - 1):
        c1, _, n1 = heapq.heappop(heap)
        c2, _, n2 = heapq.heappop(heap)
        children[inner] = (n1, n2)
        heapq.heappush(heap, (c1 + c2, V + inner, ("inner", inner)))
    codes, points = [None] * V, [None] * V

    def walk(node, code, path):
        if node[0] == "leaf":
            codes[node[1]], points[node[1]] = code, path
            return
        left, right = children[node[1]]
        walk(left, code + [0], path + [node[1]])
        walk(right, code + [1], path + [node[1]])

    walk(("inner", V - 2) if V > 1 else ("leaf", 0), [], [])
    return codes, points


# ------------------------------------------------------------------------------------------------ Huffman
@HYP
@given(COUNTS)
def test_huffman_structure_prefix_free_kraft(counts):
    V = len(counts)
    tree = build_huffman(counts)
    codes, points = code_lists(tree)
    assert tree.num_inner == V - 1
    assert tree.codes.shape == tree.points.shape == (V, max(len(c) for c in codes))
    assert tree.points.dtype == torch.long and tree.lengths.dtype == torch.long
    if V == 1:
        assert codes == [[]]
        return
    # every prefix of a code names one inner node, consistently; the V-1 inner nodes are 0..V-2
    node_of_prefix = {}
    for c, p in zip(codes, points):
        assert p[0] == V - 2  # every path starts at the root
        for j in range(len(c)):
            assert node_of_prefix.setdefault(tuple(c[:j]), p[j]) == p[j]
    assert sorted(node_of_prefix.values()) == list(range(V - 1))
    # prefix-free (V leaves, all distinct) and Kraft sum exactly 1
    strings = sorted("".join(map(str, c)) for c in codes)
    assert len(set(strings)) == V
    assert not any(b.startswith(a) for a, b in zip(strings, strings[1:]))
    Lmax = max(len(c) for c in codes)
    assert sum(2 ** (Lmax - len(c)) for c in codes) == 2**Lmax
    # padding is zero
    mask = torch.arange(tree.max_length) < tree.lengths[:, None]
    assert not tree.codes[~mask].any() and not tree.points[~mask].any()


@HYP
@given(COUNTS)
def test_huffman_optimality_properties(counts):
    tree = build_huffman(counts)
    lengths = tree.lengths.tolist()
    V = len(counts)
    # count_a > count_b  =>  len_a <= len_b: walking the distinct counts downwards, the shortest
    # code of each count is at least the longest code of every larger count
    by_count = {}
    for c, n in zip(counts, lengths):
        by_count.setdefault(c, []).append(n)
    longest_above = 0
    for c in sorted(by_count, reverse=True):
        assert min(by_count[c]) >= longest_above
        longest_above = max(longest_above, max(by_count[c]))
    if V >= 2:
        total = sum(counts)
        p = [c / total for c in counts]
        H = -sum(q * math.log2(q) for q in p)
        Lbar = sum(q * n for q, n in zip(p, lengths))
        assert H - 1e-9 <= Lbar < H + 1
        assert Lbar <= math.ceil(math.log2(V)) + 1e-9


@HYP
@given(st.one_of(COUNTS, TIED_COUNTS))
def test_huffman_equals_heapq_reference(counts):
    codes, points = code_lists(build_huffman(counts))
    ref_codes, ref_points = heap_reference(counts)
    assert codes == ref_codes
    assert points == ref_points


def test_huffman_small_cases():
    for k in range(0, 9):  # uniform counts, V = 2^k -> every code has length k
        tree = build_huffman([7] * 2**k)
        assert tree.lengths.tolist() == [k] * 2**k
    with pytest.raises(ValueError):
        build_huffman([])
    one = build_huffman([5])
    assert one.lengths.tolist() == [0] and one.codes.shape == (1, 0) and one.num_inner == 0
    two = build_huffman([5, 3])  # 3 is popped first -> left (0); root id 0
    assert code_lists(two) == ([[1], [0]], [[0], [0]])
    three = build_huffman([1, 1, 2])  # (1,w0) left,(1,w1) right -> inner 0; then (2,w2) left, inner0 right
    assert code_lists(three) == ([[1, 0], [1, 1], [0]], [[1, 0], [1, 0], [1]])


# ------------------------------------------------------------------------------------------------ HS
@pytest.mark.parametrize("V", [2, 3, 17, 1000])
def test_hs_distribution_sums_to_one(V):
    g = torch.Generator().manual_seed(V)
    counts = torch.randint(1, 1000, (V,), generator=g).tolist()
    model = Word2Vec(Word2VecConfig(V, 16, hs=1, negative=0), counts).double()
    with torch.no_grad():
        model.inner_vectors.weight.normal_(0, 1.0, generator=g)
    v = torch.randn(16, generator=g, dtype=torch.float64)
    logp = model.hs_log_prob(v)
    assert logp.shape == (V,)
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-5
    batch = torch.randn(4, 16, generator=g, dtype=torch.float64)
    assert torch.allclose(model.hs_log_prob(batch).exp().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-5)
    # the HS training loss of one pair is -log p(context | center)
    c, o = 0, V - 1
    loss, n = model.loss(torch.tensor([c]), torch.tensor([o]), torch.tensor([0]))
    assert n == 1
    assert torch.allclose(loss, -model.hs_log_prob(model.in_vectors.weight[c])[o])


def test_hs_single_word_vocab():
    model = Word2Vec(Word2VecConfig(1, 4, hs=1, negative=0), [3]).double()
    assert model.inner_vectors.weight.shape == (1, 4)
    assert torch.equal(model.hs_log_prob(torch.ones(4, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ noise
def test_noise_distribution_matches_unigram_power():
    counts = [1000, 500, 200, 100, 50, 20, 10, 5, 2, 1, 0] + list(range(300, 0, -7))
    sampler = NoiseSampler(counts, 0.75)
    expected = torch.tensor(counts, dtype=torch.float64) ** 0.75
    expected /= expected.sum()
    assert sampler.probs.dtype == torch.float64 and torch.allclose(sampler.probs, expected, rtol=0, atol=1e-15)
    draws = sampler.sample((1000, 1000), generator=torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and draws.shape == (1000, 1000)
    freq = torch.bincount(draws.view(-1), minlength=len(counts)).double() / draws.numel()
    assert (freq - expected).abs().max() < 1e-3
    assert freq[10] == 0  # a zero count is never drawn
    # reproducible with a generator
    a = sampler.sample((50,), generator=torch.Generator().manual_seed(3))
    b = sampler.sample((50,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_noise_exponent_zero_is_uniform_and_saved():
    sampler = NoiseSampler([100, 10, 1, 1, 7], exponent=0.0)
    assert torch.allclose(sampler.probs, torch.full((5,), 0.2, dtype=torch.float64))
    freq = torch.bincount(sampler.sample((10**6,), generator=torch.Generator().manual_seed(1)), minlength=5) / 1e6
    assert (freq - 0.2).abs().max() < 2e-3
    model = Word2Vec(Word2VecConfig(5, 4, ns_exponent=0.0), [100, 10, 1, 1, 7])
    state = model.state_dict()
    assert {"noise.probs", "in_vectors.weight", "out_vectors.weight"} <= set(state)
    assert "inner_vectors.weight" not in state and "codes" not in state


# ------------------------------------------------------------------------------------------------ subsampling
def test_keep_probabilities_formula():
    counts = [5000, 1000, 100, 10, 1]
    t = 1e-3
    N = sum(counts)
    keep = keep_probabilities(counts, t)
    for f, k in zip(counts, keep):
        assert k == pytest.approx(min(1.0, (math.sqrt(f / (t * N)) + 1) * (t * N) / f), rel=1e-12)
    # hand value: f=5000, tN=6.111 -> (sqrt(5000/6.111) + 1)·6.111/5000
    assert keep[0] == pytest.approx(0.0361822, abs=1e-6)
    assert keep[0] < keep[1] < keep[2] < 1.0
    assert keep[3] == keep[4] == 1.0  # f <= t·N: never discarded
    assert np.array_equal(keep_probabilities(counts, 0), np.ones(5))
    assert np.array_equal(keep_probabilities(counts, -1.0), np.ones(5))


def test_keep_probabilities_boundary():
    # sqrt(x) + x = 1 at x = tN/f = (3 - sqrt 5)/2: kept surely iff f <= tN·(3 + sqrt 5)/2
    t, N = 1e-4, 10**7
    edge = t * N * (3 + math.sqrt(5)) / 2  # ≈ 2618.03
    rest = N - 2618 - 2619 - 1000
    keep = keep_probabilities([rest, 2618, 2619, 1000], t)
    assert keep[1] == 1.0 and keep[3] == 1.0
    assert keep[2] < 1.0 and keep[0] < 1.0
    assert 2618 <= edge < 2619


# ------------------------------------------------------------------------------------------------ losses
def batch_with_repeats(V, seed=0):
    """Groups of sizes 1..5 (group 4 empty), words repeated across centers, contexts and negatives."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([1, 3, 2, 5, 0, 4, 1, 2])
    B = len(sizes)
    group = torch.repeat_interleave(torch.arange(B), sizes)
    center = torch.randint(0, 6, (B,), generator=g)  # only 6 distinct centers: collisions
    context = torch.randint(0, V, (len(group),), generator=g)
    context[:4] = center[0]  # a context equal to a center
    return center, context, group, g


def naive_loss(model, center, context, group, negatives):
    """Per-prediction Python loop over the paper's objective (no batching tricks)."""
    cfg = model.config
    W = model.in_vectors.weight
    total = torch.zeros((), dtype=W.dtype)

    def ns(v, target, negs):
        out = model.out_vectors.weight
        # word2vec.c / gensim skip a drawn negative that equals the target
        return -F.logsigmoid(out[target] @ v) - sum(F.logsigmoid(-(out[n] @ v)) for n in negs if n != target)

    def hs(v, target):
        L = int(model.code_lengths[target])
        loss = torch.zeros((), dtype=W.dtype)
        for j in range(L):
            sign = 1.0 - 2.0 * float(model.codes[target, j])
            loss = loss - F.logsigmoid(sign * (model.inner_vectors.weight[model.points[target, j]] @ v))
        return loss

    n = 0
    for b in range(len(center)):
        ctx = context[group == b]
        if cfg.sg:
            for o in ctx:
                v = W[center[b]]
                total = total + (ns(v, o, negatives[b]) if cfg.negative else 0) + (hs(v, o) if cfg.hs else 0)
                n += 1
        elif len(ctx):
            h = W[ctx].sum(0) / (len(ctx) if cfg.cbow_mean else 1)
            total = total + (ns(h, center[b], negatives[b]) if cfg.negative else 0) + (hs(h, center[b]) if cfg.hs else 0)
            n += 1
    return total, n


CASES = [
    (sg, neg, hs, mean)
    for sg in (1, 0)
    for neg, hs in ((5, 0), (0, 1), (3, 1))
    for mean in ((1,) if sg else (1, 0))
]


def make_model(V, sg, neg, hs, mean, seed=0):
    torch.manual_seed(seed)
    counts = torch.randint(1, 500, (V,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    cfg = Word2VecConfig(V, 8, sg=sg, hs=hs, negative=neg, cbow_mean=mean, init="xavier")
    return Word2Vec(cfg, counts).double()


@pytest.mark.parametrize("sg,neg,hs,mean", CASES)
def test_loss_matches_naive_loop(sg, neg, hs, mean):
    V = 40
    model = make_model(V, sg, neg, hs, mean)
    center, context, group, g = batch_with_repeats(V)
    negatives = model.noise.sample((len(center), neg), generator=g) if neg else None
    if neg:  # a negative equal to the target: CBOW's center, and a context word of skip-gram's group
        negatives[2, 0] = center[2]
        negatives[int(group[0]), 1] = context[0]
    loss, n = model.loss(center, context, group, negatives)
    ref, ref_n = naive_loss(model, center, context, group, negatives)
    assert n == ref_n == (len(context) if sg else 7)
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("sg,neg,hs,mean", CASES)
def test_fused_sgd_step_equals_autograd_sgd(sg, neg, hs, mean, chunked):
    V, lr = 30, 0.3
    fused = make_model(V, sg, neg, hs, mean)
    if chunked:  # one group per chunk: errors of every chunk must still use the pre-update rows
        fused.chunk_elements = 1
    ref = copy.deepcopy(fused)
    before = copy.deepcopy(fused.state_dict())
    center, context, group, g = batch_with_repeats(V, seed=2)
    negatives = fused.noise.sample((len(center), neg), generator=g) if neg else None
    if neg:
        negatives[0, :] = negatives[1, 0]  # repeated negatives within and across groups
        negatives[2, 0] = center[2]  # equal to the target (CBOW) ...
        negatives[int(group[0]), 1] = context[0]  # ... and to a pair's context word (skip-gram): skipped

    value, n = fused.sgd_step(center, context, group, negatives, lr)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    loss, ref_n = ref.loss(center, context, group, negatives)
    loss.backward()
    opt.step()

    assert n == ref_n and isinstance(value, float)
    assert value == pytest.approx(loss.item(), rel=1e-12)
    changed = 0.0
    for name, p in fused.named_parameters():
        q = dict(ref.named_parameters())[name]
        assert torch.allclose(p, q, rtol=0, atol=1e-9), name
        changed = max(changed, (p.detach() - before[name]).abs().max().item())
    assert changed > 1e-3  # the step really moved the parameters


def test_loss_draws_negatives_and_trains_with_adam():
    model = make_model(20, 1, 5, 0, 1).float()
    center, context, group, _ = batch_with_repeats(20)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    torch.manual_seed(0)
    first = None
    for _ in range(30):
        loss, n = model.loss(center, context, group)  # negatives drawn from model.noise
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first


def test_initial_losses_with_zero_outputs():
    V, K = 50, 5
    counts = list(range(V, 0, -1))
    center, context, group, g = batch_with_repeats(V)
    for sg in (1, 0):
        model = Word2Vec(Word2VecConfig(V, 10, sg=sg, negative=K), counts)
        assert not model.out_vectors.weight.any()
        assert model.in_vectors.weight.abs().max() <= 0.5 / 10
        negatives = model.noise.sample((len(center), K), generator=g)
        first = int(group[0])
        negatives[first, 0] = context[0] if sg else center[first]  # a negative equal to its target
        # every prediction costs ln 2 for its positive and for each negative that is not its target
        if sg:
            targets, negs = context, negatives[group]
        else:
            targets, negs = center[torch.bincount(group, minlength=len(center)) > 0], negatives[torch.unique(group)]
        kept = int((negs != targets[:, None]).sum())
        loss, n = model.loss(center, context, group, negatives)
        assert n == len(targets) and kept < n * K
        assert loss.item() == pytest.approx((n + kept) * math.log(2), rel=1e-6)
        # no collisions (a negative no batch word uses): exactly (1 + K)·ln 2 = 4.1589 per prediction
        unused = torch.tensor(sorted(set(range(V)) - set(center.tolist()) - set(context.tolist())))
        clean, n1 = model.loss(center, context, group, unused[:1].expand(len(center), K).contiguous())
        assert clean.item() / n1 == pytest.approx((1 + K) * math.log(2), rel=1e-6)
        assert clean.item() / n1 == pytest.approx(4.1589, abs=1e-4)
        value, n2 = model.sgd_step(center, context, group, negatives, 0.025)
        assert n2 == n and value == pytest.approx((n + kept) * math.log(2), rel=1e-6)
    model = Word2Vec(Word2VecConfig(V, 10, sg=1, hs=1, negative=0), counts)
    assert not model.inner_vectors.weight.any()
    loss, n = model.loss(center, context, group)
    expected = float(model.code_lengths[context].sum()) * math.log(2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_config_validation_and_api():
    with pytest.raises(ValueError):
        Word2VecConfig(10, negative=0, hs=0)
    with pytest.raises(ValueError):
        Word2VecConfig(10, init="normal")
    with pytest.raises(ValueError):
        Word2Vec(Word2VecConfig(10), [1] * 9)
    model = Word2Vec(Word2VecConfig(10, 4, hs=1, negative=2, init="xavier"), list(range(10, 0, -1)))
    assert model.vectors() is model.in_vectors.weight
    assert model.num_params() == 10 * 4 + 10 * 4 + 9 * 4
    assert model.out_vectors.weight.abs().sum() > 0  # xavier initialises the outputs too


# ------------------------------------------------------------------------------------------------ learning
def cluster_corpus(n_clusters=4, size=8, n_sent=400, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, n_clusters, (n_sent, 1), generator=g)
    return cluster * size + torch.randint(0, size, (n_sent, length), generator=g)


def window_batch(sentences: torch.Tensor, window: int = 2):
    """center/context/group for every position of every sentence (sentences: (S, T) word ids)."""
    S, T = sentences.shape
    center = sentences.reshape(-1)
    pos = torch.arange(T)
    groups, contexts = [], []
    for off in [o for o in range(-window, window + 1) if o]:
        ok = (pos + off >= 0) & (pos + off < T)
        src = (torch.arange(S)[:, None] * T + pos[ok][None]).reshape(-1)
        groups.append(src)
        contexts.append(sentences[:, pos[ok] + off].reshape(-1))
    group, order = torch.sort(torch.cat(groups), stable=True)
    return center, torch.cat(contexts)[order], group


@pytest.mark.parametrize("sg,neg,hs", [(1, 5, 0), (0, 5, 0), (1, 0, 1), (0, 0, 1)])
def test_learns_planted_clusters(sg, neg, hs):
    n_clusters, size = 4, 8
    corpus = cluster_corpus(n_clusters, size)
    counts = torch.bincount(corpus.view(-1), minlength=n_clusters * size).tolist()
    torch.manual_seed(0)
    model = Word2Vec(Word2VecConfig(n_clusters * size, 16, sg=sg, hs=hs, negative=neg), counts)
    gen = torch.Generator().manual_seed(1)
    steps, alpha = 300, 0.025
    first = last = None
    for step in range(steps):
        rows = torch.randint(0, len(corpus), (16,), generator=gen)
        center, context, group = window_batch(corpus[rows])
        negatives = model.noise.sample((len(center), neg), generator=gen) if neg else None
        lr = alpha * max(1e-4, 1 - step / steps)
        value, n = model.sgd_step(center, context, group, negatives, lr)
        first = value / n if first is None else first
        last = value / n
    assert last < first
    vec = F.normalize(model.vectors().detach(), dim=-1)
    sim = vec @ vec.T
    sim.fill_diagonal_(-2)
    nearest = sim.argmax(-1)
    words = torch.arange(n_clusters * size)
    hit = (nearest // size == words // size).float().mean()
    assert hit >= 0.95, hit


@pytest.mark.parametrize("sg,neg,hs", [(1, 0, 1), (1, 5, 0)])
def test_sequential_chunks_learn_from_whole_corpus_batches(sg, neg, hs):
    """Every batch is the whole corpus (~11k pairs): as one summed step the hierarchical-softmax nodes
    near the root would move by thousands of learning rates; applied chunk by chunk it learns."""
    n_clusters, size = 4, 8
    corpus = cluster_corpus(n_clusters, size)
    counts = torch.bincount(corpus.view(-1), minlength=n_clusters * size).tolist()
    torch.manual_seed(0)
    model = Word2Vec(Word2VecConfig(n_clusters * size, 16, sg=sg, hs=hs, negative=neg), counts)
    model.chunk_elements = 2**14  # ~ a few dozen groups per chunk, as at full scale
    center, context, group = window_batch(corpus)
    epochs = 20
    for epoch in range(epochs):
        negatives = model.noise.sample((len(center), neg)) if neg else None
        model.sgd_step(center, context, group, negatives, 0.025 * (1 - epoch / epochs), sequential=True)
    vec = F.normalize(model.vectors().detach(), dim=-1)
    sim = vec @ vec.T
    sim.fill_diagonal_(-2)
    words = torch.arange(n_clusters * size)
    assert (sim.argmax(-1) // size == words // size).float().mean() >= 0.95
