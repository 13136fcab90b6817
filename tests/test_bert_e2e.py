"""BERT through the real CLI: WordPiece + NSP/MLM data → train a few steps → eval → fill-mask infer."""

from __future__ import annotations

import json

import pytest

from conftest import run_dirs

pytestmark = pytest.mark.slow


def small(corpus) -> list[str]:
    return ["experiment=bert_shakespeare", "data=text", f"data.path={corpus}", "tokenizer.vocab_size=1000",
            "method.datamodule.max_seq_len=64", "method.datamodule.batch_size=8", "logger=csv"]


def test_train_eval_infer_round_trip(run_cli, small_corpus):
    run_cli("train", *small(small_corpus), "debug=limit")
    run = run_dirs(run_cli.root)[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert {f"{split}/loss", f"{split}/ppl", f"{split}/mlm_acc", f"{split}/nsp_loss", f"{split}/nsp_acc"} <= set(metrics)
        assert 0 <= metrics[f"{split}/mlm_acc"] <= 1 and 0 <= metrics[f"{split}/nsp_acc"] <= 1
    assert metrics["val/loss"] < metrics["val/loss_untrained"]
    assert "train/ppl" not in metrics  # MLM + NSP is not a token NLL

    run_cli("eval", "ckpt_path=last", "limit_batches=2")  # the test batches debug=limit scored
    evaluated = json.loads((run_dirs(run_cli.root, "eval")[-1] / "metrics.json").read_text())
    for key in ("test/loss", "test/mlm_acc", "test/nsp_acc"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-4), key

    proc = run_cli("infer", "ckpt_path=last", "text='the king is [MASK] and the queen is [MASK]'", "topn=3")
    fills = [line for line in proc.stdout.splitlines() if line.startswith("[MASK] #")]
    assert len(fills) == 2 and all(line.count(" (0.") == 3 for line in fills)
    proc = run_cli("infer", "ckpt_path=last", "text=no mask here", check=False)
    assert proc.returncode == 2 and "[MASK]" in proc.stderr and "Traceback" not in proc.stderr


def test_bert_needs_wordpiece(run_cli, small_corpus):
    proc = run_cli("train", *small(small_corpus)[:3], "tokenizer=char", "debug=fdr", check=False)
    assert proc.returncode == 2 and "tokenizer=wordpiece" in proc.stderr and "Traceback" not in proc.stderr
