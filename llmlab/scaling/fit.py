"""Fit scaling laws to your own runs: Kaplan's power laws and Chinchilla's Approaches 2 and 3 (spec
seed000_part3 §1.3), with bootstrap confidence intervals. ``llmlab scaling fit SWEEP_DIR`` calls
:func:`run_fit`.

Points come from a sweep (``llmlab train experiment=scaling_sweep -m``): one job dir per run, whose
``metrics.json`` gives N = ``model/params_non_embedding`` (Kaplan's count; with a character vocabulary
the embeddings are a small share anyway), D = ``train/tokens_seen``, C = ``train/flops`` (6N per token
plus the attention term, Kaplan Table 1), L = ``val/loss`` (nats/token) and the IsoFLOP budget
``scaling/compute`` that groups the runs.

* **Kaplan** (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §3 / Table 5):
  ``L(X) = (X_c / X) ** alpha_X`` for X = N, D, C, fitted by least squares on ``(ln X, ln L)``. Kaplan fit
  L(N) on converged models, L(D) on large models with early stopping and L(C_min) on the envelope of the
  training curves. An IsoFLOP sweep has none of these, so we fit *envelopes*: the runs that no run with
  fewer parameters, fewer tokens or less compute beats (for C: the compute frontier). Read the exponents
  as envelope slopes of this sweep, not as Kaplan's converged-model laws.
* **Chinchilla Approach 2** (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models",
  §3.2): per budget C a parabola of L in ln N (``numpy.polyfit`` degree 2), its vertex is N_opt(C) and
  D_opt(C) = C / (6 N_opt) — the paper's C = 6ND, so b = 1 - a by construction; then
  ``N_opt = k_N C**a`` and ``D_opt = k_D C**b`` by least squares in log-log.
* **Chinchilla Approach 3** (§3.3 and Appendix D.2): ``L(N, D) = E + A/N**alpha + B/D**beta`` fitted as
  ``min sum_i Huber_delta(LSE(a - alpha ln N_i, b - beta ln D_i, e) - ln L_i)`` with E = e^e, A = e^a,
  B = e^b, delta = 1e-3, by L-BFGS (``scipy.optimize.minimize(method="L-BFGS-B")``, analytic gradient)
  from a grid of initialisations, keeping the best.
* **Bootstrap**: resample the points with replacement (within each budget, so every resample keeps the
  IsoFLOP design), refit, take the 2.5/97.5 percentiles.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.errors import UserError

METRICS = "metrics.json"
FAILED = "error.txt"
# metrics.json keys (contract with the sweep's jobs)
LOSS_KEY = "val/loss"
N_KEY = "model/params_non_embedding"
D_KEY = "train/tokens_seen"
C_KEY = "train/flops"
BUDGET_KEY = "scaling/compute"
FIT_HINT = ("run `llmlab train experiment=scaling_sweep -m` first, or pass the sweep dir that holds the "
            "job dirs")

# Hoffmann et al. Appendix D.2's grid of initialisations for Approach 3 (5 x 5 x 5 x 6 x 6 = 4500 points).
GRID_ALPHA = GRID_BETA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_A = GRID_B = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
PARAMETRIC_PARAMS = 5  # E, A, B, alpha, beta
N_STARTS = 32  # L-BFGS starts of a fit: the best rows of the grid (the paper starts from all 4500)
BOOTSTRAP_GRID_STARTS = 2  # grid rows a bootstrap resample starts from, besides the full-data optimum


@dataclass(frozen=True)
class Point:
    """One finished run: N (non-embedding parameters), D (tokens), C (FLOPs spent), L (val loss, nats/token),
    the IsoFLOP budget it belongs to (FLOPs) and its run dir."""

    n_params: float
    n_tokens: float
    compute: float
    loss: float
    budget: float
    run_dir: str


# ----------------------------------------------------------------------------------------------- collect


@dataclass
class _Scan:
    points: list[Point]
    jobs: int
    failed: int
    unfinished: int
    empty_dirs: list[str]  # given dirs without a finished run (fine when pooled with others)


def _job_dirs(root: Path) -> list[Path]:
    """The run dirs under ``root``: ``root`` itself when it is a run, else its sub-dirs that are jobs
    (have metrics.json, error.txt or Hydra's .hydra/ — so our own ``fit/`` output dir is not a job)."""
    if (root / METRICS).is_file():
        return [root]
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and ((p / METRICS).is_file() or (p / FAILED).is_file() or (p / ".hydra").is_dir())]
    return sorted(subs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _budget_of(metrics: dict, compute: float) -> float:
    """The IsoFLOP budget: the sweep's ``scaling/compute``, else C rounded to 2 significant digits."""
    budget = metrics.get(BUDGET_KEY)
    if _finite(budget) and budget > 0:
        return float(budget)
    return float(f"{compute:.1e}")


def _read_point(job: Path) -> Point | None:
    """The job's point, or None when it failed (error.txt, non-finite loss). Bad metrics -> UserError."""
    if (job / FAILED).is_file() or not (job / METRICS).is_file():
        return None
    path = job / METRICS
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): delete that job dir or rerun the job") from None
    if not isinstance(metrics, dict):
        raise UserError(f"{path} is not a JSON object: delete that job dir or rerun the job")
    loss = metrics.get(LOSS_KEY)
    if not _finite(loss):
        return None  # diverged or never validated: a failed job
    values = {}
    for key in (N_KEY, D_KEY):
        value = metrics.get(key)
        if not _finite(value) or value <= 0:
            raise UserError(f"{path} has no positive {key!r} (got {value!r}): fit runs of llmlab's GPT "
                            f"(`llmlab train experiment=scaling_sweep -m`), which log it")
        values[key] = float(value)
    N, D = values[N_KEY], values[D_KEY]
    C = metrics.get(C_KEY)
    C = float(C) if _finite(C) and C > 0 else 6 * N * D  # runs logged before FLOPs accounting: C = 6ND
    if loss <= 0:
        raise UserError(f"{path}: {LOSS_KEY}={loss} is not a positive loss: rerun that job")
    return Point(n_params=N, n_tokens=D, compute=C, loss=float(loss), budget=_budget_of(metrics, C),
                 run_dir=str(job))


