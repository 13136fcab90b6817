"""T5 pretraining data: the corpus as span-corrupted chunks (Raffel et al. 2020, §3.1.4 and §3.3;
the chunking of Hugging Face's ``run_t5_mlm_flax.py``).

The corpus becomes one token stream (:meth:`T5Tokenizer.encode_documents`: documents joined by a
blank line, cached like the LM stream), cut by position into train / val / test (contiguous, so
no text is in two splits). Each split is cut into non-overlapping chunks of the *pre-corruption*
length ``compute_input_and_target_lengths(input_length)[0]``: after span corruption (15 % of the
tokens dropped in spans of mean length 3, one sentinel per span, EOS appended) every encoder input
is exactly ``input_length`` tokens and every target exactly ``target_length``, so no compute is
spent on padding. Batches are dicts of ``input_ids`` (B, S), ``attention_mask`` (B, S; 1 = real
token) and ``labels`` (B, T; -100 = padding, only for a shorter last chunk).

* training (:class:`TrainChunks`): an endless stream; epoch ``e`` visits every training chunk once
  in an order drawn from ``(seed, e)`` and corrupts each with noise drawn from ``(seed, e, chunk)``,
  so every epoch sees new spans. Batch ``i`` is a pure function of ``(seed, i)``: a resumed run
  continues with exactly the batch an uninterrupted one would have used;
* evaluation (:class:`EvalChunks`): chunk ``k`` of a split always gets the noise of
  ``(seed, split, k)``, so validation and ``llmlab eval`` score the same examples every time.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llmlab.data.base import CorpusDataModule, IndexedBatches, ResumableBatches, TokenSplits, eval_loader
from llmlab.data.lm import split_stream, tokenize_cached
from llmlab.data.span_corruption import compute_input_and_target_lengths, noise_span_counts, span_corruption
from llmlab.data.t5_tokenizer import T5Tokenizer
from llmlab.data.tokenizers import Tokenizer
from llmlab.errors import UserError
from llmlab.nn.losses import IGNORE_INDEX

__all__ = ["EvalChunks", "T5DataModule", "TrainChunks", "collate_span_corruption"]

log = logging.getLogger(__name__)

_SPLIT_KEYS = {"train": 0, "val": 1, "test": 2}  # part of the evaluation noise seed


def collate_span_corruption(pairs: list[tuple[np.ndarray, np.ndarray]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``(inputs, targets)`` pairs -> ``input_ids`` / ``attention_mask`` padded with ``pad_id``,
    ``labels`` padded with -100."""
    S = max(len(i) for i, _ in pairs)
    T = max(len(t) for _, t in pairs)
    input_ids = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), S), dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    for row, (inp, tgt) in enumerate(pairs):
        input_ids[row, : len(inp)] = torch.from_numpy(np.asarray(inp, dtype=np.int64))
        attention_mask[row, : len(inp)] = 1
        labels[row, : len(tgt)] = torch.from_numpy(np.asarray(tgt, dtype=np.int64))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _Corruptor:
    """Span corruption of one chunk with a given seed (settings of the datamodule)."""

    def __init__(self, vocab_size: int, noise_density: float, mean_noise_span_length: float, eos_id: int) -> None:
        self.vocab_size, self.eos_id = int(vocab_size), int(eos_id)
        self.noise_density, self.mean_noise_span_length = float(noise_density), float(mean_noise_span_length)

    def __call__(self, chunk: np.ndarray, seed: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return span_corruption(
            np.asarray(chunk, dtype=np.int64), self.vocab_size, noise_density=self.noise_density,
            mean_noise_span_length=self.mean_noise_span_length, eos_id=self.eos_id,
            rng=np.random.default_rng(seed),
        )


class TrainChunks(IndexedBatches):
    """Endless training batches over the chunks of the training split (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, chunk_length: int, batch_size: int, corruptor: _Corruptor,
                 pad_id: int = 0, seed: int = 1337, start_batch: int = 0, rank: int = 0) -> None:
        super().__init__(seed, start_batch, rank)
        self.tokens, self.chunk_length = tokens, int(chunk_length)
        self.num_chunks = len(tokens) // self.chunk_length
        self.batch_size = int(batch_size)
        if self.num_chunks < 1:
            raise UserError(
                f"the training split has {len(tokens)} tokens, fewer than one chunk of {self.chunk_length}: "
                "use a larger corpus (data.path) or a smaller method.input_length"
            )
        # an epoch = every chunk once; a batch never spans two epochs (the last partial batch of
        # an epoch is dropped unless the split holds less than one batch)
        self.batches_per_epoch = max(1, self.num_chunks // self.batch_size)
        self.corrupt, self.pad_id = corruptor, int(pad_id)

    def order(self, epoch: int) -> np.ndarray:
        """Chunk indices in the order epoch ``epoch`` visits them."""
        return np.random.default_rng([*self._key, 0, int(epoch)]).permutation(self.num_chunks)

    def chunk(self, k: int) -> np.ndarray:
        """Raw tokens of training chunk ``k`` (before corruption)."""
        start = int(k) * self.chunk_length
        return np.asarray(self.tokens[start : start + self.chunk_length], dtype=np.int64)

    def example(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``k`` corrupted with epoch ``epoch``'s noise: ``(inputs, targets)``."""
        return self.corrupt(self.chunk(k), [*self._key, 1, int(epoch), int(k)])

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        """Training batch ``i`` (a pure function of ``seed`` and ``i``)."""
        epoch, j = divmod(int(i), self.batches_per_epoch)
        ks = self.order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return collate_span_corruption([self.example(epoch, k) for k in ks], self.pad_id)


class EvalChunks(Dataset):
    """Consecutive chunks of an evaluation split with fixed noise; items are ``(inputs, targets)``.

    The split's last tokens form a shorter last chunk (padded in the batch) when at least
    ``min_length`` of them are left, so nearly every token is scored.
    """

    def __init__(self, tokens: np.ndarray, chunk_length: int, corruptor: _Corruptor, seed: int, split: str,
                 min_length: int = 8) -> None:
        self.tokens, self.chunk_length = tokens, int(chunk_length)
        self.corrupt, self.seed, self.split = corruptor, int(seed), split
        n = len(tokens)
        self.n_full = n // self.chunk_length
        self.tail = n - self.n_full * self.chunk_length >= min(int(min_length), self.chunk_length)

    def __len__(self) -> int:
        return self.n_full + int(self.tail)

    def chunk(self, k: int) -> np.ndarray:
        start = int(k) * self.chunk_length
        return np.asarray(self.tokens[start : start + self.chunk_length], dtype=np.int64)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.corrupt(self.chunk(k), [self.seed, 2, _SPLIT_KEYS[self.split], int(k)])


class T5DataModule(TokenSplits, ResumableBatches, CorpusDataModule):
    """Corpus -> T5 tokenizer -> cached stream -> span-corrupted train/val/test chunks.

    The corpus keys (``corpus``, ``path``, ``seed``, ``cache_dir``, ``num_workers``) come from the
    data config; the rest from the method's ``datamodule`` node. Assign :attr:`tokenizer` (a
    :class:`~llmlab.data.t5_tokenizer.T5Tokenizer`, trained on :meth:`documents`) before setup.
    """

    tokenizer_class, tokenizer_option = T5Tokenizer, "t5"
    reads = "T5 span corruption needs the T5 vocabulary with <extra_id_*> sentinels"

    def __init__(
        self,
        input_length: int = 128,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        corpus: str = "shakespeare",
        path: str | None = None,
        seed: int = 1337,
        num_workers: int = 0,
        cache_dir: str | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__(corpus, path, seed, num_workers, None if cache_dir is None else str(cache_dir))
        self.input_length = int(input_length)
        self.noise_density, self.mean_noise_span_length = float(noise_density), float(mean_noise_span_length)
        # raises a UserError for bad densities / span lengths / input lengths < 3
        self.chunk_length, self.target_length = compute_input_and_target_lengths(
            self.input_length, self.noise_density, self.mean_noise_span_length)
        spans = noise_span_counts(self.chunk_length, self.noise_density, self.mean_noise_span_length)[1]
        if spans + 1 > T5Tokenizer.num_sentinels:
            raise UserError(
                f"method.input_length={self.input_length} gives {spans} noise spans per example but T5 has "
                f"{T5Tokenizer.num_sentinels} sentinels (one per span + a final one): use a smaller "
                "method.input_length or a larger method.mean_noise_span_length"
            )
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1: set data.{name} to a positive number")
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        split_stream(np.zeros(0), self.val_fraction, self.test_fraction)  # validate the fractions now
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} is negative: use 0 (load in the main process) or more")
        self.tokenizer = tokenizer
        self.next_batch = 0  # index of the next training batch (restored from checkpoints)
        self.splits: dict[str, np.ndarray] | None = None
        self._setup_key: str | None = None

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise UserError("the T5 datamodule has no tokenizer: assign datamodule.tokenizer (tokenizer=t5) before setup()")
        key = self.tokenizer.fingerprint
        if self.splits is not None and self._setup_key == key:
            return
        tokens = tokenize_cached(self.documents(), self.tokenizer, self.cache_dir)
        splits = split_stream(tokens, self.val_fraction, self.test_fraction)
        fractions = {"train": 1.0, "val": self.val_fraction, "test": self.test_fraction}
        for name in self.SPLITS:
            n = len(splits[name])
            if fractions[name] > 0 and n < self.chunk_length:
                raise UserError(
                    f"corpus too short: the {name} split has {n} tokens, fewer than one example of "
                    f"{self.chunk_length} tokens (method.input_length={self.input_length} after span corruption); "
                    "use a larger corpus (data.path) or a smaller method.input_length"
                )
        self.splits, self._setup_key = splits, key
        log.info("token stream: %s; %d tokens per example -> %d input + %d target tokens",
                 ", ".join(f"{k} {v:,}" for k, v in self.stats().items()), self.chunk_length,
                 self.input_length, self.target_length)

    def _corruptor(self) -> _Corruptor:
        return _Corruptor(self.tokenizer.vocab_size, self.noise_density, self.mean_noise_span_length,
                          self.tokenizer.eos_id)

    # ---------------------------------------------------------------- loaders
    def train_dataset(self) -> TrainChunks:
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        return TrainChunks(self._split("train"), self.chunk_length, self.batch_size, self._corruptor(),
                           pad_id=self.tokenizer.pad_id, seed=self.seed, start_batch=self.next_batch, rank=rank)

    def train_dataloader(self) -> DataLoader:
        # the dataset builds whole batches, so no collation
        return DataLoader(self.train_dataset(), batch_size=None, num_workers=self.num_workers,
                          generator=self._loader_rng())

    def eval_dataset(self, split: str) -> EvalChunks:
        if split not in self.SPLITS:
            raise UserError(f"unknown split {split!r}: use one of {', '.join(self.SPLITS)}")
        return EvalChunks(self._split(split), self.chunk_length, self._corruptor(), self.seed, split)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every chunk of a split (``train`` too) with its fixed noise, in order."""
        return eval_loader(self.eval_dataset(split), self.eval_batch_size, getattr(self, "trainer", None), split,
                           num_workers=self.num_workers, generator=self._loader_rng(),
                           collate_fn=partial(collate_span_corruption, pad_id=self.tokenizer.pad_id))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
