"""method=reward: last-real-token pooling under right and left padding, the Bradley–Terry loss, a reward model
that learns a marker token, frozen backbone, the scoring API, and experiment=reward_sentiment through the CLI
(fast_dev_run, then infer and eval of a short run)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from llmlab.errors import UserError
from llmlab.methods.classify import last_token_index, pool_last
from llmlab.methods.reward import RewardModel
from llmlab.models.gpt import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CLI harness of test_peft_e2e

V, PAD, MARK = 12, 0, 3  # toy vocabulary: 0 = pad/EOS, 3 = the marker chosen responses contain


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"vocab_size": V, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32, **kw}))


def right_pad(rows):
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def left_pad(rows):
    from llmlab.alignment.rollout import left_pad as lp

    return lp(rows, PAD)


def pair_batch(chosen, rejected):
    ids, mask = right_pad(chosen + rejected)
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------- pooling


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(right).tolist() == [2, 4, 0]  # len - 1 per row
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(left).tolist() == [4, 4, 4]  # the last real token (the seed's sum - 1 gives 2, 4, 0)
    h = torch.arange(3 * 5 * 2, dtype=torch.float).view(3, 5, 2)
    assert torch.equal(pool_last(h, right), h[[0, 1, 2], [2, 4, 0]])


def test_left_and_right_padded_batches_give_the_same_rewards():
    rm = RewardModel({"model": tiny_gpt()}).eval()
    rows = [[5, 6, 7, 8, 9, 1], [4, 2], [7, 7, 7, 1], [9]]
    with torch.no_grad():
        alone = torch.stack([rm(torch.tensor([r]))[0] for r in rows])  # no padding at all
        right, left = rm(*right_pad(rows)), rm(*left_pad(rows))
    torch.testing.assert_close(right, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-5)
    assert rm.score_ids(*left_pad(rows)).shape == (4,)


# ---------------------------------------------------------------------------- the loss


def test_bradley_terry_is_ln2_at_equal_rewards_and_matches_trl():
    rm = RewardModel({"model": tiny_gpt()}, center_rewards_coefficient=0.01)
    same = [[5, 6, 7, 1], [8, 9, 1]]
    step = rm.model_step(pair_batch(same, same))  # chosen == rejected: equal rewards
    r = rm(*right_pad(same)).detach()
    assert step.loss.item() == pytest.approx(math.log(2) + 0.01 * float((2 * r).pow(2).mean()), abs=1e-6)
    assert float(step.metrics["accuracy"][0]) == 0.0 and step.n_tokens == 2

    chosen, rejected = [[5, 6, 1], [4, 4, 4, 1]], [[5, 7, 1], [2, 1]]
    step = rm.model_step(pair_batch(chosen, rejected))
    with torch.no_grad():
        rc, rr = rm(*right_pad(chosen)), rm(*right_pad(rejected))
    trl = -torch.nn.functional.logsigmoid(rc - rr).mean() + 0.01 * torch.mean((rc + rr) ** 2)  # RewardTrainer.compute_loss
    assert step.loss.item() == pytest.approx(trl.item(), abs=1e-6)
    assert float(step.metrics["margin"][0]) == pytest.approx(float((rc - rr).mean()), abs=1e-6)


# ---------------------------------------------------------------------------- learning


def marker_pairs(n: int, gen: torch.Generator):
    """Prompt of 2-5 random tokens, a response of 3-6 tokens + EOS; chosen has the marker at a random place."""
    chosen, rejected = [], []
    for _ in range(n):
        prompt = torch.randint(4, V, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist()
        resp = torch.randint(4, V, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
        marked = list(resp)
        marked[int(torch.randint(0, len(resp), (1,), generator=gen))] = MARK
        chosen.append(prompt + marked + [PAD])
        rejected.append(prompt + resp + [PAD])
    return chosen, rejected


def train(rm: RewardModel, steps: int, lr: float = 3e-3) -> None:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=lr)
    rm.train()
    for _ in range(steps):
        loss = rm.model_step(pair_batch(*marker_pairs(32, gen))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_reward_model_learns_the_marker_token(head):
    rm = RewardModel({"model": tiny_gpt()}, head=head)
    held_out = pair_batch(*marker_pairs(200, torch.Generator().manual_seed(99)))
    with torch.no_grad():
        assert float(rm.eval().model_step(held_out).loss) == pytest.approx(math.log(2), abs=0.02)  # untrained: ~ln 2
    train(rm, 120)
    with torch.no_grad():
        step = rm.eval().model_step(held_out)
    assert float(step.metrics["accuracy"][0]) >= 0.95 and float(step.loss) < 0.2


def test_frozen_backbone_trains_the_head_only_and_mlp_width_comes_from_the_model():
    gpt = tiny_gpt(n_embd=48, tie_embeddings=False)
    before = {k: v.clone() for k, v in gpt.state_dict().items()}
    rm = RewardModel({"model": gpt}, head="mlp", head_hidden=16, freeze_backbone=True)
    assert rm.head[0].in_features == 48  # n_embd, not the seed's hard-coded 768
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n in trainable)
    train(rm, 3)
    assert all(torch.equal(before[k], v) for k, v in gpt.state_dict().items())
    rm = RewardModel({"model": tiny_gpt(tie_embeddings=False)})  # trainable backbone: the unused LM head is frozen
    assert not rm.model.lm_head.weight.requires_grad and rm.model.transformer.wte.weight.requires_grad


def test_bad_settings_are_one_line():
    with pytest.raises(UserError, match="method.head="):
        RewardModel({"model": tiny_gpt()}, head="tanh")
    with pytest.raises(UserError, match="head_dropout"):
        RewardModel({"model": tiny_gpt()}, head="mlp", head_dropout=1.5)


# ---------------------------------------------------------------------------- through the CLI

QUIET = ["trainer.enable_model_summary=false", "callbacks.progress.kind=plain", "callbacks.samples.max_new_tokens=8",
         "generation.max_new_tokens=8"]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "data.batch_size=8", "data.eval_batch_size=32"]


def test_reward_sentiment_fast_dev_run_then_train_infer_eval(tmp_path):
    from test_peft_e2e import llmlab_batch

    fdr, run, infer_good, infer_bad, evaluated = llmlab_batch(
        tmp_path,
        ["train", "experiment=reward_sentiment", *TINY, *QUIET, "trainer.fast_dev_run=true"],
        ["train", "experiment=reward_sentiment", *TINY, *QUIET, "trainer.max_steps=10", "trainer.val_check_interval=10",
         "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"],
        ["infer", "ckpt_path={run1}", "prompt=The day", "text= was wonderful, lovely and happy."],
        ["infer", "ckpt_path={run1}", "prompt=The day"],
        ["eval", "ckpt_path={run1}", "limit_batches=2"])
    fdr.ok()
    metrics = json.loads((run.ok().run / "metrics.json").read_text())
    assert {"test/accuracy", "test/margin", "test/loss", "val/accuracy"} <= set(metrics)
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    line = [x for x in infer_good.ok().output.splitlines() if x.startswith("reward: ")]
    assert len(line) == 1 and math.isfinite(float(line[0].split()[1]))
    assert infer_bad.returncode == 2 and "text=" in infer_bad.stderr.strip().splitlines()[-1]
    scored = json.loads((evaluated.ok().run / "metrics.json").read_text())
    assert "test/accuracy" in scored and "test/ppl" not in scored

    # the scoring API of PPO's reward=model agrees with the infer line and with training's encoding
    from omegaconf import OmegaConf

    from llmlab.checkpoint import load_method
    from llmlab.tasks.common import build_data

    rm, meta = load_method(run.run)
    r = rm.score_texts(["The day"], [" was wonderful, lovely and happy."])
    assert float(line[0].split()[1]) == pytest.approx(float(r[0]), abs=1e-4)
    data, _ = build_data(OmegaConf.create(meta["config"]["data"]), tokenizer_state=meta["tokenizer"])
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    pairs = data.pairs("test")[:4]
    n = batch["input_ids"].size(0) // 2
    with torch.no_grad():
        trained = rm.eval()(batch["input_ids"], batch["attention_mask"])
    scored = rm.score_texts([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    torch.testing.assert_close(scored, torch.cat([trained[:4], trained[n:n + 4]]), rtol=0, atol=1e-5)
