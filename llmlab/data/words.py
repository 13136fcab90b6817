"""Word-level training data: streamed word2vec windows and GloVe co-occurrence counts.

Both start from the same sentences: every non-empty line of every document, lowercased regex
words, out-of-vocabulary words dropped *before* windows are formed (word2vec.c and glove.c do the
same), so a window never crosses a line.

- :class:`Word2VecDataModule` streams one epoch at a time, never materialising a pair list (seed
  bug 9): frequent words are subsampled with word2vec.c's keep-probability, each kept word draws
  its reduced window b ~ U{1..window} (word2vec.c's dynamic window), and batches hold ``batch_words``
  centers with all their context words, as ``center`` (B,), ``context`` (P,) and ``group`` (P,)
  (the center row each context word belongs to). The same layout serves skip-gram and CBOW.
- :class:`CooccurrenceDataModule` counts X_ij once with 1/d distance weighting (glove.c's
  ``cooccur``), keeps it as sorted sparse (i, j, x) triples and shuffles them every epoch.

Every epoch's randomness is a pure function of (seed, epoch), so resumed runs see the same data.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from llmlab.data.base import CorpusDataModule
from llmlab.data.tokenizers import Tokenizer, WordTokenizer
from llmlab.errors import UserError
from llmlab.models.word2vec import keep_probabilities


# ------------------------------------------------------------------------------------------------
# word2vec windows
# ------------------------------------------------------------------------------------------------


def window_pairs(
    ids: np.ndarray, sent: np.ndarray, reduced: np.ndarray, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centers ``start..stop-1`` of the stream with their context words.

    ``reduced[i]`` is center i's window (context = words at distance 1..reduced[i] on both sides,
    inside the same sentence). Returns (center ids (B,), context ids (P,), group (P,)): group[p]
    indexes the center of pair p, non-decreasing; centers without any context are left out.
    """
    n = len(ids)
    window = int(reduced[start:stop].max(initial=0))
    pos = np.arange(start, stop)
    offsets = np.concatenate([np.arange(-window, 0), np.arange(1, window + 1)])
    j = pos[:, None] + offsets[None, :]  # (B, 2w) candidate context positions
    jc = np.clip(j, 0, n - 1)
    ok = (j >= 0) & (j < n) & (np.abs(offsets)[None, :] <= reduced[pos][:, None]) & (sent[jc] == sent[pos][:, None])
    rows, cols = np.nonzero(ok)  # row-major: rows come out sorted
    has_ctx = np.bincount(rows, minlength=len(pos)) > 0
    compact = np.cumsum(has_ctx) - 1  # renumber the centers that have a context
    return ids[pos[has_ctx]], ids[jc[rows, cols]], compact[rows]


class Word2VecWindows(IterableDataset):
    """One epoch of subsampled, dynamically windowed batches (a pure function of seed and epoch)."""

    def __init__(
        self,
        ids: np.ndarray,
        sent: np.ndarray,
        keep: np.ndarray,
        window: int,
        shrink_windows: bool,
        batch_words: int,
        shared_negatives: bool,
        seed: int,
    ) -> None:
        self.ids, self.sent, self.keep = ids, sent, keep
        self.window, self.shrink_windows = int(window), bool(shrink_windows)
        self.batch_words, self.shared_negatives = int(batch_words), bool(shared_negatives)
        self.seed = int(seed)
        self.epoch = 0  # set by the datamodule before each epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        kept = rng.random(len(self.ids)) < self.keep[self.ids]  # word2vec.c: drop w with prob 1 - keep(w)
        ids, sent = self.ids[kept], self.sent[kept]
        n = len(ids)
        if self.shrink_windows:
            reduced = rng.integers(1, self.window + 1, size=n)
        else:
            reduced = np.full(n, self.window)
        for start in range(0, n, self.batch_words):
            stop = min(n, start + self.batch_words)
            center, context, group = window_pairs(ids, sent, reduced, start, stop)
            if len(center) == 0:
                continue
            if not self.shared_negatives:  # one group per pair: K fresh negatives per pair (word2vec.c)
                center, group = center[group], np.arange(len(group))
            yield {
                "center": torch.from_numpy(center),
                "context": torch.from_numpy(context),
                "group": torch.from_numpy(group),
                "progress": stop / n,  # share of this epoch done (drives the linear LR decay)
                "words": int(round(len(self.ids) * (stop - start) / n)),  # raw corpus words covered
            }


class _WordsDataModule(CorpusDataModule):
    """Corpus → word tokenizer → (ids, sentence index) arrays; one validation 'batch' for intrinsic eval."""

    tokenizer_class, reads, tokenizer_option = WordTokenizer, "word2vec and GloVe train on words", "word"

    def __init__(self, corpus: str = "shakespeare", path: str | None = None, seed: int = 1337,
                 num_workers: int = 0, cache_dir: str | None = None, tokenizer: Tokenizer | None = None) -> None:
        super().__init__(corpus, path, seed, num_workers, cache_dir)
        self.tokenizer = tokenizer
        self.ids: np.ndarray | None = None
        self.sent: np.ndarray | None = None
        self._train_set: IterableDataset | None = None
        self.epoch = 0

    def setup(self, stage: str | None = None) -> None:
        if self.ids is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("assign datamodule.tokenizer (a WordTokenizer) before setup()")
        self.ids, self.sent = self.tokenizer.encode_sentences(self.documents())
        if len(self.ids) < 2:
            raise UserError(
                f"the corpus has {len(self.ids)} in-vocabulary words: pass a larger corpus (data.path=...) "
                "or lower method.min_count"
            )

    def stats(self) -> dict[str, int]:
        self.setup()
        return {"words": int(len(self.ids)), "sentences": int(self.sent[-1]) + 1, "vocab": self.tokenizer.vocab_size}

    def val_dataloader(self) -> DataLoader:
        # validation = intrinsic evaluation of the current vectors; the loop needs one batch to run
        return DataLoader([0], batch_size=1)

    def set_epoch(self, epoch: int) -> None:
        """Called by the method at every epoch start: the next pass draws that epoch's randomness."""
        self.epoch = int(epoch)
        if self._train_set is not None:
            self._train_set.epoch = self.epoch