def _scan(sweep_dirs: Sequence[str | Path]) -> _Scan:
    if isinstance(sweep_dirs, (str, Path)):
        sweep_dirs = [sweep_dirs]
    if not sweep_dirs:
        raise UserError(f"no sweep dir given: pass SWEEP_DIR; {FIT_HINT}")
    scan = _Scan(points=[], jobs=0, failed=0, unfinished=0, empty_dirs=[])
    for raw in sweep_dirs:
        root = Path(raw)
        if not root.is_dir():
            raise UserError(f"sweep dir {root} does not exist: {FIT_HINT}")
        jobs = _job_dirs(root)
        points = failed = unfinished = 0
        for job in jobs:
            point = _read_point(job)
            if point is not None:
                scan.points.append(point)
                points += 1
            elif (job / FAILED).is_file() or (job / METRICS).is_file():
                failed += 1
            else:
                unfinished += 1
        scan.jobs += len(jobs)
        scan.failed += failed
        scan.unfinished += unfinished
        if points == 0 and len(sweep_dirs) == 1:
            raise UserError(f"no finished runs in {root} ({len(jobs)} jobs, {failed} failed): {FIT_HINT}")
        if points == 0:
            scan.empty_dirs.append(str(root))
    if not scan.points:
        names = ", ".join(str(d) for d in sweep_dirs)
        raise UserError(f"no finished runs in {names} ({scan.jobs} jobs, {scan.failed} failed): {FIT_HINT}")
    return scan


def collect(sweep_dirs: Sequence[str | Path]) -> list[Point]:
    """The finished runs of the given sweep dirs (pooled). Failed jobs (error.txt, non-finite ``val/loss``)
    and unfinished ones (no metrics.json yet) are skipped; UserError when none is finished."""
    return _scan(sweep_dirs).points


def _arrays(points: Sequence[Point]) -> tuple[np.ndarray, ...]:
    N = np.array([p.n_params for p in points], dtype=np.float64)
    D = np.array([p.n_tokens for p in points], dtype=np.float64)
    C = np.array([p.compute for p in points], dtype=np.float64)
    L = np.array([p.loss for p in points], dtype=np.float64)
    return N, D, C, L


def _by_budget(points: Sequence[Point]) -> dict[float, list[Point]]:
    groups: dict[float, list[Point]] = {}
    for p in points:
        groups.setdefault(p.budget, []).append(p)
    return dict(sorted(groups.items()))


# ------------------------------------------------------------------------------------------------ Kaplan


