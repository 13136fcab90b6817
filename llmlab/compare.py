"""Compare runs: learning curves on one axis, the final metric against each swept parameter, and
the config keys that differ between them.

Used by the sweep summary (every ``llmlab train -m`` writes ``comparison.png`` next to
``summary.csv``) and by ``llmlab compare DIR [DIR ...]`` (any run dirs: a sweep dir expands to its
jobs, so two sweeps, or runs of different methods, can be set side by side). Everything is read
from disk — ``.hydra/config.yaml`` and ``overrides.yaml``, ``metrics.csv`` (the learning curves
``llmlab.callbacks.LearningCurves`` writes: step, tokens, train/*, val/*), ``metrics.json`` (final
metrics), ``error.txt`` (a failed job) — so it works whichever launcher ran the jobs (basic,
joblib, submitit) and long after.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from llmlab.errors import UserError
from llmlab.utils import atomic_write_bytes, atomic_write_text

USAGE = "llmlab compare DIR [DIR ...] [metric=val/loss] [out=DIR]"
MAX_PANELS = 6  # parameter panels in one figure (the table lists every difference)


@dataclass(eq=False)
class Run:
    path: Path
    config: dict[str, Any]                     # .hydra/config.yaml as flat dotted keys (values as written)
    overrides: dict[str, str]                  # .hydra/overrides.yaml: key -> value as typed
    curves: list[dict[str, float]] = field(default_factory=list)  # metrics.csv rows
    final: dict[str, Any] = field(default_factory=dict)           # metrics.json
    error: str | None = None                   # error.txt of a failed job
    name: str = ""                             # path relative to the runs' common dir

    @property
    def status(self) -> str:  # as in the sweep summary (llmlab/sweep.py)
        if self.error is not None:
            return "stopped" if self.error.startswith("stopped by ") else "failed"
        return "ok" if self.final else "no metrics"

    def value(self, key: str) -> str:
        """A parameter's value in this run: the override as typed, else the config's, else ``-``."""
        if key in self.overrides:
            return self.overrides[key]
        return _text(self.config[key]) if key in self.config else "-"


# ---------------------------------------------------------------------------- reading


def is_run(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def find_runs(dirs: list[str | Path]) -> list[Path]:
    """Run dirs of each given dir (itself if it is a run, else every run below it: a sweep's jobs)."""
    out: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise UserError(f"{d} is not a directory: pass run or sweep dirs, e.g. outputs/train/multiruns/<date>")
        found = [d] if is_run(d) else sorted((p.parent.parent for p in d.rglob("config.yaml") if p.parent.name == ".hydra"),
                                             key=_natural)
        if not found:
            raise UserError(f"{d} holds no runs (no .hydra/config.yaml in it or below): pass a run dir "
                            "(outputs/train/runs/<date>) or a sweep dir (outputs/train/multiruns/<date>)")
        out += [p for p in found if p.resolve() not in {q.resolve() for q in out}]
    return out


def load_runs(paths: list[Path]) -> list[Run]:
    runs = [load_run(p) for p in paths]
    common = Path(*_common_parts([p.resolve().parts for p in paths]))
    names = [p.resolve().relative_to(common).parts if len(paths) > 1 else (p.resolve().name,) for p in paths]
    if len({len(n) for n in names}) == 1:  # drop the levels all share (outputs/train/multiruns of two sweeps)
        keep = [i for i in range(len(names[0])) if len({n[i] for n in names}) > 1] or [len(names[0]) - 1]
        names = [tuple(n[i] for i in keep) for n in names]
    for run, name in zip(runs, names):
        run.name = "/".join(name) or run.path.resolve().name
    return runs


def load_run(path: Path) -> Run:
    hydra = path / ".hydra"
    config = yaml.safe_load((hydra / "config.yaml").read_text()) if (hydra / "config.yaml").is_file() else {}
    overrides = {}
    if (hydra / "overrides.yaml").is_file():
        for o in yaml.safe_load((hydra / "overrides.yaml").read_text()) or []:
            key, _, value = str(o).partition("=")
            overrides[key.lstrip("+~")] = value
    run = Run(path=path, config=resolved_values(flatten(config or {}), config or {}), overrides=overrides)
    if (path / "metrics.csv").is_file():
        with (path / "metrics.csv").open(newline="") as f:
            run.curves = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    if (path / "metrics.json").is_file():
        run.final = json.loads((path / "metrics.json").read_text())
    if (path / "error.txt").is_file():
        run.error = " ".join((path / "error.txt").read_text(encoding="utf-8").split())
    return run


def resolved_values(flat: dict[str, Any], config: dict) -> dict[str, Any]:
    """Interpolations (``${optim.lr}``, ``${precision_for:cpu}``) replaced by their values where they resolve
    outside the run (not ``${hydra:...}``): two runs that differ in a value should not look alike, or differ, by
    how it was written."""
    from omegaconf import OmegaConf

    from llmlab.distributed import register_resolvers

    register_resolvers()
    cfg = OmegaConf.create(config)
    out = dict(flat)
    for key, value in flat.items():
        if isinstance(value, str) and "${" in value:
            try:
                out[key] = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            except Exception:  # noqa: BLE001 - e.g. ${hydra:runtime.output_dir}: keep it as written
                pass
    return out


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_layer": 2}} -> {"model.n_layer": 2}; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


# ---------------------------------------------------------------------------- what differs


def config_differences(runs: list[Run]) -> list[str]:
    """Flat config keys whose value is not the same in every run (a key a run lacks counts as ``-``)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    return [k for k in keys if len({_text(r.config.get(k, "-")) for r in runs}) > 1]


def swept_keys(runs: list[Run]) -> list[str]:
    """The parameters the runs were set apart by: overrides that differ (a sweep's swept keys, as typed),
    else the config keys that differ (runs started with the same overrides but different files)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    swept = [k for k in keys if len({r.value(k) for r in runs}) > 1]
    return swept or config_differences(runs)


def check_metric(runs: list[Run], metric: str) -> None:
    if any(metric in r.final or any(metric in row for row in r.curves) for r in runs):
        return
    known = sorted({k for r in runs for k, v in r.final.items() if isinstance(v, (int, float))})
    raise UserError(f"unknown metric {metric!r}: no run logged it; choose one of {', '.join(known) or '(no run has metrics.json)'}")


def table(runs: list[Run], metric: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows): run, every config key that differs, status, the metric — best run first."""
    keys = config_differences(runs)
    header = ["run", *keys, "status", metric]
    ordered = sorted(runs, key=lambda r: _sort_value(r.final.get(metric), metric))
    rows = [[r.name, *(_text(r.config.get(k, "-")) for k in keys), r.status, _fmt(r.final.get(metric, ""))]
            for r in ordered]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731 — a | would end the Markdown cell
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the figure


def curve_key(runs: list[Run], metric: str) -> str:
    """The learning curve drawn: the metric itself when metrics.csv has it (val/accuracy ...), else val/loss."""
    return metric if metric.startswith("val/") and any(metric in row for r in runs for row in r.curves) else "val/loss"


def plot(runs: list[Run], metric: str, title: str = "") -> bytes:
    from llmlab.utils import png_bytes

    return png_bytes(figure(runs, metric, title))


def figure(runs: list[Run], metric: str, title: str = ""):
    """Every run's learning curve (``curve_key`` vs tokens seen) on one axis, then one small panel
    per swept parameter with each run's final ``metric`` (categories as categories; numbers on a log
    axis when they span more than 10x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = swept_keys(runs)[:MAX_PANELS]
    fig, axes = plt.subplots(1, 1 + len(params), figsize=(7 + 3.3 * len(params), 4.4), dpi=110, squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1] * len(params)})
    ax = axes[0][0]
    key = curve_key(runs, metric)
    by_tokens = any(row.get("tokens", 0) > 0 for r in runs for row in r.curves)
    labels = _labels(runs, params)
    for run, label in zip(runs, labels):
        pts = [(row["tokens"] if by_tokens else row["step"], row[key]) for row in run.curves if key in row]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", ms=3, lw=1.5, label=label)
        elif run.error is not None:
            ax.plot([], [], ls="none", marker="x", color="C3", label=f"{label} (failed)")
    ax.set_xlabel("tokens seen" if by_tokens else "step")
    ax.set_ylabel(key)
    ax.set_title(title or f"{len(runs)} runs: {key}", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best", ncol=2 if len(runs) > 8 else 1)
    for ax, param in zip(axes[0][1:], params):
        _param_panel(ax, runs, param, metric)
    fig.tight_layout()
    return fig


def _param_panel(ax, runs: list[Run], param: str, metric: str) -> None:
    scored = [r for r in runs if isinstance(r.final.get(metric), (int, float)) and math.isfinite(r.final[metric])]
    failed = [r for r in runs if r.error is not None and r not in scored]  # drawn as an x at the bottom
    values = [r.value(param) for r in scored + failed]
    kind = axis_kind(values)
    if kind != "category":
        xs = [float(v) for v in values]
        ax.set_xscale(kind)
    else:  # categories, in order of first appearance
        cats = list(dict.fromkeys(values))
        xs = [cats.index(v) for v in values]
        rotate = len(cats) > 3
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels([c if len(c) <= 14 else c[:13] + "…" for c in cats], rotation=30 if rotate else 0,
                           fontsize=8, ha="right" if rotate else "center")
        ax.set_xlim(-0.5, len(cats) - 0.5)
    ys = [float(r.final[metric]) for r in scored]
    if scored:
        ax.scatter(xs[:len(scored)], ys, s=25, zorder=3)
        best = min(range(len(ys)), key=lambda i: _sort_value(ys[i], metric))
        ax.scatter([xs[best]], [ys[best]], s=90, facecolors="none", edgecolors="C3", zorder=4, label="best")
    if failed:
        ax.scatter(xs[len(scored):], [0.04] * len(failed), marker="x", color="C3", zorder=4, label="failed",
                   transform=ax.get_xaxis_transform())
    if kind != "category":  # every run in view (a failed x too)
        lo, hi = min(xs), max(xs)
        ax.set_xlim(*((lo / 1.5, hi * 1.5) if ax.get_xscale() == "log" else (lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo))))
        if ax.get_xscale() != "log":  # few short ticks: 1e-3 reads 0.001, not 0.0010000
            from matplotlib.ticker import FormatStrFormatter, MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=all(x == int(x) for x in xs)))
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    if failed and scored:
        ax.legend(fontsize=7)
    ax.set_xlabel(param, fontsize=9)
    ax.set_ylabel(metric, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def axis_kind(values: list[str]) -> str:
    """``log`` for positive numbers spanning more than 10x, ``linear`` for other numbers, else ``category``
    (names, booleans, a single value)."""
    numbers = _numbers(values)
    if numbers is None or len(set(numbers)) < 2:
        return "category"
    return "log" if min(numbers) > 0 and max(numbers) / min(numbers) > 10 else "linear"


def _labels(runs: list[Run], params: list[str]) -> list[str]:
    shown = params[:3]
    return [f"{r.name}: " + ", ".join(f"{k}={r.value(k)}" for k in shown) if shown else r.name for r in runs]


# ---------------------------------------------------------------------------- outputs


def write_figure(path: Path, runs: list[Run], metric: str, title: str = "") -> Path:
    return atomic_write_bytes(path, plot(runs, metric, title))


def write_comparison(runs: list[Run], metric: str, out: Path) -> dict[str, Path]:
    """compare.png, compare.md, compare.csv in ``out``; the Markdown table is printed."""
    header, rows = table(runs, metric)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    paths = {"csv": atomic_write_text(out / "compare.csv", buf.getvalue())}
    md = f"Compare {len(runs)} runs — sorted by {metric}; columns: the config keys that differ\n\n" + markdown(header, rows)
    md += "\n" + "\n".join(f"- {r.name}: {r.path.resolve()}" for r in runs) + "\n"
    paths["md"] = atomic_write_text(out / "compare.md", md)
    paths["png"] = write_figure(out / "compare.png", runs, metric)
    return paths


def parse_args(args: list[str], log_dir: Path) -> tuple[list[str], str, Path]:
    """(dirs, metric, out) of ``llmlab compare``'s plain arguments."""
    dirs, options = [a for a in args if "=" not in a], dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(options) - {"metric", "out"})
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} of llmlab compare: use {USAGE}")
    if not dirs:
        raise UserError(f"llmlab compare needs run or sweep dirs: {USAGE}")
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    out = Path(options["out"]) if options.get("out") else log_dir / "compare" / stamp
    return dirs, options.get("metric") or "val/loss", out