class Word2VecDataModule(_WordsDataModule):
    """word2vec training batches (see module docstring); names follow gensim."""

    def __init__(self, window: int = 5, shrink_windows: bool = True, sample: float = 1e-3,
                 batch_words: int = 1024, shared_negatives: bool = True, **corpus) -> None:
        super().__init__(**corpus)
        self.window, self.shrink_windows, self.sample = int(window), bool(shrink_windows), float(sample)
        self.batch_words, self.shared_negatives = int(batch_words), bool(shared_negatives)
        if self.window < 1:
            raise UserError(f"method.window={self.window} must be at least 1")
        if self.batch_words < 1:
            raise UserError(f"method.batch_words={self.batch_words} must be at least 1")
        if self.sample < 0:
            raise UserError(f"method.sample={self.sample} must be >= 0 (0 = no subsampling)")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        keep = keep_probabilities(self.tokenizer.counts, self.sample)
        ds = Word2VecWindows(self.ids, self.sent, np.asarray(keep), self.window, self.shrink_windows,
                             self.batch_words, self.shared_negatives, self.seed)
        ds.epoch = self.epoch
        self._train_set = ds
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers)


# ------------------------------------------------------------------------------------------------
# GloVe co-occurrences
# ------------------------------------------------------------------------------------------------


def cooccurrence(
    ids: np.ndarray, sent: np.ndarray, vocab_size: int, window: int = 10, symmetric: bool = True,
    distance_weighting: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse X as sorted (i, j, x) triples: X_ij += 1/d for word j at distance d ≤ window after i.

    glove.c's ``cooccur``: the left context of each word (its right context when ``symmetric``, so
    X is symmetric), inside a sentence. Duplicates are summed by one coalesce, in float64.
    """
    keys, vals = [], []
    for d in range(1, int(window) + 1):
        same = sent[d:] == sent[:-d]
        left, right = ids[:-d][same], ids[d:][same]  # `left` is d words before `right`
        w = 1.0 / d if distance_weighting else 1.0
        keys.append(left * vocab_size + right)  # glove.c: X[w1][w2] += 1/d, w1 = the earlier word
        vals.append(np.full(len(left), w))
        if symmetric:
            keys.append(right * vocab_size + left)
            vals.append(np.full(len(left), w))
    if not keys:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0, dtype=torch.float64)
    key = torch.from_numpy(np.concatenate(keys))
    val = torch.from_numpy(np.concatenate(vals))
    X = torch.sparse_coo_tensor(key[None], val, (vocab_size * vocab_size,), check_invariants=False).coalesce()
    k = X.indices()[0]
    return k // vocab_size, k % vocab_size, X.values()


class CooccurrenceTriples(IterableDataset):
    """The non-zero entries of X, reshuffled every epoch (a pure function of seed and epoch)."""

    def __init__(self, i: torch.Tensor, j: torch.Tensor, x: torch.Tensor, batch_size: int, seed: int) -> None:
        self.i, self.j, self.x = i, j, x.float()
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.x), generator=g)
        n = len(order)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield {"i": self.i[idx], "j": self.j[idx], "x": self.x[idx], "progress": min(n, start + self.batch_size) / n}


class CooccurrenceDataModule(_WordsDataModule):
    """GloVe training batches of (i, j, X_ij) over the non-zero entries; names follow glove.c."""

    def __init__(self, window: int = 10, symmetric: bool = True, distance_weighting: bool = True,
                 batch_size: int = 4096, **corpus) -> None:
        super().__init__(**corpus)
        self.window, self.symmetric, self.distance_weighting = int(window), bool(symmetric), bool(distance_weighting)
        self.batch_size = int(batch_size)
        self.triples: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if self.window < 1:
            raise UserError(f"method.window={self.window} must be at least 1")
        if self.batch_size < 1:
            raise UserError(f"method.batch_size={self.batch_size} must be at least 1")

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.triples is None:
            self.triples = cooccurrence(self.ids, self.sent, self.tokenizer.vocab_size, self.window,
                                        self.symmetric, self.distance_weighting)
            if len(self.triples[2]) == 0:
                raise UserError("no two in-vocabulary words share a line: nothing to count; pass a larger corpus")

    def stats(self) -> dict[str, int]:
        out = super().stats()
        out["nonzeros"] = int(len(self.triples[2]))
        return out

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ds = CooccurrenceTriples(*self.triples, batch_size=self.batch_size, seed=self.seed)
        ds.epoch = self.epoch
        self._train_set = ds
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers)
