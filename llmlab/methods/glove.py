"""GloVe as an llmlab method: weighted least squares on log co-occurrences.

Pennington, Socher & Manning 2014, "GloVe: Global Vectors for Word Representation", eq. 8:
J = Σ_{X_ij > 0} f(X_ij) (w_iᵀw̃_j + b_i + b̃_j − log X_ij)², f(x) = min(1, (x/x_max)^α). Names and
defaults follow glove.c (``vector_size``, ``window``, ``symmetric``, ``x_max=100``, ``alpha=0.75``,
``eta=0.05`` with AdaGrad); the vectors are W + W̃ (paper §4.2).

Only the non-zero entries of X are visited (no log(X+1) needed; ``log_offset=1`` reproduces the
course seed's choice). ``optimizer: adagrad`` (the paper's; glove.c's update, fused in
:meth:`~llmlab.models.glove.GloVe.adagrad_step` and applied to the touched rows only) or ``adam``
(the seed's, through autograd).
"""

from __future__ import annotations

import torch

from llmlab.errors import UserError
from llmlab.methods.embeddings import WordEmbeddingModule

OPTIMIZERS = ("adagrad", "adam")
COMBINE = ("sum", "mean", "w")


class GloVeModule(WordEmbeddingModule):
    name = "glove"

    def __init__(
        self,
        models: dict | None = None,
        vector_size: int = 100,
        x_max: float = 100.0,
        alpha: float = 0.75,
        eta: float = 0.05,
        log_offset: float = 0.0,
        optimizer: str = "adagrad",
        init: str = "glove",
        combine: str = "sum",
        restrict_vocab: int = 30000,
        **data_keys,  # window, symmetric, min_count ... belong to the data/tokenizer; kept in hparams for the record
    ) -> None:
        # GloVe's `alpha` is the weighting exponent; its learning rate is `eta` (constant, as in glove.c)
        super().__init__(models, alpha=eta, min_alpha=eta, restrict_vocab=restrict_vocab)
        data_keys.pop("optim", None)
        self.save_hyperparameters(ignore=["models"])
        if optimizer not in OPTIMIZERS:
            raise UserError(f"method.optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if combine not in COMBINE:
            raise UserError(f"method.combine={combine!r}: choose one of {', '.join(COMBINE)}")
        if x_max <= 0 or alpha <= 0:
            raise UserError(f"x_max={x_max}, alpha={alpha}: both must be positive (paper: 100 and 0.75)")
        self.x_max, self.weight_exponent, self.log_offset = float(x_max), float(alpha), float(log_offset)
        self.combine = combine
        self.use_fused_update(optimizer == "adagrad")  # adagrad: glove.c's update, fused
        self.title = "GloVe"
        if self.fused_update:
            self.model.init_adagrad_state()  # glove.c's accumulators (checkpointed with the weights)

    def vectors(self) -> torch.Tensor:
        return self.model.vectors(self.combine)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        i, j, x = batch["i"], batch["j"], batch["x"]
        weighting = dict(x_max=self.x_max, alpha=self.weight_exponent, log_offset=self.log_offset)
        if self.fused_update:
            cost, loss = self.model.adagrad_step(i, j, x, eta=self.alpha, **weighting), None
            self.optimizers().step()  # no gradients: only counts the step
        else:
            loss = self.model.loss(i, j, x, **weighting)
            cost = float(loss.detach())
        self.log_train(cost, len(x), len(x), epoch_end=batch["progress"] >= 1.0)  # "tokens" = co-occurrence entries visited
        return loss
