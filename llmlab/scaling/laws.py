"""The published scaling laws and compute-optimal allocation, as formulas (spec seed000_part3 §1.3).

* **Chinchilla** (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", Approach 3):
  ``L(N, D) = E + A / N**alpha + B / D**beta`` with N = total parameters, D = training tokens,
  compute C = 6 N D. Minimising L on C = 6 N D has a closed form (Lagrange / substitution):
  ``G = (alpha A / (beta B)) ** (1 / (alpha + beta))``, ``N* = G (C/6)**a``, ``D* = (C/6)**b / G`` with
  ``a = beta / (alpha + beta)``, ``b = alpha / (alpha + beta)``; on that frontier the loss is again a
  power law, ``L*(C) = E + K (C/6) ** -(alpha beta / (alpha + beta))``, ``K = A G**-alpha + B G**beta``.
  Two constant sets: the paper's rounded ones (``hoffmann``: D*/N* grows with C, 25.7 at 1e18 to 97.7
  at 1e24) and Epoch's refit (Besiroglu et al. 2024, arXiv 2404.10102: ``besiroglu``, ~20 tokens per
  parameter).
* **Kaplan** (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Tables 5/6): N =
  non-embedding parameters; ``L(N) = (N_c/N)**alpha_N``, ``L(D) = (D_c/D)**alpha_D``, ``L(C_min) =
  (C_c/C_min)**alpha_C`` (C in PF-days, 1 PF-day = 8.64e19 FLOPs) and the compute-efficient
  allocation ``N_opt = 1.3e9 C**0.73``, ``D_opt = 2e10 C**0.27`` (at the critical batch size, so 6 N D
  is *not* C there).
* The **20-tokens rule** (Chinchilla Approaches 1/2): ``N = sqrt(C / 120)``, ``D = 20 N``.

The seed's constants for Kaplan (A = B = 1 plus L_inf = 1.7), its allocations (N = 0.1 C**0.73 and
N = 0.3 C**0.5) and its "simplified" compute laws are wrong by orders of magnitude (spec §1.6) and
are not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmlab.errors import UserError

PF_DAY = 8.64e19  # FLOPs in one petaflop/s-day


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{name}={value!r} must be a positive finite number")
    return float(value)


@dataclass(frozen=True)
class ChinchillaLaw:
    """``L(N, D) = E + A / N**alpha + B / D**beta`` (module docstring)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = "chinchilla"

    def loss(self, n_params: float, n_tokens: float) -> float:
        """Predicted loss (nats/token) of ``n_params`` total parameters trained on ``n_tokens`` tokens."""
        N, D = _positive("n_params", n_params), _positive("n_tokens", n_tokens)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def a(self) -> float:
        """N* ∝ C**a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D* ∝ C**b."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def frontier_exponent(self) -> float:
        """L*(C) - E ∝ (C/6) ** -frontier_exponent."""
        return self.alpha * self.beta / (self.alpha + self.beta)

    @property
    def K(self) -> float:
        return self.A * self.G ** (-self.alpha) + self.B * self.G**self.beta

    def optimal(self, compute: float) -> dict[str, float]:
        """Compute-optimal ``n_params``, ``n_tokens`` (C = 6 N D), tokens per parameter and ``loss``."""
        C = _positive("compute", compute)
        n = self.G * (C / 6) ** self.a
        d = (C / 6) ** self.b / self.G
        return {"compute": C, "n_params": n, "n_tokens": d, "tokens_per_param": d / n, "loss": self.loss(n, d)}

    def frontier_loss(self, compute: float) -> float:
        """``L*(C)`` from the closed form (equals ``optimal(C)["loss"]``)."""
        return self.E + self.K * (_positive("compute", compute) / 6) ** (-self.frontier_exponent)

    def compute_for_loss(self, target_loss: float) -> float:
        """The smallest compute whose optimal model reaches ``target_loss`` (must be above E)."""
        target = _positive("target_loss", target_loss)
        if target <= self.E:
            raise UserError(f"target_loss={target} is not above the irreducible loss E={self.E} of the "
                            f"{self.name} law: no compute reaches it; choose target_loss > {self.E}")
        return 6 * ((target - self.E) / self.K) ** (-1.0 / self.frontier_exponent)


@dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020's single-variable laws and Table 6 allocation (module docstring)."""

    N_c: float = 8.8e13
    alpha_N: float = 0.076
    D_c: float = 5.4e13
    alpha_D: float = 0.095
    C_c_pf_days: float = 3.1e8
    alpha_C: float = 0.050
    name: str = "kaplan"

    def loss_params(self, n_params: float) -> float:
        """L(N): non-embedding parameters, trained to convergence."""
        return (self.N_c / _positive("n_params", n_params)) ** self.alpha_N

    def loss_tokens(self, n_tokens: float) -> float:
        """L(D): a large model trained on ``n_tokens`` with early stopping."""
        return (self.D_c / _positive("n_tokens", n_tokens)) ** self.alpha_D

    def loss_compute(self, compute: float) -> float:
        """L(C_min), C in FLOPs."""
        return (self.C_c_pf_days * PF_DAY / _positive("compute", compute)) ** self.alpha_C

    def optimal(self, compute: float) -> dict[str, float]:
        """Table 6's compute-efficient allocation (C_min in PF-days; 6 N D != C, see the module docstring)."""
        C = _positive("compute", compute)
        pf = C / PF_DAY
        n, d = 1.3e9 * pf**0.73, 2e10 * pf**0.27
        return {"compute": C, "n_params": n, "n_tokens": d, "tokens_per_param": d / n, "loss": self.loss_compute(C)}

    def compute_for_loss(self, target_loss: float) -> float:
        """Invert L(C_min): FLOPs that reach ``target_loss``."""
        return self.C_c_pf_days * PF_DAY / _positive("target_loss", target_loss) ** (1.0 / self.alpha_C)


def twenty_tokens_rule(compute: float) -> dict[str, float]:
    """Chinchilla's rule of thumb: D = 20 N at C = 6 N D, i.e. N = sqrt(C / 120)."""
    C = _positive("compute", compute)
    n = math.sqrt(C / 120)
    return {"compute": C, "n_params": n, "n_tokens": 20 * n, "tokens_per_param": 20.0}


PRESETS = {
    "chinchilla_hoffmann": ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="chinchilla_hoffmann"),
    "chinchilla_besiroglu": ChinchillaLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                                          name="chinchilla_besiroglu"),
    "kaplan": KaplanLaw(),
}
