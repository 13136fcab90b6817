"""Progress display, learning curves and sweep summaries (units; the e2e tests run them for real)."""

from __future__ import annotations

import csv

import pytest

from llmlab.callbacks import LearningCurves, PlainProgressBar, RichProgressBar, progress_bar
from llmlab.errors import UserError
from llmlab.sweep import write_summary


def test_progress_bar_is_plain_without_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert isinstance(progress_bar("auto"), PlainProgressBar)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert isinstance(progress_bar("auto"), RichProgressBar)
    assert isinstance(progress_bar("plain"), PlainProgressBar)
    with pytest.raises(UserError, match="kind"):
        progress_bar("fancy")


def test_learning_curves_write_csv_and_png(tmp_path):
    curves = LearningCurves()
    curves.rows = [{"step": 0, "tokens": 0, "val/loss": 4.3}, {"step": 10, "tokens": 1000, "train/loss": 3.0},
                   {"step": 10, "tokens": 1000, "val/loss": 2.9}]
    curves.write(tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["val/loss"] for r in rows] == ["4.3", "", "2.9"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    restored = LearningCurves()
    restored.load_state_dict(curves.state_dict())  # resumed runs keep the whole curve
    assert restored.rows == curves.rows


def test_sweep_summary_sorts_by_metric_and_keeps_failed_jobs(tmp_path):
    rows = [{"job": "0", "model.n_layer": "1", "val/loss": 2.0, "status": "ok"},
            {"job": "1", "model.n_layer": "2", "status": "failed"},
            {"job": "2", "model.n_layer": "4", "val/loss": 1.5, "status": "ok"}]
    csv_path, md_path = write_summary(tmp_path, rows, "val/loss")
    assert [r["job"] for r in csv.DictReader(csv_path.open())] == ["2", "0", "1"]
    assert "| 2 | 4 | ok | 1.5 |" in md_path.read_text()
