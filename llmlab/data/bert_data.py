"""BERT pre-training data: documents → WordPiece segments → NSP pairs → dynamically masked batches.

Splits are contiguous per document (each document's first segments train, the next ``val`` and the
last ``test`` fraction), so every split has every document and NotNext pairs can always come from
another document; a corpus of one document is cut into ``pseudo_documents`` contiguous parts first.
Training pairs are rebuilt every pass over the split with seed ``seed + pass`` and masked afresh
per batch (:class:`~llmlab.data.mlm.MLMCollator`), an endless stream that ``trainer.max_steps``
ends; validation and test pairs and masks are drawn once, so their metrics are comparable.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from llmlab.data.base import CorpusDataModule
from llmlab.data.mlm import MLMCollator, WordPieceTokenizer, build_nsp_pairs, mask_tokens, tokenize_documents
from llmlab.errors import UserError

log = logging.getLogger(__name__)
ROW_KEYS = ("input_ids", "token_type_ids", "attention_mask", "special_tokens_mask", "next_sentence_label")


class NSPStream(IterableDataset):
    """Endless NSP rows: pass ``k`` packs the documents with seed ``seed + k`` and shuffles them."""

    def __init__(self, documents, max_seq_len: int, seed: int, **pair_options) -> None:
        self.documents, self.max_seq_len, self.seed = documents, int(max_seq_len), int(seed)
        self.pair_options = pair_options

    def __iter__(self):
        k = 0
        while True:
            pairs = build_nsp_pairs(self.documents, self.max_seq_len, seed=self.seed + k, **self.pair_options)
            order = torch.randperm(len(pairs["input_ids"]), generator=torch.Generator().manual_seed(self.seed + k))
            for i in order.tolist():
                yield {key: pairs[key][i] for key in ROW_KEYS}
            k += 1


class BertDataModule(CorpusDataModule):
    tokenizer_class, reads, tokenizer_option = WordPieceTokenizer, "BERT reads WordPiece ids", "wordpiece"

    def __init__(self, max_seq_len: int = 128, max_predictions: int = 20, mlm_probability: float = 0.15,
                 nsp_probability: float = 0.5, short_seq_prob: float = 0.1, batch_size: int = 32,
                 eval_batch_size: int = 64, val_fraction: float = 0.05, test_fraction: float = 0.05,
                 pseudo_documents: int = 8, corpus: str = "shakespeare", path: str | None = None,
                 seed: int = 1337, num_workers: int = 0, cache_dir: str | None = None) -> None:
        super().__init__(corpus, path, seed, num_workers, cache_dir)
        if not 0 < val_fraction < 0.5 or not 0 < test_fraction < 0.5:
            raise UserError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in (0, 0.5)")
        self.max_seq_len, self.max_predictions = int(max_seq_len), max_predictions
        self.mlm_probability, self.batch_size, self.eval_batch_size = float(mlm_probability), int(batch_size), int(eval_batch_size)
        self.pair_options = dict(nsp_probability=float(nsp_probability), short_seq_prob=float(short_seq_prob))
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.pseudo_documents = int(pseudo_documents)
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

    def collator(self, seed: int) -> MLMCollator:
        tok = self.tokenizer
        return MLMCollator(tok.vocab_size, tok.mask_id, tok.special_ids, self.mlm_probability,
                           self.max_predictions, seed=seed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        stream = NSPStream(self.splits["train"], self.max_seq_len, self.seed, cls_id=self.tokenizer.cls_id,
                           sep_id=self.tokenizer.sep_id, pad_id=self.tokenizer.pad_id, **self.pair_options)
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=self.collator(self.seed),
                          num_workers=self.num_workers)

    def eval_set(self, split: str) -> dict[str, torch.Tensor]:
        """The fixed pairs and masks of ``split`` (drawn once, with the split's own seed)."""
        self.setup()
        if split not in self.eval_sets:
            offset = {"train": 0, "val": 1, "test": 2}[split]
            tok = self.tokenizer
            pairs = build_nsp_pairs(self.splits[split], self.max_seq_len, cls_id=tok.cls_id, sep_id=tok.sep_id,
                                    pad_id=tok.pad_id, seed=self.seed + 7919 * offset, **self.pair_options)
            batch = {k: pairs[k] for k in ROW_KEYS}
            g = torch.Generator().manual_seed(self.seed + 104729 * offset)
            batch["input_ids"], batch["labels"] = mask_tokens(
                batch["input_ids"], batch["special_tokens_mask"], tok.vocab_size, tok.mask_id, tok.special_ids,
                g, self.mlm_probability, self.max_predictions)
            self.eval_sets[split] = batch
        return self.eval_sets[split]

    def eval_dataloader(self, split: str) -> DataLoader:
        data = self.eval_set(split)
        n = len(data["input_ids"])
        rows = [{k: v[i] for k, v in data.items()} for i in range(n)]
        return DataLoader(rows, batch_size=self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def stats(self) -> dict[str, int]:
        self.setup()
        return {name: sum(len(s) for part in parts for s in part) for name, parts in self.splits.items()}
