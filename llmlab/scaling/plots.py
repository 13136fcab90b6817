"""The figures of ``llmlab scaling fit`` (:mod:`llmlab.scaling.fit`), as PNG bytes.

* ``loss_vs_compute.png`` — every run's loss vs the FLOPs it spent, coloured by IsoFLOP budget, with
  Kaplan's L(C) fitted on the compute frontier and Approach 3's frontier L*(C) (Hoffmann et al. 2022,
  the closed form of :class:`~llmlab.scaling.laws.ChinchillaLaw`).
* ``isoflop.png`` — Hoffmann et al. Figure 3 for this sweep: loss vs N per budget with the fitted
  parabolas and their minima; next to it N_opt and D_opt vs C with Approach 2's power laws.
* ``surface.png`` — contours of Approach 3's L(N, D) in (log N, log D), the runs coloured by measured
  loss on the same colour scale, the budgets' lines C = 6ND and the compute-optimal path N*(C), D*(C).
* ``residuals.png`` — Approach 3's log residuals ln L - ln L_hat vs N and vs D.

Drawn on private Agg canvases (no display needed, matplotlib's global backend left alone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from llmlab.scaling.laws import ChinchillaLaw
from llmlab.utils import png_bytes

DPI = 120
LOSS_LABEL = "validation loss L (nats/token)"
N_LABEL = "N, non-embedding parameters"
D_LABEL = "D, training tokens"
C_LABEL = "C, training compute (FLOPs)"


def _figure(ncols: int = 1, width: float = 7.0, height: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    # fixed margins: a layout engine would draw every figure twice (seconds on a busy CPU)
    total = width * ncols  # inches
    fig.subplots_adjust(left=1.0 / total, right=1 - 0.25 / total, bottom=0.11, top=0.9, wspace=0.28)
    return fig, (axes if ncols > 1 else [axes])


def _budget_colours(budgets: Sequence[float]) -> dict[float, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    distinct = sorted(set(budgets))
    span = max(len(distinct) - 1, 1)
    return {b: cmap(0.9 * i / span) for i, b in enumerate(distinct)}


def _law(fit: dict) -> ChinchillaLaw:
    return ChinchillaLaw(**fit["law"])


def _logspace(lo: float, hi: float, n: int = 200, pad: float = 1.5) -> np.ndarray:
    return np.logspace(math.log10(lo / pad), math.log10(hi * pad), n)


def loss_vs_compute(fit: dict, points: Sequence) -> bytes:
    """Runs (by budget colour), the compute frontier, Kaplan's L(C) and Approach 3's L*(C)."""
    from matplotlib.ticker import FormatStrFormatter, ScalarFormatter

    from llmlab.scaling.fit import frontier

    fig, (ax,) = _figure()
    colours = _budget_colours([p.budget for p in points])
    for budget, colour in colours.items():
        group = [p for p in points if p.budget == budget]
        ax.scatter([p.compute for p in group], [p.loss for p in group], color=colour, s=28,
                   label=f"budget {budget:.2g} FLOPs")
    C = np.array([p.compute for p in points])
    L = np.array([p.loss for p in points])
    front = frontier(C, L)
    ax.plot(C[front], L[front], "o", mfc="none", mec="k", ms=9, label="compute frontier (no cheaper run is better)")
    grid = _logspace(C.min(), C.max())
    kaplan = fit.get("kaplan", {}).get("C")
    if kaplan and kaplan.get("X_c") and kaplan.get("alpha") is not None:
        ax.plot(grid, (kaplan["X_c"] / grid) ** kaplan["alpha"], "k--",
                label=f"Kaplan L(C) = (C_c/C)^{kaplan['alpha']:.3f} on the frontier")
    law = _law(fit)
    ax.plot(grid, [law.frontier_loss(c) for c in grid], color="tab:red",
            label=f"Approach 3 L*(C), E = {law.E:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")  # power laws are straight lines; plain tick labels, not 2x10^0
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.set_xlabel(C_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Loss vs compute (Approach 3's C = 6ND; runs at the FLOPs they spent)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig, dpi=DPI)


def isoflop(fit: dict, points: Sequence) -> bytes:
    """Left: loss vs N per budget, parabolas, minima. Right: N_opt, D_opt vs C with Approach 2's fits."""
    fig, (ax, ax2) = _figure(2)
    approach2 = fit.get("approach2", {})
    curves = {c["budget"]: c for c in approach2.get("budgets", [])}
    colours = _budget_colours([p.budget for p in points])
    for budget, colour in colours.items():
        group = sorted((p for p in points if p.budget == budget), key=lambda p: p.n_params)
        N = np.array([p.n_params for p in group])
        ax.scatter(N, [p.loss for p in group], color=colour, s=28, label=f"C = {budget:.2g} FLOPs")
        curve = curves.get(budget)
        if curve and curve.get("coef"):
            x = np.linspace(math.log(N.min()), math.log(N.max()), 100)
            ax.plot(np.exp(x), np.polyval(curve["coef"], x), color=colour, lw=1.2)
        if curve and curve.get("n_opt"):
            ax.plot(curve["n_opt"], curve["loss_min"], "*", color=colour, ms=16, mec="k")
    ax.set_xscale("log")
    ax.set_xlabel(N_LABEL)
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("IsoFLOP curves: parabolas in ln N, stars at their minima")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ok = [c for c in curves.values() if c.get("n_opt")]
    if ok:
        budgets = np.array([c["budget"] for c in ok])
        ax2.scatter(budgets, [c["n_opt"] for c in ok], color="tab:blue", label="N_opt (parabola vertex)")
        ax2.scatter(budgets, [c["d_opt"] for c in ok], color="tab:orange", label="D_opt = C / (6 N_opt)")
        grid = _logspace(budgets.min(), budgets.max(), 50)
        if approach2.get("a") is not None:
            ax2.plot(grid, approach2["n_coef"] * grid ** approach2["a"], color="tab:blue",
                     label=f"N_opt ∝ C^{approach2['a']:.3f}")
            ax2.plot(grid, approach2["d_coef"] * grid ** approach2["b"], color="tab:orange",
                     label=f"D_opt ∝ C^{approach2['b']:.3f}")
        law = _law(fit)
        ax2.plot(grid, [law.optimal(c)["n_params"] for c in grid], ":", color="tab:blue",
                 label=f"Approach 3 N* ∝ C^{law.a:.3f}")
        ax2.plot(grid, [law.optimal(c)["n_tokens"] for c in grid], ":", color="tab:orange",
                 label=f"Approach 3 D* ∝ C^{law.b:.3f}")
        ax2.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel(C_LABEL)
    ax2.set_ylabel("compute-optimal N (parameters) and D (tokens)")
    ax2.set_title("Approach 2: compute-optimal allocation")
    ax2.grid(alpha=0.3)
    return png_bytes(fig, dpi=DPI)


