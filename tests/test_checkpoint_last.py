"""last.ckpt is the last state even when the last validation is not the best (llmlab.callbacks.ModelCheckpoint;
Lightning 2.6 alone refreshed it only together with a new best.ckpt)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, run_dirs

pytestmark = pytest.mark.xdist_group("peft_e2e")


def test_last_ckpt_follows_validations_that_are_not_the_best(run_cli, small_corpus):
    # monitoring tokens_seen with mode=min makes the first validation the only best one, deterministically
    run_cli("train", "data=text", f"data.path={small_corpus}", *TINY, "callbacks.progress.kind=plain",
            "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=1",
            "callbacks.model_checkpoint.monitor=train/tokens_seen", "callbacks.model_checkpoint.mode=min", "test=false")
    checkpoints = run_dirs(run_cli.root)[-1] / "checkpoints"
    best = torch.load(checkpoints / "best.ckpt", weights_only=True)
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (best["global_step"], last["global_step"]) == (10, 20)
    assert (best["llmlab"]["tokens_seen"], last["llmlab"]["tokens_seen"]) == (10 * 8 * 32, 20 * 8 * 32)
    assert any(not torch.equal(last["state_dict"][k], v) for k, v in best["state_dict"].items())
