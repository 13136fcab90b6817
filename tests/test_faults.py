"""Faults a run survives (issue 16), each provoked for real through the CLI in a subprocess: SIGTERM and
SIGINT during training (and during a sweep), kill -9 while a checkpoint is written, a NaN loss, two
processes building one token cache, unwritable or colliding output dirs, and CPU determinism."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, cli_env, run_dirs

# a tiny GPT with dropout (so the RNG stream matters) and one plain progress line per step (to poll)
COMMON = ["data=text", *TINY, "debug=limit", "trainer.val_check_interval=10", "optim.scheduler.decay_steps=30",
          "model.dropout=0.1", "test=false", "callbacks.samples.max_new_tokens=4", "callbacks.progress.kind=plain",
          "callbacks.progress.every_n_steps=1"]
pytestmark = pytest.mark.slow  # real training processes (about 12 CLI starts)

VOLATILE = ("train/wall_time_s", "train/tokens_per_sec", "train/peak_rss_mb")  # clocks and memory, not results


def common(corpus: Path) -> list[str]:
    return [f"data.path={corpus}", *COMMON]


def start(root: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`llmlab train ARGS` in the background, stdout piped (to poll its progress lines)."""
    return subprocess.Popen([sys.executable, "-m", "llmlab.cli", "train", *args], cwd=root,
                            env={**cli_env(root), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_at_step(proc: subprocess.Popen, sig: int, step: int) -> tuple[str, str]:
    """Send ``sig`` once the run prints its progress line of ``step`` (so training is under way), then
    wait for the process; returns (stdout, stderr)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            proc.send_signal(sig)
            break
    else:
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"the run ended before step {step}\n{''.join(seen)[-2000:]}\n{err[-3000:]}")
    out, err = proc.communicate(timeout=300)
    return "".join(seen) + out, err


def run(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmlab.cli", "train", *args], cwd=root,
                          env={**cli_env(root), **(env or {})}, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def one_error_line(proc, code: int = 2) -> str:
    """The run failed with ``code`` and one line on stderr, no traceback; returns that line."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_corpus) -> list[Path]:
    """Two identical uninterrupted 30-step runs (the reference of the resume test, and the determinism test)."""
    root = tmp_path_factory.mktemp("straight")
    for _ in range(2):
        ok(run(root, *common(small_corpus), "trainer.max_steps=30"))
    return run_dirs(root)


def test_same_command_same_metrics(straight):
    """Determinism on CPU: the same command and seed give bit-identical metrics, curves and weights."""
    a, b = (json.loads((d / "metrics.json").read_text()) for d in straight)
    assert a.keys() == b.keys() and "val/loss" in a
    assert {k: v for k, v in a.items() if k not in VOLATILE} == {k: v for k, v in b.items() if k not in VOLATILE}
    curves = [(d / "metrics.csv").read_text().splitlines() for d in straight]
    header = curves[0][0].split(",")
    keep = [i for i, k in enumerate(header) if k not in VOLATILE]
    assert [[row.split(",")[i] for i in keep] for row in curves[0]] == [[row.split(",")[i] for i in keep] for row in curves[1]]
    wa, wb = (load(d / "checkpoints" / "last.ckpt")["state_dict"] for d in straight)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_saves_last_and_resumes_exactly(tmp_path, small_corpus, straight):
    """SIGTERM mid-run: last.ckpt at the current step, one line, exit 143; `ckpt_path=last` then continues to
    step 30 exactly as the uninterrupted run (weights, tokens, FLOPs, LR schedule, val loss)."""
    proc = start(tmp_path, *common(small_corpus), "trainer.max_steps=200")
    out, err = signal_at_step(proc, signal.SIGTERM, 5)
    assert proc.returncode == 143, f"{out[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err, err[-4000:]
    m = re.search(r"^stopped by SIGTERM at step (\d+): checkpoint (\S+); resume with: llmlab train .*"
                  r"trainer\.max_steps=200 ckpt_path=(\S+)$", err, re.M)
    assert m, err[-3000:]
    step, ckpt = int(m.group(1)), Path(m.group(2))
    assert 5 <= step < 30 and m.group(3) == str(ckpt)
    assert ckpt == run_dirs(tmp_path)[0] / "checkpoints" / "last.ckpt"
    assert load(ckpt)["global_step"] == step
    assert not (run_dirs(tmp_path)[0] / "metrics.json").exists()  # an interrupted run has no final metrics

    ok(run(tmp_path, *common(small_corpus), "trainer.max_steps=30", "ckpt_path=last"))
    resumed = run_dirs(tmp_path)[-1]
    a, b = load(straight[0] / "checkpoints" / "last.ckpt"), load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 30
    assert a["llmlab"]["tokens_seen"] == b["llmlab"]["tokens_seen"]
    assert a["llmlab"]["flops_seen"] == b["llmlab"]["flops_seen"] > 0
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    sa, sb = a["lr_schedulers"][0], b["lr_schedulers"][0]
    assert (sa["last_epoch"], sa["_last_lr"]) == (sb["last_epoch"], sb["_last_lr"])
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight[0], resumed))
    assert ma["val/loss"] == pytest.approx(mb["val/loss"], abs=1e-6)
    assert ma["train/tokens_seen"] == mb["train/tokens_seen"]


