"""Progress display, learning curves and sweep summaries (units; the e2e tests run them for real)."""

from __future__ import annotations

import csv

import pytest

from llmlab.callbacks import LearningCurves, PlainProgressBar, RichProgressBar, plot_loss, progress_bar
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


def test_loss_plot_adds_components_and_an_accuracy_panel(monkeypatch):
    import matplotlib.axes

    plotted = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *a, **kw: plotted.append((id(ax), kw.get("label"))) or real_plot(ax, *a, **kw))
    rows = [{"step": 0, "tokens": 0, "val/loss": 9.0},
            {"step": 5, "tokens": 500, "train/loss": 7.0, "train/mlm_loss": 6.3, "train/nsp_loss": 0.7},
            {"step": 5, "tokens": 500, "val/loss": 6.0, "val/nsp_loss": 0.69, "val/mlm_acc": 0.1, "val/nsp_acc": 0.5}]
    png = plot_loss(rows)
    assert png[:4] == b"\x89PNG"
    axes = {}
    for ax, label in plotted:
        axes.setdefault(ax, []).append(label)
    left, right = axes.values()
    assert left == ["train/loss", "val/loss", "train/mlm_loss", "train/nsp_loss", "val/nsp_loss"]
    assert right == ["val/mlm_acc", "val/nsp_acc"]
    plotted.clear()
    plot_loss(rows[:2])  # a plain LM: one panel, no accuracies
    assert len({ax for ax, _ in plotted}) == 1


def test_sweep_summary_sorts_by_metric_and_keeps_failed_jobs(tmp_path):
    rows = [{"job": "0", "model.n_layer": "1", "val/loss": 2.0, "status": "ok"},
            {"job": "1", "model.n_layer": "2", "status": "failed"},
            {"job": "2", "model.n_layer": "4", "val/loss": 1.5, "status": "ok"}]
    csv_path, md_path = write_summary(tmp_path, rows, "val/loss")
    assert [r["job"] for r in csv.DictReader(csv_path.open())] == ["2", "0", "1"]
    assert "| 2 | 4 | ok | 1.5 |" in md_path.read_text()
