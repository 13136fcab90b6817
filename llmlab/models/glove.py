"""GloVe: global log-bilinear regression on word–word co-occurrence counts.

References
----------
- Pennington, Socher & Manning 2014, "GloVe: Global Vectors for Word Representation", eq. 8:
  J = Σ_{i,j: X_ij > 0} f(X_ij)·(w_iᵀw̃_j + b_i + b̃_j − log X_ij)², with the weighting function
  f(x) = (x/x_max)^α for x < x_max, else 1 (x_max = 100, α = 3/4); the word vectors are W + W̃.
- glove.c (Stanford's reference code): the cost carries a factor ½ (``cost += 0.5 * fdiff * diff``),
  all parameters (vectors *and* biases) are initialised U(−0.5, 0.5)/d, and training is AdaGrad
  with every squared-gradient accumulator starting at 1.

Design: plain PyTorch, four ``nn.Embedding`` tables (``w``, ``w_tilde``, ``b``, ``b_tilde``), sparse
gradients by default so that ``torch.optim.Adagrad`` / ``SGD`` only touch the rows of a batch
(``sparse=False`` for Adam, the course seed's optimiser). The caller passes only the non-zero
entries (i, j, X_ij) of the co-occurrence matrix, so log X_ij is always finite and no +1 smoothing
is needed (``log_offset=1`` reproduces the seed's log(X + 1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

INITS = ("glove", "seed")
COMBINE = ("sum", "mean", "w")


def glove_weight(x: torch.Tensor, x_max: float = 100.0, alpha: float = 0.75) -> torch.Tensor:
    """f(x) = min(1, (x / x_max)^alpha); f(0) = 0 (for alpha > 0)."""
    return torch.clamp(torch.pow(x / x_max, alpha), max=1.0)


@dataclass
class GloVeConfig:
    vocab_size: int
    vector_size: int = 100
    init: str = "glove"  # "glove": U(-0.5, 0.5)/d for vectors and biases (glove.c) | "seed": U(-0.5, 0.5)

    def __post_init__(self) -> None:
        if int(self.vocab_size) < 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be at least 1")
        if int(self.vector_size) < 1:
            raise ValueError(f"vector_size={self.vector_size} must be at least 1")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: choose one of {', '.join(INITS)}")


class GloVe(nn.Module):
    """W (``w``), W̃ (``w_tilde``), b (``b``), b̃ (``b_tilde``) as ``nn.Embedding`` tables (biases V×1)."""

    def __init__(self, config: GloVeConfig, sparse: bool = True) -> None:
        super().__init__()
        self.config = config
        V, d = config.vocab_size, config.vector_size
        self.sparse = bool(sparse)
        self.w = nn.Embedding(V, d, sparse=self.sparse)
        self.w_tilde = nn.Embedding(V, d, sparse=self.sparse)
        self.b = nn.Embedding(V, 1, sparse=self.sparse)
        self.b_tilde = nn.Embedding(V, 1, sparse=self.sparse)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = 1.0 / self.config.vector_size if self.config.init == "glove" else 1.0
        with torch.no_grad():
            for table in (self.w, self.w_tilde, self.b, self.b_tilde):
                table.weight.uniform_(-0.5, 0.5).mul_(scale)

    def predict(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """w_i·w̃_j + b_i + b̃_j, shape of ``i`` (``squeeze(-1)``: a batch of 1 stays a batch)."""
        return (self.w(i) * self.w_tilde(j)).sum(-1) + self.b(i).squeeze(-1) + self.b_tilde(j).squeeze(-1)

    def loss(self, i: torch.Tensor, j: torch.Tensor, x: torch.Tensor, *, x_max: float = 100.0,
             alpha: float = 0.75, log_offset: float = 0.0) -> torch.Tensor:
        """Σ_batch ½·f(x)·(predict(i, j) − log(x + log_offset))²  (glove.c's cost; a sum, not a mean)."""
        pred = self.predict(i, j)
        x = x.to(pred.dtype)
        diff = pred - torch.log(x + log_offset)
        return 0.5 * (glove_weight(x, x_max, alpha) * diff * diff).sum()

    # ------------------------------------------------------------------ glove.c's AdaGrad, fused
    def init_adagrad_state(self) -> None:
        """Squared-gradient accumulators (buffers, so they are checkpointed), all starting at 1 as in glove.c."""
        for name, table in (("w", self.w), ("w_tilde", self.w_tilde), ("b", self.b), ("b_tilde", self.b_tilde)):
            self.register_buffer(f"gradsq_{name}", torch.ones_like(table.weight.detach()))

    @torch.no_grad()
    def adagrad_step(self, i: torch.Tensor, j: torch.Tensor, x: torch.Tensor, *, eta: float,
                     x_max: float = 100.0, alpha: float = 0.75, log_offset: float = 0.0) -> float:
        """glove.c's update for a batch of entries (i, j, X_ij); returns the cost before it.

        Per entry: fdiff = η·f(x)·(w_iᵀw̃_j + b_i + b̃_j − log x), g(w_i) = fdiff·w̃_j, g(w̃_j) = fdiff·w_i,
        g(b_i) = g(b̃_j) = fdiff; every row moves by −g/√G with G its accumulator *before* this
        gradient, then G += g². (That is glove.c, not torch.optim.Adagrad: the accumulator sums
        squares of the η-scaled gradient, and the current gradient is added after the step.) All
        entries of the batch read the parameters before any is written; repeated rows add up.
        """
        if not hasattr(self, "gradsq_w"):
            raise RuntimeError("call init_adagrad_state() before adagrad_step()")
        W, Wt = self.w.weight, self.w_tilde.weight
        wi, wj = W.index_select(0, i), Wt.index_select(0, j)
        x = x.to(W.dtype)
        diff = (wi * wj).sum(-1) + self.b.weight.index_select(0, i)[:, 0] \
            + self.b_tilde.weight.index_select(0, j)[:, 0] - torch.log(x + log_offset)
        fdiff = glove_weight(x, x_max, alpha) * diff
        cost = 0.5 * float((fdiff * diff).sum())
        fdiff = (fdiff * eta)[:, None]
        for table, gradsq, idx, g in ((W, self.gradsq_w, i, fdiff * wj), (Wt, self.gradsq_w_tilde, j, fdiff * wi),
                                      (self.b.weight, self.gradsq_b, i, fdiff),
                                      (self.b_tilde.weight, self.gradsq_b_tilde, j, fdiff)):
            table.index_add_(0, idx, g / gradsq.index_select(0, idx).sqrt_().neg_())
            gradsq.index_add_(0, idx, g * g)
        return cost

    def vectors(self, combine: str = "sum") -> torch.Tensor:
        """"sum": W + W̃ (paper §4.2); "mean": (W + W̃)/2 (the seed); "w": W only."""
        if combine == "sum":
            return self.w.weight + self.w_tilde.weight
        if combine == "mean":
            return (self.w.weight + self.w_tilde.weight) / 2
        if combine == "w":
            return self.w.weight
        raise ValueError(f"combine={combine!r}: choose one of {', '.join(COMBINE)}")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["glove_weight", "GloVeConfig", "GloVe"]
