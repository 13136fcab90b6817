"""`llmlab bench speculative` on tiny random models (no training): the table, the JSON, the greedy checks
(llmlab and HF assisted generation), and a bad option as one line."""

from __future__ import annotations

import json

import pytest
import torch
from bench_helpers import run_main

from llmlab.bench import speculative as bench
from llmlab.data.corpora import load_corpus
from llmlab.data.tokenizers import CharTokenizer
from llmlab.errors import UserError
from llmlab.models.gpt import GPT, GPTConfig


def test_tiny_bench_writes_the_table_and_its_checks_pass(tmp_path, monkeypatch):
    tok = CharTokenizer.train(load_corpus("shakespeare")[:1])

    def tiny(seed: int, n_layer: int) -> GPT:
        torch.manual_seed(seed)
        return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=n_layer, n_head=2, n_embd=32,
                             init_std=0.3)).eval()

    target = tiny(0, 2)
    draft = tiny(0, 1)
    draft.load_state_dict(target.state_dict(), strict=False)  # shares the embeddings: a draft that half agrees
    monkeypatch.setattr(bench, "load_models", lambda args: (target, draft, tok, "tiny-target", "tiny-draft"))
    argv = ["--gamma", "1", "3", "--temperature", "1.0", "0", "--prompts", "1", "--prompt-len", "8",
            "--max-new-tokens", "12", "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path)]
    stdout, stderr, code = run_main(bench, argv)
    assert code == 0, stdout + stderr
    record = json.loads((tmp_path / "speculative.json").read_text())
    assert [(r["temperature"], r["gamma"]) for r in record["rows"]] == [(1.0, 1), (1.0, 3), (0.0, 1), (0.0, 3)]
    for r in record["rows"]:
        assert 1.0 <= r["tokens_per_target_call"] <= r["gamma"] + 1 and 0.0 <= r["alpha"] <= 1.0
        assert r["speedup_llmlab"] > 0 and r["speedup_hf"] > 0 and r["c"] > 0
    assert [c["ok"] for c in record["checks"]] == [True, True]  # llmlab and HF greedy = the target's greedy
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert (tmp_path / "speculative.md").read_text() == stdout and len(rows) == 5  # header + 4 rows
    assert (tmp_path / "speculative.png").stat().st_size > 10_000  # the speed-up plot

    with pytest.raises(UserError, match="--gamma=0 must be an integer >= 1"):  # the CLI prints it as one line, exit 2
        run_main(bench, ["--gamma", "0"])
    stdout, stderr, code = run_main(bench, ["--gamma", "two"])
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "--gamma" in stderr
