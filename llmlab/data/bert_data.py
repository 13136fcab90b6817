"""BERT pre-training data: documents → WordPiece segments → NSP pairs → dynamically masked batches.

Splits are contiguous per document (each document's first segments train, the next ``val`` and the
last ``test`` fraction), so every split has every document and NotNext pairs can always come from
another document; a corpus of one document is cut into ``pseudo_documents`` contiguous parts first.
Training pairs are rebuilt every pass over the split with seed ``seed + pass`` and masked afresh
per batch (:class:`NSPBatches`: batch ``i`` is a pure function of ``(seed, i)``, so resuming from a
checkpoint continues the same batch sequence), an endless stream that ``trainer.max_steps`` ends;
``static_masking=true`` keeps the first pass's pairs and masks instead. Validation and test pairs
and masks are drawn once, so their metrics are comparable.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from llmlab.data.base import CorpusDataModule, IndexedBatches, ResumableBatches, eval_loader
from llmlab.data.mlm import WordPieceTokenizer, build_nsp_pairs, mask_tokens, tokenize_documents
from llmlab.errors import UserError

log = logging.getLogger(__name__)
ROW_KEYS = ("input_ids", "token_type_ids", "attention_mask", "special_tokens_mask", "next_sentence_label")


class NSPBatches(IndexedBatches):
    """Endless training batches; batch ``i`` is a pure function of ``(seed, i)``, so a resumed run
    continues with exactly the batches it would have seen.

    Pass ``k`` over the split packs the documents into pairs with seed ``seed + k`` and visits them
    in a shuffled order; a batch never spans two passes (a pass's last partial batch is dropped).
    Dynamic masking (RoBERTa's, the default) masks each batch afresh with seed ``(seed, i)``; with
    ``static_masking`` every pass reuses pass 0's pairs and masks, as BERT's original data
    (``create_pretraining_data.py`` with ``dupe_factor=1``), in a new order.
    """

    def __init__(self, documents, max_seq_len: int, batch_size: int, masker: Callable, seed: int,
                 static_masking: bool = False, start_batch: int = 0, rank: int = 0, **pair_options) -> None:
        super().__init__(seed, start_batch, rank)
        self.documents, self.max_seq_len, self.batch_size = documents, int(max_seq_len), int(batch_size)
        self.masker, self.static_masking, self.pair_options = masker, bool(static_masking), pair_options
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._sizes: list[int] = []  # batches in each pass built so far
        self._static: dict[str, torch.Tensor] | None = None  # static_masking: pass 0, masked

    def pairs(self, k: int) -> dict[str, torch.Tensor]:
        """The rows of pass ``k`` in visiting order (masked already with ``static_masking``)."""
        if self._cache is None or self._cache[0] != k:
            rows = self._static_rows() if self.static_masking else self._packed(k)
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([*self._key, 0, k]).generate_state(1)[0]))
            order = torch.randperm(len(rows["input_ids"]), generator=g)
            self._cache = (k, {key: v[order] for key, v in rows.items()})
        return self._cache[1]

    def _packed(self, k: int) -> dict[str, torch.Tensor]:
        rows = build_nsp_pairs(self.documents, self.max_seq_len, seed=self.seed + k, **self.pair_options)
        return {key: rows[key] for key in ROW_KEYS}

    def _static_rows(self) -> dict[str, torch.Tensor]:
        """Pass 0's pairs and masks, built once and reused by every pass."""
        if self._static is None:
            rows = self._packed(0)
            rows["input_ids"], rows["labels"] = self.masker(rows, torch.Generator().manual_seed(self.seed))
            self._static = rows
        return self._static

    def _locate(self, i: int) -> tuple[int, int]:
        """(pass, batch within the pass) of global batch ``i``."""
        k, first = 0, 0
        while True:
            if k == len(self._sizes):
                n = len(self.pairs(k)["input_ids"])
                if n < self.batch_size:
                    raise UserError(f"the training split packs into {n} pairs, fewer than one batch of "
                                    f"{self.batch_size}: lower method.datamodule.batch_size or use a larger corpus")
                self._sizes.append(n // self.batch_size)
            if i < first + self._sizes[k]:
                return k, i - first
            first += self._sizes[k]
            k += 1

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        """Training batch ``i``."""
        k, j = self._locate(int(i))
        rows = self.pairs(k)
        batch = {key: v[j * self.batch_size : (j + 1) * self.batch_size] for key, v in rows.items()}
        if not self.static_masking:
            seed = int(np.random.SeedSequence([*self._key, 1, int(i)]).generate_state(1)[0])
            batch["input_ids"], batch["labels"] = self.masker(batch, torch.Generator().manual_seed(seed))
        return batch


class BertDataModule(ResumableBatches, CorpusDataModule):
    tokenizer_class, reads, tokenizer_option = WordPieceTokenizer, "BERT reads WordPiece ids", "wordpiece"

    def __init__(self, max_seq_len: int = 128, max_predictions: int = 20, mlm_probability: float = 0.15,
                 nsp_probability: float = 0.5, short_seq_prob: float = 0.1, batch_size: int = 32,
                 eval_batch_size: int = 64, val_fraction: float = 0.05, test_fraction: float = 0.05,
                 pseudo_documents: int = 8, static_masking: bool = False, corpus: str = "shakespeare",
                 path: str | None = None,
                 seed: int = 1337, num_workers: int = 0, cache_dir: str | None = None) -> None:
        super().__init__(corpus, path, seed, num_workers, cache_dir)
        if not 0 < val_fraction < 0.5 or not 0 < test_fraction < 0.5:
            raise UserError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in (0, 0.5)")
        self.max_seq_len, self.max_predictions = int(max_seq_len), max_predictions
        self.mlm_probability, self.batch_size, self.eval_batch_size = float(mlm_probability), int(batch_size), int(eval_batch_size)
        self.pair_options = dict(nsp_probability=float(nsp_probability), short_seq_prob=float(short_seq_prob))
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.pseudo_documents = int(pseudo_documents)
        self.static_masking = bool(static_masking)
        self.splits: dict[str, list] | None = None
        self.eval_sets: dict[str, dict[str, torch.Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("assign datamodule.tokenizer (a WordPieceTokenizer) before setup()")
        docs = [d for d in tokenize_documents(self.tokenizer, self.documents()) if d]
        if len(docs) == 1 and len(docs[0]) >= 2 * self.pseudo_documents:
            segs = docs[0]
            cuts = np.linspace(0, len(segs), self.pseudo_documents + 1).astype(int)
            docs = [segs[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
            log.info("one document: cut into %d contiguous parts for next-sentence negatives", len(docs))
        self.splits = {"train": [], "val": [], "test": []}
        for segs in docs:
            n = len(segs)
            a = int(round(n * (1 - self.val_fraction - self.test_fraction)))
            b = int(round(n * (1 - self.test_fraction)))
            for name, part in (("train", segs[:a]), ("val", segs[a:b]), ("test", segs[b:])):
                if part:
                    self.splits[name].append(part)
        for name, parts in self.splits.items():
            if sum(len(p) for p in parts) < 2 or len(parts) < 2:
                raise UserError(
                    f"the {name} split has too little text for next-sentence pairs ({len(parts)} document(s)): "
                    "pass a larger corpus (data.path=...) or raise method.datamodule.val_fraction/test_fraction"
                )

    def mask(self, rows: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)``: BERT's masking of ``rows["input_ids"]`` with this datamodule's settings."""
        tok = self.tokenizer
        return mask_tokens(rows["input_ids"], rows["special_tokens_mask"], tok.vocab_size, tok.mask_id,
                           tok.special_ids, generator, self.mlm_probability, self.max_predictions)

    def train_dataset(self) -> NSPBatches:
        self.setup()
        tok = self.tokenizer
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        return NSPBatches(self.splits["train"], self.max_seq_len, self.batch_size, self.mask, self.seed,
                          static_masking=self.static_masking, start_batch=self.next_batch, rank=rank,
                          cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id, **self.pair_options)

    def train_dataloader(self) -> DataLoader:
        # the dataset builds whole batches, so no collation
        return DataLoader(self.train_dataset(), batch_size=None, num_workers=self.num_workers,
                          generator=self._loader_rng())

    def eval_set(self, split: str) -> dict[str, torch.Tensor]:
        """The fixed pairs and masks of ``split`` (drawn once, with the split's own seed)."""
        self.setup()
        if split not in self.eval_sets:
            offset = {"train": 0, "val": 1, "test": 2}[split]
            tok = self.tokenizer
            pairs = build_nsp_pairs(self.splits[split], self.max_seq_len, cls_id=tok.cls_id, sep_id=tok.sep_id,
                                    pad_id=tok.pad_id, seed=self.seed + 7919 * offset, **self.pair_options)
            batch = {k: pairs[k] for k in ROW_KEYS}
            batch["input_ids"], batch["labels"] = self.mask(batch, torch.Generator().manual_seed(self.seed + 104729 * offset))
            self.eval_sets[split] = batch
        return self.eval_sets[split]

    def eval_dataloader(self, split: str) -> DataLoader:
        data = self.eval_set(split)
        n = len(data["input_ids"])
        rows = [{k: v[i] for k, v in data.items()} for i in range(n)]
        return eval_loader(rows, self.eval_batch_size, getattr(self, "trainer", None), split)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def stats(self) -> dict[str, int]:
        self.setup()
        return {name: sum(len(s) for part in parts for s in part) for name, parts in self.splits.items()}
