"""Choosing the next token from a batch of logits: greedy, temperature, top-k, top-p and min-p.

Order of operations (the same as Hugging Face's): divide by the temperature, keep the top-k
logits, then keep the top-p nucleus of what is left, then the min-p filter, then sample. Top-k gives the same set before
or after the temperature; top-p does not (a higher temperature flattens the distribution and so
widens the nucleus). Filtered logits become ``-inf``. Everything works row by row on ``(B, V)``.
"""

from __future__ import annotations

import math

import torch

from llmlab.errors import UserError

# cumulative probabilities are float sums: treat a nucleus that reaches p within this much as
# reaching it, so that e.g. probabilities [0.5, 0.3, ...] with p=0.8 keep exactly two tokens
_P_TOL = 1e-6


def validate_sampling_args(
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, min_p: float | None = None
) -> None:
    """Raise :class:`UserError` for a negative temperature, top_k < 1, top_p outside (0, 1] or min_p outside [0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or math.isnan(temperature):
        raise UserError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy)")
    if temperature < 0 or math.isinf(temperature):
        raise UserError(f"temperature={temperature} must be finite and >= 0 (0 = greedy, 1 = unchanged)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UserError(f"top_k={top_k!r} must be an integer >= 1 (or null to disable top-k)")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0
    ):
        raise UserError(f"top_p={top_p!r} must be in (0, 1] (or null to disable nucleus sampling)")
    if min_p is not None and (
        isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0.0 <= min_p <= 1.0
    ):
        raise UserError(f"min_p={min_p!r} must be in [0, 1] (or null to disable min-p sampling)")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the row's k-th largest to ``-inf`` (ties with the k-th are kept)."""
    validate_sampling_args(top_k=k)
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1): keepdim so rows broadcast
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is >= p.

    The most likely token is always kept. Token ``i`` (in descending order) is dropped when the
    tokens ranked before it already reach ``p``.
    """
    validate_sampling_args(top_p=p)
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of all higher-ranked tokens
    drop_sorted = mass_before >= p - _P_TOL
    drop_sorted[..., 0] = False  # the top token survives even when p is tiny
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024, HF ``MinPLogitsWarper``): drop tokens whose probability is below
    ``p`` times the most likely token's; the most likely token is always kept."""
    validate_sampling_args(min_p=p)
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def warp_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """Float logits after temperature, top-k, top-p and min-p (filtered entries ``-inf``); the
    distribution a sampler draws from is their softmax. ``temperature`` must be > 0 here."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids ``(B,)`` from logits ``(B, V)``.

    ``greedy=True`` or ``temperature == 0`` takes the argmax (top-k/top-p cannot change it: they
    always keep the top token). Otherwise samples from ``softmax(filter(logits / temperature))``;
    pass a seeded ``torch.Generator`` for reproducible draws.
    """
    validate_sampling_args(temperature, top_k, top_p, min_p)
    if logits.dim() != 2:
        raise UserError(f"sample_next expects logits of shape (batch, vocab), got {tuple(logits.shape)}")
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
