"""The IsoFLOP sweep's job plan (llmlab/scaling/isoflop.py) and a real two-job sweep through the CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmlab.errors import UserError
from llmlab.scaling.flops import gpt_param_counts
from llmlab.scaling.isoflop import kaplan_lr, plan_job, shape_for

SCALING = dict(tokens_per_param=20, size_step=2.0, aspect=32, head_dim=16, max_layers=12, lr_scale=1.0,
               max_warmup=0.1, min_lr_ratio=0.1)
MODEL = dict(arch="gpt", block_size=128, bias=True, tie_embeddings=True)
TOKENS_PER_STEP = 32 * 128


def test_kaplan_learning_rate_eq_d1():
    assert kaplan_lr(1e6) == pytest.approx(0.003239 - 0.0001395 * math.log(1e6))
    assert kaplan_lr(1e6) == pytest.approx(1.312e-3, abs=1e-6)
    assert kaplan_lr(2e4) > kaplan_lr(1e5) > kaplan_lr(1e6)  # smaller models take larger steps


@pytest.mark.parametrize("n", [1.5e4, 4e4, 1e5, 3e5, 1e6, 3e6])
def test_shapes_hit_the_size_and_aspect(n):
    shape = shape_for(n)
    got = gpt_param_counts({**shape, "vocab_size": 1, "block_size": 1})["params_non_embedding"]
    assert abs(math.log(got / n)) < math.log(1.4)  # widths in steps of 8 cannot hit N exactly
    assert shape["n_embd"] % shape["n_head"] == 0 and shape["n_embd"] % 8 == 0
    assert 8 <= shape["n_embd"] / shape["n_layer"] <= 64


def test_isoflop_grid():
    for compute in (5e11, 4e12):
        plans = [plan_job({**SCALING, "compute": compute, "size": s}, MODEL, TOKENS_PER_STEP) for s in range(-2, 3)]
        sizes = [p["n_params_non_embedding"] for p in plans]
        assert sizes == sorted(sizes) and sizes[-1] / sizes[0] > 10  # a log grid, ~x16 end to end
        for p in plans:  # every job spends its budget, to within half a step of tokens
            assert abs(p["tokens"] * p["flops_per_token"] - compute) <= p["flops_per_token"] * TOKENS_PER_STEP / 2
            assert p["warmup_steps"] <= max(1, 0.1 * p["max_steps"]) and p["min_lr"] == pytest.approx(0.1 * p["lr"])
        ratios = [p["tokens"] / p["n_params_non_embedding"] for p in plans]
        assert ratios[0] > 100 > 20 > ratios[-1] > 0.5  # both sides of Chinchilla's ~20 tokens per parameter
        centre = plans[2]
        assert centre["tokens"] / centre["n_params_non_embedding"] == pytest.approx(20, rel=0.6)


@pytest.mark.parametrize("compute", [0, -1e12])
def test_bad_budget(compute):
    with pytest.raises(UserError, match="positive number of FLOPs"):
        plan_job({**SCALING, "compute": compute, "size": 0}, MODEL, TOKENS_PER_STEP)


@pytest.mark.parametrize("key,value", [("compute", "abc"), ("compute", float("nan")), ("compute", float("inf")),
                                       ("size", "big"), ("size", None)])
def test_not_a_number(key, value):
    with pytest.raises(UserError, match=f"scaling.{key}=.* must be a finite number"):
        plan_job({**SCALING, "compute": 1e12, "size": 0, key: value}, MODEL, TOKENS_PER_STEP)


def test_bad_grid_settings():
    with pytest.raises(UserError, match="scaling.size_step=0 must be positive"):
        plan_job({**SCALING, "compute": 1e12, "size": 0, "size_step": 0}, MODEL, TOKENS_PER_STEP)


def test_budget_too_small_for_the_size():
    with pytest.raises(UserError, match="only .* steps"):
        plan_job({**SCALING, "compute": 1e9, "size": 2}, MODEL, TOKENS_PER_STEP)


@pytest.mark.slow
def test_sweep_jobs_spend_their_budget(run_cli, small_corpus):
    """experiment=scaling_sweep, two budgets of one size on a small corpus: every job's FLOPs, sizes and
    schedule land in metrics.json and the sweep summary; the loggers' learning curve has train/flops."""
    run_cli("train", "experiment=scaling_sweep", "data=text", f"data.path={small_corpus}",
            "scaling.compute=2e10,4e10", "scaling.size=0", "trainer.limit_val_batches=2", "logger=csv")
    sweep = next((run_cli.root / "outputs" / "train" / "multiruns").iterdir())
    recipe = OmegaConf.load(Path(__file__).parents[2] / "conf" / "experiment" / "scaling_sweep.yaml")
    per_step = recipe.data.batch_size * MODEL["block_size"]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    for job in ("0", "1"):
        m = json.loads((sweep / job / "metrics.json").read_text())
        budget = m["scaling/compute"]
        assert budget in (2e10, 4e10)
        assert m["train/flops"] == m["train/tokens_seen"] * m["model/flops_per_token"]
        assert abs(m["train/flops"] - budget) <= m["model/flops_per_token"] * per_step / 2  # half a step
        plan = plan_job({**recipe.scaling, "compute": budget, "size": 0}, MODEL, per_step)
        assert m["model/params_non_embedding"] == plan["n_params_non_embedding"]
        assert m["model/params"] > m["model/params_non_embedding"]
        assert "test/loss" not in m and math.isfinite(m["val/loss"])
        logged = list(csv.DictReader(next((sweep / job).glob("csv/**/metrics.csv")).open()))
        flops = [float(r["train/flops"]) for r in logged if r.get("train/flops")]
        assert flops and flops == sorted(flops) and flops[-1] == m["train/flops"]
