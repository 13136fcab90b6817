"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective
Pruning Approach for Large Language Models", https://arxiv.org/abs/2306.11695, §3).

The score of weight W_ij (output i, input j) is ``S_ij = |W_ij| · ‖X_j‖₂``, where ‖X_j‖₂ is the L2
norm of input feature j over every token of a small calibration set (§3, eq. 1). Scores are
compared **per output row** (§3 "comparison group"): each row loses the same share of its
weights, the ``round(amount · in_features)`` of lowest score. No weight is updated and nothing
is retrained (unlike SparseGPT). A weight on a feature whose activations are large survives even
when it is small — what magnitude pruning gets wrong for LLMs with outlier features.

As in the authors' code (``lib/prune.py: prune_wanda``) the blocks are pruned one after the
other (``sequential``): the inputs of a block are computed by the blocks below it *after* those
were pruned, and all Linear layers of one block are scored on the same pass (before the block
itself is pruned). Their code truncates ``int(amount · in_features)``; rounding here gives the
same count as magnitude pruning, so both methods sit at the same sparsity on the curve.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llmlab.quant.prune import LossFn, set_mask


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖X‖₂`` broadcast over rows: (out, in) scores from (out, in) weights and (in,) norms."""
    return weight.detach().abs() * input_norm.to(weight.dtype)[None, :]


def row_mask(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """0 at the ``round(amount · in)`` lowest scores of every row (Wanda's per-output comparison group)."""
    k = round(amount * scores.size(1))
    mask = torch.ones_like(scores)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, 0.0)
    return mask


@torch.no_grad()
def input_norms(model: nn.Module, layers: Sequence[tuple[str, nn.Linear]], batches: Sequence[Any],
                loss_fn: LossFn) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over every calibration token, for the input of each layer: forward pre-hooks on the
    layers sum x_j² while ``loss_fn`` runs the model on the batches (eval mode: no dropout)."""
    sums = {path: torch.zeros(layer.in_features, dtype=torch.float64, device=layer.weight.device)
            for path, layer in layers}

    def hook(path):
        def add(_module, args):
            x = args[0].detach()
            sums[path].add_(x.reshape(-1, x.size(-1)).double().pow(2).sum(0))  # (B*T, in) -> (in,)
        return add

    handles = [layer.register_forward_pre_hook(hook(path)) for path, layer in layers]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss_fn(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {path: s.sqrt().float() for path, s in sums.items()}


def blocks_of(layers: Sequence[tuple[str, nn.Linear]]) -> list[list[tuple[str, nn.Linear]]]:
    """Layers grouped by transformer block (the path up to its first index: ``transformer.h.3``),
    bottom to top; layers outside any indexed block form their own group."""
    groups: dict[str, list] = {}
    for path, layer in layers:
        m = re.match(r"^(.*?\.\d+)(\.|$)", path)
        groups.setdefault(m.group(1) if m else path, []).append((path, layer))
    return list(groups.values())


def wanda(model: nn.Module, layers: Sequence[tuple[str, nn.Linear]], amount: float, batches: Sequence[Any],
          loss_fn: LossFn, sequential: bool = True) -> None:
    """Prune ``layers`` of ``model`` to ``amount`` per output row by Wanda's score (module docstring)."""
    for group in blocks_of(layers) if sequential else [list(layers)]:
        norms = input_norms(model, group, batches, loss_fn)
        for path, layer in group:
            set_mask(layer, "weight", row_mask(wanda_scores(layer.weight, norms[path]), amount))