def main(args: list[str], log_dir: Path) -> dict[str, Path]:
    """``llmlab compare``: read, check, write, print."""
    dirs, metric, out = parse_args(args, log_dir)
    runs = load_runs(find_runs(dirs))
    check_metric(runs, metric)
    try:
        paths = write_comparison(runs, metric, out)
    except OSError as e:
        raise UserError(f"cannot write to {out}: {e.strerror or e}; pass out=DIR with a writable dir") from None
    print(paths["md"].read_text(), end="")
    print(f"comparison of {len(runs)} runs: {paths['png']} (table: {paths['md']}, {paths['csv']})", flush=True)
    return paths


# ---------------------------------------------------------------------------- helpers


def _text(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _numbers(values: list[str]) -> list[float] | None:
    try:
        out = [float(v) for v in values]
    except ValueError:
        return None
    return out if all(math.isfinite(x) for x in out) else None


def _sort_value(v: Any, metric: str) -> tuple:
    from llmlab.sweep import higher_is_better

    if not isinstance(v, (int, float)) or math.isnan(v):
        return (1, 0.0)
    return (0, -v if higher_is_better(metric) else v)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _natural(p: Path) -> tuple:
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts)


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    common = parts[0][:-1] if len(parts) == 1 else parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return common or ("/",)
