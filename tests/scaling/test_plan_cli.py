"""`llmlab scaling plan` / `llmlab scaling fit` through the CLI: spec seed000_part3 §1.3/§1.5's numbers, plan.json,
law presets = llmlab.scaling.laws.PRESETS, a fitted law from fit.json, and bad input (one line, exit 2, nothing written).

The CLI runs in-process (llmlab.cli.main: a Hydra app per call, ~0.5 s, vs ~1 s for a subprocess); one subprocess
checks the real exit code and that a plan never imports torch.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env
from omegaconf import OmegaConf

from llmlab import cli
from llmlab.scaling import PRESETS

C_CHINCHILLA = 5.76e23  # Chinchilla's (and Gopher's) training compute, Hoffmann et al. 2022 Table 3


@pytest.fixture
def llmlab(tmp_path, monkeypatch, capsys):
    """llmlab(*args) -> (exit code, stdout, stderr), run in-process with outputs under tmp_path."""
    monkeypatch.setenv("LLMLAB_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # _run_hydra sets it for Hydra

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    run.root = tmp_path
    return run


def plans(root: Path) -> list[Path]:
    return sorted(root.glob("outputs/scaling_plan/runs/*/plan.json"))


def plan(llmlab, *args: str) -> tuple[dict, str]:
    """Run a plan that must succeed; its plan.json (the newest) and stdout."""
    before = set(plans(llmlab.root))
    code, out, err = llmlab("scaling", "plan", *args)
    assert code == 0, err
    (new,) = set(plans(llmlab.root)) - before
    assert f"plan: {new}" in out
    result = json.loads(new.read_text())
    metrics = json.loads((new.parent / "metrics.json").read_text())  # for -m sweep summaries
    assert metrics == {f"plan/{k}": result[k] for k in ("compute", "n_params", "n_tokens", "tokens_per_param", "loss")}
    return result, out


def fails(llmlab, *args: str) -> str:
    """Run a command that must fail on bad input: exit 2, one `error:` line, no plan.json written."""
    before = plans(llmlab.root)
    code, out, err = llmlab(*args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert "Traceback" not in out + err and plans(llmlab.root) == before
    return lines[0]


# ---------------------------------------------------------------------------- the presets


@pytest.mark.parametrize("name", ["chinchilla_hoffmann", "chinchilla_besiroglu", "kaplan"])
def test_law_configs_hold_the_presets_constants(name):
    cfg = OmegaConf.to_container(OmegaConf.load(cli.CONF_DIR / "law" / f"{name}.yaml"))
    form = cfg.pop("form")
    assert cfg == asdict(PRESETS[name]) and form == ("kaplan" if name == "kaplan" else "chinchilla")
    assert name in cli.list_configs("law")


def test_scaling_rules_check_keys_that_exist():
    """A typo in schema.SCALING_RULES would silently check nothing."""
    from llmlab.schema import SCALING_RULES

    keys = {*OmegaConf.load(cli.CONF_DIR / "scaling_plan.yaml"), *OmegaConf.load(cli.CONF_DIR / "scaling_fit.yaml")}
    assert {rule.key for rule in SCALING_RULES} <= keys


def test_besiroglu_at_chinchilla_compute(llmlab):
    # Epoch's refit gives ~20 tokens/param: N* = 72.3B, D* = 1.33T (spec §1.3)
    p, out = plan(llmlab, f"compute={C_CHINCHILLA}", "law=chinchilla_besiroglu")
    assert p["n_params"] == pytest.approx(72.3e9, rel=0.01) and p["n_tokens"] == pytest.approx(1.33e12, rel=0.01)
    assert p["law"]["name"] == "chinchilla_besiroglu" and p["law"]["B"] == 2085.43
    assert 6 * p["n_params"] * p["n_tokens"] == pytest.approx(C_CHINCHILLA, rel=1e-9)
    assert "72.2B" in out and "1.33T" in out and "a = 0.5126" in out


def test_hoffmann_at_chinchilla_compute_with_gpu_time(llmlab):
    p, out = plan(llmlab, f"compute={C_CHINCHILLA}", "gpu_flops=312e12", "mfu=0.4", "n_gpus=1024")
    assert set(p) >= {"n_params", "n_tokens", "compute", "loss", "tokens_per_param", "law", "a", "b", "gpu_hours"}
    assert "target_loss" not in p and p["compute"] == C_CHINCHILLA
    assert p["tokens_per_param"] == pytest.approx(92.6, abs=0.05)  # the rounded constants' drift (spec §1.3)
    assert p["n_tokens"] / p["n_params"] == pytest.approx(p["tokens_per_param"], rel=1e-12)
    assert p["law"] == {"form": "chinchilla", "name": "chinchilla_hoffmann", "E": 1.69, "A": 406.4, "B": 410.7,
                        "alpha": 0.34, "beta": 0.28}
    assert p["a"] == pytest.approx(0.4516, abs=1e-4) and p["b"] == pytest.approx(0.5484, abs=1e-4)
    # independent of the closed form: brute-force argmin of E + A/N^alpha + B/D^beta on C = 6 N D
    n = np.logspace(9, 12, 200_001)
    loss = 1.69 + 406.4 / n**0.34 + 410.7 / (C_CHINCHILLA / (6 * n)) ** 0.28
    assert p["n_params"] == pytest.approx(n[loss.argmin()], rel=1e-4) and p["loss"] == pytest.approx(loss.min(), rel=1e-9)
    # 5.76e23 FLOPs at 40 % of an A100's 312 TFLOP/s: 1.28e6 GPU-hours, 52 days on 1024 GPUs
    assert p["gpu_hours"] == pytest.approx(5.76e23 / (0.4 * 312e12) / 3600, rel=1e-12)
    assert p["gpu_hours"] == pytest.approx(1.282e6, rel=1e-3) and p["days"] == pytest.approx(52.2, rel=1e-2)
    assert "92.6" in out and "1024 GPUs" in out


def test_kaplan_allocation(llmlab):
    p, out = plan(llmlab, f"compute={C_CHINCHILLA}", "law=kaplan")
    pf_days = C_CHINCHILLA / 8.64e19  # Kaplan et al. Table 6: C_min in PF-days
    assert p["n_params"] == pytest.approx(1.3e9 * pf_days**0.73, rel=1e-12)
    assert p["n_tokens"] == pytest.approx(2e10 * pf_days**0.27, rel=1e-12)
    assert p["loss"] == pytest.approx((3.1e8 / pf_days) ** 0.050, rel=1e-12)  # Table 5's L(C_min)
    assert {k: p[k] for k in PRESETS["kaplan"].optimal(C_CHINCHILLA)} == PRESETS["kaplan"].optimal(C_CHINCHILLA)
    assert p["compute_6ND"] != pytest.approx(C_CHINCHILLA, rel=0.1)  # Table 6 is for C_min at the critical batch
    assert "non-embedding" in out and "Table 6" in out


def test_target_loss(llmlab):
    # Hoffmann's frontier reaches 2.0 nats/token at 1.11e23 FLOPs with N* 15.3B, D* 1.21T (spec §1.5)
    p, _ = plan(llmlab, "target_loss=2.0")
    assert p["target_loss"] == 2.0 and p["loss"] == pytest.approx(2.0, rel=1e-9)
    assert p["compute"] == pytest.approx(1.11e23, rel=5e-3)
    assert p["n_params"] == pytest.approx(1.53e10, rel=5e-3) and p["n_tokens"] == pytest.approx(1.21e12, rel=5e-3)


def test_a_preset_constant_overridden(llmlab):
    # E only shifts the loss: spec §1.5's L*(1e21) = 2.3289 becomes 2.3289 - 1.69 + 1.8; N*, D* stay 1.824e9, 9.136e10
    p, out = plan(llmlab, "compute=1e21", "law.E=1.8")
    assert p["loss"] == pytest.approx(2.3289 + 0.11, abs=1e-4) and p["n_params"] == pytest.approx(1.824e9, rel=1e-3)
    assert p["law"]["E"] == 1.8 and p["law"]["name"] == "chinchilla_hoffmann (modified: E=1.8)" and "modified" in out


def test_law_from_a_fit_json(llmlab, tmp_path):
    fit = tmp_path / "sweep" / "fit" / "fit.json"
    fit.parent.mkdir(parents=True)
    law = {"E": 1.5, "A": 300.0, "B": 500.0, "alpha": 0.3, "beta": 0.3, "name": "fit"}
    fit.write_text(json.dumps({"law": law, "approach3": {"E": 1.5}, "n_points": 30}))
    for spec in ("sweep/fit/fit.json", "sweep/fit"):  # the file, or the dir `llmlab scaling fit` wrote it to
        p, _ = plan(llmlab, "compute=6e18", f"law={spec}")
        # alpha = beta: a = b = 1/2 and N* = (A/B)^(1/(2 alpha)) sqrt(C/6), D* = C / (6 N*) — by hand
        n = (300 / 500) ** (1 / 0.6) * math.sqrt(6e18 / 6)
        assert p["n_params"] == pytest.approx(n, rel=1e-12) and p["n_tokens"] == pytest.approx(6e18 / 6 / n, rel=1e-12)
        assert p["loss"] == pytest.approx(1.5 + 300 / n**0.3 + 500 / (1e18 / n) ** 0.3, rel=1e-12)
        assert p["a"] == pytest.approx(0.5) and p["law"] == {"form": "chinchilla", **law, "path": str(fit.resolve())}


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args,says", [
    (["compute=0"], "compute=0 is not a positive"),
    (["compute=-1"], "compute=-1 is not a positive, finite number of FLOPs"),
    (["compute=abc"], "compute=abc"),
    (["compute=inf"], "compute=inf"),
    (["compute=1e21", "target_loss=2.0"], "both given"),
    ([], "pass compute=FLOPs"),
    (["target_loss=1.6"], "not above the irreducible loss E=1.69"),
    (["compute=1e21", "law=missing.json"], "does not exist"),
    (["compute=1e21", "law=bad.json"], "is not JSON"),
    (["compute=1e21", "law=nolaw.json"], 'no "law" block'),
    (["compute=1e21", "law=negative.json"], "law.alpha=-0.3 is not a positive number"),
    (["compute=1e21", "law=nosuch"], "unknown law=nosuch: choose one of chinchilla_besiroglu, chinchilla_hoffmann"),
    (["compute=1e21", "law=fit"], "law=fit needs the file"),
    (["compute=1e21", "law.beta=0"], "law.beta=0 is not a positive"),
])
def test_bad_plan_input_is_one_line(llmlab, tmp_path, args, says):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nolaw.json").write_text(json.dumps({"kaplan": {}}))
    (tmp_path / "negative.json").write_text(json.dumps({"law": {"E": 1.5, "A": 1, "B": 1, "alpha": -0.3, "beta": 0.3}}))
    assert says in fails(llmlab, "scaling", "plan", *args)


def test_scaling_subcommands_and_fit_input(llmlab, tmp_path):
    for args in ([], ["foo"]):
        line = fails(llmlab, "scaling", *args)
        assert "llmlab scaling plan" in line and "llmlab scaling fit" in line
    (tmp_path / "empty").mkdir()
    assert "needs a sweep dir" in fails(llmlab, "scaling", "fit")
    assert "does not exist" in fails(llmlab, "scaling", "fit", "nowhere")
    assert "unknown key 'n_boot'" in fails(llmlab, "scaling", "fit", "empty", "n_boot=3")
    assert "n_bootstrap=-1 is not an integer >= 0" in fails(llmlab, "scaling", "fit", "empty", "n_bootstrap=-1")
    assert "delta=abc" in fails(llmlab, "scaling", "fit", "empty", "delta=abc")
    assert "no finished runs" in fails(llmlab, "scaling", "fit", "empty")  # llmlab.scaling.fit.collect
    assert not (tmp_path / "empty" / "fit").exists()


def test_fit_wiring(llmlab, tmp_path, monkeypatch):
    """`llmlab scaling fit A B key=value ...` -> run_fit([A, B], out, n_bootstrap=, seed=, delta=), numbers printed."""
    import llmlab.scaling.fit as fit_module

    calls = []

    def fake_run_fit(sweep_dirs, out_dir, *, n_bootstrap, seed, delta):
        calls.append((list(map(str, sweep_dirs)), str(out_dir), n_bootstrap, seed, delta))
        ci = {"level": 0.95, "n_resamples": n_bootstrap, "n_failed": 0,
              "intervals": {"alpha": [0.3, 0.4], "a": [0.45, 0.55], "alpha_N": [0.07, 0.08]}}
        return {"law": {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28, "name": "fit"},
                "approach3": {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28, "a": 0.45, "b": 0.55, "ci": ci},
                "approach2": {"a": 0.49, "b": 0.51, "ci": ci}, "kaplan": {"N": {"X_c": 8.8e13, "alpha": 0.076}, "ci": ci},
                "n_points": 12, "jobs": {"total": 13}, "sweep_dirs": list(map(str, sweep_dirs)), "warnings": ["1 failed"]}

    monkeypatch.setattr(fit_module, "run_fit", fake_run_fit)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    code, out, err = llmlab("scaling", "fit", "a", "b", "n_bootstrap=50", "seed=3", "delta=1e-2")
    assert code == 0, err
    assert calls == [(["a", "b"], str(Path("a") / "fit"), 50, 3, 0.01)]
    assert "0.34" in out and "95% CI [0.3, 0.4]" in out and "0.49" in out and "alpha_N" in out and "warning: 1 failed" in out
    code, _, err = llmlab("scaling", "fit", "a", f"out={tmp_path / 'elsewhere'}")
    assert code == 0, err
    assert calls[-1] == (["a"], str(tmp_path / "elsewhere"), 200, 0, 1e-3)


def test_plan_never_imports_torch_and_exits_2(run_cli):
    """In a real process: a plan is arithmetic and must stay fast (no torch, no lightning); bad input exits 2."""
    code = ("import sys; from llmlab.cli import main; main(['scaling', 'plan', 'compute=1e21']); "
            "print('imported:', sorted(m for m in ('torch', 'lightning') if m in sys.modules)); "
            "main(['scaling', 'plan', 'compute=-1'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=run_cli.root, env=cli_env(run_cli.root),
                          capture_output=True, text=True, timeout=120)
    assert "imported: []" in proc.stdout, proc.stderr
    assert proc.returncode == 2 and proc.stderr.startswith("error: compute=-1") and proc.stderr.count("\n") == 1
