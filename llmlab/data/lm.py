"""Language-model data: a cached token stream, contiguous splits, training and evaluation windows.

The corpus becomes one token stream (documents joined by EOS, or by a blank line for tokenizers
without one), cached as a memory-mapped ``.npy``. The stream is cut by position into train / val /
test, and read through windows of ``block_size`` tokens with pre-shifted targets
(``y[t] = x[t + 1]``, as in Raschka's ``GPTDatasetV1`` and nanoGPT's ``get_batch``):

* training: :class:`RandomWindows` — random offsets like nanoGPT, but batch ``i`` is a pure function
  of ``(seed, i)``, so a run resumed at batch ``i`` sees exactly the batches an uninterrupted run
  would have seen;
* evaluation: :class:`StridedWindows` — non-overlapping windows that predict every token of the
  split exactly once, so the mean loss over them is the split's true per-token cross-entropy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llmlab.data.base import IndexedBatches, ResumableBatches, TokenSplits, eval_loader
from llmlab.data.corpora import load_corpus
from llmlab.data.tokenizers import Tokenizer, token_dtype
from llmlab.errors import UserError
from llmlab.nn.losses import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "LMDataModule",
    "RandomWindows",
    "StridedWindows",
    "count_unknown",
    "split_stream",
    "stream_key",
    "tokenize_cached",
]

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------
# Token stream cache
# ------------------------------------------------------------------------------------------------


def stream_key(docs: list[str], tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer fingerprint and the documents (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    h.update(b"llmlab-token-stream-v1\0")
    h.update(tokenizer.fingerprint.encode("ascii"))
    for doc in docs:
        data = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _tokenize(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    t0 = time.perf_counter()
    tokens = np.ascontiguousarray(tokenizer.encode_documents(docs), dtype=token_dtype(tokenizer.vocab_size))
    log.info("tokenised %d documents into %d %s tokens in %.2fs", len(docs), len(tokens), tokenizer.name, time.perf_counter() - t0)
    return tokens


def tokenize_cached(docs: list[str], tokenizer: Tokenizer, cache_dir: str | os.PathLike | None) -> np.ndarray:
    """The 1-D token stream of ``docs``; cached under ``cache_dir`` and memory-mapped on reuse.

    The file name is keyed by :func:`stream_key`, so a different corpus or tokenizer never reads a
    stale stream. The file is written to a temporary name in the same directory and renamed into
    place, so a crash (or a concurrent writer) never leaves a half-written cache; processes building the
    same stream at once (sweep jobs) take turns on a file lock, so it is tokenised once. With a cache dir
    the result is always a read-only memmap; with ``cache_dir=None`` it is an in-memory array.
    """
    if cache_dir is None:
        return _tokenize(docs, tokenizer)
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"tokens-{tokenizer.name}-{stream_key(docs, tokenizer)[:32]}.npy"
    cached = _load_cached(path)
    if cached is not None:
        return cached
    lock_path = cache_dir / f".{path.name}.lock"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(lock_path, "a")  # noqa: SIM115 - held while building
    except OSError as e:
        raise UserError(f"cannot write the token cache in {cache_dir} ({e.strerror}): pass a writable directory via data.cache_dir=DIR (or data.cache_dir=null)") from None
    with lock:
        _lock_exclusive(lock)  # sweep jobs building the same stream at once: one tokenises, the others wait and read it
        try:
            cached = _load_cached(path)  # the real guard: a waiter finds the file its predecessor renamed into place
            if cached is not None:
                return cached
            tokens = _tokenize(docs, tokenizer)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, tokens)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        finally:  # the lock only saves duplicate work; the cache dir keeps nothing but the streams
            lock_path.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def _load_cached(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:  # unreadable: tokenise again and overwrite it
        log.warning("token cache %s is unreadable (%s): rebuilding it", path, e)
        return None


def _lock_exclusive(f) -> None:
    """flock the open file (released when it closes); where locks are unsupported, go on unlocked:
    the write is still atomic (temp file + rename), concurrent builders only duplicate work."""
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass


def count_unknown(tokens: np.ndarray, tokenizer: Tokenizer, chunk: int = 1 << 24) -> int:
    """How many ids of ``tokens`` are the tokenizer's unknown id (0 if it has none).

    Counted from the stream itself (in chunks, so a memmap is never loaded whole), so the count is
    the same whether the stream was just tokenised or read back from the cache.
    """
    unk = tokenizer.unk_id
    if unk is None:
        return 0
    return sum(int(np.count_nonzero(tokens[i : i + chunk] == unk)) for i in range(0, len(tokens), chunk))


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def split_stream(tokens: np.ndarray, val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """Cut the stream by position: ``train`` = the start, ``val`` = the next ``val_fraction``,
    ``test`` = the last ``test_fraction`` (views, no copies).

    Why contiguous and not random windows: neighbouring windows overlap (and text repeats within a
    document), so windows drawn at random into train and val would put the same tokens in both and
    make validation loss look better than it is. A cut by position leaks at most the one boundary.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(f) < 1.0:
            raise UserError(f"data.{name}={f} is out of range: use a fraction in [0, 1), e.g. data.{name}=0.05")
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise UserError(
            f"data.val_fraction + data.test_fraction = {float(val_fraction) + float(test_fraction):g} leaves "
            "nothing to train on: make their sum smaller than 1 (e.g. 0.05 each)"
        )
    n = len(tokens)
    n_test = int(round(n * float(test_fraction)))
    n_val = int(round(n * float(val_fraction)))
    n_train = n - n_val - n_test
    return {
        "train": tokens[:n_train],
        "val": tokens[n_train : n_train + n_val],
        "test": tokens[n_train + n_val :],
    }


