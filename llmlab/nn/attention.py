"""Scaled dot-product attention, shared by every transformer in llmlab (Vaswani et al. 2017).

``attention(q, k, v)`` computes ``softmax(q kᵀ · scale + mask) v`` over already split heads. It
knows nothing about projections or caches, so GPT (causal self-attention), BERT (bidirectional,
padding mask) and T5 (encoder, decoder, cross-attention; ``scale=1``) can all call it. There are
two implementations that must agree to ~1e-6:

* ``impl="sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention`, fused and fast;
* ``impl="eager"``: the textbook formula written out, for teaching and as a test oracle.

Mask conventions (the same as SDPA's): a **boolean** mask is ``True`` where a query may attend
to a key; a **float** mask is *added* to the scores (0 = keep, a very negative number = drop).
Either must broadcast to ``(B, nh, Tq, Tk)``; turn a ``(B, Tk)`` 0/1 padding mask into that shape
with :func:`key_padding_mask`. A query row whose boolean mask allows no key at all returns zeros
(that is what SDPA does; there is nothing to average over).

Causal masking is "bottom-right aligned" through ``q_offset``: query ``i`` sits at absolute
position ``q_offset + i`` and may see keys ``0 .. q_offset + i``. With a KV cache holding ``L``
earlier tokens and ``T`` new queries, ``Tk = L + T`` and ``q_offset = L = Tk - Tq``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmlab.errors import UserError

IMPLS = ("sdpa", "eager")


def causal_mask(
    tq: int, tk: int, device: torch.device | str | None = None, *, q_offset: int | None = None
) -> torch.Tensor:
    """Boolean ``(tq, tk)`` mask, ``True`` where query ``i`` may see key ``j`` (``j <= q_offset + i``).

    ``q_offset`` defaults to ``tk - tq``: the queries are the *last* ``tq`` positions of the keys,
    which is the KV-cache case (and the plain lower triangle when ``tq == tk``).
    """
    if q_offset is None:
        q_offset = tk - tq
    q_pos = torch.arange(tq, device=device).unsqueeze(1) + q_offset  # (tq, 1)
    k_pos = torch.arange(tk, device=device).unsqueeze(0)  # (1, tk)
    return k_pos <= q_pos


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, Tk)`` 1 = real token / 0 = padding -> boolean ``(B, 1, 1, Tk)`` for :func:`attention`."""
    if attention_mask.dim() != 2:
        raise UserError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, seq_len) of 0/1"
        )
    return attention_mask.bool()[:, None, None, :]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    impl: str = "sdpa",
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head attention over split heads; returns ``(B, nh, Tq, hs_v)``.

    Args:
        q: ``(B, nh, Tq, hs)`` queries; k: ``(B, nh, Tk, hs)`` keys; v: ``(B, nh, Tk, hs_v)`` values.
        causal: hide keys in the future of each query (see ``q_offset``).
        mask: optional boolean (``True`` = attend) or additive float mask, broadcastable to
            ``(B, nh, Tq, Tk)``; combined with the causal mask when both are given.
        dropout_p: dropout on the attention weights. Pass 0 at eval time (this function does
            not know whether the caller is training).
        impl: ``"sdpa"`` or ``"eager"``.
        q_offset: absolute position of the first query when ``causal`` (``Tk - Tq`` with a cache).
        scale: multiplier of the scores; default ``1/sqrt(hs)`` (T5 uses 1.0).
    """
    if impl not in IMPLS:
        raise UserError(f"unknown attention impl {impl!r}: use one of {', '.join(IMPLS)}")
    tq, tk = q.size(-2), k.size(-2)
    is_causal = False
    if causal:
        if mask is None and q_offset == 0:
            is_causal = True  # SDPA's own causal mask is top-left aligned, i.e. q_offset == 0
        elif mask is None and q_offset >= tk - 1:
            pass  # every query sees every key (one-token decode step): no mask at all
        else:
            mask = _merge_masks(causal_mask(tq, tk, q.device, q_offset=q_offset), mask, q.dtype)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    return _eager_attention(q, k, v, mask, is_causal, dropout_p, scale)


def _merge_masks(causal: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Causal (tq, tk) boolean mask AND a user mask, keeping the user mask's kind (bool/additive)."""
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    # additive: a hidden position gets the most negative finite value (not -inf: no NaN rows)
    return torch.where(causal, mask.to(dtype), torch.finfo(dtype).min)


def _eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
) -> torch.Tensor:
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    if is_causal:
        mask = causal_mask(q.size(-2), k.size(-2), q.device, q_offset=0)
    neg = torch.finfo(scores.dtype).min  # finite, so a fully hidden row cannot produce NaN
    empty_rows = None
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, neg)
        empty_rows = ~mask.any(dim=-1, keepdim=True)  # queries that may see no key at all
    elif mask is not None:
        scores = scores + mask.to(scores.dtype)
    # softmax in fp32 so half-precision scores do not lose the small weights
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if empty_rows is not None:
        weights = weights.masked_fill(empty_rows, 0.0)  # match SDPA: such rows output zeros
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (B, nh, Tq, hs_v)
