"""Optimizer parameter groups and learning-rate schedules shared by every method.

Weight decay goes on matrices (Linear/Embedding weights) only; biases, LayerNorm gains and other
1-D parameters are not decayed (GPT-1 §4.1 "modified L2 regularization ... on all non bias or gain
weights"). The schedule is linear warmup followed by cosine (or linear) decay to ``min_lr``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn

from llmlab.errors import UserError

log = logging.getLogger(__name__)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed (dim >= 2) and a non-decayed group.

    Modules that say ``no_weight_decay = True`` (soft prompts and prefixes of :mod:`llmlab.peft`,
    which are embedding tables like GPT's own, but the only thing that trains) are not decayed.
    """
    params = [p for p in module.parameters() if p.requires_grad]  # shared (tied) params appear once
    exempt = {id(p) for m in module.modules() if getattr(m, "no_weight_decay", False) for p in m.parameters()}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in exempt]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in exempt]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw8bit(params, *, paged: bool = False, **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit block-wise optimizer states (Dettmers et al. 2022, "8-bit
    Optimizers via Block-wise Quantization", arXiv:2110.02861): ``optim=adamw8bit``.

    ``paged=True`` (``optim=paged_adamw8bit``, QLoRA §3 "Paged Optimizers") keeps the states in
    CUDA unified memory, paged to CPU RAM under memory pressure; without a CUDA device there is
    nothing to page from, so the plain (same-update) AdamW8bit is used and the log says so.
    ``kwargs``: AdamW8bit's (lr, betas, eps, weight_decay, min_8bit_size ...).
    """
    from llmlab.quant.bnb import bitsandbytes

    optim = bitsandbytes().optim
    if "betas" in kwargs:  # a plain tuple: the optimizer state is checkpointed, and loading reads plain data only
        kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])
    if paged and not torch.cuda.is_available():
        log.info("optim=paged_adamw8bit: no CUDA device, so no unified memory to page optimizer states to: "
                 "using bitsandbytes AdamW8bit (non-paged, the same update)")
        paged = False
    return (optim.PagedAdamW8bit if paged else optim.AdamW8bit)(params, **kwargs)


def lr_lambda(
    name: str, warmup_steps: int, decay_steps: int | None, min_ratio: float
) -> Callable[[int], float]:
    """LR multiplier at optimizer step ``step``: warmup, then decay to ``min_ratio`` at ``decay_steps``."""
    if name not in ("cosine", "linear", "constant"):
        raise UserError(f"unknown optim.scheduler.name={name!r}: use cosine, linear or constant")
    if decay_steps is None or decay_steps < 0:  # e.g. trainer.max_steps=-1: nothing to decay towards
        name = "constant"

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
        if name == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * (1.0 - progress)

    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str = "cosine",
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    min_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    peak = optimizer.param_groups[0]["lr"]
    min_ratio = min_lr / peak if peak > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(name, warmup_steps, decay_steps, min_ratio)
    )
