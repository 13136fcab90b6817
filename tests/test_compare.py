"""Comparing runs: `llmlab compare DIR ...` (curves on one axis, the metric against each swept key, the
config keys that differ) and the comparison.png every sweep writes next to its summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from llmlab import compare

BASE = {"seed": 1, "method": {"name": "gpt"}, "model": {"n_layer": 1, "n_embd": 32}, "optim": {"lr": 1e-3},
        "tags": ["dev"]}


def make_run(d: Path, config: dict, overrides=(), losses=(), metrics=None, error=None) -> Path:
    """A run dir as `llmlab train` leaves it: .hydra/{config,overrides}.yaml, metrics.csv, metrics.json, error.txt."""
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    if losses:
        rows = [{"step": 10 * i, "tokens": 2560 * i, "val/loss": v} for i, v in enumerate(losses)]
        rows.insert(1, {"step": 5, "tokens": 1280, "train/loss": 9.0})  # train rows have no val/loss
        with (d / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "tokens", "train/loss", "val/loss"])
            w.writeheader()
            w.writerows(rows)
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (d / "error.txt").write_text(error + "\n")
    return d


def with_(config: dict, key: str, value) -> dict:
    out = json.loads(json.dumps(config))
    node = out
    *parents, last = key.split(".")
    for k in parents:
        node = node[k]
    node[last] = value
    return out


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    """A 4-job learning-rate sweep (one job failed) and a BERT run."""
    sweep = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    for job, (lr, final) in enumerate([(1e-4, 3.0), (1e-3, 2.5), (1e-2, 2.8)]):
        make_run(sweep / str(job), with_(BASE, "optim.lr", lr), [f"optim.lr={lr:g}"], losses=(4.0, 3.5, final),
                 metrics={"val/loss": final, "val/accuracy": 1 / final})
    make_run(sweep / "3", with_(BASE, "optim.lr", 1.0), ["optim.lr=1"], error="error: the loss is nan at step 3: lower optim.lr")
    (sweep / "summary.md").write_text("not a run\n")
    bert = with_(with_(BASE, "method.name", "bert"), "model.n_layer", 2)
    other = make_run(tmp_path / "runs" / "2026-01-02_00-00-00", bert, ["method=bert"], losses=(5.0, 2.0),
                     metrics={"val/loss": 2.0})
    return sweep, other


def test_compare_table_and_figure(run_cli, runs):
    sweep, other = runs
    out = run_cli.root / "cmp"
    proc = run_cli("compare", str(sweep), str(other), f"out={out}")
    rows = list(csv.reader((out / "compare.csv").open()))
    # only the keys that differ, in config order; best first, the failed job last
    assert rows[0] == ["run", "method.name", "model.n_layer", "optim.lr", "status", "val/loss"]
    assert [r[0] for r in rows[1:]] == ["runs/2026-01-02_00-00-00", "multiruns/2026-01-01_00-00-00/1",
                                        "multiruns/2026-01-01_00-00-00/2", "multiruns/2026-01-01_00-00-00/0",
                                        "multiruns/2026-01-01_00-00-00/3"]
    assert rows[1][1:] == ["bert", "2", "0.001", "ok", "2"]
    assert rows[-1][-2:] == ["failed", ""]
    md = (out / "compare.md").read_text()
    assert md in proc.stdout and "| multiruns/2026-01-01_00-00-00/1 | gpt | 1 | 0.001 | ok | 2.5 |" in md
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"comparison of 5 runs: {out / 'compare.png'}" in proc.stdout

    # the default output dir, and a metric where higher is better
    proc = run_cli("compare", str(sweep), "metric=val/accuracy")
    (made,) = (run_cli.root / "outputs" / "compare").iterdir()
    rows = list(csv.reader((made / "compare.csv").open()))
    assert rows[0] == ["run", "optim.lr", "status", "val/accuracy"]
    assert [r[1] for r in rows[1:]] == ["0.001", "0.01", "0.0001", "1.0"]  # 1/2.5 > 1/2.8 > 1/3.0


def test_figure_curves_and_parameter_panels(runs):
    sweep, other = runs
    loaded = compare.load_runs(compare.find_runs([sweep, other]))
    assert compare.swept_keys(loaded) == ["optim.lr", "method"]  # the overrides that differ, as typed
    fig = compare.figure(loaded, "val/loss")
    curves, lr, method = fig.axes
    lines = [line for line in curves.get_lines() if len(line.get_xdata())]
    assert len(lines) == 4  # every finished run's val/loss curve; the failed job only in the legend
    assert list(lines[0].get_xdata()) == [0, 2560, 5120] and list(lines[0].get_ydata()) == [4.0, 3.5, 3.0]
    assert curves.get_xlabel() == "tokens seen"
    assert any("(failed)" in t.get_text() for t in curves.get_legend().get_texts())
    assert lr.get_xlabel() == "optim.lr" and lr.get_xscale() == "log"  # 1e-4 .. 1: more than 10x
    assert method.get_xlabel() == "method" and [t.get_text() for t in method.get_xticklabels()] == ["-", "bert"]

    # runs started alike (no overrides): the config keys that differ are the parameters
    plain = compare.load_runs([compare.load_run(sweep / "0").path, other])
    for run in plain:
        run.overrides = {}
    assert compare.swept_keys(plain) == ["method.name", "model.n_layer", "optim.lr"]
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.parametrize("values, kind", [(["1e-4", "1e-3", "1e-2"], "log"), (["3e-4", "1e-3"], "linear"),
                                          (["1", "2", "4"], "linear"), (["-1", "10", "100"], "linear"),
                                          (["gpt", "bert"], "category"), (["True", "False"], "category"),
                                          (["2", "2"], "category")])
def test_axis_kind(values, kind):
    assert compare.axis_kind(values) == kind


def test_bad_input_is_one_line(run_cli, runs, tmp_path):
    sweep, _ = runs
    (tmp_path / "empty").mkdir()
    cases = [([], "llmlab compare needs run or sweep dirs"),
             ([str(tmp_path / "empty")], "holds no runs"),
             ([str(tmp_path / "missing")], "is not a directory"),
             ([str(sweep), "metric=val/nope"], "unknown metric 'val/nope': no run logged it; choose one of val/accuracy, val/loss"),
             ([str(sweep), "colour=red"], "unknown option 'colour'")]
    for args, message in cases:
        proc = run_cli("compare", *args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (run_cli.root / "outputs").exists()  # nothing written on bad input


def test_sweep_writes_comparison_figure(run_cli, small_corpus):
    run_cli("train", "-m", "data=text", f"data.path={small_corpus}", *TINY, "debug=limit", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "test=false", "callbacks.samples.max_new_tokens=4", "optim.lr=1e-3,3e-4")
    (sweep,) = (run_cli.root / "outputs" / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "comparison.png", "multirun.yaml", "summary.csv",
                                                       "summary.md"]
    assert (sweep / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the summary is as before: one row per job, overrides then metrics, sorted by val/loss
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["optim.lr"], r["status"]) for r in rows] == [("0", "0.001", "ok"), ("1", "0.0003", "ok")]
    assert float(rows[0]["val/loss"]) < float(rows[1]["val/loss"])
    assert (sweep / "summary.md").read_text().startswith(f"Sweep {sweep} — sorted by val/loss\n")
    # the figure's data: both jobs' curves (3 validations each, the untrained one at 0 tokens)
    loaded = compare.load_runs(compare.find_runs([sweep]))
    assert [r.name for r in loaded] == ["0", "1"]
    assert [[row["tokens"] for row in r.curves if "val/loss" in row] for r in loaded] == [[0, 512, 1024]] * 2
    assert compare.swept_keys(loaded) == ["optim.lr"]
