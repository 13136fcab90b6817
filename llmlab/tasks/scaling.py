"""`llmlab scaling plan` and `llmlab scaling fit`: plan a training run from a compute budget, fit your own law.

* ``plan(cfg)`` (conf/scaling_plan.yaml, law presets in conf/law): the compute-optimal model size N* and token
  count D* of a budget C — or of the smallest budget that reaches ``target_loss`` — under a scaling law
  (:mod:`llmlab.scaling.laws`: Chinchilla's ``L = E + A/N**alpha + B/D**beta`` minimised on C = 6 N D, Hoffmann et
  al. 2022 §3.3 eq. 4; or Kaplan et al. 2020's Table 6 allocation). Prints a short table and writes
  ``<run dir>/plan.json``. Spec seed000_part3 §1.3; the seed's allocations (N = 0.3 C**0.5, N = 0.1 C**0.73) and
  its training-days formula (1000x off, §1.6 item 7) are not used.
* ``fit(cfg)`` (conf/scaling_fit.yaml): :func:`llmlab.scaling.fit.run_fit` on sweep dirs, then its numbers.

Neither imports torch: a plan takes well under a second.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmlab.errors import UserError
from llmlab.scaling.laws import PF_DAY, PRESETS, ChinchillaLaw, KaplanLaw, twenty_tokens_rule
from llmlab.utils import write_json

FORMS = {"chinchilla": ChinchillaLaw, "kaplan": KaplanLaw}
FIT_LAW_KEYS = ("E", "A", "B", "alpha", "beta")  # the "law" block of a fit.json (Approach 3's point estimate)
FIX_FIT = ("pass the fit.json written by `llmlab scaling fit SWEEP_DIR` (law=SWEEP_DIR/fit/fit.json) or a preset "
           "(law=chinchilla_hoffmann)")


# ---------------------------------------------------------------------------- plan


def plan(cfg: DictConfig) -> dict[str, Any]:
    law = build_law(cfg.law)
    target = cfg.get("target_loss")
    C = law.compute_for_loss(target) if target is not None else float(cfg.compute)  # UserError at or below E
    opt = law.optimal(C)
    result: dict[str, Any] = {**opt, "compute_pf_days": opt["compute"] / PF_DAY, "law": law_record(law, cfg.law)}
    if target is not None:
        result["target_loss"] = float(target)
    if isinstance(law, ChinchillaLaw):
        result.update(a=law.a, b=law.b)  # N* ∝ C**a, D* ∝ C**b
        rule = twenty_tokens_rule(opt["compute"])
        result["twenty_tokens_rule"] = {"n_params": rule["n_params"], "n_tokens": rule["n_tokens"],
                                        "loss": law.loss(rule["n_params"], rule["n_tokens"])}
    else:  # Table 6 allocates C_min at the critical batch size: 6 N D is not C
        result["compute_6ND"] = 6 * opt["n_params"] * opt["n_tokens"]
        result["n_params_counts"] = "non-embedding parameters (Kaplan et al. 2020)"
    if cfg.get("gpu_flops") is not None:
        result.update(training_time(opt["compute"], float(cfg.gpu_flops), float(cfg.mfu), int(cfg.n_gpus)))
    run_dir = Path(cfg.paths.output_dir)
    # metrics.json as every run dir has (flat floats): the summary table of `llmlab scaling plan -m compute=1e19,1e21`
    write_json(run_dir / "metrics.json", {f"plan/{k}": float(result[k]) for k in
                                          ("compute", "n_params", "n_tokens", "tokens_per_param", "loss")})
    path = write_json(run_dir / "plan.json", result)
    print_plan(result, law)
    print(f"plan: {path}")
    return result


def build_law(law_cfg: DictConfig) -> ChinchillaLaw | KaplanLaw:
    """The law of a conf/law option: a preset's constants (overridable: law.E=1.8) or a fit.json's "law" block."""
    form = str(law_cfg.form)
    if form not in FORMS:
        raise UserError(f"law.form={form} is not a scaling law form: use chinchilla or kaplan")
    if "path" in law_cfg.keys():  # law=fit: the constants are in the file (`in law_cfg` is False while it is ???)
        if OmegaConf.is_missing(law_cfg, "path"):
            raise UserError("law=fit needs the file: pass law=PATH/fit.json (the fit.json written by "
                            "`llmlab scaling fit SWEEP_DIR`) or law.path=PATH")
        return ChinchillaLaw(**read_fit_law(law_cfg.path))
    cls = FORMS[form]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(law_cfg) - names - {"form"})
    if unknown:
        raise UserError(f"law.{unknown[0]} is not a constant of the {form} law: use {', '.join(sorted(names))}")
    return cls(**{k: (str(v) if k == "name" else float(v)) for k, v in law_cfg.items() if k != "form"})


def read_fit_law(path: str | Path) -> dict[str, Any]:
    """The top-level ``"law": {E, A, B, alpha, beta, name}`` of a fit.json (json only: nothing in it runs)."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"law file {p} does not exist: {FIX_FIT}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"law file {p} is not JSON ({e}): {FIX_FIT}") from None
    block = data.get("law") if isinstance(data, dict) else None
    if not isinstance(block, dict) or any(k not in block for k in FIT_LAW_KEYS):
        raise UserError(f'law file {p} has no "law" block with {", ".join(FIT_LAW_KEYS)}: {FIX_FIT}')
    law: dict[str, Any] = {"name": str(block.get("name") or f"fit:{p}")}
    for key in FIT_LAW_KEYS:
        value = block[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UserError(f"law file {p}: law.{key}={value!r} is not a positive number, so it is no Chinchilla law: "
                            "refit it (llmlab scaling fit SWEEP_DIR) or pass a preset (law=chinchilla_hoffmann)")
        law[key] = float(value)
    return law


def law_record(law: ChinchillaLaw | KaplanLaw, law_cfg: DictConfig) -> dict[str, Any]:
    """The law as plan.json records it: name, form, constants (and the fit.json it came from); a preset whose
    constants were overridden on the command line says which."""
    record: dict[str, Any] = {"form": str(law_cfg.form), **asdict(law)}
    if "path" in law_cfg.keys():
        record["path"] = str(Path(str(law_cfg.path)).expanduser().resolve())
    preset = PRESETS.get(law.name)
    if preset is not None and preset != law:
        changed = [f"{f.name}={getattr(law, f.name):g}" for f in fields(law) if getattr(law, f.name) != getattr(preset, f.name)]
        record["name"] = f"{law.name} (modified: {', '.join(changed)})"
    return record


def training_time(compute: float, gpu_flops: float, mfu: float, n_gpus: int) -> dict[str, float]:
    """Time to spend ``compute`` FLOPs at ``mfu`` of ``gpu_flops`` peak (the seed divided by 1e20 FLOP/s, not its
    stated 1e17: 1000x off, spec §1.6 item 7)."""
    gpu_hours = compute / (gpu_flops * mfu) / 3600
    return {"gpu_flops": gpu_flops, "mfu": mfu, "n_gpus": n_gpus, "gpu_hours": gpu_hours,
            "days": gpu_hours / 24 / n_gpus}


# ---------------------------------------------------------------------------- printing


def human(n: float) -> str:
    """72.3B, 1.33T: the papers' way of writing parameter and token counts."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def law_formula(law: ChinchillaLaw | KaplanLaw) -> str:
    if isinstance(law, ChinchillaLaw):
        return f"L(N, D) = {law.E:g} + {law.A:g} / N^{law.alpha:g} + {law.B:g} / D^{law.beta:g}"
    return f"L(C) = ({law.C_c_pf_days:g} PF-days / C)^{law.alpha_C:g}"


def print_plan(r: dict[str, Any], law: ChinchillaLaw | KaplanLaw) -> None:
    source = f" (from {r['law']['path']})" if "path" in r["law"] else ""
    rows = [("law", f"{r['law']['name']}{source}: {law_formula(law)}")]
    if "target_loss" in r:
        rows.append(("target loss", f"{r['target_loss']:g} nats/token"))
    rows.append(("compute C", f"{r['compute']:.3e} FLOPs ({r['compute_pf_days']:.3g} PF-days)"))
    if isinstance(law, ChinchillaLaw):
        rows += [("parameters N*", f"{human(r['n_params'])}  (N* ∝ C^a, a = {r['a']:.4f})"),
                 ("tokens D*", f"{human(r['n_tokens'])}  (D* ∝ C^b, b = {r['b']:.4f}; C = 6 N* D*)")]
    else:
        rows += [("parameters N*", f"{human(r['n_params'])} non-embedding  (Kaplan Table 6: 1.3e9 C^0.73, C in PF-days)"),
                 ("tokens D*", f"{human(r['n_tokens'])}  (Table 6: 2e10 C^0.27; 6 N D = {r['compute_6ND']:.3g}, not C: "
                               "the allocation is for C_min at the critical batch size)")]
    rows += [("tokens per param", f"{r['tokens_per_param']:.3g}"), ("predicted loss", f"{r['loss']:.4f} nats/token")]
    if "twenty_tokens_rule" in r:
        t = r["twenty_tokens_rule"]
        rows.append(("20 tokens/param", f"N = {human(t['n_params'])}, D = {human(t['n_tokens'])} -> loss {t['loss']:.4f}"))
    if "gpu_hours" in r:
        rows.append(("training time", f"{r['gpu_hours']:.3g} GPU-hours at {r['mfu']:g} of {r['gpu_flops']:.3g} FLOP/s = "
                                      f"{r['days']:.3g} days on {r['n_gpus']} GPU{'s' if r['n_gpus'] > 1 else ''}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


# ---------------------------------------------------------------------------- fit


def fit(cfg: DictConfig) -> dict[str, Any]:
    """``llmlab scaling fit SWEEP_DIR ...``: run the fits, print their numbers and where the files are."""
    from llmlab.scaling.fit import run_fit

    dirs = [Path(str(d)).expanduser() for d in cfg.sweep_dirs]  # run_fit says which is missing or empty
    out = Path(str(cfg.out)).expanduser() if cfg.get("out") else dirs[0] / "fit"
    result = run_fit(dirs, out, n_bootstrap=int(cfg.n_bootstrap), seed=int(cfg.seed), delta=float(cfg.delta))
    print_fit(result)
    pngs = sorted(p.name for p in out.glob("*.png"))
    print(f"fit: {out / 'fit.json'}" + (f"\nplots: {out}/{{{','.join(pngs)}}}" if pngs else ""))
    print(f"plan with it: llmlab scaling plan compute=1e21 law={out / 'fit.json'}")
    return result


def _ci(block: Any, key: str) -> str:
    """``  95% CI [lo, hi]`` from ``block["ci"]["intervals"][key]`` (:func:`llmlab.scaling.fit.bootstrap`), if any."""
    ci = block.get("ci") if isinstance(block, dict) else None
    interval = (ci.get("intervals") or {}).get(key) if isinstance(ci, dict) else None
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(isinstance(x, (int, float)) for x in interval):
        return f"  {100 * ci.get('level', 0.95):g}% CI [{interval[0]:.4g}, {interval[1]:.4g}]"
    return ""


def print_fit(r: dict[str, Any]) -> None:
    jobs = r.get("jobs") or {}
    print(f"{r.get('n_points')} finished runs (of {jobs.get('total', '?')} jobs) from {', '.join(r.get('sweep_dirs', []))}")
    a3 = r.get("approach3") or {}
    print("Chinchilla Approach 3 (Hoffmann et al. 2022 §3.3): L(N, D) = E + A / N^alpha + B / D^beta")
    for key in (*FIT_LAW_KEYS, "a", "b"):
        if isinstance(a3.get(key), (int, float)):
            note = {"a": "  (N* ∝ C^a)", "b": "  (D* ∝ C^b)"}.get(key, "")
            print(f"  {key:<8} {a3[key]:<10.4g}{_ci(a3, key)}{note}")
    a2 = r.get("approach2") or {}
    print("Chinchilla Approach 2 (IsoFLOP parabolas, §3.2): N_opt ∝ C^a, D_opt ∝ C^b")
    if "error" in a2:
        print(f"  not fitted: {a2['error']}")
    for key in ("a", "b"):
        if isinstance(a2.get(key), (int, float)):
            print(f"  {key:<8} {a2[key]:<10.4g}{_ci(a2, key)}")
    kaplan = r.get("kaplan") or {}
    print("Kaplan et al. 2020: L(X) = (X_c / X)^alpha_X on this sweep's envelopes")
    if "error" in kaplan:
        print(f"  not fitted: {kaplan['error']}")
    for x in ("N", "D", "C"):
        k = kaplan.get(x)
        if isinstance(k, dict) and isinstance(k.get("alpha"), (int, float)):
            print(f"  alpha_{x:<2} {k['alpha']:<10.4g}{_ci(kaplan, 'alpha_' + x)}  {x}_c = {k.get('X_c') or float('nan'):.3g}")
    for warning in r.get("warnings") or []:
        print(f"warning: {warning}")


def fit_config(path: Path, sweep_dirs: list[str], overrides: list[str]) -> DictConfig:
    """``path`` (conf/scaling_fit.yaml) with the sweep dirs and ``key=value`` overrides (no new keys)."""
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key not in cfg or key == "sweep_dirs":
            raise UserError(f"unknown key {key!r} of llmlab scaling fit: use {', '.join(k for k in cfg if k != 'sweep_dirs')}"
                            " (e.g. n_bootstrap=50), and the sweep dirs as plain arguments")
        try:  # YAML typing, as on Hydra's command line: 200 -> int, 1e-3 -> float, null -> None
            cfg[key] = OmegaConf.from_dotlist([f"v={value}"]).v if value != "" else None
        except Exception as e:  # noqa: BLE001 — any parse error is the user's value
            raise UserError(f"cannot parse {arg!r} ({type(e).__name__}): write key=value, e.g. n_bootstrap=50") from None
    cfg.sweep_dirs = list(sweep_dirs)
    return cfg
