"""Structured pruning of attention heads by importance (Michel, Levy & Neubig 2019, "Are Sixteen
Heads Really Better than One?", https://arxiv.org/abs/1905.10650, §4.1–4.2).

Every head h of every layer gets a gate ξ_h (1 = on) multiplying its output before the output
projection: ``MHA(x) = Σ_h ξ_h · Att_h(x) W_O^h``. The importance of a head is how much the loss
moves if the gate moves (eq. 2, a first-order Taylor estimate of masking it),

    I_h = E_x | ∂L(x) / ∂ξ_h |  =  E_x | Att_h(x)ᵀ ∂L(x)/∂(Att_h(x)) |,

taken here over calibration batches (absolute value per batch, as the authors' code does).
Importances are ℓ2-normalised within each layer (§4.2, after Molchanov et al. 2017), then the
``round(amount · heads)`` least important heads of the whole model are pruned (a global ranking,
so some layers lose more heads than others).

A pruned head is removed by zeroing its parameters: its query, key and value rows of ``c_attn``
(weight and bias) and its columns of ``c_proj``. Its contribution to the output is then exactly
zero, as if the head were cut out — the GPT keeps its shape (``n_head`` is one number for every
layer, so heads are not physically sliced out) and its checkpoint stays a plain GPT checkpoint.
The masks keep them zero while fine-tuning (:mod:`llmlab.quant.prune`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.quant.prune import LossFn, set_mask, sparsity


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """GPT's attention modules, bottom to top."""
    model = getattr(model, "_orig_mod", model)
    h = getattr(getattr(model, "transformer", None), "h", None)
    if type(model).__name__ != "GPT" or h is None:
        raise UserError(f"prune=heads prunes the attention heads of GPT models; {type(model).__name__} is not one: "
                        "use prune=magnitude or prune=wanda")
    return [block.attn for block in h]


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The Linear layers head pruning zeroes (``c_attn`` and ``c_proj`` of every attention)."""
    out = []
    for i, attn in enumerate(attention_modules(model)):
        out += [(f"transformer.h.{i}.attn.c_attn", attn.c_attn), (f"transformer.h.{i}.attn.c_proj", attn.c_proj)]
    return out


def head_importance(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn,
                    normalize_by_layer: bool = True) -> torch.Tensor:
    """``(n_layer, n_head)`` importances I_h (module docstring) from the gates' gradients."""
    attns = attention_modules(model)
    n_head = attns[0].n_head
    device = attns[0].c_proj.weight.device
    gates = torch.ones(len(attns), n_head, device=device, requires_grad=True)  # ξ

    def gate(layer: int, head_dim: int):
        def hook(_module, args):  # c_proj's input: (B, T, C), heads side by side
            return (args[0] * gates[layer].repeat_interleave(head_dim).to(args[0].dtype),)
        return hook

    handles = [a.c_proj.register_forward_pre_hook(gate(i, a.n_embd // a.n_head)) for i, a in enumerate(attns)]
    importance = torch.zeros(len(attns), n_head, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            (grad,) = torch.autograd.grad(loss_fn(batch), gates)  # only the gates: no .grad left on the model
            importance += grad.detach().abs().double()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    importance /= max(len(batches), 1)
    if normalize_by_layer:
        importance /= importance.norm(dim=1, keepdim=True).clamp_min(1e-20)
    return importance.float()


def least_important(importance: torch.Tensor, amount: float) -> dict[int, list[int]]:
    """``{layer: [heads]}``: the ``round(amount · heads)`` lowest importances over the whole model."""
    k = round(amount * importance.numel())
    order = torch.argsort(importance.reshape(-1), stable=True)[:k]
    out: dict[int, list[int]] = {}
    for flat in sorted(order.tolist()):
        out.setdefault(flat // importance.size(1), []).append(flat % importance.size(1))
    return out


def prune_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """Zero (and keep zero) the q/k/v rows of ``c_attn`` and the ``c_proj`` columns of the given
    heads, ``{layer: [head, ...]}``; every other head of every layer is kept."""
    for layer, attn in enumerate(attention_modules(model)):
        C, hs = attn.n_embd, attn.n_embd // attn.n_head
        gone = torch.zeros(C, dtype=torch.bool)
        for h in heads.get(layer, []):
            if not 0 <= h < attn.n_head:
                raise UserError(f"head {h} of layer {layer} does not exist: the model has {attn.n_head} heads per layer")
            gone[h * hs:(h + 1) * hs] = True
        keep = (~gone).float()  # (C,) over one projection's outputs / c_proj's inputs
        qkv = keep.repeat(3)  # (3C,): q, k and v rows of the fused c_attn
        set_mask(attn.c_attn, "weight", qkv[:, None].expand_as(attn.c_attn.weight))
        if attn.c_attn.bias is not None:
            set_mask(attn.c_attn, "bias", qkv)
        set_mask(attn.c_proj, "weight", keep[None, :].expand_as(attn.c_proj.weight))


def prune_heads_by_importance(model: nn.Module, amount: float, batches: Sequence[Any], loss_fn: LossFn,
                              normalize_by_layer: bool = True) -> dict[str, float]:
    """Score every head on ``batches``, prune the ``amount`` least important; metrics of the result."""
    importance = head_importance(model, batches, loss_fn, normalize_by_layer)
    chosen = least_important(importance, amount)
    prune_heads(model, chosen)
    n = sum(len(v) for v in chosen.values())
    return {"prune/sparsity": sparsity(attention_layers(model)), "prune/amount": amount,
            "prune/heads_pruned": float(n), "prune/heads_pruned_frac": n / importance.numel()}
