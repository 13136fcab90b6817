"""T5 through the real CLI: train a few steps of span corruption -> eval -> infer (fill spans)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_dirs

pytestmark = pytest.mark.slow


def small(corpus, tokenizer: str = "tokenizer.vocab_size=512") -> list[str]:
    return ["experiment=t5_shakespeare", "data=text", f"data.path={corpus}", tokenizer,
            "method.input_length=32", "model.d_model=32", "model.d_kv=16", "model.num_heads=2", "model.d_ff=64",
            "data.batch_size=8", "data.eval_batch_size=16", "trainer.enable_model_summary=false", "logger=csv"]


def test_train_eval_infer_round_trip(run_cli, small_corpus):
    run_cli("train", *small(small_corpus), "debug=limit")
    run = run_dirs(run_cli.root)[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("val", "test"):
        assert metrics[f"{split}/ppl"] == pytest.approx(math.exp(metrics[f"{split}/loss"]), rel=1e-4)
        assert 0.0 <= metrics[f"{split}/acc_text"] <= metrics[f"{split}/acc"] <= 1.0  # sentinels and EOS are easy
    assert metrics["val/loss"] < metrics["val/loss_untrained"] <= math.log(512) + 1.0  # starts near ln V
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "hf" / "config.json").is_file()

    run_cli("eval", "ckpt_path=last", "limit_batches=2")  # the 2 test batches debug=limit scored
    evaluated = json.loads((run_dirs(run_cli.root, "eval")[-1] / "metrics.json").read_text())
    for key in ("test/loss", "test/ppl", "test/acc", "test/acc_text"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-4), key

    # as the shell hands it over (quotes removed): llmlab quotes prose values for Hydra's grammar
    proc = run_cli("infer", "ckpt_path=last", "text=Thank you <extra_id_0> me to your party <extra_id_1> week.",
                   "generation.max_new_tokens=12")
    lines = {l.split(":", 1)[0]: l.split(":", 1)[1].strip() for l in proc.stdout.splitlines() if ":" in l}
    assert lines["input"] == "Thank you <extra_id_0> me to your party <extra_id_1> week."
    assert "target" in lines
    filled = lines["filled"]
    assert "<extra_id" not in filled and filled.startswith("Thank you") and filled.endswith("week.")
    saved = json.loads((run_dirs(run_cli.root, "infer")[-1] / "t5_fill.json").read_text())
    assert saved["filled"] == filled

    proc = run_cli("infer", "ckpt_path=last", "text=no sentinel in here", check=False)
    assert proc.returncode == 2 and "<extra_id_0>" in proc.stderr and "Traceback" not in proc.stderr


def test_t5_needs_its_tokenizer(run_cli, small_corpus):
    proc = run_cli("train", *small(small_corpus, tokenizer="tokenizer=char"), "debug=fdr", check=False)
    errors = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "tokenizer=t5" in errors[0], proc.stderr
