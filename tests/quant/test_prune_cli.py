"""`prune` through the CLI: `llmlab train prune=wanda model.init_from=<tiny trained run>` writes a plain
checkpoint whose pruned weights stayed zero through its optimizer steps, `llmlab eval` reads its 50 %
sparsity, `llmlab eval prune=curve` writes the perplexity-vs-sparsity CSV/PNG/metrics, and bad input
(amount outside [0, 1), the curve in training, pruning under a tuner) is one line with nothing written.
All commands run in one Python process (tests/test_peft_e2e.py's harness)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CLI harness of test_peft_e2e
from test_cli_errors import assert_user_error  # noqa: E402
from test_peft_e2e import QUIET, data_args, llmlab_batch  # noqa: E402

MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "optim.scheduler.warmup_steps=0"]
LEAVES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_prune_train_eval_curve_and_bad_input(tmp_path, small_corpus):
    data = data_args(small_corpus)
    base, pruned, evaluated, curve, *bad = llmlab_batch(
        tmp_path,
        ["train", *data, *MODEL, "trainer.max_steps=10", "trainer.val_check_interval=10", *QUIET],
        ["train", *data, "model.init_from={run0}", "prune=wanda", "prune.amount=0.5", "prune.calibration_batches=2",
         "trainer.max_steps=3", "trainer.val_check_interval=3", *QUIET],
        ["eval", "ckpt_path={run1}", "limit_batches=2"],
        ["eval", "ckpt_path={run0}", "prune=curve", "prune.methods=[magnitude,wanda,heads]", "prune.amounts=[0.0,0.5]",
         "prune.calibration_batches=2", "limit_batches=2"],
        ["train", *data, "model.init_from={run0}", "prune=wanda", "prune.amount=1.0"],
        ["train", *data, "model.init_from={run0}", "prune=magnitude", "prune.amount=-0.1"],
        ["eval", "ckpt_path={run0}", "prune=magnitude", "prune.amount=1.0"],
        ["train", *data, "model.init_from={run0}", "prune=curve", "trainer.max_steps=2", *QUIET],
        ["train", *data, "model.init_from={run0}", "prune=magnitude", "peft=lora", "trainer.max_steps=2", *QUIET],
    )
    base.ok()

    # train: 3 AdamW steps after one-shot Wanda; every row of every block Linear is still exactly half zeros
    metrics = json.loads((pruned.ok().run / "metrics.json").read_text())
    assert metrics["prune/sparsity"] == 0.5 and metrics["train/sparsity"] == 0.5
    state = torch.load(pruned.run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.endswith(("_mask", "_orig")) for k in state)  # plain GPT weights
    dense = torch.load(base.run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    for i in range(2):
        for leaf in LEAVES:
            w = state[f"model.transformer.h.{i}.{leaf}.weight"]
            assert torch.equal(w.eq(0).sum(1), torch.full((w.size(0),), w.size(1) // 2)), leaf
            kept = w.ne(0)
            assert not torch.equal(w[kept], dense[f"model.transformer.h.{i}.{leaf}.weight"][kept])  # they trained
    assert state["model.transformer.wte.weight"].ne(0).all()  # embeddings (and the tied head) untouched

    # eval of the pruned run: its sparsity is reported without pruning again
    assert json.loads((evaluated.ok().run / "metrics.json").read_text())["prune/sparsity"] == 0.5

    # the curve: every (method, amount), then the dense model scored as usual
    rows = list(csv.DictReader((curve.ok().run / "prune_curve.csv").open()))
    assert [(r["method"], float(r["amount"])) for r in rows] == [(m, a) for m in ("magnitude", "wanda", "heads")
                                                                  for a in (0.0, 0.5)]
    assert (curve.run / "prune_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cm = json.loads((curve.run / "metrics.json").read_text())
    assert cm["prune/wanda@0.50/sparsity"] == cm["prune/magnitude@0.50/sparsity"] == 0.5
    assert cm["prune/heads@0.50/sparsity"] == 0.5  # 2 of 4 heads: half of c_attn and c_proj
    for m in ("magnitude", "wanda", "heads"):
        assert cm[f"prune/{m}@0.00/test/ppl"] == pytest.approx(cm["test/ppl"], rel=1e-6)  # dense weights restored
        assert cm[f"prune/{m}@0.50/test/ppl"] > cm["test/ppl"]
    assert "prune/sparsity" not in cm

    # bad input: one line, exit 2, no run written
    for result, needles in zip(bad, [["prune.amount=1.0", "[0, 1)"], ["prune.amount=-0.1", "[0, 1)"],
                                     ["prune.amount=1.0", "[0, 1)"], ["prune=curve", "llmlab eval"],
                                     ["peft=lora", "prune with peft=none"]]):
        assert_user_error(result, *needles)
    for r in bad:  # nothing but Hydra's record of the command line
        assert r.run_dir is None or {p.name for p in r.run.iterdir()} <= {".hydra", "train.log", "eval.log"}, r.argv
