"""word2vec: skip-gram and CBOW with negative sampling and/or hierarchical softmax.

References
----------
- Mikolov, Chen, Corrado & Dean 2013a, "Efficient Estimation of Word Representations in Vector
  Space" (skip-gram, CBOW, Huffman-coded hierarchical softmax, cost Q = C·(D + D·log2 V)).
- Mikolov, Sutskever, Chen, Corrado & Dean 2013b, "Distributed Representations of Words and Phrases
  and their Compositionality" (negative sampling with P_n ∝ U(w)^{3/4}, subsampling of frequent
  words, the hierarchical-softmax factorisation p(w|c) = Π_j σ(⟦·⟧ u'_{n(w,j)}·v_c)).
- word2vec.c (Mikolov's reference code): ``syn0`` (input vectors, initialised U(−0.5/d, 0.5/d)),
  ``syn1neg`` / ``syn1`` (output / inner-node vectors, initialised to 0), ``CreateBinaryTree``
  (code bit 0/1 per branch, label = 1 − code), the subsampling keep-probability
  (sqrt(f/(t·N)) + 1)·(t·N)/f, and the plain-SGD update g = (label − σ(score))·α.
- Ji, Shah, Satish, Kaul & Dubey 2016, "Parallelizing Word2Vec in Shared and Distributed Memory":
  one draw of negatives shared by all context words of a window.

Design
------
Everything here is plain PyTorch (no Lightning, no Hydra), written for CPU throughput.

*Batch layout* (shared by skip-gram and CBOW, produced by the datamodule): ``center`` (B,) word ids,
``context`` (P,) word ids and ``group`` (P,) non-decreasing in [0, B): the center each context word
belongs to. ``negatives`` (B, K) holds one draw of K noise words per *group*, shared by all pairs of
that group; every pair still sees K negatives, so the objective is the paper's (pass groups of
size 1 for word2vec.c's per-pair draws). Sharing lets the negative scores be computed once per
group, (B, K), and weighted by the group size m_g instead of once per pair.

*Objectives* (summed, never averaged over the K negatives; ``F.logsigmoid``, no ε hacks):

- skip-gram (``sg=1``), v = syn0[center_g], for every pair (g, o):
  NS: −log σ(u_o·v) − Σ_k log σ(−u_{n_gk}·v);  HS: −Σ_j log σ((1 − 2·code_j)·u'_{point_j}·v)
  over the Huffman path of o. One prediction per pair.
- CBOW (``sg=0``), h_g = mean (``cbow_mean=1``) or sum of syn0[context] over the group, predicts
  center_g with the same two losses. One prediction per (non-empty) group.
- ``hs`` and ``negative`` may both be on (as in word2vec.c / gensim): the losses add.

*Two training paths*: :meth:`Word2Vec.loss` is autograd-capable (for Adam etc. and for tests);
:meth:`Word2Vec.sgd_step` is word2vec.c's hand-written SGD update, fused, vectorised over the batch
and applied with ``index_add_`` to the touched rows only. It equals one ``torch.optim.SGD`` step on
:meth:`Word2Vec.loss` with the same negatives (the tests check this to 1e-9 in float64), including
for repeated words in a batch (index_add accumulates, exactly like the summed gradient). CPU speed:
rows are gathered with ``index_select`` (advanced indexing is much slower on CPU), scores are
elementwise mul + sum, and the batch is processed in chunks of groups whose gathered rows fit in
the cache: pass 1 computes every error from the pre-update parameters, pass 2 writes the rows.
(CBOW with ``cbow_mean=1`` feeds the mean of the context vectors forward but, like word2vec.c and
gensim, passes the whole error back to every context word, in both paths.)

*Noise* (:class:`NoiseSampler`): P_n ∝ count^0.75, precomputed once in float64 (the course seed
rebuilt it every batch); an alias table makes each draw O(1) and exact.

*Huffman tree* (:func:`build_huffman`): inner nodes get ids 0..V−2 in creation order (root = V−2);
``points[w]`` are the inner nodes from the root to w's parent and ``codes[w]`` the branch taken at
each (0 = left = first popped, 1 = right), padded to the longest code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("word2vec", "xavier")


# ------------------------------------------------------------------------------------------------
# Huffman tree (hierarchical softmax)
# ------------------------------------------------------------------------------------------------
@dataclass
class HuffmanTree:
    """A Huffman code over V words, padded to the longest code.

    ``codes`` (V, L) uint8 branch bits, ``points`` (V, L) long inner-node ids (root first), both padded
    with 0 beyond ``lengths[w]``; ``num_inner = V − 1`` inner nodes with ids 0..V−2 (root = V−2).
    """

    codes: torch.Tensor
    points: torch.Tensor
    lengths: torch.Tensor
    num_inner: int

    @property
    def max_length(self) -> int:
        return int(self.codes.shape[1])


def build_huffman(counts: Sequence[int]) -> HuffmanTree:
    """Build the Huffman tree of ``counts`` (word2vec.c's ``CreateBinaryTree``).

    Order of merges: always the two smallest nodes under the key (count, creation counter), where
    leaves have counters 0..V−1 (their word ids) and inner node i has counter V + i, so ties break
    deterministically (leaves before inner nodes, then by id). The first node taken is the left
    child (code 0), the second the right child (code 1); inner nodes get ids 0..V−2 in creation
    order (root = V−2).

    This is exactly what a ``heapq`` of (count, counter, node) tuples pops (the tests check the
    two agree), but computed like word2vec.c with two queues: the leaves sorted once by (count, id)
    and the inner nodes in creation order, whose counts never decrease. That is O(V log V) for the
    sort plus a cheap O(V) Python loop (about 10x faster than the heap for V = 1e6); the padded
    tensors are filled with vectorised numpy, one code position at a time.
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    V = int(c.size)
    if V == 0:
        raise ValueError("build_huffman: empty vocabulary (need at least one word)")
    if (c < 0).any():
        raise ValueError("build_huffman: counts must be non-negative")
    if V == 1:  # the root is the only leaf: empty code, no inner node used
        z = torch.zeros((1, 0), dtype=torch.long)
        return HuffmanTree(z.to(torch.uint8), z, torch.zeros(1, dtype=torch.long), 0)

    # nodes: leaves 0..V-1, inner node i is node V + i
    order = np.argsort(c, kind="stable")  # by (count, word id)
    leaf_c, leaf_n = c[order].tolist(), order.tolist()
    inner_c = [0] * (V - 1)
    parent = [0] * (2 * V - 1)  # inner id of each node's parent
    bit = [0] * (2 * V - 1)
    i = j = 0  # fronts of the leaf queue and of the inner-node queue (inner nodes 0..inner-1 exist)
    for inner in range(V - 1):
        if i < V and (j >= inner or leaf_c[i] <= inner_c[j]):  # equal counts: the leaf is older
            n1, c1 = leaf_n[i], leaf_c[i]
            i += 1
        else:
            n1, c1 = V + j, inner_c[j]
            j += 1
        if i < V and (j >= inner or leaf_c[i] <= inner_c[j]):
            n2, c2 = leaf_n[i], leaf_c[i]
            i += 1
        else:
            n2, c2 = V + j, inner_c[j]
            j += 1
        parent[n1] = inner
        parent[n2] = inner
        bit[n2] = 1
        inner_c[inner] = c1 + c2

    # depth of every node, root (node 2V-2) at depth 0; parents are created after their children,
    # so walking the nodes from the root down sees every parent before its children
    depth = [0] * (2 * V - 1)
    for node in range(2 * V - 3, -1, -1):
        depth[node] = depth[V + parent[node]] + 1
    lengths = np.asarray(depth[:V], dtype=np.int64)
    parent = np.asarray(parent, dtype=np.int64)
    bit = np.asarray(bit, dtype=np.uint8)
    L = int(lengths.max())

    # fill codes/points from the leaf upwards: column depth-1-s holds the s-th ancestor's branch
    codes = np.zeros((V, L), dtype=np.uint8)
    points = np.zeros((V, L), dtype=np.int64)
    cur = np.arange(V, dtype=np.int64)
    words = np.arange(V, dtype=np.int64)
    for s in range(L):
        alive = lengths[words] > s  # words whose code is longer than s
        if not alive.all():
            words, cur = words[alive], cur[alive]
        col = lengths[words] - 1 - s
        codes[words, col] = bit[cur]
        points[words, col] = parent[cur]
        cur = V + parent[cur]
    return HuffmanTree(torch.from_numpy(codes), torch.from_numpy(points), torch.from_numpy(lengths.copy()), V - 1)


# ------------------------------------------------------------------------------------------------
# noise distribution and subsampling
# ------------------------------------------------------------------------------------------------
class NoiseSampler(nn.Module):
    """Draws negatives from P_n(w) = count(w)^exponent / Z (Mikolov et al. 2013b: exponent 3/4).

    Everything is computed once, in float64, and kept in buffers (so it moves and saves with the
    model): ``probs`` (V,) and Walker's alias table (``alias_prob``, ``alias``; Vose's O(V)
    construction). :meth:`sample` is then O(1) per draw: one uniform u, k = ⌊u·V⌋, keep k if the
    fractional part of u·V is below ``alias_prob[k]``, else take ``alias[k]``. That is exact (no
    1e8-entry unigram table as in word2vec.c) and, on CPU, several times faster than an inverse-cdf
    ``searchsorted``.
    """

    def __init__(self, counts: Sequence[int], exponent: float = 0.75) -> None:
        super().__init__()
        c = np.asarray(counts, dtype=np.float64)
        if c.ndim != 1 or c.size == 0:
            raise ValueError("NoiseSampler: counts must be a non-empty 1-d sequence")
        if (c < 0).any():
            raise ValueError("NoiseSampler: counts must be non-negative")
        w = np.power(c, float(exponent))  # 0**0 = 1: exponent 0 is uniform over the whole vocabulary
        if not w.sum() > 0:
            raise ValueError("NoiseSampler: all counts are zero")
        self.exponent = float(exponent)
        probs = w / w.sum()
        alias_prob, alias = _alias_table(probs)
        self.register_buffer("probs", torch.from_numpy(probs))
        self.register_buffer("alias_prob", torch.from_numpy(alias_prob))
        self.register_buffer("alias", torch.from_numpy(alias))

    @property
    def vocab_size(self) -> int:
        return int(self.probs.numel())

    def sample(self, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        """A LongTensor of ``shape`` i.i.d. draws from ``probs``."""
        V = self.vocab_size
        x = torch.rand(shape, generator=generator, dtype=torch.float64, device=self.probs.device).mul_(V)
        k = x.long().clamp_(max=V - 1)
        accept = torch.lt(x.sub_(k), self.alias_prob.index_select(0, k.view(-1)).view(k.shape))
        return torch.where(accept, k, self.alias.index_select(0, k.view(-1)).view(k.shape))


def _alias_table(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vose's alias method: bucket k keeps itself with probability ``prob[k]``, else ``alias[k]``."""
    V = len(probs)
    q = (probs * V).tolist()
    prob = [1.0] * V
    alias = list(range(V))
    small = [k for k in range(V) if q[k] < 1.0]
    large = [k for k in range(V) if q[k] >= 1.0]
    while small and large:
        s, l = small.pop(), large[-1]
        prob[s], alias[s] = q[s], l
        q[l] = (q[l] + q[s]) - 1.0
        if q[l] < 1.0:
            large.pop()
            small.append(l)
    # leftovers (round-off only) keep themselves with probability 1
    return np.asarray(prob, dtype=np.float64), np.asarray(alias, dtype=np.int64)


def keep_probabilities(counts: Sequence[int], sample: float) -> np.ndarray:
    """word2vec.c's subsampling: keep a token of word w with probability
    (sqrt(f/(t·N)) + 1)·(t·N)/f, capped at 1 (f = count(w), N = total count of the vocabulary,
    t = ``sample``). ``sample <= 0`` disables subsampling (all ones).

    With x = t·N/f the formula is sqrt(x) + x, which reaches 1 at x = (3 − √5)/2: every word with
    f ≤ t·N·(3 + √5)/2 ≈ 2.618·t·N is always kept.
    """
    f = np.asarray(counts, dtype=np.float64)
    if sample <= 0 or f.size == 0:
        return np.ones_like(f)
    tn = float(sample) * float(f.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (np.sqrt(f / tn) + 1.0) * tn / f
    keep = np.where(f > 0, keep, 1.0)
    return np.minimum(keep, 1.0)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for an index tensor of any shape, via ``index_select`` (on CPU, advanced
    indexing with a tensor is often an order of magnitude slower than index_select)."""
    return table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[-1])


@dataclass
class Word2VecConfig:
    vocab_size: int
    vector_size: int = 100
    sg: int = 1  # 1 = skip-gram, 0 = CBOW
    hs: int = 0  # 1 = hierarchical softmax
    negative: int = 5  # K noise words per prediction (0 = off)
    ns_exponent: float = 0.75
    cbow_mean: int = 1  # CBOW: 1 = mean of the context vectors, 0 = sum
    init: str = "word2vec"  # "word2vec": syn0 U(-0.5/d, 0.5/d), outputs 0 | "xavier": the seed's

    def __post_init__(self) -> None:
        if int(self.vocab_size) < 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be at least 1")
        if int(self.vector_size) < 1:
            raise ValueError(f"vector_size={self.vector_size} must be at least 1")
        if int(self.negative) < 0:
            raise ValueError(f"negative={self.negative} must be >= 0")
        if int(self.negative) == 0 and not int(self.hs):
            raise ValueError("negative=0 and hs=0: enable negative sampling (negative > 0) and/or hs=1")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: choose one of {', '.join(INITS)}")


class Word2Vec(nn.Module):
    """Skip-gram / CBOW with negative sampling and/or hierarchical softmax.

    ``counts`` are the vocabulary counts in id order (frequency order); they define the noise
    distribution and the Huffman tree. Parameters: ``in_vectors`` (syn0, V×d), ``out_vectors``
    (syn1neg, V×d, if ``negative > 0``), ``inner_vectors`` (syn1, (V−1)×d, if ``hs``; 1 unused row
    when V = 1). Buffers: ``codes``, ``points``, ``code_lengths`` (the Huffman tree, if ``hs``) and
    the :class:`NoiseSampler` ``noise``.
    """

    def __init__(self, config: Word2VecConfig, counts: Sequence[int]) -> None:
        super().__init__()
        counts = [int(c) for c in counts]
        if len(counts) != config.vocab_size:
            raise ValueError(f"len(counts)={len(counts)} != vocab_size={config.vocab_size}")
        self.config = config
        V, d = config.vocab_size, config.vector_size
        self.sg, self.hs, self.negative = bool(config.sg), bool(config.hs), int(config.negative)
        self.cbow_mean = bool(config.cbow_mean)

        self.in_vectors = nn.Embedding(V, d)
        self.out_vectors = nn.Embedding(V, d) if self.negative > 0 else None
        self.noise = NoiseSampler(counts, config.ns_exponent)
        if self.hs:
            tree = build_huffman(counts)
            self.inner_vectors = nn.Embedding(max(1, V - 1), d)
            self.register_buffer("codes", tree.codes)
            self.register_buffer("points", tree.points)
            self.register_buffer("code_lengths", tree.lengths)
        else:
            self.inner_vectors = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.config.vector_size
        outputs = [m for m in (self.out_vectors, self.inner_vectors) if m is not None]
        with torch.no_grad():
            if self.config.init == "word2vec":  # word2vec.c: syn0 U(-0.5/d, 0.5/d); syn1neg, syn1 = 0
                self.in_vectors.weight.uniform_(-0.5 / d, 0.5 / d)
                for m in outputs:
                    m.weight.zero_()
            else:  # the seed: xavier_uniform on the input and output tables (inner-node table too)
                nn.init.xavier_uniform_(self.in_vectors.weight)
                for m in outputs:
                    nn.init.xavier_uniform_(m.weight)

    # ------------------------------------------------------------------------------ helpers
    def vectors(self) -> torch.Tensor:
        """The word vectors: the input table syn0 (word2vec.c's output)."""
        return self.in_vectors.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _negatives(self, negatives: torch.Tensor | None, B: int) -> torch.Tensor | None:
        if self.negative == 0:
            return None
        if negatives is None:
            return self.noise.sample((B, self.negative))
        return negatives

    def _paths(self, words: torch.Tensor):
        """Huffman paths of ``words``: points (N, L'), codes (N, L') and the validity mask (N, L'),
        with L' the longest code among ``words`` (not the whole vocabulary)."""
        lengths = self.code_lengths.index_select(0, words)
        L = int(lengths.max()) if lengths.numel() else 0
        points = self.points.index_select(0, words)[:, :L]
        codes = self.codes.index_select(0, words)[:, :L]
        mask = torch.arange(L, device=words.device) < lengths[:, None]
        return points, codes, mask

    def _group_sizes(self, group: torch.Tensor, B: int) -> torch.Tensor:
        return torch.bincount(group, minlength=B)

    def _negative_weights(self, center, context, group, negatives, m, dtype) -> torch.Tensor:
        """(B, K) how many predictions each drawn negative serves: the m_g pairs of its group
        (skip-gram) or the group's one prediction (CBOW), minus those whose positive *is* that word —
        word2vec.c and gensim skip a negative equal to the target (``if (target == word) continue``)."""
        if self.sg:
            hits = (context[:, None] == negatives.index_select(0, group)).to(dtype)  # (P, K)
            return m.to(dtype)[:, None] - torch.zeros(negatives.shape, dtype=dtype).index_add_(0, group, hits)
        return ((negatives != center[:, None]) & (m > 0)[:, None]).to(dtype)

    def _cbow_hidden(self, context, group, B, m, weight):
        d = weight.shape[1]
        h = torch.zeros(B, d, dtype=weight.dtype, device=weight.device).index_add_(
            0, group, weight.index_select(0, context))
        if self.cbow_mean:
            # the value is the mean, but the gradient reaches every context word undivided, as in
            # word2vec.c and gensim (their neu1e); the true 1/|group| gradient learns ~2x worse here
            scale = 1.0 / m.clamp(min=1).to(h.dtype)[:, None]
            h = h + (h * (scale - 1.0)).detach()
        return h

    # ------------------------------------------------------------------------------ autograd loss
    def loss(self, center: torch.Tensor, context: torch.Tensor, group: torch.Tensor,
             negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch (autograd-capable) and the number of predictions
        (pairs for skip-gram, non-empty groups for CBOW)."""
        B = center.shape[0]
        negatives = self._negatives(negatives, B)
        m = self._group_sizes(group, B)
        W = self.in_vectors.weight
        total = W.new_zeros(())
        if self.sg:
            v = W.index_select(0, center)  # (B, d)
            vp = v.index_select(0, group)  # (P, d)
            if self.negative:
                out = self.out_vectors.weight
                sp = (out.index_select(0, context) * vp).sum(-1)
                sn = (_rows(out, negatives) * v[:, None]).sum(-1)  # (B, K), once per group
                nw = self._negative_weights(center, context, group, negatives, m, sn.dtype)
                total = total - F.logsigmoid(sp).sum() - (F.logsigmoid(-sn) * nw).sum()
            if self.hs:
                points, codes, mask = self._paths(context)
                s = (_rows(self.inner_vectors.weight, points) * vp[:, None]).sum(-1)
                sign = 1.0 - 2.0 * codes.to(s.dtype)
                total = total - (F.logsigmoid(sign * s) * mask).sum()
            return total, int(context.shape[0])
        # CBOW: one prediction (of center) per non-empty group
        h = self._cbow_hidden(context, group, B, m, W)
        valid = (m > 0).to(h.dtype)
        if self.negative:
            out = self.out_vectors.weight
            sp = (out.index_select(0, center) * h).sum(-1)
            sn = (_rows(out, negatives) * h[:, None]).sum(-1)
            nw = self._negative_weights(center, context, group, negatives, m, sn.dtype)
            total = total - (F.logsigmoid(sp) * valid).sum() - (F.logsigmoid(-sn) * nw).sum()
        if self.hs:
            points, codes, mask = self._paths(center)
            s = (_rows(self.inner_vectors.weight, points) * h[:, None]).sum(-1)
            sign = 1.0 - 2.0 * codes.to(s.dtype)
            total = total - ((F.logsigmoid(sign * s) * mask).sum(-1) * valid).sum()
        return total, int((m > 0).sum())

    # ------------------------------------------------------------------------------ fused SGD
    #: working-set budget (tensor elements) of one chunk of groups in :meth:`sgd_step`; the batch is
    #: processed in chunks whose gathered rows stay in the CPU cache (about 2 MB of float32).
    chunk_elements: int = 2**19

    def _chunks(self, m: torch.Tensor, per_pair: int, per_group: int) -> list[tuple[int, int, int, int]]:
        """Split the groups into consecutive ranges [a, b) (pairs [pa, pb)) of about
        ``chunk_elements`` gathered elements each, given the cost per pair and per group."""
        B, P = m.shape[0], int(m.sum())
        cost = per_group * B + per_pair * P
        if cost <= self.chunk_elements or B <= 1:
            return [(0, B, 0, P)]
        size = max(1, (self.chunk_elements * B) // max(1, cost))  # groups per chunk, on average
        ends = [0] + torch.cumsum(m, 0).tolist()
        return [(a, min(B, a + size), ends[a], ends[min(B, a + size)]) for a in range(0, B, size)]

    @torch.no_grad()
    def sgd_step(self, center: torch.Tensor, context: torch.Tensor, group: torch.Tensor,
                 negatives: torch.Tensor | None, lr: float, sequential: bool = False) -> tuple[float, int]:
        """Plain SGD on :meth:`loss`, written out by hand like word2vec.c.

        Touched rows are gathered, the error of every score g = (label − σ(score))·lr is computed
        (label 1 for the positive and for code bit 0, else 0), and the updates are scattered with
        ``index_add_`` (repeated words accumulate exactly like the summed gradient). The batch is
        processed in chunks of groups whose gathered rows stay in the CPU cache.

        ``sequential=False``: every chunk's errors come from the pre-update parameters and the rows
        are written afterwards, so this is exactly one ``torch.optim.SGD(lr)`` step on :meth:`loss`
        (the tests check it to 1e-9). ``sequential=True``: each chunk is written before the next is
        read, like word2vec.c's pair-by-pair updates. Hierarchical softmax needs that: every pair
        of a batch walks through the root and the nodes below it, so one summed step over thousands
        of pairs moves those rows by thousands of learning rates at once and diverges.
        Returns (loss before the updates, number of predictions).
        """
        lr = float(lr)
        B = center.shape[0]
        negatives = self._negatives(negatives, B)
        m = self._group_sizes(group, B)
        d, K = self.config.vector_size, self.negative
        L = self.points.shape[1] if self.hs else 0
        if self.sg:
            chunks = self._chunks(m, d * (2 + L), d * (2 + K))
        else:
            chunks = self._chunks(m, 1, d * (3 + K + L))
        batch = (center, context, group, negatives, m)
        if sequential:
            loss = sum(self._apply_chunk(c, batch, self._chunk_errors(c, batch, lr)) for c in chunks)
        else:
            errors = [self._chunk_errors(c, batch, lr) for c in chunks]
            loss = sum(self._apply_chunk(c, batch, e) for c, e in zip(chunks, errors))
        return float(loss), int(context.shape[0]) if self.sg else int((m > 0).sum())

    def _chunk_errors(self, chunk, batch, lr: float) -> dict:
        """Scores, loss and lr-scaled errors of the groups [a, b) (pairs [pa, pb)); writes nothing."""
        a, b, pa, pb = chunk
        center, context, group, negatives, m = batch
        W = self.in_vectors.weight
        gc = group[pa:pb] - a  # group of every pair, relative to the chunk
        if self.sg:
            x = W.index_select(0, center[a:b])  # v: the input vector of every group
            xp = x.index_select(0, gc)  # ... of every pair
            weight = m[a:b].to(W.dtype)  # skip-gram: the group's negatives serve its m_g pairs
            targets = context[pa:pb]  # one prediction per pair
        else:
            x = self._cbow_hidden(context[pa:pb], gc, b - a, m[a:b], W)  # h: one per group
            xp = x
            weight = (m[a:b] > 0).to(W.dtype)  # CBOW: one prediction per non-empty group
            targets = center[a:b]
        e = {"x": x, "xp": xp, "gc": gc, "loss": x.new_zeros((), dtype=torch.float64)}
        gx = x.new_zeros(x.shape)  # error of the input vector of every group
        if self.negative:
            out = self.out_vectors.weight
            up = out.index_select(0, targets)
            sp = (up * xp).sum(-1)
            un = _rows(out, negatives[a:b])  # (b-a, K, d): one draw per group
            sn = (un * x[:, None]).sum(-1)
            pos_w = 1.0 if self.sg else weight
            nw = self._negative_weights(center[a:b], context[pa:pb], gc, negatives[a:b], m[a:b], sn.dtype)
            e["loss"] -= (F.logsigmoid(sp) * pos_w).sum() + (F.logsigmoid(-sn) * nw).sum()
            e["gp"] = gp = torch.sigmoid(sp).neg_().add_(1.0).mul_(lr * pos_w)  # (1 − σ)·lr, label 1
            e["gn"] = gn = torch.sigmoid(sn).mul_(nw.mul_(-lr))  # (0 − σ)·lr per prediction it serves
            gx += torch.bmm(gn[:, None], un)[:, 0]  # Σ_k gn·u_n
            self._add_per_target(gx, gc, gp[:, None] * up)
        if self.hs:
            points, codes, mask = self._paths(targets)
            q = _rows(self.inner_vectors.weight, points)  # (n, L', d)
            s = (q * xp[:, None]).sum(-1)
            label = 1.0 - codes.to(s.dtype)
            ls = (F.logsigmoid((2.0 * label - 1.0) * s) * mask).sum(-1)
            gh = (label - torch.sigmoid(s)).mul_(mask).mul_(lr)  # (n, L')
            if not self.sg:
                ls, gh = ls * weight, gh.mul_(weight[:, None])
            e["loss"] -= ls.sum()
            e["gh"], e["points"] = gh, points
            self._add_per_target(gx, gc, torch.bmm(gh[:, None], q)[:, 0])
        e["gx"] = gx
        return e

    def _add_per_target(self, gx: torch.Tensor, gc: torch.Tensor, g: torch.Tensor) -> None:
        """Add per-prediction input errors to their group: per pair for skip-gram, per group for CBOW."""
        if self.sg:
            gx.index_add_(0, gc, g)
        else:
            gx += g

    def _apply_chunk(self, chunk, batch, e: dict) -> torch.Tensor:
        """Write the updates of one chunk (output rows, then input rows); returns its loss."""
        a, b, pa, pb = chunk
        center, context, group, negatives, m = batch
        d = self.config.vector_size
        if self.negative:
            out = self.out_vectors.weight
            out.index_add_(0, context[pa:pb] if self.sg else center[a:b], e["gp"][:, None] * e["xp"])
            out.index_add_(0, negatives[a:b].reshape(-1), (e["gn"][..., None] * e["x"][:, None]).view(-1, d))
        if self.hs:
            points = e["points"]
            self.inner_vectors.weight.index_add_(
                0, points.reshape(-1), (e["gh"][..., None] * e["xp"][:, None]).view(-1, d))
        W = self.in_vectors.weight
        if self.sg:
            W.index_add_(0, center[a:b], e["gx"])
        else:
            # every context word gets the group's whole error, also for the mean (see _cbow_hidden)
            W.index_add_(0, context[pa:pb], e["gx"].index_select(0, e["gc"]))
        return e["loss"]

    # ------------------------------------------------------------------------------ probes
    @torch.no_grad()
    def hs_log_prob(self, v: torch.Tensor) -> torch.Tensor:
        """log p(w | v) for every word w under the hierarchical softmax: (V,) for v of shape (d,),
        (N, V) for (N, d). Sums (in probability) to 1 by construction of the binary tree."""
        if not self.hs:
            raise ValueError("hs_log_prob needs a model built with hs=1")
        inner = self.inner_vectors.weight
        t = v.to(inner.dtype) @ inner.T  # (..., V-1): every inner node's score, once
        s = t.index_select(-1, self.points.reshape(-1)).view(*t.shape[:-1], *self.points.shape)  # (..., V, L)
        sign = 1.0 - 2.0 * self.codes.to(s.dtype)
        mask = torch.arange(self.points.shape[1], device=s.device) < self.code_lengths[:, None]
        return (F.logsigmoid(sign * s) * mask).sum(-1)


__all__ = [
    "HuffmanTree",
    "build_huffman",
    "NoiseSampler",
    "keep_probabilities",
    "Word2VecConfig",
    "Word2Vec",
]
