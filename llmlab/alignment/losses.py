"""The formulas of RLHF and preference optimisation, one function each, in pure torch.

Shapes: ``B`` rows (sequences or preference pairs), ``T`` tokens (the response), ``V`` vocabulary.
Masks are ``(B, T)`` 0/1 floats or bools, 1 on the tokens that count (response tokens up to and
including EOS). Every "mean" below is a *masked* mean over those tokens of the whole batch, the way
TRL computes it. Metrics come back as detached 0-d tensors, so a caller can log them directly.

Papers, in the order the pipeline uses them:

* Reward model -- Bradley & Terry (1952); Christiano et al. 2017, "Deep RL from Human Preferences";
  Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
  (InstructGPT): ``loss = -log sigma(r(x, y_w) - r(x, y_l))``.
* PPO -- Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped surrogate); GAE --
  Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation".
* KL penalty against the reference -- Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences" (per-token penalty, score at the last token, the adaptive controller); estimators k1,
  k2, k3 -- J. Schulman, "Approximating KL Divergence" (blog note, 2020).
* DPO -- Rafailov et al. 2023, "Direct Preference Optimization"; conservative DPO (label smoothing) --
  Mitchell 2023, "A note on DPO with noisy preferences"; IPO -- Azar et al. 2023, "A General Theoretical
  Paradigm to Understand Learning from Human Preferences".

Reference implementations the tests compare against on the same tensors: TRL 1.16
(``DPOTrainer._compute_loss``, ``RewardTrainer.compute_loss``) and legacy TRL 0.11.4 (``PPOTrainer.loss``,
``compute_advantages``, ``compute_rewards``, ``AdaptiveKLController``, ``DPOTrainer.dpo_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmlab.errors import UserError

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
KL_KINDS = ("k1", "k2", "k3")


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``).

    Masked-out entries are ignored even when they hold inf/nan; an empty mask gives 0, not nan.
    """
    m = mask.bool()
    total = x.masked_fill(~m, 0).sum() if dim is None else x.masked_fill(~m, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp_min(1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions, with Bessel's correction ``n/(n-1)`` when ``unbiased``."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.bool().sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked positions (mean 0, unbiased std 1 there).

    With ``shift_mean=False`` the mean is added back: only the scale changes (TRL's ``whiten_rewards``).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 = perfect critic, 0 = predicts the mean, < 0 worse."""
    return 1 - masked_var(returns - values, mask, unbiased=False) / masked_var(returns, mask, unbiased=False)


# --------------------------------------------------------------------------- per-token log-probs, entropy, KL


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets[b, t] | logits[b, t])``, shape ``(B, T)``; positions whose target is -100 give 0.

    ``logits`` (B, T, V), ``targets`` (B, T) already shifted (``targets[t]`` is the token after ``t``).
    """
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T), ignore_index=-100, reduction="none")
    return -nll.view(B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the full next-token distribution, ``-sum_v p_v log p_v``; (B, T, V) -> (B, T)."""
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``; (B, T) -> (B, T).

    With ``log r = log pi_ref(y) - log pi(y)`` (Schulman, "Approximating KL Divergence"):

    * ``k1 = -log r``                  unbiased, high variance, can be negative per token (TRL's "kl")
    * ``k2 = (log r)^2 / 2``            biased, low variance, >= 0 (TRL's "mse")
    * ``k3 = (r - 1) - log r``          unbiased, low variance, >= 0 always

    All three are exactly 0 when ``logp == ref_logp``.
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise UserError(f"kl estimator kind={kind!r} is unknown; use one of {', '.join(KL_KINDS)}")


# --------------------------------------------------------------------------- reward model


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss ``mean(softplus(r_rejected - r_chosen [+ margin]))`` (InstructGPT eq. 1).

    ``softplus(r_l - r_w) = -log sigma(r_w - r_l)``: the Bradley-Terry negative log-likelihood that the chosen
    response wins. ``margin`` (B,) asks the chosen reward to win by at least that much (Llama 2; TRL's
    ``margin`` column). Equal rewards give ln 2; adding a constant to both rewards changes nothing.
    Metrics (TRL's names): ``accuracy`` = mean(r_w > r_l), ``margin`` = mean(r_w - r_l).
    """
    diff = r_chosen - r_rejected  # (B,)
    logits = diff if margin is None else diff - margin
    loss = F.softplus(-logits).mean()
    with torch.no_grad():
        metrics = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, metrics


# --------------------------------------------------------------------------- DPO / IPO


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss on summed response log-probs, all (B,); returns (mean loss, TRL's metrics).

    With the implicit rewards ``r_w = beta (log pi(y_w) - log pi_ref(y_w))`` (and ``r_l`` likewise) and
    ``d = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``:

    * ``sigmoid`` (Rafailov et al. 2023): ``-log sigma(beta d)``; with ``label_smoothing = eps`` the
      conservative form ``-(1 - eps) log sigma(beta d) - eps log sigma(-beta d)`` (cDPO, labels flipped
      with probability eps; TRL <= 0.x's ``sigmoid``; TRL 1.x ignores eps for ``sigmoid``).
    * ``ipo`` (Azar et al. 2023, eq. 17): ``(d_w/|y_w| - d_l/|y_l| - 1/(2 beta))^2`` with the log-ratios
      averaged per token, as TRL does; needs ``chosen_len``/``rejected_len`` (B,), the response lengths.
    * ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - beta d)``.

    Metrics: ``rewards/chosen``, ``rewards/rejected`` (means of ``r_w``, ``r_l``), ``rewards/accuracies``
    (mean of ``r_w > r_l``), ``rewards/margins`` (mean ``r_w - r_l``), ``logps/chosen``, ``logps/rejected``.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    delta = chosen_logratios - rejected_logratios  # (B,)
    if loss_type not in DPO_LOSS_TYPES:
        raise UserError(f"loss_type={loss_type!r} is unknown; use one of {', '.join(DPO_LOSS_TYPES)}")
    if label_smoothing and loss_type != "sigmoid":
        raise UserError(f"label_smoothing={label_smoothing} only applies to loss_type=sigmoid; set it to 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"label_smoothing={label_smoothing} must lie in [0, 0.5) (the label-flip probability)")

    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("dpo_loss(loss_type='ipo') needs chosen_len and rejected_len (response lengths)")
        n_w = torch.as_tensor(chosen_len, dtype=delta.dtype, device=delta.device).clamp_min(1)
        n_l = torch.as_tensor(rejected_len, dtype=delta.dtype, device=delta.device).clamp_min(1)
        losses = (chosen_logratios / n_w - rejected_logratios / n_l - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * delta)

    with torch.no_grad():
        r_w, r_l = beta * chosen_logratios, beta * rejected_logratios
        metrics = {
            "rewards/chosen": r_w.mean(),
            "rewards/rejected": r_l.mean(),
            "rewards/accuracies": (r_w > r_l).float().mean(),
            "rewards/margins": (r_w - r_l).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }
    return losses.mean(), metrics


# --------------------------------------------------------------------------- PPO


def kl_penalized_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``r_t = -kl_coef * kl_t``, plus the sequence score at the last response token.

    (Ziegler et al. 2019; InstructGPT; TRL's ``compute_rewards``.) ``scores`` (B,), ``logp``/``ref_logp``/
    ``mask`` (B, T). Returns ``(rewards, kl)``, both (B, T) and 0 outside the mask; ``kl`` is the per-token
    estimate (:func:`kl_estimate`), so ``kl.sum(1)`` is each sequence's KL to the reference.
    """
    m = mask.bool()
    kl = kl_estimate(logp, ref_logp, kind).masked_fill(~m, 0)  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    T = m.shape[1]
    last = T - 1 - m.flip(1).int().argmax(1)  # (B,) index of the last valid token
    score = (scores.to(rewards.dtype) * m.any(1)).unsqueeze(1)  # (B, 1); a row with no token gets nothing
    return rewards.scatter_add(1, last.unsqueeze(1), score), kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation along the token axis of each row (Schulman et al. 2016).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, with rewards and values
    zeroed outside the mask, so the value after the last response token is 0 (the episode ends at EOS).
    ``rewards``, ``values``, ``mask`` (B, T), masks right-aligned (valid tokens, then padding).
    Returns ``(advantages, returns)``, (B, T), ``returns = A + V`` (the value head's target). Not whitened:
    TRL whitens the advantages afterwards, ``masked_whiten(advantages, mask)``.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m  # (B, T)
    T = rewards.shape[1]
    last_gae = torch.zeros_like(values[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    return advantages, advantages + values


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss: masked mean of
    ``max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))`` with ``ratio = exp(logp - old_logp)``; all (B, T).

    Metrics: ``clipfrac`` = fraction of tokens where the clipped term is the larger loss (TRL's definition:
    the update is actually cut off there; ``|ratio - 1| > eps`` on the other side of 1 does not count),
    ``approx_kl`` = ``mean((logp - old_logp)^2) / 2`` (TRL's), ``approx_kl_k1`` = ``mean(old_logp - logp)``
    (TRL's ``policykl``), ``ratio`` = mean ratio. Old policy vs new, not the reference.
    """
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "approx_kl_k1": masked_mean(-log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))``; all (B, T).

    As in TRL (and OpenAI's baselines): the critic may not move more than ``cliprange_value`` from its rollout
    prediction without paying the unclipped error. The caller multiplies by ``vf_coef``.
    Metric ``vf_clipfrac``: fraction of tokens where the clipped error is the larger one.
    """
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses = (values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((vf_losses_clipped > vf_losses).float(), mask)}
    return loss, metrics


# --------------------------------------------------------------------------- KL coefficient controllers


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2; legacy TRL's controller).

    After each PPO batch with observed KL ``current`` (per sequence, summed over tokens):
    ``e = clip(current / target - 1, -0.2, 0.2)`` and ``value *= 1 + e * n_steps / horizon``: the
    coefficient grows while the policy drifts further than ``target`` nats and shrinks while it stays closer.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing (same interface as :class:`AdaptiveKLController`)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        pass