def test_sigint_stops_the_sweep_after_saving(tmp_path, small_corpus):
    """Ctrl+C in a sweep: the running job saves last.ckpt, the summary marks it stopped, no further job
    starts, exit 130."""
    proc = start(tmp_path, "-m", *common(small_corpus), "trainer.max_steps=200", "model.n_layer=1,2")
    out, err = signal_at_step(proc, signal.SIGINT, 3)
    assert proc.returncode == 130, f"{out[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err, err[-4000:]
    sweep = next((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    m = re.search(r"^stopped by SIGINT at step (\d+): checkpoint (\S+); .* \(the sweep stopped here: see (\S+)\)$",
                  err, re.M)
    assert m, err[-3000:]
    assert Path(m.group(2)) == sweep / "0" / "checkpoints" / "last.ckpt"
    assert load(Path(m.group(2)))["global_step"] == int(m.group(1)) >= 3
    assert Path(m.group(3)) == sweep / "summary.md"
    assert not (sweep / "1").exists()  # the second job never started
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and ",stopped," in rows[1] and "stopped by SIGINT" in rows[1]


def test_kill_9_while_writing_a_checkpoint_keeps_the_previous(tmp_path, small_corpus):
    """SIGKILL while a checkpoint is being replaced: the previous one stays whole and loadable, and no
    partial file sits under a checkpoint's name (the test hook holds the finished temp file before its rename)."""
    proc = start(tmp_path, *common(small_corpus), "trainer.max_steps=200", "trainer.val_check_interval=2",
                 env={"LLMLAB_TEST_SLOW_CKPT": "120"})
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = list(tmp_path.glob("outputs/train/runs/*/checkpoints/.*.ckpt.*.tmp"))
            if tmps and all((tmps[0].parent / name).exists() for name in ("best.ckpt", "last.ckpt")):
                break  # replacing a checkpoint (held open by the test hook), not writing the first ones
            time.sleep(0.05)
        assert proc.poll() is None and tmps, "the run never started replacing a checkpoint"
        proc.kill()
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpts = tmps[0].parent
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["best.ckpt", "last.ckpt"]
    assert tmps[0].exists()  # killed between writing the new checkpoint and renaming it

    from llmlab.checkpoint import load_method, read_checkpoint

    for name in ("best.ckpt", "last.ckpt"):  # both as written at the first validation; the kill came at step 4
        assert read_checkpoint(ckpts / name)["global_step"] == 2
    module, meta = load_method(ckpts / "last.ckpt")  # what llmlab eval / infer do with it
    assert meta["method"] == "gpt" and all(torch.isfinite(p).all() for p in module.parameters())


def test_nan_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tmp_path, small_corpus):
    """A learning rate that diverges within a few steps: exit 2, one line naming the step and the fix; the last
    checkpoint is the last finite state (no NaN state was saved over it)."""
    proc = run(tmp_path, *common(small_corpus), "trainer.max_steps=30", "trainer.val_check_interval=2",
               "optim.lr=1e3", "optim.scheduler.warmup_steps=10")
    line = one_error_line(proc, 2)
    m = re.match(r"error: (train|val)/loss is (nan|inf) at step (\d+); the last good checkpoint, (\S+), is kept: "
                 r"lower optim.lr \(now 1e\+03\)", line)
    assert m, line
    step, path = int(m.group(3)), Path(m.group(4))
    assert path == run_dirs(tmp_path)[0] / "checkpoints" / "last.ckpt"
    ckpt = load(path)
    assert 2 <= ckpt["global_step"] < step
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    best = ckpt["callbacks"][next(k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint"))]["best_model_score"]
    assert math.isfinite(float(best))
    assert not (path.parent.parent / "metrics.json").exists()


CACHE_BUILD = """
import hashlib, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(message)s")
from llmlab.data.lm import tokenize_cached
from llmlab.data.tokenizers import build_tokenizer
docs = [d for d in Path(sys.argv[1]).read_text().split("\\n\\n") if d.strip()]
tok = build_tokenizer("char", texts=docs)
print("ready", flush=True)
arr = tokenize_cached(docs, tok, sys.argv[2])
print("sha", hashlib.sha256(arr.tobytes()).hexdigest(), len(arr))
"""


def test_two_processes_build_one_token_cache(tmp_path, small_corpus):
    """Two jobs tokenising the same corpus into the same empty cache dir at once: both succeed, the corpus is
    tokenised once (a file lock; the test holds it until both are waiting), and the cache equals a
    single-process build."""
    import fcntl
    import hashlib

    from llmlab.data.lm import stream_key, tokenize_cached
    from llmlab.data.tokenizers import build_tokenizer

    docs = [d for d in small_corpus.read_text().split("\n\n") if d.strip()]
    tok = build_tokenizer("char", texts=docs)
    cache = tmp_path / "cache"
    cache.mkdir()
    name = f"tokens-{tok.name}-{stream_key(docs, tok)[:32]}.npy"
    with open(cache / f".{name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # both jobs find no cache and queue on the lock
        procs = [subprocess.Popen([sys.executable, "-c", CACHE_BUILD, str(small_corpus), str(cache)],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.communicate()
        time.sleep(1.0)  # from "ready" to the lock is microseconds of work
        assert not (cache / name).exists()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    shas = [re.search(r"^sha (\w+) (\d+)$", out, re.M).groups() for out, _ in outs]
    assert shas[0] == shas[1]
    assert sum(err.count("tokenised ") for _, err in outs) == 1, outs  # one built it, the other read it
    assert [p.name for p in cache.glob("*.npy")] == [name] and not list(cache.glob("*.tmp"))

    single = tokenize_cached(docs, tok, tmp_path / "single")
    assert (hashlib.sha256(single.tobytes()).hexdigest(), str(len(single))) == shas[0]
    assert (cache / name).read_bytes() == (tmp_path / "single" / name).read_bytes()


def test_unwritable_or_colliding_output_dirs(tmp_path, small_corpus):
    """A run dir that cannot be created (a file in the way, a read-only place) and a checkpoint dir that is a
    file: one line each, exit 2, and the file in the way is untouched."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    line = one_error_line(run(tmp_path, f"hydra.run.dir={a_file}"))
    assert line.startswith(f"error: cannot write {a_file} (a file is in the way): ") and "hydra.run.dir=DIR" in line
    line = one_error_line(run(tmp_path, env={"LLMLAB_ROOT": str(a_file / "sub")}))
    assert "(a part of the path is a file, not a directory)" in line and "LLMLAB_ROOT=DIR" in line
    assert a_file.read_text() == "keep me\n"

    if os.geteuid() == 0:  # root writes through file permissions: use a file system that refuses mkdir
        read_only = Path("/sys/llmlab-faults-test")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        read_only = tmp_path / "ro" / "outputs"
    line = one_error_line(run(tmp_path, env={"LLMLAB_ROOT": str(read_only)}))
    assert re.match(rf"error: cannot write {re.escape(str(read_only))}\S* \((permission denied|not permitted|"
                    r"read-only file system)\): write outputs somewhere writable", line), line

    run_dir = tmp_path / "collide"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a dir\n")
    line = one_error_line(run(tmp_path, *common(small_corpus), "trainer.max_steps=4", f"hydra.run.dir={run_dir}"))
    assert line.startswith(f"error: the checkpoint dir {run_dir / 'checkpoints'} is a file: move it away")
    assert (run_dir / "checkpoints").read_text() == "not a dir\n"
