"""`llmlab bench serving --quick`: the three servers produce the same greedy tokens; bad options are one line."""

from __future__ import annotations

import json

import pytest
from bench_helpers import run_main

from llmlab.bench import serving
from llmlab.errors import UserError


def test_quick_run_checks_pass_and_writes_outputs(tmp_path):
    out, err, code = run_main(serving, ["--quick", "--requests", "8", "--max-num-seqs", "3", "--hf-batch-size", "4",
                                        "--out", str(tmp_path / "s")])
    assert code == 0, err
    assert "continuous batching (llmlab Engine, max_num_seqs=3" in out and "static batches of 4" in out
    record = json.loads((tmp_path / "s.json").read_text())
    assert [c["ok"] for c in record["checks"]] == [True, True]  # engine == alone; HF == llmlab
    assert record["requests"] == 8 and record["useful_tokens"] >= 8 * 16  # --quick: max_new_tokens 16..24
    assert record["engine"]["peak_blocks"] > 0 and record["engine"]["kv_bytes"] < record["contiguous_bytes"]
    assert (tmp_path / "s.md").read_text() == out


def test_bad_options():
    with pytest.raises(UserError, match="--requests=0 must be >= 1"):
        serving.main(["--quick", "--requests", "0"])
    _, err, code = run_main(serving, ["--bogus"])
    assert code == 2 and err.strip().startswith("error: llmlab bench serving: unrecognized arguments: --bogus")