def surface(fit: dict, points: Sequence) -> bytes:
    """Contours of Approach 3's L(N, D) with the measured runs on the same colour scale."""
    from matplotlib.colors import Normalize

    fig, (ax,) = _figure(width=7.5, height=6)
    law = _law(fit)
    N = np.array([p.n_params for p in points])
    D = np.array([p.n_tokens for p in points])
    L = np.array([p.loss for p in points])
    gn, gd = _logspace(N.min(), N.max(), 120, 3), _logspace(D.min(), D.max(), 120, 3)
    NN, DD = np.meshgrid(gn, gd)
    surf = law.E + law.A / NN**law.alpha + law.B / DD**law.beta
    lo, hi = min(L.min(), law.E), max(L.max(), np.quantile(surf, 0.5))
    norm = Normalize(vmin=lo, vmax=hi)
    levels = np.linspace(lo, hi, 15)
    cs = ax.contourf(NN, DD, surf, levels=levels, cmap="viridis", norm=norm, alpha=0.75, extend="max")
    ax.contour(NN, DD, surf, levels=levels, colors="k", linewidths=0.3)
    ax.scatter(N, D, c=L, cmap="viridis", norm=norm, edgecolors="w", s=45, label="runs (colour = measured loss)")
    for budget in sorted({p.budget for p in points}):
        ax.plot(gn, budget / (6 * gn), color="w", lw=0.6, ls="--")
    path = [law.optimal(6 * n * d) for n, d in ((gn[0], gd[0]), (gn[-1], gd[-1]))]
    C = np.logspace(math.log10(path[0]["compute"]), math.log10(path[-1]["compute"]), 100)
    opt = [law.optimal(c) for c in C]
    ax.plot([o["n_params"] for o in opt], [o["n_tokens"] for o in opt], color="tab:red", lw=2,
            label=f"compute-optimal N*(C), D*(C) (a = {law.a:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(gn[0], gn[-1])
    ax.set_ylim(gd[0], gd[-1])
    ax.set_xlabel(N_LABEL)
    ax.set_ylabel(D_LABEL)
    ax.set_title(f"Approach 3: L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}"
                 "\n(dashed: the budgets' C = 6ND)", fontsize=10)
    fig.colorbar(cs, ax=ax, label=LOSS_LABEL)
    ax.legend(fontsize=8, loc="upper right")
    return png_bytes(fig, dpi=DPI)


def residuals(fit: dict, points: Sequence) -> bytes:
    """ln L - ln L_hat of Approach 3 vs N and vs D, coloured by budget."""
    fig, axes = _figure(2, width=6)
    law = _law(fit)
    colours = _budget_colours([p.budget for p in points])
    delta = fit.get("approach3", {}).get("delta")
    for ax, attr, label in ((axes[0], "n_params", N_LABEL), (axes[1], "n_tokens", D_LABEL)):
        for budget, colour in colours.items():
            group = [p for p in points if p.budget == budget]
            r = [math.log(p.loss) - math.log(law.loss(p.n_params, p.n_tokens)) for p in group]
            ax.scatter([getattr(p, attr) for p in group], r, color=colour, s=28, label=f"C = {budget:.2g} FLOPs")
        ax.axhline(0, color="k", lw=0.8)
        if delta:
            ax.axhspan(-delta, delta, color="grey", alpha=0.2, label=f"Huber δ = {delta:g}")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("log residual ln L − ln L̂ (nats of ratio)")
        ax.grid(alpha=0.3)
    axes[0].set_title("Approach 3 residuals vs N")
    axes[1].set_title("Approach 3 residuals vs D")
    axes[1].legend(fontsize=8)
    return png_bytes(fig, dpi=DPI)


def all_plots(fit: dict, points: Sequence) -> dict[str, bytes]:
    """{file name: PNG bytes} of the four figures."""
    return {
        "loss_vs_compute.png": loss_vs_compute(fit, points),
        "isoflop.png": isoflop(fit, points),
        "surface.png": surface(fit, points),
        "residuals.png": residuals(fit, points),
    }
