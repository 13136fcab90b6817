"""Hydra launchers: a sweep through submitit_local (one process per job) and joblib (a pool of 2) gives the
summary of the basic launcher (jobs in the CLI's process) — failed jobs included; the Slurm launcher
(conf/hydra/launcher/slurm.yaml) composes and writes the sbatch script we expect (no cluster here:
a stand-in `sbatch` keeps the script and refuses the job)."""

from __future__ import annotations

import csv
import os
import stat
import subprocess
import sys
from pathlib import Path

import yaml
from hydra.utils import instantiate

from conftest import TINY, cli_env

SAME = ("job", "optim.lr", "status", "error", "train/loss", "val/loss")  # what must not depend on the launcher


def sweep(run_cli, corpus: Path, *launcher: str) -> tuple:
    """A job that trains and one that fails on bad input (caught before torch is imported: cheap in a new
    process) -> (process, sweep dir, rows)."""
    proc = run_cli("train", "-m", "data=text", f"data.path={corpus}", "optim.lr=1e-3,-1", *TINY, "debug=limit", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test=false", "callbacks.samples=null",
                   *launcher, check=False)
    latest = max((run_cli.root / "outputs" / "train" / "multiruns").iterdir())  # dir names are timestamps
    rows = list(csv.DictReader((latest / "summary.csv").open()))
    return proc, latest, [{k: r.get(k) for k in SAME} for r in rows]


def test_submitit_local_and_joblib_match_basic(run_cli, small_corpus):
    basic, basic_dir, expected = sweep(run_cli, small_corpus)
    assert [(r["job"], r["status"]) for r in expected] == [("0", "ok"), ("1", "failed")]
    assert float(expected[0]["val/loss"]) > 0 and float(expected[0]["train/loss"]) > 0
    assert expected[1]["error"].startswith("error: optim.lr=-1")
    assert basic.returncode == 2
    assert basic.stderr.strip().splitlines()[-1] == f"error: 1 of 2 sweep jobs failed: see {basic_dir}/summary.md"
    for launcher in (["hydra/launcher=submitit_local"], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]):
        proc, sweep_dir, rows = sweep(run_cli, small_corpus, *launcher)
        assert sweep_dir != basic_dir
        assert rows == expected, launcher  # same jobs, same metrics (bit-exact on CPU), same failure
        # the failure, recorded in another process, still ends the sweep with one line and exit code 2
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == f"error: 1 of 2 sweep jobs failed: see {sweep_dir}/summary.md"
        assert "Traceback" not in proc.stderr
        assert (sweep_dir / "comparison.png").is_file()


def test_slurm_launcher_composes_and_writes_sbatch(run_cli, tmp_path):
    """hydra/launcher=slurm: the keys compose (`--cfg hydra`), the launcher instantiates, and the sweep
    reaches `sbatch` with the partition, GPUs, time and array parallelism asked for."""
    keys = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.timeout_min=90", "hydra.launcher.array_parallelism=2"]
    shown = run_cli("train", *keys, "--cfg", "hydra").stdout
    launcher = yaml.safe_load(shown)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["timeout_min"], launcher["array_parallelism"]) == (
        "gpu", 4, 90, 2)
    obj = instantiate({k: v for k, v in launcher.items() if "${" not in str(v)})  # no ${hydra...} outside a run
    assert type(obj).__name__ == "SlurmLauncher" and obj.params["partition"] == "gpu"

    # a stand-in cluster: `srun` exists, `sbatch` keeps the script it is given and refuses the job
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "submitted.sh"
    for name, body in (("srun", "exit 0"), ("sbatch", f'cp "$1" {script}; echo "sbatch: error: no cluster here" >&2; exit 1')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = cli_env(run_cli.root)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, "-m", "llmlab.cli", "train", "-m", *keys, "model.n_layer=1,2,3"], cwd=run_cli.root,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and script.is_file(), proc.stderr[-2000:]
    text = script.read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4", "#SBATCH --time=90",
                 "#SBATCH --array=0-2%2", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB"):
        assert line in text, (line, text)


def test_missing_required_key_in_a_launcher_process(run_cli):
    """A recipe's `requires:` stops a basic sweep at once; in joblib's processes each job records it and
    the sweep ends with the usual one line (not a crashed worker's traceback)."""
    proc = run_cli("train", "-m", "experiment=gpt_domain_adapt", "seed=1,2", "hydra/launcher=joblib", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 2 of 2 sweep jobs failed: see ")
    (sweep,) = (run_cli.root / "outputs" / "train" / "multiruns").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "error.txt").read_text().startswith("error: gpt_domain_adapt needs model.init_from")