def _power_law(x: np.ndarray, loss: np.ndarray, name: str) -> dict[str, float]:
    """Least squares of ln L = alpha ln X_c - alpha ln X: L = (X_c / X) ** alpha."""
    if len(np.unique(x)) < 2:
        raise UserError(f"Kaplan's L({name}) needs at least 2 distinct {name} values, got {len(np.unique(x))}: "
                        f"sweep more sizes")
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    alpha = -slope
    X_c = math.exp(intercept / alpha) if alpha != 0 and abs(intercept / alpha) < 700 else math.nan
    return {"X_c": X_c, "alpha": float(alpha), "n_points": len(x)}


def frontier(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the runs on the frontier in ``x``: each beats every run with no more ``x`` (of runs at
    equal ``x`` only the best counts). In C this is Kaplan's L(C_min) envelope; in N and D the best loss
    per size (or token count) that no smaller one beats."""
    order = np.lexsort((loss, x))  # by x, then by loss
    keep, best = [], math.inf
    for i in order:
        if loss[i] < best:
            keep.append(i)
            best = loss[i]
    return np.array(keep, dtype=int)


def fit_kaplan(points: Sequence[Point]) -> dict:
    """Kaplan's ``L(X) = (X_c/X)**alpha`` for X = N, D, C (module docstring), each fitted on the sweep's
    frontier in X (:func:`frontier`: the best loss per X that no smaller X beats). These are envelope fits,
    not Kaplan's converged-model fits: in a small IsoFLOP sweep no model is trained to convergence (L(N))
    nor is any model large enough not to limit the loss (L(D)); only L(C) is the same construction as theirs.
    In an IsoFLOP sweep every run has its own D, so "the best loss per distinct D" alone would keep every run."""
    N, D, C, L = _arrays(points)
    fits = {}
    for name, X in (("N", N), ("D", D), ("C", C)):
        keep = frontier(X, L)
        fits[name] = _power_law(X[keep], L[keep], name)
    return fits


def _kaplan_params(points: Sequence[Point]) -> dict[str, float]:
    fit = fit_kaplan(points)
    return {f"alpha_{x}": fit[x]["alpha"] for x in ("N", "D", "C")}


# -------------------------------------------------------------------------------------------- Approach 2


def _parabola(points: Sequence[Point]) -> dict:
    """One IsoFLOP curve: L = c2 (ln N)^2 + c1 ln N + c0; vertex ln N_opt = -c1 / (2 c2)."""
    N, _, _, L = _arrays(points)
    budget = points[0].budget
    row: dict[str, Any] = {"budget": budget, "n_points": len(points), "n_opt": None, "d_opt": None,
                           "loss_min": None, "coef": None}
    if len(np.unique(N)) < 3:
        row["status"] = f"skipped: {len(np.unique(N))} distinct N, a parabola needs 3"
        return row
    x = np.log(N)
    c2, c1, c0 = np.polyfit(x, L, 2)
    row["coef"] = [float(c2), float(c1), float(c0)]
    if c2 <= 0:
        row["status"] = "no minimum: the parabola opens downward (the budget's N range misses the optimum)"
        return row
    x_opt = -c1 / (2 * c2)
    span = x.max() - x.min()
    if not x.min() - span <= x_opt <= x.max() + span:  # a nearly flat parabola: its vertex says nothing
        row["status"] = "no usable minimum: the vertex lies more than the sampled ln N range outside it"
        return row
    row["n_opt"] = math.exp(x_opt)
    row["d_opt"] = budget / (6 * row["n_opt"])  # C = 6 N D, as the paper
    row["loss_min"] = float(c0 - c1**2 / (4 * c2))
    inside = x.min() <= x_opt <= x.max()
    row["status"] = "ok" if inside else "ok, extrapolated: the vertex lies outside the sampled N"
    return row


def fit_isoflop(points: Sequence[Point]) -> dict:
    """Chinchilla Approach 2 (Hoffmann et al. 2022 §3.2): a parabola per budget in ln N, then
    ``N_opt = n_coef * C**a`` and ``D_opt = d_coef * C**b``. D_opt = C / (6 N_opt) (the paper's C = 6ND),
    so b = 1 - a by construction. Budgets whose parabola opens downward are reported and left out.
    Needs >= 2 budgets with a minimum (each from >= 3 distinct N)."""
    curves = [_parabola(group) for group in _by_budget(points).values()]
    ok = [c for c in curves if c["n_opt"] is not None]
    result: dict[str, Any] = {"budgets": curves, "n_budgets": len(ok), "a": None, "b": None,
                              "n_coef": None, "d_coef": None,
                              "note": "d_opt = budget / (6 n_opt) (C = 6ND, as Hoffmann et al.), so b = 1 - a"}
    if len(ok) < 2:
        raise UserError(f"Approach 2 needs at least 2 IsoFLOP budgets with a parabola minimum (each >= 3 "
                        f"distinct N), got {len(ok)} of {len(curves)}: sweep more sizes per budget or more "
                        f"budgets")
    lnC = np.log([c["budget"] for c in ok])
    a, ln_kn = np.polyfit(lnC, np.log([c["n_opt"] for c in ok]), 1)
    b, ln_kd = np.polyfit(lnC, np.log([c["d_opt"] for c in ok]), 1)
    result.update(a=float(a), b=float(b), n_coef=math.exp(ln_kn), d_coef=math.exp(ln_kd))
    return result


def _approach2_params(points: Sequence[Point]) -> dict[str, float]:
    fit = fit_isoflop(points)
    return {"a": fit["a"], "b": fit["b"]}


# -------------------------------------------------------------------------------------------- Approach 3


def paper_grid() -> np.ndarray:
    """Hoffmann et al. App. D.2's initialisations as rows (a, b, e, alpha, beta): 4500 of them."""
    return np.array(list(itertools.product(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA)), dtype=np.float64)


def _objective(theta: np.ndarray, lnN: np.ndarray, lnD: np.ndarray, lnL: np.ndarray, delta: float):
    """sum Huber_delta(LSE(a - alpha lnN, b - beta lnD, e) - lnL) / delta**2 and its gradient.

    Dividing by delta**2 (the objective in units of delta, a constant factor: same minimiser) keeps it
    O(1) per point, so L-BFGS's tolerances mean something (scipy's ftol is absolute below 1).
    """
    a, b, e, alpha, beta = theta
    t1, t2 = a - alpha * lnN, b - beta * lnD  # ln(A/N^alpha), ln(B/D^beta); the third term is e = ln E
    m = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = x1 + x2 + x3
    r = m + np.log(s) - lnL  # LSE(t1, t2, e) - ln L, computed without overflow
    u = np.abs(r)
    c = np.minimum(u, delta)  # Huber_delta(r) = c (|r| - c/2): r^2/2 inside [-delta, delta], linear outside
    value = (c @ (u - 0.5 * c)) / delta**2
    psi = np.copysign(c, r) / (delta**2 * s)  # dHuber/dr (= clip(r, -delta, delta)) over the softmax denominator
    g1, g2 = psi * x1, psi * x2  # dLSE/dt_i = x_i / s
    grad = np.array([g1.sum(), g2.sum(), (psi * x3).sum(), -(g1 @ lnN), -(g2 @ lnD)])
    return value, grad


def _ranked_grid(points: Sequence[Point], delta: float) -> np.ndarray:
    """The paper's grid sorted by the objective at each row (computed for all rows at once)."""
    N, D, _, L = _arrays(points)
    lnN, lnD, lnL = np.log(N), np.log(D), np.log(L)
    grid = paper_grid()
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    t1, t2 = a - alpha * lnN, b - beta * lnD  # (G, n)
    m = np.maximum(np.maximum(t1, t2), e)
    u = np.abs(m + np.log(np.exp(t1 - m) + np.exp(t2 - m) + np.exp(e - m)) - lnL)
    c = np.minimum(u, delta)
    return grid[np.argsort((c * (u - 0.5 * c)).sum(axis=1), kind="stable")]


def fit_parametric(points: Sequence[Point], *, delta: float = 1e-3, n_starts: int | None = N_STARTS,
                   inits: Iterable[Sequence[float]] = ()) -> dict:
    """Chinchilla Approach 3 (Hoffmann et al. 2022 §3.3, App. D.2): ``L = E + A/N**alpha + B/D**beta``.

    Minimises the Huber loss (``delta``) of the log residual ``LSE(a - alpha ln N, b - beta ln D, e) -
    ln L`` with L-BFGS-B (analytic gradient; alpha, beta >= 0 so the law decreases in N and D) and keeps
    the best of several starts. The paper starts L-BFGS from every point of its 4500-point grid; we rank
    the grid by its objective (vectorised, cheap) and start from the ``n_starts`` best (None: all 4500,
    the paper's procedure, ~100x slower; on synthetic sweeps of our size 8, 64 and 4500 starts reach the
    same optimum), plus any rows ``(a, b, e, alpha, beta)`` in ``inits`` (the bootstrap passes the
    full-data optimum). ``theta`` in the result is the optimum as (a, b, e, alpha, beta).
    """
    from scipy.optimize import minimize

    if len(points) < PARAMETRIC_PARAMS:
        raise UserError(f"{len(points)} points, Approach 3 needs at least {PARAMETRIC_PARAMS} (one per parameter "
                        f"E, A, B, alpha, beta): finish more sweep jobs or pass more sweep dirs")
    N, D, _, L = _arrays(points)
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise UserError(f"Approach 3 needs runs at >= 2 distinct N and >= 2 distinct D, got {len(np.unique(N))} "
                        f"and {len(np.unique(D))}: sweep model sizes and token budgets")
    lnN, lnD, lnL = np.log(N), np.log(D), np.log(L)
    starts = [np.asarray(x, dtype=np.float64) for x in inits]
    if n_starts is None:
        starts.extend(paper_grid())
    elif n_starts > 0:
        starts.extend(_ranked_grid(points, delta)[:n_starts])
    if not starts:
        raise UserError("fit_parametric got no initialisation: pass n_starts >= 1 or inits")
    bounds = [(None, None)] * 3 + [(0.0, None)] * 2
    best = None
    for x0 in starts:
        res = minimize(_objective, x0, args=(lnN, lnD, lnL, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-8})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    a, b, e, alpha, beta = (float(v) for v in best.x)
    pred = np.logaddexp(np.logaddexp(a - alpha * lnN, b - beta * lnD), e)
    resid = lnL - pred
    result = {"E": math.exp(e), "A": _exp(a), "B": _exp(b), "alpha": alpha, "beta": beta,
              "a": beta / (alpha + beta) if alpha + beta > 0 else math.nan,
              "b": alpha / (alpha + beta) if alpha + beta > 0 else math.nan,
              "objective": float(best.fun) * delta**2, "delta": delta, "n_points": len(points),
              "n_starts": len(starts), "converged": bool(best.success),
              "rms_log_residual": float(np.sqrt(np.mean(resid**2))), "theta": [a, b, e, alpha, beta]}
    return result


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def _approach3_params(points: Sequence[Point], **kwargs) -> dict[str, float]:
    fit = fit_parametric(points, **kwargs)
    return {k: fit[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")}


# --------------------------------------------------------------------------------------------- bootstrap


def bootstrap(points: Sequence[Point], fit_fn: Callable[[Sequence[Point]], dict[str, float]], n: int,
              seed: int = 0, *, level: float = 0.95) -> dict:
    """Percentile bootstrap: refit ``fit_fn`` (points -> {name: value}) on ``n`` resamples drawn with
    replacement within each budget (every resample keeps the IsoFLOP design and its size) and report the
    (1-level)/2 and (1+level)/2 percentiles. Resamples the fit rejects (e.g. a budget left with < 3 distinct
    N) are counted in ``n_failed`` and left out."""
    rng = np.random.default_rng(seed)
    groups = list(_by_budget(points).values())
    draws: dict[str, list[float]] = {}
    failed = 0
    for _ in range(n):
        sample = [g[i] for g in groups for i in rng.integers(0, len(g), len(g))]
        try:
            values = fit_fn(sample)
        except (UserError, ArithmeticError, np.linalg.LinAlgError):  # e.g. a resample without a usable minimum
            failed += 1
            continue
        for k, v in values.items():
            draws.setdefault(k, []).append(v)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    intervals = {k: [float(x) for x in np.percentile(np.asarray(v, dtype=np.float64), q)] for k, v in draws.items()}
    return {"level": level, "n_resamples": n, "n_failed": failed, "intervals": intervals}


# ------------------------------------------------------------------------------------------------ run_fit


def _json_safe(obj: Any) -> Any:
    """Non-finite floats -> None (fit.json is strict JSON), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def run_fit(sweep_dirs: Sequence[str | Path], out_dir: str | Path, *, n_bootstrap: int = 200, seed: int = 0,
            delta: float = 1e-3) -> dict:
    """Collect the sweep(s), fit Kaplan and Chinchilla Approaches 2 and 3 with bootstrap CIs, write
    ``<out_dir>/fit.json`` and the PNGs (:mod:`llmlab.scaling.plots`); return the fit.json dict. Prints
    nothing: notes for the user are in its ``"warnings"``. Kaplan or Approach 2 failing on this data is a
    warning (their entry holds ``"error"``); Approach 3 is required (its law is the ``"law"`` the planner
    reads), so too few points is a UserError and nothing is written."""
    from llmlab.scaling import plots
    from llmlab.utils import atomic_write_bytes, atomic_write_text

    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise UserError(f"n_bootstrap={n_bootstrap!r} must be an integer >= 0 (0 skips the confidence intervals)")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta <= 0:
        raise UserError(f"delta={delta!r} must be a positive number (Hoffmann et al. use 1e-3)")
    delta = float(delta)
    if isinstance(sweep_dirs, (str, Path)):
        sweep_dirs = [sweep_dirs]
    scan = _scan(sweep_dirs)
    points = scan.points
    warnings: list[str] = []
    if scan.failed or scan.unfinished:
        warnings.append(f"skipped {scan.failed} failed and {scan.unfinished} unfinished of {scan.jobs} jobs")
    for empty in scan.empty_dirs:
        warnings.append(f"no finished runs in {empty}")

    approach3 = fit_parametric(points, delta=delta)
    for k, x in (("alpha", "N"), ("beta", "D")):
        if approach3[k] <= 1e-6:
            raise UserError(f"Approach 3 fitted {k} = 0: the loss does not fall with {x} in these runs, so no "
                            f"law can plan from them; sweep a wider range of {x} (and check the runs trained)")
    law = {k: approach3[k] for k in ("E", "A", "B", "alpha", "beta")} | {"name": "fit"}

    def attempt(name: str, fn: Callable[[], dict]) -> dict:
        try:
            return fn()
        except UserError as e:
            warnings.append(f"{name}: {e}")
            return {"error": str(e)}

    kaplan = attempt("Kaplan", lambda: fit_kaplan(points))
    approach2 = attempt("Approach 2", lambda: fit_isoflop(points))
    for curve in approach2.get("budgets", []):
        if curve["status"] != "ok":
            kept = "kept" if curve["n_opt"] is not None else "left out"
            warnings.append(f"Approach 2: budget C={curve['budget']:.3g} {kept}: {curve['status']}")

    if n_bootstrap:
        # Resamples restart L-BFGS from the full-data optimum plus the full data's 2 best grid points, not
        # from a ranked grid each: 3 starts per resample keep 200 resamples well under a minute.
        inits = [approach3["theta"], *_ranked_grid(points, delta)[:BOOTSTRAP_GRID_STARTS]]
        boot3 = bootstrap(points, lambda s: _approach3_params(s, delta=delta, n_starts=0, inits=inits),
                          n_bootstrap, seed)
        approach3["ci"] = boot3
        if "error" not in approach2:
            approach2["ci"] = bootstrap(points, _approach2_params, n_bootstrap, seed)
        if "error" not in kaplan:
            kaplan["ci"] = bootstrap(points, _kaplan_params, n_bootstrap, seed)
        for name, fit in (("Approach 2", approach2), ("Approach 3", approach3), ("Kaplan", kaplan)):
            ci = fit.get("ci")
            if ci and ci["n_failed"]:
                warnings.append(f"{name} bootstrap: {ci['n_failed']} of {n_bootstrap} resamples could not be fitted")
    else:
        for fit in (approach2, approach3, kaplan):
            if "error" not in fit:
                fit["ci"] = None

    result = _json_safe({
        "law": law,
        "kaplan": kaplan,
        "approach2": approach2,
        "approach3": approach3,
        "points": [asdict(p) for p in points],
        "n_points": len(points),
        "jobs": {"total": scan.jobs, "finished": len(points), "failed": scan.failed, "unfinished": scan.unfinished},
        "sweep_dirs": [str(d) for d in sweep_dirs],
        "n_bootstrap": n_bootstrap, "seed": seed, "delta": delta,
        "warnings": warnings,
    })
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in plots.all_plots(result, points).items():
        atomic_write_bytes(out / name, png)
    atomic_write_text(out / "fit.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result
