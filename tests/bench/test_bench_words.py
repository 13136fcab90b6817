"""`llmlab bench word2vec --quick` and `llmlab bench glove --quick`: both implementations in the table,
finite metrics, a positive speed ratio, passing checks, and the .md + .json outputs.

Timings themselves are not asserted (they depend on the machine and its load).
"""

from __future__ import annotations

import json
import math
import re

import pytest
from bench_helpers import run_main

# one thread: OpenMP's spinning makes 2 threads crawl when other tests share the 2 cores
QUICK = ["--quick", "--threads", "1"]
HEADER = "| implementation | variant | seeds |"


def table(text: str) -> list[dict[str, str]]:
    """The Markdown table's rows as {column: cell}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines and lines[0].startswith(HEADER), text
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def mean(cell: str) -> float:
    """The mean of a '0.123' or '0.123 ± 0.004' cell (thousands separators allowed)."""
    return float(re.match(r"-?[0-9][0-9,]*(\.[0-9]+)?", cell).group(0).replace(",", ""))


def check_quick_run(module, tmp_path, reference: str) -> tuple[list[dict[str, str]], dict, str]:
    out = tmp_path / "sub" / "bench"
    stdout, stderr, code = run_main(module, [*QUICK, "--out", str(out)])
    assert code == 0, stdout + stderr
    rows = table(stdout)
    impls = {r["implementation"] for r in rows}
    assert impls == {reference, "llmlab"}, rows
    for r in rows:
        for col in ("train s", "words/s", "ratio"):
            assert mean(r[col]) > 0, (r, col)
        for col in ("WS353 ρ", "SimLex ρ", "analogy acc"):
            assert math.isfinite(mean(r[col])), (r, col)
        assert mean(r["analogies covered"]) > 0, r
    assert "**throughput**" in stdout and "**quality**" in stdout
    assert "MISMATCH" not in stdout

    md, js = out.with_name("bench.md"), out.with_name("bench.json")
    assert md.read_text(encoding="utf-8") == stdout
    record = json.loads(js.read_text(encoding="utf-8"))
    assert record["args"]["quick"] is True and record["args"]["seeds"] == 1
    assert {r["impl"] for r in record["runs"]} == {reference, "llmlab"}
    assert all(c["ok"] for c in record["checks"]) and record["checks"]
    for run in record["runs"]:
        assert run["train_s"] > 0 and math.isfinite(run["metrics"]["ws353/spearman"])
    return rows, record, stdout


def test_word2vec_quick(tmp_path):
    pytest.importorskip("gensim")
    from llmlab.bench import word2vec as bench

    rows, record, stdout = check_quick_run(bench, tmp_path, "gensim")
    assert [r["variant"] for r in rows] == [bench.MAIN, bench.MAIN]
    assert record["corpus"]["plays"] == 5 and record["args"]["epochs"] == 1
    names = " ".join(c["name"] for c in record["checks"])
    assert "vocabulary" in names and "WS353 cross-check" in names


def test_glove_quick(tmp_path):
    pytest.importorskip("glove")
    from llmlab.bench import glove as bench

    rows, record, stdout = check_quick_run(bench, tmp_path, "glove-python")
    assert [(r["implementation"], r["variant"]) for r in rows] == [
        ("glove-python", bench.REF_VARIANT), ("llmlab", bench.OURS), ("llmlab", bench.OURS_W)
    ]
    assert record["args"]["epochs"] == 2
    co = record["cooccurrence"]
    # glove-python: upper triangle only (with duplicate entries); llmlab: both triangles + diagonal
    assert co["llmlab_entries"] == 2 * co["glove_python_pairs"] + co["llmlab_diagonal"]
    assert co["glove_python_entries"] >= co["glove_python_pairs"]
    assert "upper triangle" in stdout


def test_cli_registry_and_help(capsys):
    from llmlab import cli
    from llmlab.bench import glove, word2vec

    assert cli.BENCHES["word2vec"] == "llmlab.bench.word2vec" and cli.BENCHES["glove"] == "llmlab.bench.glove"
    for module in (word2vec, glove):
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        assert e.value.code == 0
        assert "--quick" in capsys.readouterr().out
        with pytest.raises(SystemExit) as e:
            module.main(["--nope"])
        assert e.value.code == 2


def test_bad_numbers_are_user_errors():
    from llmlab.bench import word2vec
    from llmlab.errors import UserError

    for argv in (["--seeds", "0"], ["--plays", "39"], ["--epochs", "0"]):
        with pytest.raises(UserError):
            word2vec.resolve_args(word2vec.build_parser().parse_args(argv))


def test_out_paths_and_verdicts():
    from pathlib import Path

    from llmlab.bench.common import WordRun, out_paths, summarize, verdicts

    assert out_paths(Path("a/b.md")) == (Path("a/b.md"), Path("a/b.json"))
    assert out_paths(Path("a/b")) == (Path("a/b.md"), Path("a/b.json"))
    metrics = {"ws353/spearman": 0.30, "simlex/spearman": 0.10, "analogy/total": 0.05, "analogy/covered": 10.0}
    worse = dict(metrics, **{"ws353/spearman": 0.10})
    runs = [WordRun("ref", "v", s, 1.0, 1.0, 100.0, metrics) for s in (0, 1, 2)]
    runs += [WordRun("llmlab", "v", s, 1.0, 2.0, 50.0 + s, worse) for s in (0, 1, 2)]
    ref, ours = summarize(runs, reference="ref")
    assert ref.ratio == 1.0 and ours.ratio == pytest.approx(0.51)
    throughput, quality = verdicts(ours, ref)
    assert throughput["ok"] and not quality["ok"] and "BELOW" in quality["detail"]
