"""Knowledge-distillation losses: temperature softmax, forward / reverse KL, Hinton's mix, MiniLLM.

Pure tensor math (no Lightning), each a function of student logits, teacher logits and a mask, so it can
be checked against ``torch.nn.functional.kl_div`` and the golden values of spec seed000_part3 §2.5.

* **Hinton et al. 2015**, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531, §2):
  soft targets ``p_T = softmax(z / T)``; ``L = alpha * T^2 * KL(p_T^teacher || q_T^student) +
  (1 - alpha) * CE(y, q_1^student)``. The T^2 keeps the soft-target gradient ``T (q_T - p_T)`` about as
  large at every T (it shrinks as 1/T^2 without it). **Here ``alpha`` always weights the distillation
  term** (Hinton; Kim & Rush's L = (1 - a) NLL + a KD); the course notes' code (spec seed001_003 §2.12)
  weights the hard loss with its alpha, i.e. its alpha = 1 - ours.
* **Reverse KL** ``KL(q || p)`` (mode-seeking: the student puts its mass on the teacher's main modes,
  MiniLLM's argument) as an exact sum over the vocabulary of ``log_softmax`` values — never
  ``log(softmax + eps)`` (the seed's).
* **Every objective is a per-token mean over the positions of ``mask``** (the non-pad, already shifted
  target positions). The seed's ``F.kl_div(..., reduction="batchmean")`` on ``(B, L, V)`` divides by B
  only, i.e. sums over L: its forward KL is L x the per-token value while its reverse KL is a per-token
  mean, so switching objectives rescaled the KD term against CE by L (spec §2.5 "Seed bugs"). Here a
  batch of identical per-token distributions gives the same loss at every length.
* **MiniLLM** (Gu et al., ICLR 2024, "MiniLLM: Knowledge Distillation of Large Language Models",
  arXiv:2306.08543, §2.2 and Algorithm 1): the sequence-level reverse KL ``KL(q_theta(y|x) || p(y|x))``
  minimised by policy gradient on sampled responses, with its three stabilisers — (1) single-step
  decomposition: the per-step reverse KL (exact over the vocabulary) is differentiated directly; (2)
  teacher-mixed sampling from ``p~ = a p + (1 - a) q`` (a = ``teacher_mixed_alpha`` = 0.2) with per-token
  importance weights ``w_t = q(y_t) / p~(y_t)``; (3) the long-term reward is length-normalised,
  ``R_{t+1} = mean_{t' > t} log p(y_t') / q(y_t')``. As in the authors' code (microsoft/LMOps
  ``minillm/losses.py``), the policy-gradient term is PPO's clipped surrogate with ratio = w.
* **Sequence-level KD** (Kim & Rush 2016, "Sequence-Level Knowledge Distillation", §3.2): the student's
  NLL of the teacher's own generations, ``-log q(y_hat | x)`` — :func:`token_nll` on those tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------- temperature


def soft_targets(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``softmax(z / T)`` over the last dimension: higher T = flatter (spec §2.5 temperature table)."""
    return F.softmax(logits.float() / temperature, dim=-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy in nats of ``softmax(z / T)`` per position (at most ln V, reached as T -> inf)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def annealed_temperature(t0: float, epoch: int) -> float:
    """``T_e = max(1, T0 - e)``: the seed's ``temperature_schedule`` (defined there but never used)."""
    return max(1.0, float(t0) - int(epoch))


# ---------------------------------------------------------------------------- per-token divergences


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))`` per position; 0 log 0 = 0 (a -inf logit)."""
    p = logp.exp()
    terms = p * (logp - logq)
    return terms.masked_fill(p == 0, 0.0).sum(-1)


def token_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """``KL(p_T^teacher || q_T^student)`` at every position (``(...)`` = the logits' leading shape):
    mode-covering — the student pays for every teacher token it gives little mass."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return _kl(logp, logq)


def token_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """``KL(q_T^student || p_T^teacher)`` at every position, exact over the vocabulary: mode-seeking —
    the student pays for mass it puts where the teacher has little."""
    logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return _kl(logq, logp)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (all positions without a mask);
    0 (keeping the graph) when no position counts."""
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Hinton's distillation term: ``T^2 * KL(p_T || q_T)``, averaged over the tokens of ``mask``."""
    return masked_mean(token_forward_kl(student_logits, teacher_logits, temperature), mask) * temperature**2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(q_T || p_T)``, averaged over the tokens of ``mask`` (MiniLLM's token-level reverse KL
    on teacher-forced text; the paper's setting is T = 1)."""
    return masked_mean(token_reverse_kl(student_logits, teacher_logits, temperature), mask) * temperature**2


def token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean ``-log q(target)`` over the tokens of ``mask`` (and never at target -100): the hard loss,
    and sequence-level KD when the targets are the teacher's generations."""
    valid = targets != -100
    mask = valid if mask is None else (mask.bool() & valid)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.masked_fill(~valid, 0).reshape(-1),
                          reduction="none").view(targets.shape)
    return masked_mean(nll, mask)


def hinton_loss(kd: torch.Tensor, ce: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * kd + (1 - alpha) * ce``: ``alpha`` weights the distillation term (``kd`` already
    carries the T^2 of :func:`forward_kl`)."""
    return alpha * kd + (1.0 - alpha) * ce


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unshifted causal-LM data -> aligned ``(logits[:, :-1], labels[:, 1:], mask[:, 1:])``: the state at
    ``t`` predicts token ``t + 1`` (the seed forgot this). llmlab's LM batches are already shifted."""
    target_mask = (labels[:, 1:] != -100) if mask is None else mask[:, 1:].bool() & (labels[:, 1:] != -100)
    return logits[:, :-1], labels[:, 1:], target_mask


# ---------------------------------------------------------------------------- MiniLLM


def mixed_log_probs(teacher_logp: torch.Tensor, student_logp: torch.Tensor, teacher_mixed_alpha: float) -> torch.Tensor:
    """``log p~ = log(a p + (1 - a) q)`` from log-probabilities (whole distributions or picked tokens),
    by log-sum-exp: the teacher-mixed sampling distribution of MiniLLM (a = 0.2 in the paper)."""
    a = float(teacher_mixed_alpha)
    if a <= 0.0:
        return student_logp
    if a >= 1.0:
        return teacher_logp
    return torch.logaddexp(teacher_logp + math.log(a), student_logp + math.log1p(-a))


def importance_weights(student_token_logp: torch.Tensor, mixed_token_logp: torch.Tensor) -> torch.Tensor:
    """``w_t = q(y_t) / p~(y_t)`` for tokens sampled from ``p~`` (MiniLLM's per-token approximation of
    the sequence ratio); detached. Since ``p~ >= (1 - a) q``, ``w_t <= 1 / (1 - a)``."""
    return (student_token_logp.detach() - mixed_token_logp.detach()).exp()


def normalized_future_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised long-term reward ``R_{t+1} = mean of rewards[t'] over the masked t' > t`` for
    each position of ``(N, T)`` rewards (0 where nothing follows): a long response no longer gets a
    larger return just for being long (MiniLLM §2.2 "length normalization")."""
    m = mask.to(rewards.dtype)
    r = rewards * m
    future_sum = r.flip(1).cumsum(1).flip(1) - r  # sum over t' > t
    future_len = m.flip(1).cumsum(1).flip(1) - m
    return future_sum / future_len.clamp_min(1.0)


@dataclass
class MiniLLMLoss:
    """What :func:`minillm_loss` returns: the loss to minimise and its parts (detached)."""

    loss: torch.Tensor
    single: torch.Tensor  # weighted per-step reverse KL, the single-step term
    long: torch.Tensor  # clipped policy-gradient surrogate of the normalised long-term reward
    reverse_kl: torch.Tensor  # mean per-token KL(q || p) on the sampled prefixes (unweighted)
    reward: torch.Tensor  # mean log p(y_t) - log q(y_t) of the sampled tokens
    weight: torch.Tensor  # mean importance weight w_t


def minillm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, response_ids: torch.Tensor,
                 mask: torch.Tensor, *, teacher_mixed_alpha: float = 0.2, cliprange: float = 0.2,
                 length_norm: bool = True) -> MiniLLMLoss:
    """MiniLLM's loss on sampled responses (module docstring; Gu et al. 2024 eq. 5-7, Algorithm 1).

    ``student_logits`` ``(N, T, V)`` (with gradient) and ``teacher_logits`` ``(N, T, V)`` predict the
    ``(N, T)`` sampled ``response_ids`` (drawn from ``p~`` with ``teacher_mixed_alpha``), ``mask`` = their
    real positions. Loss per masked token, averaged over tokens:
    ``w_t KL(q_t || p_t)`` + ``max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))`` with ``rho_t`` = w_t
    in value and ``w_t grad log q(y_t)`` in gradient, ``A_t = R_{t+1}`` (length-normalised, or the plain
    sum of future rewards with ``length_norm=False``), ``eps = cliprange``.
    """
    logq = F.log_softmax(student_logits.float(), dim=-1)  # (N, T, V)
    logp = F.log_softmax(teacher_logits.float(), dim=-1).detach()
    q_tok = logq.gather(-1, response_ids[..., None]).squeeze(-1)  # (N, T)
    p_tok = logp.gather(-1, response_ids[..., None]).squeeze(-1)
    mix_tok = mixed_log_probs(p_tok, q_tok.detach(), teacher_mixed_alpha)
    w = importance_weights(q_tok, mix_tok)
    rewards = (p_tok - q_tok).detach()  # r_t = log p(y_t) / q(y_t)
    if length_norm:
        advantages = normalized_future_rewards(rewards, mask)
    else:
        m = mask.to(rewards.dtype)
        advantages = (rewards * m).flip(1).cumsum(1).flip(1) - rewards * m
    step_kl = _kl(logq, logp)  # (N, T): exact single-step reverse KL, gradient through q
    single = masked_mean(w * step_kl, mask)
    ratio = (q_tok - q_tok.detach()).exp() * w  # = w, gradient w * grad log q
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange))
    long = masked_mean(surrogate, mask)
    return MiniLLMLoss(single + long, single.detach(), long.detach(), masked_mean(step_kl.detach(), mask),
                       masked_mean(rewards, mask), masked_mean(w, mask))
