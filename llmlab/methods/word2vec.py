"""word2vec as an llmlab method: skip-gram / CBOW with negative sampling and/or hierarchical softmax.

Mikolov et al. 2013a ("Efficient Estimation of Word Representations in Vector Space") and 2013b
("Distributed Representations of Words and Phrases and their Compositionality"); hyperparameter
names and defaults follow gensim's ``Word2Vec`` (``vector_size``, ``window``, ``min_count``, ``sg``,
``hs``, ``negative``, ``ns_exponent``, ``sample``, ``alpha``, ``min_alpha``, ``cbow_mean``).

``optimizer: sgd`` (default) trains like word2vec.c: plain SGD with a linearly decaying rate,
applied by :meth:`~llmlab.models.word2vec.Word2Vec.sgd_step` to the touched rows only (a
hand-written update, checked against autograd in the tests), chunk after chunk of the batch
(``sequential=True``) so that rows shared by thousands of pairs (hierarchical-softmax nodes near
the root, frequent negatives) move as in word2vec.c's pair-by-pair SGD instead of overshooting. ``optimizer: adam`` goes through
autograd and ``torch.optim.Adam`` on the mean loss (the course seed's recipe).
"""

from __future__ import annotations

import torch

from llmlab.errors import UserError
from llmlab.methods.embeddings import WordEmbeddingModule

OPTIMIZERS = ("sgd", "adam")


class Word2VecModule(WordEmbeddingModule):
    name = "word2vec"

    def __init__(
        self,
        models: dict | None = None,
        vector_size: int = 100,
        sg: int = 1,
        hs: int = 0,
        negative: int = 5,
        ns_exponent: float = 0.75,
        cbow_mean: int = 1,
        alpha: float = 0.025,
        min_alpha: float = 0.0001,
        optimizer: str = "sgd",
        init: str = "word2vec",
        restrict_vocab: int = 30000,
        **data_keys,  # window, sample, min_count ... belong to the data/tokenizer; kept in hparams for the record
    ) -> None:
        super().__init__(models, alpha=alpha, min_alpha=min_alpha, restrict_vocab=restrict_vocab)
        data_keys.pop("optim", None)
        self.save_hyperparameters(ignore=["models"])
        if optimizer not in OPTIMIZERS:
            raise UserError(f"method.optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if int(negative) < 0 or (int(negative) == 0 and not int(hs)):
            raise UserError(f"negative={negative}, hs={hs}: set negative > 0 (negative sampling) and/or hs=1 (hierarchical softmax)")
        if int(vector_size) < 1:
            raise UserError(f"method.vector_size={vector_size} must be at least 1")
        self.use_fused_update(optimizer == "sgd")  # sgd: the fused word2vec.c update
        self.sg = bool(int(sg))
        self.title = f"word2vec ({'skip-gram' if self.sg else 'CBOW'}, {_objective(int(hs), int(negative))})"

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        center, context, group = batch["center"], batch["context"], batch["group"]
        lr = self.lr_at(batch["progress"])
        K = self.model.config.negative
        negatives = self.model.noise.sample((len(center), K)) if K else None
        self.set_lr(lr)
        if self.automatic_optimization:
            loss_sum, n = self.model.loss(center, context, group, negatives)
            loss = loss_sum / max(1, n)
        else:
            loss_sum, n = self.model.sgd_step(center, context, group, negatives, lr, sequential=True)
            self.optimizers().step()  # no gradients: only counts the step
            loss = None
        self.log_train(float(loss_sum), n, int(batch["words"]), epoch_end=batch["progress"] >= 1.0)
        return loss


def _objective(hs: int, negative: int) -> str:
    parts = ([f"{negative} negatives"] if negative else []) + (["hierarchical softmax"] if hs else [])
    return " + ".join(parts)
