"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY


def assert_user_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_help_and_ls(run_cli):
    out = run_cli("--help").stdout
    for command in ("train", "eval", "infer", "ls", "bench"):
        assert command in out
    out = run_cli("ls").stdout
    for group in ("method", "model", "data", "tokenizer", "optim", "trainer", "logger", "callbacks",
                  "generation", "debug", "experiment", "hparams_search", "paths", "hydra"):
        assert group in out
    out = run_cli("ls", "model").stdout
    assert "gpt_nano" in out and "gpt2_124m" in out and "124,439,808" in out


def test_train_help_lists_groups(run_cli):
    out = run_cli("train", "--help").stdout
    conf = Path(__file__).resolve().parents[1] / "conf"
    for group in ("model", "method", "experiment"):
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in out, group


@pytest.mark.parametrize(
    "args, needles",
    [
        (["fit"], ["unknown command 'fit'", "train"]),
        (["ls", "modle"], ["unknown config group 'modle'"]),
        (["bench", "nope"], ["unknown benchmark 'nope'"]),
        (["train", "model=gpt_huge"], ["unknown model=gpt_huge", "gpt_nano", "llmlab ls model"]),
        (["train", "tokenizer=sentencepiece"], ["unknown tokenizer=sentencepiece", "char, gpt2"]),
        (["train", "n_layers=3"], ["unknown config key 'n_layers'"]),
        (["train", "model.n_layers=3"], ["model.n_layers"]),
        (["train", "data=text"], ["data.path"]),
        (["train", "data=text", "data.path=/no/such/corpus.txt"], ["/no/such/corpus.txt"]),
        (["train", "model.n_head=3"], ["n_head"]),
        (["eval"], ["ckpt_path"]),
        (["eval", "ckpt_path=/no/such.ckpt"], ["/no/such.ckpt", "does not exist"]),
        (["infer", "ckpt_path=last"], ["no last.ckpt", "llmlab train"]),
    ],
)
def test_bad_input(run_cli, args, needles):
    assert_user_error(run_cli(*args, check=False), *needles)


def test_empty_and_short_corpus(run_cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    assert_user_error(run_cli("train", "data=text", f"data.path={empty}", check=False), str(empty), "empty")
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be: that is the question.\n" * 3)
    line = assert_user_error(run_cli("train", "data=text", f"data.path={short}", *TINY, check=False))
    assert "too short" in line and "block_size" in line
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert_user_error(run_cli("train", "data=text", f"data.path={binary}", check=False), "UTF-8")


def test_corrupt_checkpoint_is_reported_and_left_alone(run_cli, tmp_path):
    bad = tmp_path / "broken.ckpt"
    payload = b"PK\x03\x04 this is not a checkpoint" * 10
    bad.write_bytes(payload)
    for command in ("eval", "infer"):
        assert_user_error(run_cli(command, f"ckpt_path={bad}", check=False), str(bad), "corrupt")
    assert_user_error(run_cli("train", f"ckpt_path={bad}", *TINY, check=False), "corrupt")
    assert bad.read_bytes() == payload  # nothing already written is lost
    not_ours = tmp_path / "weights.ckpt"
    import torch

    torch.save({"state_dict": {}}, not_ours)
    assert_user_error(run_cli("eval", f"ckpt_path={not_ours}", check=False), "not an llmlab checkpoint")
