"""Context-dependent logits processors: repetition penalty and no-repeat n-gram.

* **Repetition penalty** (Keskar et al. 2019, "CTRL: A Conditional Transformer Language Model for
  Controllable Generation", §4.1 "Sampling"): every token that already occurs in the context (the
  prompt included) has its logit divided by ``penalty`` when positive and multiplied by it when
  negative, so ``penalty > 1`` always makes a repeat less likely (CTRL's paper divides only; the
  sign rule is Hugging Face's ``RepetitionPenaltyLogitsProcessor``). Applied once per distinct
  token, however often it occurred. ``1.0`` = off.
* **No-repeat n-gram** (Paulus et al. 2018, "A Deep Reinforced Model for Abstractive
  Summarization", §2.5; fairseq / Hugging Face ``NoRepeatNGramLogitsProcessor``): a token that
  would complete an n-gram already present in the context gets ``-inf``.

Both run *before* the warpers of :func:`llmlab.inference.sampling.warp_logits` (temperature, top-k,
top-p, min-p), in this order, which is the order of ``GenerationMixin._get_logits_processor`` in
``transformers``; under greedy decoding they still apply (HF: ``do_sample=False`` keeps the
processors and drops only the warpers). Everything is batched over rows and vectorised over the
vocabulary and the context positions.
"""

from __future__ import annotations

import math

import torch

from llmlab.errors import UserError


def validate_processor_args(repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None) -> None:
    """Raise :class:`UserError` for a penalty that is not a number > 0 or an n-gram size < 0."""
    if repetition_penalty is not None and (
        isinstance(repetition_penalty, bool)
        or not isinstance(repetition_penalty, (int, float))
        or not math.isfinite(repetition_penalty)
        or repetition_penalty <= 0
    ):
        raise UserError(f"repetition_penalty={repetition_penalty!r} must be a number > 0 (1.0 = off, >1 discourages "
                        "repeats; or null)")
    if no_repeat_ngram_size is not None and (
        isinstance(no_repeat_ngram_size, bool) or not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0
    ):
        raise UserError(f"no_repeat_ngram_size={no_repeat_ngram_size!r} must be an integer >= 0 (0 or null = off)")


def processors_active(repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None) -> bool:
    """Whether :func:`apply_processors` would change anything (lets a decoding loop skip it)."""
    return (repetition_penalty is not None and repetition_penalty != 1.0) or bool(no_repeat_ngram_size)


def repetition_penalty_(logits: torch.Tensor, context_ids: torch.Tensor, penalty: float,
                        context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Penalise, in place, the logits ``(B, V)`` of every token in ``context_ids`` ``(B, T)``.

    ``context_mask`` ``(B, T)`` (1 = token, 0 = padding) leaves padding out, as HF does for a
    left-padded batch (its ``prompt_ignore_length``). Returns ``logits``."""
    V = logits.size(-1)
    ids = context_ids.clamp(max=V)  # ids past the head's vocabulary cannot be generated: spare column V
    if context_mask is not None:
        ids = ids.masked_fill(~context_mask.bool(), V)
    padded = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1): the spare column absorbs what is ignored
    score = padded.gather(1, ids)  # (B, T): duplicates read the same unpenalised value, so once per token
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits.copy_(padded.scatter(1, ids, score)[:, :V])
    return logits


def no_repeat_ngram_(logits: torch.Tensor, context_ids: torch.Tensor, n: int,
                     context_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Set to ``-inf``, in place, each token that would repeat an n-gram of ``context_ids`` ``(B, T)``.

    The next token completes the n-gram ``context[-(n-1):] + [token]``; every earlier window whose
    first ``n - 1`` tokens equal that suffix bans its own last token. Windows touching padding
    (``context_mask`` 0) never ban anything. Returns ``logits``."""
    B, T = context_ids.shape
    if n < 1 or T < n:  # no complete n-gram yet
        return logits
    V = logits.size(-1)
    windows = context_ids.unfold(1, n, 1)  # (B, T - n + 1, n) views, no copy
    suffix = context_ids[:, T - n + 1 :]  # (B, n - 1)
    matches = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)  # (B, T - n + 1)
    if context_mask is not None:
        matches &= context_mask.bool().unfold(1, n, 1).all(dim=-1)
    banned = torch.where(matches, windows[..., -1].clamp(max=V), V)  # non-matches go to the spare column V
    mask = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, banned, True)
    return logits.masked_fill_(mask[:, :V], float("-inf"))


def apply_processors(
    logits: torch.Tensor,
    context_ids: torch.Tensor,
    *,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float logits ``(B, V)`` after the repetition penalty, then the no-repeat n-gram ban (HF's order).

    ``context_ids`` ``(B, T)`` long: every token so far, prompt included. ``context_mask`` ``(B, T)``
    optional, 0 on (left) padding. ``None`` / ``1.0`` / ``0`` switch a processor off; with both off
    the logits come back unchanged (same tensor)."""
    validate_processor_args(repetition_penalty, no_repeat_ngram_size)
    if not processors_active(repetition_penalty, no_repeat_ngram_size):
        return logits
    if logits.dim() != 2 or context_ids.dim() != 2 or context_ids.size(0) != logits.size(0):
        raise UserError(f"apply_processors needs logits (batch, vocab) and context ids (batch, T), got "
                        f"{tuple(logits.shape)} and {tuple(context_ids.shape)}")
    logits = logits.float().clone()  # the caller's tensor is not modified
    context_ids = context_ids.long()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        repetition_penalty_(logits, context_ids, float(repetition_penalty), context_mask)
    if no_repeat_ngram_size:
        no_repeat_ngram_(logits, context_ids, no_repeat_ngram_size, context_mask)
    return logits
