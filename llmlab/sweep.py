"""Sweep summary: after `llmlab train -m ...`, one table of every job's overrides and final metrics.

A Hydra callback (configured in conf/hydra/default.yaml). Reads each job dir's
``.hydra/overrides.yaml``, ``metrics.json`` and ``error.txt`` and writes ``summary.csv`` and
``summary.md`` into the sweep dir, sorted by the optimized metric. Jobs that failed (the CLI writes
their one ``error:`` line, or a bug's type and message, to ``<job dir>/error.txt`` and lets the
sweep go on) appear with status ``failed`` and that line in the ``error`` column; the CLI then
exits non-zero once the summary is printed (see :func:`take_outcome`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llmlab.utils import atomic_write_text


@dataclass(frozen=True)
class SweepOutcome:
    total: int        # jobs in the sweep dir
    failed: int       # jobs with an error.txt (status failed)
    user_errors: int  # ... of which failed on bad input (an ``error:`` line) rather than a bug
    summary: Path     # summary.md


_running: tuple[Path, str] | None = None  # (sweep dir, metric) of the sweep in progress
_outcome: SweepOutcome | None = None      # of the last sweep that ended in this process


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _running, _outcome
        _running = (Path(config.hydra.sweep.dir), config.get("optimized_metric") or "val/loss")
        _outcome = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _running, _outcome
        _running = None
        _outcome = summarize(Path(config.hydra.sweep.dir), config.get("optimized_metric") or "val/loss")


def summarize(sweep_dir: Path, metric: str) -> SweepOutcome | None:
    """Write and print the summary of the jobs in ``sweep_dir``; None if it has none."""
    rows = collect(sweep_dir)
    if not rows:
        return None
    paths = write_summary(sweep_dir, rows, metric)
    print(f"sweep summary ({len(rows)} jobs): {paths[1]}")
    print(paths[1].read_text(), flush=True)
    write_comparison_figure(sweep_dir, [sweep_dir / r["job"] for r in rows], metric)
    errors = [r["error"] for r in rows if "error" in r]
    return SweepOutcome(total=len(rows), failed=len(errors), user_errors=sum(e.startswith("error:") for e in errors),
                        summary=paths[1])


def write_comparison_figure(sweep_dir: Path, jobs: list[Path], metric: str) -> None:
    """comparison.png: every job's learning curve on one axis, the metric against each swept key
    (llmlab/compare.py, also behind `llmlab compare`). A figure that fails to draw costs only itself."""
    from llmlab import compare

    try:
        path = compare.write_figure(sweep_dir / "comparison.png", compare.load_runs(jobs), metric,
                                    title=f"sweep {sweep_dir.name}: {len(jobs)} jobs")
    except Exception as e:  # noqa: BLE001 — the summary is written; the sweep's outcome must still be reported
        print(f"warning: no comparison figure: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return
    print(f"comparison figure: {path}")


def higher_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in _HIGHER_IS_BETTER


def take_outcome() -> SweepOutcome | None:
    """The outcome of the sweep that just ended (once)."""
    global _outcome
    outcome, _outcome = _outcome, None
    return outcome


def summarize_unfinished() -> SweepOutcome | None:
    """The sweeper stopped before on_multirun_end (e.g. Optuna when every trial failed): summarise
    the jobs that ran."""
    global _running
    if _running is None:
        return take_outcome()
    (sweep_dir, metric), _running = _running, None
    return summarize(sweep_dir, metric)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        row: dict[str, Any] = {"job": job.name}
        for o in overrides:
            key, _, value = str(o).partition("=")
            row[key.lstrip("+~")] = value
        metrics_file, error_file = job / "metrics.json", job / "error.txt"
        if metrics_file.is_file():
            row.update(json.loads(metrics_file.read_text()))
        if error_file.is_file():  # written by the CLI when the job raised
            row["error"] = " ".join(error_file.read_text(encoding="utf-8").split())
            # "stopped by SIGTERM at step N: checkpoint ...": a signal ended it (resumable), not a failure
            row["status"] = "stopped" if row["error"].startswith("stopped by ") else "failed"
        else:
            row["status"] = "ok" if metrics_file.is_file() else "no metrics"  # infer writes none
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], metric: str) -> tuple[Path, Path]:
    sign = -1 if higher_is_better(metric) else 1

    def sort_key(r):
        v = r.get(metric)
        return (not isinstance(v, (int, float)) or math.isnan(v), sign * v if isinstance(v, (int, float)) else 0)

    rows = sorted(rows, key=sort_key)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    metric_keys = [k for k in keys if "/" in k]  # slash-named metrics after the overrides
    last = [k for k in keys if k == "error"]      # a failed job's error line: long, so last
    keys = [k for k in keys if k not in metric_keys and k not in last] + metric_keys + last

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    csv_path = atomic_write_text(sweep_dir / "summary.csv", buf.getvalue())

    shown = [k for k in keys if "/" not in k or k in _HEADLINE or k == metric]
    lines = [f"Sweep {sweep_dir} — sorted by {metric}", "", "| " + " | ".join(shown) + " |",
             "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in shown) + " |")
    md_path = atomic_write_text(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return csv_path, md_path


_HEADLINE = ("train/loss", "val/loss", "val/ppl", "test/loss", "test/ppl", "val/accuracy", "test/accuracy",
             "test/macro_f1", "model/trainable_params", "model/trainable_pct", "model/params_non_embedding",
             "train/tokens_seen", "train/flops", "train/wall_time_s",
             "train/peak_rss_mb", "model/ckpt_mb", "quant/bits_per_param", "prune/sparsity", "infer/tokens_per_s",
             "infer/peak_rss_mb")
_HIGHER_IS_BETTER = ("accuracy", "macro_f1", "f1", "spearman")  # sorted best first = descending


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")  # a | would end the Markdown cell
