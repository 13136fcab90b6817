"""`optim=adamw8bit` / `optim=paged_adamw8bit` (llmlab.optim.adamw8bit): bitsandbytes' 8-bit AdamW
built from the configs the way methods build optimizers (a `_partial_` factory called with the
parameter groups); it trains like torch AdamW; the paged variant falls back on CPU and says so."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from llmlab.optim import param_groups
from llmlab.quant.bnb import bitsandbytes

CONF = Path(__file__).resolve().parents[2] / "conf"


def optimizer_from_config(option: str, module: nn.Module):
    """What LLMLabModule.configure_optimizers does with the composed `optim` group."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"optim={option}"])
    opt_cfg = OmegaConf.to_container(cfg.optim.optimizer, resolve=True)
    weight_decay = float(opt_cfg.pop("weight_decay"))
    return instantiate(opt_cfg)(param_groups(module, weight_decay)), cfg


def regression(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 1))  # 8192 weights: 8-bit states
    x = torch.randn(256, 64)
    return model, x, x[:, :1] * 2 - x[:, 1:2]


def train(model, opt, x, y, steps=60):
    losses = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adamw8bit_from_config_trains_like_adamw():
    model, x, y = regression()
    opt, cfg = optimizer_from_config("adamw8bit", model)
    assert type(opt) is bitsandbytes().optim.AdamW8bit
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    assert opt.param_groups[0]["betas"] == tuple(cfg.optim.betas)  # plain floats: checkpoints stay plain data
    losses = train(model, opt, x, y)
    state = opt.state[model[0].weight]
    assert state["state1"].dtype == torch.uint8  # 8-bit first moment
    reference, x, y = regression()
    ref_losses = train(reference, torch.optim.AdamW(param_groups(reference, 0.1), lr=cfg.optim.lr,
                                                    betas=tuple(cfg.optim.betas)), x, y)
    assert losses[-1] < 0.1 * losses[0]
    assert losses[-1] == pytest.approx(ref_losses[-1], rel=0.5, abs=0.02)


def test_paged_adamw8bit_falls_back_on_cpu_and_logs(caplog):
    assert not torch.cuda.is_available()
    model, x, y = regression()
    with caplog.at_level(logging.INFO, logger="llmlab.optim"):
        opt, cfg = optimizer_from_config("paged_adamw8bit", model)
    assert cfg.optim.optimizer.paged is True and cfg.optim.lr == 2.0e-3  # the rest is adamw8bit's
    assert type(opt) is bitsandbytes().optim.AdamW8bit and not opt.is_paged
    lines = [r.getMessage() for r in caplog.records if "paged_adamw8bit" in r.getMessage()]
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "non-paged" in lines[0]
    losses = train(model, opt, x, y, steps=20)
    assert losses[-1] < losses[0]
