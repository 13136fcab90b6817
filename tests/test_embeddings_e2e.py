"""word2vec and GloVe through the real CLI: train → eval → infer, exports, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cli_env, run_dirs

pytestmark = pytest.mark.slow


def small(corpus, experiment: str) -> list[str]:
    return [f"experiment={experiment}", "data=text", f"data.path={corpus}", "method.min_count=3",
            "method.vector_size=24", "trainer.max_epochs=2", "logger=csv"]


@pytest.fixture(scope="module")
def trained_word2vec(tmp_path_factory, small_corpus):
    """One epoch of word2vec trained once per test worker; call it with a root to copy the run there."""
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("word2vec_run")
    subprocess.run([sys.executable, "-m", "llmlab.cli", "train", *small(small_corpus, "word2vec_shakespeare"),
                    "trainer.max_epochs=1"], cwd=root, env=cli_env(root), check=True, capture_output=True)

    def copy_to(dest):
        shutil.copytree(root / "outputs", dest / "outputs", dirs_exist_ok=True)

    return copy_to


@pytest.mark.parametrize("experiment", ["word2vec_shakespeare", "glove_shakespeare"])
def test_train_eval_infer_round_trip(run_cli, small_corpus, experiment):
    from gensim.models import KeyedVectors

    run_cli("train", *small(small_corpus, experiment))
    run = run_dirs(run_cli.root)[-1]
    for name in ("checkpoints/last.ckpt", "metrics.json", "vectors.txt", "vectors.bin", "embeddings_pca.png",
                 "metrics.csv", "loss.png"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/ws353_coverage"] > 0 and np.isfinite(metrics["train/loss"])

    # the exported files load in gensim and hold exactly the checkpoint's vectors
    from llmlab.checkpoint import load_method

    method, _ = load_method(run / "checkpoints" / "last.ckpt")
    vectors = method.vectors().detach().numpy()
    for binary, name in ((True, "vectors.bin"), (False, "vectors.txt")):
        kv = KeyedVectors.load_word2vec_format(str(run / name), binary=binary)
        assert kv.index_to_key == method.tokenizer.words
        assert np.array_equal(kv.vectors, vectors)

    proc = run_cli("eval", "ckpt_path=last")
    evaluated = json.loads((run_dirs(run_cli.root, "eval")[-1] / "metrics.json").read_text())
    assert {"ws353/spearman", "simlex/spearman", "analogy/total", "analogy/semantic", "analogy/syntactic"} <= set(evaluated)
    assert evaluated["ws353/spearman"] == pytest.approx(metrics["val/ws353"], abs=1e-6)
    assert "ws353" in proc.stdout

    proc = run_cli("infer", "ckpt_path=last", "query=King", "topn=5")
    lines = [l for l in proc.stdout.splitlines() if l.strip()[:2].strip().rstrip(".").isdigit()]
    assert len(lines) == 5 and "king" not in " ".join(l.split()[1] for l in lines)
    proc = run_cli("infer", "ckpt_path=last", "analogy=man:king::woman", "topn=3")
    assert "man : king :: woman : ?" in proc.stdout


def test_word2vec_variants_one_batch(run_cli, small_corpus):
    """CBOW + HS, the seed preset (Adam) and per-pair negatives compose and train."""
    for extra in (["method.sg=0", "method.hs=1", "method.negative=0"], ["method=word2vec_seed", "trainer.gradient_clip_val=5.0"],
                  ["method.shared_negatives=false"], ["method=glove_seed"]):
        exp = "glove_shakespeare" if "glove" in extra[0] else "word2vec_shakespeare"
        run_cli("train", *small(small_corpus, exp), "debug=fdr", *extra)


def test_resume_continues_the_epoch_count(run_cli, small_corpus):
    run_cli("train", *small(small_corpus, "word2vec_shakespeare"), "trainer.max_epochs=1")
    first = run_dirs(run_cli.root)[-1]
    run_cli("train", *small(small_corpus, "word2vec_shakespeare"), "trainer.max_epochs=2", "ckpt_path=last")
    second = run_dirs(run_cli.root)[-1]
    a = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["epoch"] == 0 and b["epoch"] == 1
    assert b["llmlab"]["tokens_seen"] > a["llmlab"]["tokens_seen"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["infer", "ckpt_path=last", "query=xyzzyq"], "not in the vocabulary"),
        (["infer", "ckpt_path=last", "analogy=man:king"], "a:b::c"),
        (["infer", "ckpt_path=last"], "query=WORD"),
        (["eval", "ckpt_path=last", "vectors.similarity=[/nonexistent/pairs.tsv]"], "pairs.tsv"),
    ],
)
def test_bad_queries_are_one_line_errors(run_cli, trained_word2vec, args, message):
    trained_word2vec(run_cli.root)  # its run under this test's outputs/: ckpt_path=last finds it
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_tokenizer_or_trainer_is_a_user_error(run_cli, small_corpus):
    proc = run_cli("train", "method=word2vec", "tokenizer=char", "data=text", f"data.path={small_corpus}", "debug=fdr",
                   check=False)
    assert proc.returncode == 2 and "tokenizer=word" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "method=word2vec", "trainer.gradient_clip_val=1.0", "data=text", f"data.path={small_corpus}",
                   "debug=fdr", check=False)  # word2vec.c's fused update cannot be clipped
    assert proc.returncode == 2 and "experiment=" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_with_the_users_own_benchmark_files(run_cli, trained_word2vec, tmp_path):
    trained_word2vec(run_cli.root)  # its run under this test's outputs/: ckpt_path=last finds it
    pairs = tmp_path / "mypairs.tsv"
    pairs.write_text("# my pairs\nking\tqueen\t9.0\nking\tsword\t3.0\nlord\tlady\t8.0\nxyzzy\tking\t1.0\n")
    analogies = tmp_path / "myanalogies.txt"
    analogies.write_text(": family\nking queen lord lady\nlord lady king queen\n")
    run_cli("eval", "ckpt_path=last", f"vectors.similarity=[{pairs}]", f"vectors.analogies={analogies}")
    metrics = json.loads((run_dirs(run_cli.root, "eval")[-1] / "metrics.json").read_text())
    assert metrics["mypairs/coverage"] == pytest.approx(0.75)  # the xyzzy pair is out of vocabulary
    assert -1 <= metrics["mypairs/spearman"] <= 1
    assert metrics["analogy/covered"] == 2 and 0 <= metrics["analogy/total"] <= 1


def test_word2vec_optuna_search(run_cli, small_corpus):
    import csv

    run_cli("train", "-m", *small(small_corpus, "word2vec_shakespeare"), "hparams_search=word2vec_optuna",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_epochs=1")
    sweep = next((run_cli.root / "outputs" / "train" / "multiruns").iterdir())
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()
