"""What every datamodule that reads a named corpus with one kind of tokenizer shares: the corpus
keys the ``data`` group passes (``corpus``, ``path``, ``seed``, ``num_workers``, ``cache_dir``), the
documents read once, and a ``tokenizer`` checked when it is assigned (so a wrong ``tokenizer=``
fails before any model is built, with the option to use)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llmlab.data.corpora import load_corpus
from llmlab.data.tokenizers import Tokenizer
from llmlab.errors import UserError

SPLITS = ("train", "val", "test")  # the splits every datamodule makes


class CorpusDataModule(L.LightningDataModule):
    #: the tokenizer type the batches are made of, what the method reads, and the option to pass
    tokenizer_class: type[Tokenizer] | None = None
    reads: str = "this method"
    tokenizer_option: str = ""
    #: Shakespeare: only the plays of these genres (None = all); set by build_data from data.genres
    genres: list[str] | None = None

    def __init__(self, corpus: str = "shakespeare", path: str | None = None, seed: int = 1337,
                 num_workers: int = 0, cache_dir: str | None = None) -> None:
        super().__init__()
        self.corpus, self.path = corpus, None if path is None else str(path)
        self.seed, self.num_workers, self.cache_dir = int(seed), int(num_workers), cache_dir
        self._tokenizer: Tokenizer | None = None
        self._docs: list[str] | None = None

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer | None) -> None:
        cls = self.tokenizer_class
        if tokenizer is not None and cls is not None and not isinstance(tokenizer, cls):
            raise UserError(f"{self.reads}, not tokenizer={getattr(tokenizer, 'name', None)}: "
                            f"use tokenizer={self.tokenizer_option}")
        self._tokenizer = tokenizer

    def documents(self) -> list[str]:
        """The corpus documents (read once, then kept)."""
        if self._docs is None:
            self._docs = load_corpus(self.corpus, self.path, self.genres)
        return self._docs


def eval_loader(dataset, batch_size: int, trainer=None, split: str = "evaluation", **kwargs) -> DataLoader:
    """The evaluation DataLoader of ``dataset``, in order; under data-parallel ``trainer`` rank ``r`` of
    ``W`` gets items ``r, r+W, ...``, so every item is scored exactly once (llmlab.distributed.eval_sampler)."""
    from llmlab.distributed import eval_sampler

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=eval_sampler(dataset, trainer, split),
                      **kwargs)


class TokenSplits:
    """For datamodules that cut one token stream into ``train``/``val``/``test`` arrays in
    :meth:`setup` (kept in ``self.splits``)."""

    SPLITS = SPLITS
    splits: dict[str, np.ndarray] | None = None

    def _split(self, name: str) -> np.ndarray:
        if self.splits is None:
            self.setup()
        return self.splits[name]

    def stats(self) -> dict[str, int]:
        """Token counts per split (after :meth:`setup`)."""
        if self.splits is None:
            raise UserError("the datamodule is not set up yet: call setup() (after setting its tokenizer) before stats()")
        return {name: int(len(self.splits[name])) for name in self.SPLITS}


class ResumableBatches:
    """For datamodules whose training batch ``i`` is a pure function of ``(seed, i)``: the position
    to resume from (``next_batch``) goes into checkpoints, and DataLoaders get a private generator
    (iterating a DataLoader draws its worker seed from the global torch RNG, which would shift
    dropout's random stream after a resume)."""

    seed: int
    next_batch: int = 0

    def _loader_rng(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict:
        """Where training stands: the index of the next training batch."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            # one optimizer step consumes accumulate_grad_batches batches
            return {"next_batch": int(trainer.global_step) * int(trainer.accumulate_grad_batches)}
        return {"next_batch": int(self.next_batch)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.next_batch = int(state_dict.get("next_batch", 0))


class IndexedBatches(IterableDataset):
    """Endless training batches in which batch ``i`` is a pure function of ``(seed, i)``
    (subclasses implement :meth:`batch`), so iteration can start at any ``start_batch`` and a
    resumed run continues exactly where it stopped. With ``W`` DataLoader workers, worker ``k``
    makes batches ``start_batch + k, + k + W, ...`` and the DataLoader interleaves them back into
    order. Data-parallel ranks draw different data (``rank`` joins the random key); rank 0 draws
    what a single process would."""

    def __init__(self, seed: int, start_batch: int = 0, rank: int = 0) -> None:
        super().__init__()
        self.seed, self.start_batch = int(seed), int(start_batch)
        self._key = [self.seed] if int(rank) == 0 else [self.seed, int(rank)]

    def batch(self, i: int):
        """Training batch ``i``."""
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        i = self.start_batch + worker
        while True:
            yield self.batch(i)
            i += workers


class Collate:
    """``collate_fn`` = ``fn(items, pad)`` (a class, so DataLoader workers can pickle it)."""

    def __init__(self, fn, pad: int) -> None:
        self.fn, self.pad = fn, int(pad)

    def __call__(self, items: list):
        return self.fn(items, self.pad)


class ShuffledBatches(IndexedBatches):
    """Endless training batches of ``items``; batch ``i`` is a pure function of ``(seed, i)``.

    Epoch ``e`` visits the items in a permutation drawn with ``(seed, e)`` (its last partial batch
    is dropped); with sampling weights ``p`` it draws ``len(items)`` items with replacement instead
    (a classifier's ``balanced`` classes)."""

    def __init__(self, items: list, batch_size: int, collate: Collate, seed: int, start_batch: int = 0,
                 rank: int = 0, p: np.ndarray | None = None) -> None:
        super().__init__(seed, start_batch, rank)
        if not items:
            raise UserError("the training split has no examples: check data.path, data.max_length and the fractions")
        self.items, self.collate, self.p = items, collate, p
        self.batch_size = min(int(batch_size), len(items))
        self.per_epoch = len(items) // self.batch_size
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Item indices of epoch ``epoch`` in visiting order."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([*self._key, int(epoch)])
            n = len(self.items)
            self._order = (epoch, rng.choice(n, size=n, p=self.p) if self.p is not None else rng.permutation(n))
        return self._order[1]

    def batch(self, i: int):
        epoch, j = divmod(int(i), self.per_epoch)
        rows = self.order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return self.collate([self.items[r] for r in rows])

