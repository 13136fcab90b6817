"""One failing sweep job does not kill the sweep: it is recorded, the others run, the summary lists it,
and the sweep exits non-zero (2 for bad input) with one line after the summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY
from llmlab import sweep

TINY_NO_HEADS = [o for o in TINY if not o.startswith("model.n_head=")]


def sweep_dir(root: Path) -> Path:
    (d,) = (root / "outputs" / "train" / "multiruns").iterdir()
    return d


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------- the summary (in-process)


def make_job(root: Path, name: str, overrides: list[str], metrics: dict | None = None, error: str | None = None):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (job / "error.txt").write_text(error + "\n")


def test_summary_lists_failed_jobs_with_their_error(tmp_path, capsys):
    make_job(tmp_path, "0", ["model.n_head=3"], error="error: model.n_embd=32 is not divisible by model.n_head=3: fix | it")
    make_job(tmp_path, "1", ["model.n_head=2"], metrics={"val/loss": 2.5})
    make_job(tmp_path, "2", ["model.n_head=4"], error="RuntimeError: boom")
    make_job(tmp_path, "3", ["prompt=x"])  # infer-like: no metrics, no error

    outcome = sweep.summarize(tmp_path, "val/loss")
    assert outcome == sweep.SweepOutcome(total=4, failed=2, user_errors=1, summary=tmp_path / "summary.md")
    rows = {r["job"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert rows["0"]["status"] == "failed" and rows["0"]["error"].startswith("error: model.n_embd=32")
    assert rows["1"]["status"] == "ok" and rows["1"]["error"] == "" and float(rows["1"]["val/loss"]) == 2.5
    assert rows["2"]["status"] == "failed" and rows["2"]["error"] == "RuntimeError: boom"
    assert rows["3"]["status"] == "no metrics"
    header = next(csv.reader((tmp_path / "summary.csv").open()))
    assert header[-1] == "error"  # long, so last
    md = (tmp_path / "summary.md").read_text()
    assert "fix \\| it" in md  # a | in the message does not break the table
    assert "sweep summary (4 jobs)" in capsys.readouterr().out


def test_outcome_is_taken_once(tmp_path):
    make_job(tmp_path, "0", ["a=1"], error="error: bad: fix")

    from omegaconf import OmegaConf

    config = OmegaConf.create({"optimized_metric": None, "hydra": {"sweep": {"dir": str(tmp_path)}}})
    cb = sweep.SweepSummary()
    cb.on_multirun_start(config)
    cb.on_multirun_end(config)
    outcome = sweep.take_outcome()
    assert outcome is not None and outcome.failed == 1 and outcome.user_errors == 1
    assert sweep.take_outcome() is None


# ---------------------------------------------------------------------------- through the CLI


@pytest.mark.slow
def test_failed_job_does_not_stop_the_sweep(run_cli, small_corpus):
    proc = run_cli("train", "-m", "model.n_head=3,2", "trainer.max_steps=3", "trainer.val_check_interval=3",
                   "trainer.limit_val_batches=2", "data=text", f"data.path={small_corpus}", *TINY_NO_HEADS,
                   check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr
    assert "n_head=3" in lines[0]  # job 0's own line, printed when it failed
    d = sweep_dir(run_cli.root)
    assert lines[1] == f"error: 1 of 2 sweep jobs failed: see {d}/summary.md"  # after the summary
    assert "sweep summary (2 jobs)" in proc.stdout

    assert (d / "0" / "error.txt").read_text().strip() == lines[0]
    assert not (d / "0" / "metrics.json").exists()
    assert (d / "1" / "metrics.json").is_file() and not (d / "1" / "error.txt").exists()  # job 1 ran
    rows = {r["job"]: r for r in csv.DictReader((d / "summary.csv").open())}
    assert rows["0"]["status"] == "failed" and rows["0"]["error"] == lines[0]
    assert rows["1"]["status"] == "ok" and float(rows["1"]["val/loss"]) > 0
    assert "| failed |" in (d / "summary.md").read_text()


@pytest.mark.slow
def test_optuna_study_goes_on_after_a_failed_trial(run_cli, small_corpus):
    """Every trial fails (n_embd=32 is not divisible by 3): each is told to Optuna as failed, the
    next still runs, and the sweeper giving up ("No trials are completed yet") ends as one line."""
    proc = run_cli("train", "hparams_search=gpt_optuna", "hydra.sweeper.n_trials=2", "model.n_head=3",
                   "trainer.max_steps=3", "data=text", f"data.path={small_corpus}", *TINY_NO_HEADS, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 3 and all("n_head=3" in line for line in lines[:2]), proc.stderr
    d = sweep_dir(run_cli.root)
    assert lines[2].startswith("error: 2 of 2 sweep jobs failed") and lines[2].endswith(f"see {d}/summary.md")
    rows = list(csv.DictReader((d / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "failed"]


@pytest.mark.slow
def test_a_bug_in_one_job_is_recorded_too(run_cli, small_corpus):
    """An exception that is not bad input: traceback on stderr, type and message in the summary."""
    proc = run_cli("train", "-m", "+trainer.no_such_trainer_arg=1,2", "trainer.max_steps=3", "data=text",
                   f"data.path={small_corpus}", *TINY, check=False)
    rows = list(csv.DictReader((sweep_dir(run_cli.root) / "summary.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "failed" and "no_such_trainer_arg" in r["error"] for r in rows)
    user_error = rows[0]["error"].startswith("error:")
    assert proc.returncode == (2 if user_error else 1), proc.stderr[-3000:]
    assert error_lines(proc.stderr)[-1].startswith("error: 2 of 2 sweep jobs failed")
