"""Sweep summary: after `llmlab train -m ...`, one table of every job's overrides and final metrics.

A Hydra callback (configured in conf/hydra/default.yaml). Reads each job dir's
``.hydra/overrides.yaml`` and ``metrics.json`` and writes ``summary.csv`` and ``summary.md`` into
the sweep dir, sorted by the optimized metric. Jobs that failed appear with status ``failed``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from llmlab.utils import atomic_write_text


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        metric = config.get("optimized_metric") or "val/loss"
        rows = collect(sweep_dir)
        if rows:
            paths = write_summary(sweep_dir, rows, metric)
            print(f"sweep summary ({len(rows)} jobs): {paths[1]}")
            print(paths[1].read_text())


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
        metrics_file = job / "metrics.json"
        if metrics_file.is_file():
            row.update(json.loads(metrics_file.read_text()))
            row["status"] = "ok"
        else:
            row["status"] = "failed"
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], metric: str) -> tuple[Path, Path]:
    def sort_key(r):
        v = r.get(metric)
        return (not isinstance(v, (int, float)) or math.isnan(v), v if isinstance(v, (int, float)) else 0)

    rows = sorted(rows, key=sort_key)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    metric_keys = [k for k in keys if "/" in k]  # slash-named metrics after the overrides
    keys = [k for k in keys if k not in metric_keys] + metric_keys

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


_HEADLINE = ("train/loss", "val/loss", "val/ppl", "test/loss", "test/ppl")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
