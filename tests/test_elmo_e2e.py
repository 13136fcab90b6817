"""ELMo through the real CLI: train a few steps → eval (both directions) → infer contextual neighbours."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_dirs

pytestmark = pytest.mark.slow


def small(corpus) -> list[str]:
    return ["experiment=elmo_shakespeare", "data=text", f"data.path={corpus}", "data.block_size=16",
            "data.batch_size=8", "model.lstm_dim=64", "model.projection_dim=32", "logger=csv"]


def test_train_eval_infer_round_trip(run_cli, small_corpus):
    run_cli("train", *small(small_corpus), "debug=limit")
    run = run_dirs(run_cli.root)[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        fwd, bwd = metrics[f"{split}/loss_fwd"], metrics[f"{split}/loss_bwd"]
        assert metrics[f"{split}/loss"] == pytest.approx((fwd + bwd) / 2, rel=1e-5)
        assert metrics[f"{split}/ppl_fwd"] == pytest.approx(torch.tensor(fwd).exp().item(), rel=1e-4)
    assert metrics["val/loss"] < metrics["val/loss_untrained"]

    run_cli("eval", "ckpt_path=last", "limit_batches=2")  # the 2 test batches debug=limit scored
    evaluated = json.loads((run_dirs(run_cli.root, "eval")[-1] / "metrics.json").read_text())
    for key in ("test/loss", "test/ppl_fwd", "test/ppl_bwd"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-4), key

    proc = run_cli("infer", "ckpt_path=last", "text=the king is zzyzzx", "topn=3")
    lines = [l for l in proc.stdout.splitlines() if l.strip()[:3].strip().rstrip(".").isdigit()]
    assert len(lines) == 4 and "zzyzzx" in lines[3] and "not in the vocabulary" in lines[3]
    saved = torch.load(run_dirs(run_cli.root, "infer")[-1] / "elmo_vectors.pt")
    assert saved["vectors"].shape == (4, 64) and torch.isfinite(saved["vectors"]).all()


def test_elmo_needs_words_and_a_sentence(run_cli, small_corpus):
    proc = run_cli("train", *small(small_corpus), "tokenizer=char", "debug=fdr", check=False)
    assert proc.returncode == 2 and "tokenizer=word" in proc.stderr and "Traceback" not in proc.stderr
