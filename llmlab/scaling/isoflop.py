"""One job of an IsoFLOP sweep (Hoffmann et al. 2022, §3.2 "Approach 2"): a compute budget C and a
position on that budget's log grid of model sizes become a GPT shape, a token budget and a
learning-rate schedule. ``llmlab train experiment=scaling_sweep -m`` runs the grid.

- **Size grid.** Each IsoFLOP curve is centred on the size that gives ``tokens_per_param`` tokens per
  parameter at its budget, ``N_c = sqrt(C / (6·tokens_per_param))``, and steps by ``size_step`` (×2)
  either way: ``N = N_c · size_step^size`` (``size`` may be fractional: any N). Every ×2 in N is ×4 in
  D/N, so six sizes span a factor 1000 in tokens per parameter — wide enough that each curve's
  minimum lies inside it (tiny char models on short runs want far more than Chinchilla's 20).
- **Shape.** One aspect ratio ``d_model / n_layer`` for the whole family (:func:`shape_for`; Kaplan
  et al. 2020 §3.1: at fixed N the loss hardly depends on the shape), so N alone varies along a curve.
- **Tokens.** ``D = C / (6N + 6·n_layer·n_ctx·d_model)`` (FLOPs per token, Kaplan Table 1), rounded
  to whole optimizer steps: ``trainer.max_steps = round(D / tokens per step)``.
- **Schedule.** Peak LR from Kaplan et al. 2020 eq. D.1, ``LR(N) = 0.003239 − 0.0001395·ln N``
  (times ``lr_scale``); linear warmup over N tokens (Porian et al. 2024, "Resolving Discrepancies in
  Compute-Optimal Scaling": warm-up ≈ model size in tokens) but at most ``max_warmup`` of the run;
  cosine decay to ``min_lr_ratio`` (10 %) of the peak at exactly the run's last step — Chinchilla's
  finding that a cosine cycle longer than the run overstates the loss (Hoffmann et al. §3, Fig. A1).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from omegaconf import DictConfig, open_dict

from llmlab.errors import UserError
from llmlab.scaling.flops import gpt_flops_per_token, gpt_param_counts

log = logging.getLogger(__name__)


def kaplan_lr(n_params: float) -> float:
    """Kaplan et al. 2020, eq. D.1: the learning rate that trained each size well."""
    return 0.003239 - 0.0001395 * math.log(n_params)


def shape_for(n_target: float, *, head_dim: int = 16, aspect: float = 32.0, max_layers: int = 12) -> dict[str, int]:
    """A GPT shape with about ``n_target`` non-embedding parameters and ``d_model / n_layer ≈ aspect``:
    ``12·n_layer·d² = N`` with ``d = aspect·n_layer`` gives ``n_layer = (N / (12·aspect²))^(1/3)``;
    the width is then rounded to a multiple of 8, with heads of about ``head_dim`` dimensions. One
    rule for every size, so the family's shape changes smoothly along the grid."""
    n_layer = max(1, min(max_layers, round((n_target / (12 * aspect**2)) ** (1 / 3))))
    n_embd = max(16, 8 * round(math.sqrt(n_target / (12 * n_layer)) / 8))
    n_head = max(1, round(n_embd / head_dim))
    while n_embd % n_head:
        n_head -= 1
    return {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}


def _number(scaling: dict[str, Any], key: str) -> float:
    try:
        value = float(scaling[key])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"scaling.{key}={scaling.get(key)!r} must be a finite number, e.g. scaling.compute=1e12 scaling.size=-1")
    return value


def plan_job(scaling: dict[str, Any], model: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """Shape, steps and schedule of one IsoFLOP job (see the module docstring)."""
    compute = _number(scaling, "compute")
    if compute <= 0:
        raise UserError(f"scaling.compute={scaling['compute']}: a compute budget must be a positive number of FLOPs, e.g. 1e12")
    for key in ("tokens_per_param", "size_step", "aspect", "head_dim", "max_layers", "lr_scale"):
        if _number(scaling, key) <= 0:
            raise UserError(f"scaling.{key}={scaling[key]} must be positive (see conf/experiment/scaling_sweep.yaml)")
    n_target = math.sqrt(compute / (6.0 * float(scaling["tokens_per_param"]))) * float(scaling["size_step"]) ** _number(scaling, "size")
    shape = shape_for(n_target, head_dim=int(scaling["head_dim"]), aspect=float(scaling["aspect"]),
                      max_layers=int(scaling["max_layers"]))
    arch = {**model, **shape}
    n = gpt_param_counts({**arch, "vocab_size": 1})["params_non_embedding"]
    per_token = gpt_flops_per_token({**arch, "vocab_size": 1})
    steps = round(compute / per_token / tokens_per_step)
    if steps < 10:
        raise UserError(f"scaling.compute={compute:g} trains N={n:,} for only {steps} steps of {tokens_per_step} tokens: "
                        f"raise scaling.compute or lower scaling.size")
    lr = kaplan_lr(n) * float(scaling["lr_scale"])
    warmup = max(1, min(round(n / tokens_per_step), int(float(scaling["max_warmup"]) * steps)))
    return {**shape, "n_params_non_embedding": n, "flops_per_token": per_token, "max_steps": steps,
            "tokens": steps * tokens_per_step, "lr": lr, "warmup_steps": warmup,
            "min_lr": lr * float(scaling["min_lr_ratio"]), "n_target": n_target}


def apply_isoflop(cfg: DictConfig) -> dict[str, Any] | None:
    """``scaling.compute`` set: rewrite the model shape, max_steps and LR schedule of this run in place
    (before anything is built) and return the plan; otherwise leave the config alone."""
    scaling = cfg.get("scaling")
    if not scaling or scaling.get("compute") is None:
        return None
    if cfg.model.get("arch") != "gpt":
        raise UserError(f"scaling.compute sizes GPT models, not model.arch={cfg.model.get('arch')}: use model=gpt_nano")
    tokens_per_step = int(cfg.data.batch_size) * int(cfg.data.block_size) * int(cfg.trainer.get("accumulate_grad_batches") or 1)
    plan = plan_job(dict(scaling), dict(cfg.model), tokens_per_step)
    with open_dict(cfg):
        for key in ("n_layer", "n_embd", "n_head"):
            cfg.model[key] = plan[key]
        cfg.trainer.max_steps = plan["max_steps"]
        cfg.trainer.val_check_interval = plan["max_steps"]  # one validation, at the end: the point of the fit
        cfg.optim.lr = plan["lr"]
        cfg.optim.scheduler.warmup_steps = plan["warmup_steps"]
        cfg.optim.scheduler.min_lr = plan["min_lr"]
        cfg.optim.scheduler.decay_steps = plan["max_steps"]
    log.info("IsoFLOP job: C=%.3g FLOPs -> %d layers x %d (N=%s non-embedding), %d steps = %s tokens (%.1f per parameter), "
             "lr %.2e, warmup %d", float(scaling.compute), plan["n_layer"], plan["n_embd"], f"{plan['n_params_non_embedding']:,}",
             plan["max_steps"], f"{plan['tokens']:,}", plan["tokens"] / plan["n_params_non_embedding"], plan["lr"],
             plan["warmup_steps"])
    return plan
