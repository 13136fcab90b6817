"""`llmlab bench peft --quick`: LoRA rows for both configurations, positive numbers, passing parity
checks (same trainable count as peft, same losses, base weights unchanged); a bad rank is one line.

Timings themselves are not asserted (they depend on the machine and its load).
"""

from __future__ import annotations

import pytest
from bench_helpers import check_lines, number, table_rows
from bench_helpers import run_main as _run_main

pytest.importorskip("peft")

from llmlab.bench import peft as bench  # noqa: E402


def test_quick_lora_bench_rows_and_parity():
    stdout, stderr, code = _run_main(bench, ["--quick", "--threads", "1", "--config", "char"])
    assert code == 0, stdout + stderr
    rows = table_rows(stdout)
    assert list(rows) and all(label.startswith("LoRA train tok/s (char ") for label in rows), rows
    assert all(number(cell) > 0 for cell in next(iter(rows.values())))
    checks = check_lines(stdout)
    assert len(checks) == 4, checks  # trainable count, initial loss, loss curve, base unchanged
    assert all(line.endswith("— ok") for line in checks), checks


def test_bad_rank_is_one_line():
    stdout, stderr, code = _run_main(bench, ["--quick", "--r", "0"])
    assert code == 2
    assert "--r=0" in stderr and len(stderr.strip().splitlines()) == 1, stderr
