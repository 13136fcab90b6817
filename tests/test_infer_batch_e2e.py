"""`llmlab infer ckpt_path=X prompts=FILE.jsonl`: continuous batching end to end through the real CLI."""

from __future__ import annotations

import json

import pytest
from conftest import TINY, run_dirs

from llmlab.errors import UserError
from llmlab.inference.batch import read_requests


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_corpus):
    """A tiny char GPT trained for a few steps (a checkpoint, fast)."""
    import subprocess
    import sys

    from conftest import cli_env

    root = tmp_path_factory.mktemp("batch")
    subprocess.run([sys.executable, "-m", "llmlab.cli", "train", "data=text", f"data.path={small_corpus}", *TINY,
                    "debug=limit", "trainer.max_steps=3", "trainer.val_check_interval=3"],
                   cwd=root, env=cli_env(root), check=True, capture_output=True, text=True, timeout=600)
    return run_dirs(root)[-1] / "checkpoints" / "last.ckpt"


@pytest.mark.slow  # three CLI runs after a training run: ~30 s of CPU
def test_prompts_file_to_completions_jsonl(run_cli, ckpt, tmp_path):
    rows = [
        {"prompt": "ROMEO:", "id": "a", "greedy": True, "max_new_tokens": 12},
        {"prompt": "KING HENRY", "greedy": True},  # max_new_tokens from the command line (7)
        {"prompt": "First", "num_samples": 3, "temperature": 1.2, "seed": 5, "max_new_tokens": 9},
        {"prompt": "JULIET:", "greedy": True, "max_new_tokens": 20, "stop_strings": ["e"]},
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")  # a blank line is fine
    proc = run_cli("infer", f"ckpt_path={ckpt}", f"prompts={prompts}", "generation.max_new_tokens=7",
                   "engine.block_size=4", "engine.max_num_seqs=3")
    assert "wrote 6 completions of 4 requests" in proc.stdout and "tokens/s" in proc.stdout
    out = run_dirs(run_cli.root, "infer")[-1] / "completions.jsonl"  # the default: <run dir>/completions.jsonl
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["id"] for line in lines] == ["a", 2, 3, 4]  # input order; no id -> the line number
    assert [len(line["completions"]) for line in lines] == [1, 1, 3, 1]
    assert [c["num_tokens"] for c in lines[0]["completions"] + lines[1]["completions"]] == [12, 7]
    assert lines[0]["completions"][0]["finish_reason"] == "length"
    samples = [c["text"] for c in lines[2]["completions"]]
    assert len(set(samples)) > 1 and all(c["num_tokens"] == 9 for c in lines[2]["completions"])
    stopped = lines[3]["completions"][0]
    assert "e" not in stopped["text"] and (stopped["finish_reason"] == "stop" or stopped["num_tokens"] == 20)

    # a greedy line equals `llmlab infer prompt=... generation.greedy=true` for that prompt
    one = run_cli("infer", f"ckpt_path={ckpt}", "prompt=ROMEO:", "generation.greedy=true",
                  "generation.max_new_tokens=12").stdout
    assert one.rstrip("\n") == "ROMEO:" + lines[0]["completions"][0]["text"]

    # bad input: one line, exit 2, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ROMEO:"}\n{"prompt": "ROMEO:", "max_tokens": 5}\n', encoding="utf-8")
    proc = run_cli("infer", f"ckpt_path={ckpt}", f"prompts={bad}", f"out={tmp_path / 'c.jsonl'}", check=False)
    assert proc.returncode == 2 and not (tmp_path / "c.jsonl").exists()
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}:2: unknown key 'max_tokens': a request may set prompt, id, max_new_tokens, temperature, top_k, "
        "top_p, min_p, greedy, seed, num_samples, stop_strings, stop_at_eos, repetition_penalty, no_repeat_ngram_size"]


def _cfg(prompts, out, **generation):
    from omegaconf import OmegaConf

    return OmegaConf.create({"prompts": str(prompts), "out": str(out), "reward": None, "paths": {"output_dir": "."},
                             "engine": {"block_size": 4}, "generation": {"max_new_tokens": 5, **generation}})


