"""Losses shared by the language models.

:func:`cross_entropy` is ``F.cross_entropy(logits, targets, ignore_index=-100)`` with the same value
and gradient but fewer (B*T, V)-sized temporaries — on CPU with a 50k vocabulary the output layer
dominates the step, and every fresh 400 MB buffer costs page faults before any arithmetic.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # targets with this value do not count (torch's default ignore_index)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,), skipping -100 targets.

    Same value and gradient as ``F.cross_entropy(logits, targets, ignore_index=-100)`` (NaN when
    every target is ignored, like torch), but cheaper for big vocabularies; see
    :class:`_SoftmaxCrossEntropy`.
    """
    return _SoftmaxCrossEntropy.apply(logits, targets)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Cross-entropy through one softmax.

    ``F.cross_entropy`` is ``log_softmax`` + ``nll_loss``: with N = B*T rows and V = 50257 that is
    four (N, V) tensors per training step (logits, log-probs, nll's zero-filled gradient, the
    log-softmax gradient) and two passes of ``exp`` over N*V numbers. Each is hundreds of MB, and
    on CPU fresh memory of that size is page-faulted in on first touch, which costs about as much
    as the arithmetic. The gradient of the mean loss w.r.t. row i's logits is
    ``(softmax(logits_i) - onehot(target_i)) / n_valid``, so we keep the softmax from the forward
    pass and build the gradient from it: one ``exp`` pass and two (N, V) tensors besides the logits.
    The loss is float32 even for half-precision logits.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(logits.dtype, torch.float32)  # half-precision logits: fp32 math
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0).unsqueeze(1)  # (N, 1) gather index, ignored rows -> 0
        probs = torch.softmax(logits, dim=-1, dtype=acc)  # (N, V)
        p_target = probs.gather(1, safe).squeeze(1)  # (N,)
        logp = p_target.log()
        underflow = (p_target < 1e-30) & valid  # log() of a denormal or 0 is inexact or -inf
        if underflow.any():
            rows = underflow.nonzero().squeeze(1)
            exact = logits[rows].to(acc)  # (n_rows, V): recompute just these as logit - logsumexp
            logp[rows] = exact.gather(1, safe[rows]).squeeze(1) - torch.logsumexp(exact, dim=-1)
        n_valid = valid.sum()
        ctx.save_for_backward(probs, safe, valid, n_valid)
        ctx.logits_dtype = logits.dtype
        return -torch.where(valid, logp, 0.0).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        probs, safe, valid, n_valid = ctx.saved_tensors
        weight = torch.where(valid, grad_loss / n_valid, 0.0).to(probs.dtype)  # (N,) row weights
        grad = probs * weight.unsqueeze(1)  # (N, V); `probs` stays intact for a second backward
        grad.scatter_add_(1, safe, -weight.unsqueeze(1))  # minus the one-hot target
        return grad.to(ctx.logits_dtype), None


# ---------------------------------------------------------------------- loading helpers
