"""Choosing the next token from a batch of logits: greedy, temperature, top-k, top-p and min-p.

Order of operations (the same as Hugging Face's ``GenerationMixin._get_logits_processor``): the
context-dependent processors of :mod:`llmlab.inference.processors` (repetition penalty, no-repeat
n-gram) first, then divide by the temperature, keep the top-k logits, then the top-p nucleus of
what is left, then the min-p filter, then sample. Top-k gives the same set before or after the
temperature; top-p does not (a higher temperature flattens the distribution and so widens the
nucleus). Filtered logits become ``-inf``. Everything works row by row on ``(B, V)``, without
Python loops.
"""

from __future__ import annotations

import math

import torch

from llmlab.errors import UserError
from llmlab.inference.processors import apply_processors, processors_active, validate_processor_args

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
    return _top_k(logits, k)


def _top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1): keepdim so rows broadcast
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose total probability is >= p.

    The most likely token is always kept. Computed as Hugging Face's ``TopPLogitsWarper`` does
    (ascending sort, drop the least likely tokens while their cumulative probability is <= 1 - p),
    so ties at the edge of the nucleus are broken the same way; the float sum gets a ``_P_TOL``
    grace so that a nucleus reaching p exactly counts as reaching it.
    """
    validate_sampling_args(top_p=p)
    return _top_p(logits, p)


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = torch.softmax(sorted_logits.float(), dim=-1).cumsum(dim=-1)  # mass of this token and all less likely
    drop_sorted = cum <= (1.0 - p) + _P_TOL
    drop_sorted[..., -1] = False  # the top token survives even when p is tiny
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Min-p (Nguyen et al. 2024, HF ``MinPLogitsWarper``): drop tokens whose probability is below
    ``p`` times the most likely token's; the most likely token is always kept."""
    validate_sampling_args(min_p=p)
    return _min_p(logits, p)


def _min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
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
        logits = _top_k(logits, top_k)
    if top_p is not None:
        logits = _top_p(logits, top_p)
    if min_p is not None:
        logits = _min_p(logits, min_p)
    return logits


def sample_next(logits: torch.Tensor, **options) -> torch.Tensor:
    """Next token ids ``(B,)`` from logits ``(B, V)``: :func:`pick_next` after checking its arguments.

    Options (keyword only, defaults in brackets): ``temperature`` [1.0], ``top_k``, ``top_p``,
    ``min_p`` [None: off], ``greedy`` [False], ``generator`` [None], ``repetition_penalty``,
    ``no_repeat_ngram_size`` [None: off], ``context_ids``, ``context_mask`` [None].

    ``repetition_penalty`` / ``no_repeat_ngram_size`` need ``context_ids`` ``(B, T)`` (every token
    so far, prompt included; ``context_mask`` 0 = padding) and apply first, greedy or not (see
    :mod:`llmlab.inference.processors`). ``greedy=True`` or ``temperature == 0`` then takes the
    argmax (top-k/top-p/min-p cannot change it: they always keep the top token). Otherwise samples
    from ``softmax(warp_logits(...))``; pass a seeded ``torch.Generator`` for reproducible draws.
    """
    validate_sampling_args(**{k: options[k] for k in ("temperature", "top_k", "top_p", "min_p") if k in options})
    penalties = {k: options[k] for k in ("repetition_penalty", "no_repeat_ngram_size") if k in options}
    validate_processor_args(**penalties)
    if logits.dim() != 2:
        raise UserError(f"sample_next expects logits of shape (batch, vocab), got {tuple(logits.shape)}")
    if processors_active(**penalties) and options.get("context_ids") is None:
        raise UserError("repetition_penalty / no_repeat_ngram_size need the context: pass context_ids=")
    return pick_next(logits, **options)


def pick_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    context_ids: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`sample_next` without argument checks: for decoding loops that validated once per call."""
    if processors_active(repetition_penalty, no_repeat_ngram_size):
        logits = apply_processors(logits, context_ids, repetition_penalty=repetition_penalty,
                                  no_repeat_ngram_size=no_repeat_ngram_size, context_mask=context_mask)
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
