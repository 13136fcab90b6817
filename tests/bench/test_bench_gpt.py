"""`llmlab bench gpt --quick`: the table has every row, positive numbers, and passing parity checks.

Timings themselves are not asserted (they depend on the machine and its load).
"""

from __future__ import annotations

import importlib

import pytest
from bench_helpers import check_lines, number, table_rows
from bench_helpers import run_main as _run_main

pytest.importorskip("transformers")

from llmlab.bench import gpt as bench  # noqa: E402

# one thread: OpenMP's spinning makes 2 threads crawl when other tests share the 2 cores
QUICK = ["--quick", "--threads", "1"]
ROWS = [
    "train tok/s (bpe ",
    "train tok/s (char ",
    "generate tok/s, KV cache",
    "generate tok/s, no cache",
    "KV-cache speed-up (cache / no cache)",
    "char: generate tok/s, KV cache",  # the small presets' per-token overhead (llmlab's lean decode step)
    "char: generate tok/s, no cache",
]


def run_main(argv: list[str]) -> tuple[str, str, int]:
    return _run_main(bench, argv)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_file = tmp_path_factory.mktemp("bench") / "sub" / "bench.md"
    stdout, stderr, code = run_main([*QUICK, "--out", str(out_file)])
    return stdout, stderr, code, out_file


def test_quick_table_has_all_rows_with_positive_numbers(quick_run):
    stdout, stderr, code, _ = quick_run
    assert code == 0, stdout + stderr
    rows = table_rows(stdout)
    assert len(rows) == len(ROWS), rows
    for prefix in ROWS:
        matches = [label for label in rows if label.startswith(prefix)]
        assert len(matches) == 1, (prefix, list(rows))
        for cell in rows[matches[0]]:
            assert number(cell) > 0, (matches[0], cell)
    assert "| benchmark | llmlab | transformers | ratio (llmlab / HF) |" in stdout


def test_quick_parity_checks_ok(quick_run):
    stdout, _, _, _ = quick_run
    assert "torch " in stdout and "transformers " in stdout and "thread" in stdout
    checks = check_lines(stdout)
    names = " ".join(checks)
    for expected in ("initial loss (bpe)", "initial loss (char)", "training losses (bpe", "greedy tokens"):
        assert expected in names, checks
    for line in checks:
        assert line.endswith("— ok"), line
    assert "MISMATCH" not in stdout


def test_out_file_holds_the_table(quick_run):
    stdout, _, _, out_file = quick_run
    text = out_file.read_text(encoding="utf-8")
    assert table_rows(text) == table_rows(stdout)
    assert "Parity checks:" in text


def test_config_selection_and_no_generate():
    stdout, stderr, code = run_main([*QUICK, "--config", "char", "--no-generate"])
    assert code == 0, stdout + stderr
    labels = list(table_rows(stdout))
    assert len(labels) == 1 and labels[0].startswith("train tok/s (char "), labels


def test_greedy_mismatch_is_reported_loudly(monkeypatch):
    gen_mod = importlib.import_module("llmlab.inference.generate")  # the package re-exports the function
    real = gen_mod.generate

    def broken(model, idx, n, **kw):
        out = real(model, idx, n, **kw)
        if not kw.get("use_kv_cache", True):
            out[0, -1] = (out[0, -1] + 1) % model.config.vocab_size  # corrupt the last token
        return out

    monkeypatch.setattr(gen_mod, "generate", broken)
    stdout, stderr, code = run_main([*QUICK, "--no-train", "--gen-tokens", "6"])
    assert code == 1
    assert "MISMATCH" in stdout and "first at new token 5" in stdout
    assert "PARITY CHECK FAILED" in stderr


def test_help_and_bad_option(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["--config", "nope"])
    assert e.value.code == 2


def test_split_rounds():
    from llmlab.bench.vs_hf import split

    assert split(10, 3) == [4, 3, 3]
    assert sum(split(7, 7)) == 7


def test_contention_warning_only_when_other_processes_compete():
    import os

    from llmlab.bench.vs_hf import BenchResult

    crowded = BenchResult(header="h", threads=1, contention={"bpe train": (os.cpu_count() or 1) + 0.5})
    assert "WARNING: other processes" in crowded.markdown()
    calm = BenchResult(header="h", threads=1, contention={"bpe train": 0.0, "generate": None})
    assert "WARNING" not in calm.markdown()


def test_cpu_watch_measures_other_processes():
    from llmlab.bench.common import CpuWatch

    with CpuWatch() as watch:
        sum(range(2_000_000))
    assert watch.others is None or watch.others >= 0.0