def test_infer_batch_in_process(tmp_path):
    """A plain text file (one prompt a line); a prompt longer than the context: one line, nothing written."""
    from types import SimpleNamespace

    from llmlab.data.tokenizers import CharTokenizer
    from llmlab.inference.batch import infer_batch
    from llmlab.models.gpt import GPT, GPTConfig

    tok = CharTokenizer.train(["ROMEO: KING HENRY abcdefghijklmnopqrstuvwxyz\n"])
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    method = SimpleNamespace(model=gpt, tokenizer=tok, infer=lambda cfg: infer_batch(method, cfg))
    text = tmp_path / "p.txt"
    text.write_text("ROMEO:\n\nKING HENRY\n", encoding="utf-8")
    out = tmp_path / "c.jsonl"
    result = method.infer(_cfg(text, out, greedy=True))
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(p["id"], p["prompt"]) for p in lines] == [(1, "ROMEO:"), (3, "KING HENRY")]
    assert result["tokens"] == 10 and all(p["completions"][0]["num_tokens"] == 5 for p in lines)

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "ROMEO:"}) + "\n" + json.dumps({"prompt": "ROMEO " * 5, "max_new_tokens": 5})
                    + "\n")
    out2 = tmp_path / "c2.jsonl"
    with pytest.raises(UserError, match=r"long.jsonl:2: prompt of 30 tokens \+ max_new_tokens=5 exceeds the model's "
                                        r"context of 32 tokens"):
        method.infer(_cfg(long, out2))
    assert not out2.exists()
    # without its own max_new_tokens a request stops at the context (the group's default is for prompt=...)
    long.write_text(json.dumps({"prompt": "ROMEO " * 5}) + "\n")
    method.infer(_cfg(long, out2, greedy=True))
    done = json.loads(out2.read_text(encoding="utf-8"))["completions"][0]
    assert done["num_tokens"] == 2 and done["finish_reason"] == "length"
    long.write_text(json.dumps({"prompt": "ROMEO " * 6}) + "\n")  # 36 tokens: the prompt alone is too long
    with pytest.raises(UserError, match=r"long.jsonl:1: prompt of 36 tokens"):
        method.infer(_cfg(long, tmp_path / "c3.jsonl"))
    with pytest.raises(UserError, match="generation.num_beams=2 does not apply"):
        method.infer(_cfg(text, out2, num_beams=2))


@pytest.mark.parametrize("content, message", [
    ("", "has no requests"),
    ("\n\n", "has no requests"),
    ('["ROMEO:"]\n', r"p.jsonl:1: a request is a JSON object"),
    ('{"id": 3}\n', r'p.jsonl:1: "prompt" must be a non-empty string'),
    ('{"prompt": "A", "top_p": 1.5}\n', r"p.jsonl:1: top_p=1.5 must be in \(0, 1\]"),
    ('{"prompt": "A", "num_samples": 0}\n', r"p.jsonl:1: num_samples=0 must be an integer >= 1"),
    ('{"prompt": "A", "stop_strings": 3}\n', r"p.jsonl:1: stop_strings=3 must be"),
    ('{"prompt": "A", "greedy": "yes"}\n', r"p.jsonl:1: greedy='yes' must be true or false"),
    ('{"prompt": "ROMEO:"}\n{"prompt": "A" * 40}\n', r"p.jsonl:2: not a JSON object"),
])
def test_read_requests_rejects(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_requests(path, {"max_new_tokens": 5})


def test_read_requests_missing_file_and_defaults(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_requests(tmp_path / "nope.jsonl")
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "A", "temperature": 0.5}\n', encoding="utf-8")
    [r] = read_requests(path, {"max_new_tokens": 5, "temperature": 0.8, "top_k": 200, "num_beams": 1, "gamma": 4})
    assert (r.id, r.params.max_new_tokens, r.params.temperature, r.params.top_k) == (1, 5, 0.5, 200)
