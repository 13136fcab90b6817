"""`llmlab bench bert --quick` and `llmlab bench t5 --quick`: every row with positive numbers, passing
parity checks, the .md + .json outputs, and bad arguments as one line with exit code 2.

Timings themselves are not asserted (they depend on the machine and its load).
"""

from __future__ import annotations

import json

import pytest
from bench_helpers import check_lines, number, run_main, table_rows

pytest.importorskip("transformers")

from llmlab.bench import bert, t5  # noqa: E402

# one thread: OpenMP's spinning makes 2 threads crawl when other tests share the 2 cores
QUICK = ["--quick", "--threads", "1"]
MODULES = {"bert": bert, "t5": t5}
# a table row's label starts with the first string and ends with the second
ROWS = {
    "bert": [
        ("train tok/s (", ", llmlab masked-only logits"),
        ("train tok/s (", ", llmlab full logits"),
        ("inference tok/s (", ", forward, no grad"),
    ],
    "t5": [("train tok/s (", ")"), ("generate tok/s (", "greedy, KV cache)")],
}
CHECKS = {
    "bert": [
        "initial loss (MLM + NSP, llmlab masked-only)",
        "training losses (MLM + NSP, llmlab masked-only, 3 steps",
        "initial loss (MLM + NSP, llmlab full logits)",
        "training losses (MLM + NSP, llmlab full logits, 3 steps",
        "MLM and NSP logits at init",
    ],
    "t5": ["initial loss (span corruption)", "training losses (span corruption, 3 steps", "greedy tokens (8 new)"],
}


@pytest.fixture(scope="module", params=list(MODULES))
def quick_run(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(f"bench_{name}") / "sub" / f"{name}.md"
    stdout, stderr, code = run_main(MODULES[name], [*QUICK, "--out", str(out)])
    return name, stdout, stderr, code, out


def test_quick_table_has_all_rows_with_positive_numbers(quick_run):
    name, stdout, stderr, code, _ = quick_run
    assert code == 0, stdout + stderr
    rows = table_rows(stdout)
    assert len(rows) == len(ROWS[name]), rows
    for start, end in ROWS[name]:
        matches = [label for label in rows if label.startswith(start) and label.endswith(end)]
        assert len(matches) == 1, (start, end, list(rows))
        for cell in rows[matches[0]]:
            assert number(cell) > 0, (matches[0], cell)
    assert "| benchmark | llmlab | transformers | ratio (llmlab / HF) |" in stdout


def test_quick_parity_checks_ok(quick_run):
    name, stdout, _, _, _ = quick_run
    assert "torch " in stdout and "transformers " in stdout and "1 thread," in stdout
    checks = check_lines(stdout)
    assert len(checks) == len(CHECKS[name]), checks
    for expected in CHECKS[name]:
        assert any(line.startswith(f"- {expected}") for line in checks), (expected, checks)
    for line in checks:
        assert line.endswith("— ok"), line
    assert "MISMATCH" not in stdout


def test_out_files_hold_the_table_and_the_record(quick_run):
    name, stdout, _, _, out = quick_run
    assert table_rows(out.read_text(encoding="utf-8")) == table_rows(stdout)
    record = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert record["bench"] == name and record["ok"] is True and record["args"]["quick"] is True
    assert [r["label"] for r in record["rows"]] == list(table_rows(stdout))
    assert all(r["ratio"] > 0 for r in record["rows"])
    assert all(c["ok"] for c in record["checks"])


def test_greedy_mismatch_names_the_first_differing_token():
    ours, _ = t5.make_pair(t5.QUICK_SETUP, "v1.1", seed=0)
    x = t5.make_batches(t5.QUICK_SETUP, 1, seed=1)[0]["input_ids"][:1]
    ref = ours.generate(x, max_new_tokens=6, eos_token_id=None)
    bad = ref.clone()
    bad[0, 4] = (bad[0, 4] + 1) % t5.QUICK_SETUP.vocab_size  # the 4th new token (index 3)
    check = t5._greedy_parity(ours, x, {"llmlab": ref, "transformers": bad})
    assert not check.ok and "first at new token 3" in check.detail and "top-2 logit gap" in check.detail
    assert t5._greedy_parity(ours, x, {"llmlab": ref, "transformers": ref.clone()}).ok


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["bert", "--steps", "0"], "--steps=0 must be >= 1"),
        (["bert", "--threads", "two"], "invalid int value: 'two'"),
        (["bert", "--nope"], "unrecognized arguments: --nope"),
        (["t5", "--arch", "v2"], "invalid choice: 'v2'"),
        (["t5", "--gen-tokens", "0"], "--gen-tokens=0 must be >= 1"),
        (["t5", "--lr", "-1"], "--lr=-1.0 must be > 0"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, problem):
    from llmlab import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


def test_cli_registry_and_help(capsys):
    from llmlab import cli

    assert cli.BENCHES["bert"] == "llmlab.bench.bert" and cli.BENCHES["t5"] == "llmlab.bench.t5"
    for module in MODULES.values():
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        assert "--quick" in capsys.readouterr().out