# ------------------------------------------------------------------------------------------------
# Windows
# ------------------------------------------------------------------------------------------------


def _check_window(tokens: np.ndarray, block_size: int, what: str) -> None:
    if int(block_size) < 1:
        raise UserError(f"block_size={block_size} must be at least 1: set model.block_size to a positive number of tokens")
    if len(tokens) < int(block_size) + 1:
        raise UserError(
            f"{what} has {len(tokens)} tokens, need at least block_size+1={int(block_size) + 1}: "
            "use a larger corpus (data.path) or a smaller model.block_size"
        )


class RandomWindows(IndexedBatches):
    """Endless training batches ``(x, y)`` of random windows, ``y = x`` shifted by one token.

    Batch ``i`` draws its ``batch_size`` offsets uniformly from ``[0, len - block_size - 1]`` with
    ``np.random.default_rng([seed, i])``: it depends on nothing but ``(seed, i)`` (see
    :class:`~llmlab.data.base.IndexedBatches` for resuming and workers).
    """

    def __init__(
        self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int = 1337, start_batch: int = 0, rank: int = 0
    ) -> None:
        super().__init__(seed, start_batch, rank)
        _check_window(tokens, block_size, "the training stream")
        if int(batch_size) < 1:
            raise UserError(f"batch_size={batch_size} must be at least 1: set data.batch_size to a positive number")
        self.tokens = tokens
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self._span = np.arange(self.block_size + 1)

    def offsets(self, i: int) -> np.ndarray:
        """Start positions of batch ``i`` (a pure function of ``seed`` and ``i``)."""
        rng = np.random.default_rng([*self._key, int(i)])
        return rng.integers(0, len(self.tokens) - self.block_size - 1, size=self.batch_size, endpoint=True)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i``: ``x, y`` LongTensors of shape (batch_size, block_size)."""
        idx = self.offsets(i)[:, None] + self._span  # (B, T+1)
        buf = torch.from_numpy(np.asarray(self.tokens[idx], dtype=np.int64))
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class StridedWindows(Dataset):
    """Non-overlapping evaluation windows in which every token after the first is a target once.

    Windows start at 0, T, 2T, ...; if tokens remain, a last window ends at the stream's end and
    its targets that earlier windows already scored are set to ``-100`` (ignored by the loss).
    Items are ``(x, y)`` LongTensors of shape (T,).
    """

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        _check_window(tokens, block_size, "the evaluation stream")
        self.tokens = tokens
        self.block_size = T = int(block_size)
        n = len(tokens)
        self.n_full = (n - 1) // T  # windows at 0, T, ...: targets are positions 1 .. n_full*T
        covered = self.n_full * T
        self.tail = covered < n - 1  # positions covered+1 .. n-1 still need a window
        self._tail_start = n - 1 - T  # that window's x = tokens[n-1-T : n-1], y = tokens[n-T : n]
        self._tail_masked = covered - (n - T) + 1  # its first targets, already scored, are ignored

    def __len__(self) -> int:
        return self.n_full + int(self.tail)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start = i * self.block_size if i < self.n_full else self._tail_start
        buf = torch.from_numpy(np.asarray(self.tokens[start : start + self.block_size + 1], dtype=np.int64))
        x, y = buf[:-1].clone(), buf[1:].clone()
        if i >= self.n_full:
            y[: self._tail_masked] = IGNORE_INDEX
        return x, y

    @property
    def num_targets(self) -> int:
        """Targets scored over all windows: ``len(tokens) - 1``."""
        return len(self.tokens) - 1


# ------------------------------------------------------------------------------------------------
# DataModule
# ------------------------------------------------------------------------------------------------


class LMDataModule(TokenSplits, ResumableBatches, L.LightningDataModule):
    """Corpus -> tokenizer -> cached stream -> train/val/test windows, resumable batch by batch.

    Set :attr:`tokenizer` before :meth:`setup` (a char vocabulary is learned from :meth:`documents`).
    The training position (:attr:`next_batch`) travels in Lightning checkpoints through
    :meth:`state_dict` / :meth:`load_state_dict`, so ``ckpt_path=...`` resumes with the exact
    batch an uninterrupted run would have used next.
    """


    def __init__(
        self,
        corpus: str = "shakespeare",
        path: str | None = None,
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 1337,
        cache_dir: str | None = None,
        num_workers: int = 0,
        tokenizer: Tokenizer | None = None,
        genres: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.corpus = corpus
        self.path = None if path is None else str(path)
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.num_workers = int(num_workers)
        self.genres = None if genres is None else list(genres)  # Shakespeare: only these plays (None = all)
        self.tokenizer = tokenizer
        self.next_batch = 0  # index of the next training batch (restored from checkpoints)
        self.splits: dict[str, np.ndarray] | None = None
        self.unknown_tokens = 0  # ids of the stream that are the tokenizer's unk_id (set by setup)
        self._docs: list[str] | None = None
        self._setup_key: str | None = None
        for name in ("block_size", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be at least 1: set data.{name} (or model.block_size) to a positive number")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} is negative: use 0 (load in the main process) or more")
        split_stream(np.zeros(0), self.val_fraction, self.test_fraction)  # validate the fractions now

    # ---------------------------------------------------------------- corpus
    def documents(self) -> list[str]:
        """The corpus documents (read once, then kept on the instance)."""
        if self._docs is None:
            self._docs = load_corpus(self.corpus, self.path, self.genres)
        return self._docs

    # ---------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise UserError("the datamodule has no tokenizer: set datamodule.tokenizer (e.g. build_tokenizer('gpt2')) before setup()")
        key = self.tokenizer.fingerprint
        if self.splits is not None and self._setup_key == key:
            return  # fit, then validate/test: the stream is already split
        tokens = tokenize_cached(self.documents(), self.tokenizer, self.cache_dir)
        splits = split_stream(tokens, self.val_fraction, self.test_fraction)
        fractions = {"train": 1.0, "val": self.val_fraction, "test": self.test_fraction}
        for name in self.SPLITS:
            n = len(splits[name])
            if fractions[name] > 0 and n < self.block_size + 1:
                raise UserError(
                    f"corpus too short: {n} tokens in the {name} split, need at least "
                    f"block_size+1={self.block_size + 1}; use a larger corpus (data.path) or a smaller model.block_size"
                )
        self.splits, self._setup_key = splits, key
        self.unknown_tokens = count_unknown(tokens, self.tokenizer)
        log.info("token stream: %s", ", ".join(f"{k} {v:,}" for k, v in self.stats().items()))
        if self.unknown_tokens:
            log.warning("%d tokens of the stream are the %s tokenizer's unknown id %d (text outside its vocabulary)",
                        self.unknown_tokens, self.tokenizer.name, self.tokenizer.unk_id)

    def stats(self) -> dict[str, int]:
        """Token counts per split, and ``unknown_tokens``: how many tokens of the whole stream are
        the tokenizer's unknown id (text outside a char vocabulary; per split: :func:`count_unknown`)."""
        return {**super().stats(), "unknown_tokens": self.unknown_tokens}

    # ---------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        windows = RandomWindows(
            self._split("train"), self.block_size, self.batch_size, self.seed, start_batch=self.next_batch, rank=rank
        )
        # batches are built whole by the dataset (a fancy-indexed slice), so no collation
        return DataLoader(
            windows, batch_size=None, num_workers=self.num_workers, persistent_workers=False, generator=self._loader_rng()
        )

    def eval_dataloader(self, split: str) -> DataLoader:
        """Non-overlapping windows over any split (``train`` too), every token scored once."""
        if split not in self.SPLITS:
            raise UserError(f"unknown split {split!r}: use one of {', '.join(self.SPLITS)}")
        return self._eval_loader(split)

    def _eval_loader(self, name: str) -> DataLoader:
        tokens = self._split(name)
        if len(tokens) == 0:  # this split was switched off (fraction 0): an empty loader
            return DataLoader([], batch_size=self.eval_batch_size)
        return eval_loader(StridedWindows(tokens, self.block_size), self.eval_batch_size, getattr(self, "trainer", None), name,
                           num_workers=self.num_workers, generator=self._loader_rng())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
