"""method=ppo: a toy bandit is learned ("say token 7"), KL(pi||pi) = 0 and ratio 1 at step 0, the KL
penalty bounds the drift, the critic learns; scorers (VADER, arithmetic, a reward model of another
tokenizer = one line); preference data from a tiny policy; the experiment under fast_dev_run."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest, test_peft_e2e's harness
from test_peft_e2e import llmlab_batch  # noqa: E402

from llmlab.alignment.rewards import ArithmeticScorer, ModelScorer, VaderScorer, build_scorer  # noqa: E402
from llmlab.alignment.rollout import left_pad  # noqa: E402
from llmlab.data.tokenizers import CharTokenizer  # noqa: E402
from llmlab.errors import UserError  # noqa: E402
from llmlab.methods.ppo import PPO  # noqa: E402
from llmlab.models.gpt import GPT, GPTConfig  # noqa: E402

LETTERS = "abcdefghij"  # ids 0..9; <unk> 10, <|endoftext|> 11
TOK = CharTokenizer(LETTERS, eos=True)
SEVEN = LETTERS[7]  # the character of token 7


class SaysSeven:
    """The bandit's reward: 1 when the response contains token 7."""

    name = "token7"

    def __call__(self, prompts, responses, answers):
        return torch.tensor([float(SEVEN in r) for r in responses])


class Prompts(IterableDataset):
    """Endless batches of 1-3 random letters, PromptDataModule's batch format."""

    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            rows = [torch.randint(0, 10, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
                    for _ in range(self.batch_size)]
            ids, mask = left_pad(rows, TOK.eos_id)
            texts = [TOK.decode(r) for r in rows]
            yield {"prompt_ids": ids, "prompt_mask": mask, "prompts": texts, "raw": texts,
                   "answers": [None] * self.batch_size}


class Metrics(L.Callback):
    """Every iteration's logged train/* values."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def tiny_gpt(seed: int = 0, vocab: int = TOK.vocab_size) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))


def make_ppo(seed: int = 0, lr: float = 3e-3, **keys) -> PPO:
    gpt = tiny_gpt(seed)
    keys = {"response_length": 4, **keys}
    ppo = PPO({"model": gpt, "ref": copy.deepcopy(gpt)},
              {"optimizer": {"_target_": "torch.optim.AdamW", "lr": lr}, "scheduler": {"name": "constant"}}, **keys)
    ppo.attach_tokenizer(TOK)
    ppo.scorer = SaysSeven()
    ppo.run_config = {"generation": {"temperature": 1.0}}
    return ppo


def fit(ppo: PPO, steps: int) -> list[dict[str, float]]:
    L.seed_everything(0, verbose=False)
    metrics = Metrics()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[metrics])
    trainer.fit(ppo, train_dataloaders=DataLoader(Prompts(), batch_size=None))
    assert trainer.global_step == steps  # one Lightning step per PPO iteration
    return metrics.rows


def mean(rows, key, part):
    values = [r[key] for r in rows[part]]
    return sum(values) / len(values)


# ---------------------------------------------------------------------------- the bandit


def test_bandit_learns_token_7_with_bounded_kl():
    rows = fit(make_ppo(kl_coef=0.05), 25)
    start, end = mean(rows, "train/score", slice(0, 3)), mean(rows, "train/score", slice(-8, None))
    assert start < 0.5 and end > 0.85 and end > start + 0.4, (start, end)
    assert max(r["train/kl"] for r in rows) < 8.0  # the KL penalty keeps the drift bounded
    for key in ("score_std", "reward_total", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl",
                "kl_coef", "response_length"):
        assert f"train/{key}" in rows[-1]
    assert 1 <= rows[-1]["train/response_length"] <= 4


class FirstLetter:
    """A reward the policy cannot change but the critic can predict: 1 when the prompt starts with a-e."""

    name = "first_letter"

    def __call__(self, prompts, responses, answers):
        return torch.tensor([float(p[0] in "abcde") for p in prompts])


def test_value_head_learns_to_predict_the_returns():
    ppo = make_ppo(vf_coef=1.0)
    ppo.scorer = FirstLetter()
    rows = fit(ppo, 20)
    ev_start, ev_end = mean(rows, "train/value_explained_variance", slice(0, 3)), \
        mean(rows, "train/value_explained_variance", slice(-5, None))
    assert ev_start < 0.2 and ev_end > 0.6, (ev_start, ev_end)


def test_kl_coefficient_holds_the_policy_near_the_reference():
    free = fit(make_ppo(kl_coef=0.0, seed=1), 15)
    held = fit(make_ppo(kl_coef=1.0, seed=1), 15)
    kl_free, kl_held = mean(free, "train/kl", slice(-5, None)), mean(held, "train/kl", slice(-5, None))
    assert kl_held < 0.5 * kl_free, (kl_held, kl_free)


def test_step_zero_policy_equals_reference_kl_zero_ratio_one():
    ppo = make_ppo(ppo_epochs=1, num_mini_batches=1)
    batch = next(iter(Prompts()))
    roll = ppo.rollout(batch)
    assert roll.metrics["kl"] == 0.0  # exactly: same weights, eval mode, same tokens
    with torch.no_grad():
        _, logp = ppo.policy_forward(ppo.model, roll.prompt_ids, roll.prompt_mask, roll.response_ids, roll.response_mask)
    torch.testing.assert_close(logp, roll.logp, rtol=0, atol=0)  # ratio exactly 1 on the stored tokens
    rows = fit(make_ppo(ppo_epochs=1, num_mini_batches=1), 1)
    assert rows[0]["train/kl"] == 0.0 and rows[0]["train/clipfrac"] == 0.0
    assert abs(rows[0]["train/ratio"] - 1.0) < 1e-6 and abs(rows[0]["train/approx_kl"]) < 1e-12


def test_minibatches_separate_critic_adaptive_kl_and_early_stopping():
    ppo = make_ppo(num_mini_batches=4, critic="separate", adap_kl_ctrl=True, target=0.5, horizon=100,
                   early_stopping=True, target_kl=1e-4)
    before = [p.detach().clone() for p in ppo.critic.parameters()]
    rows = fit(ppo, 3)
    assert any(not torch.equal(a, b) for a, b in zip(before, ppo.critic.parameters()))  # the critic trains
    assert rows[0]["train/kl_coef"] == pytest.approx(0.05) and rows[-1]["train/kl_coef"] != pytest.approx(0.05)
    assert all(r["train/early_stop"] in (0.0, 1.0) for r in rows)


def test_lora_policy_uses_itself_with_adapters_off_as_the_reference():
    from llmlab.peft import apply_peft

    gpt = apply_peft(tiny_gpt(4), {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": None}, TOK)
    ppo = PPO({"model": gpt}, {"optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-2}}, response_length=4)
    ppo.attach_tokenizer(TOK)
    ppo.scorer, ppo.run_config = SaysSeven(), {"generation": {"temperature": 1.0}}
    assert "ref" not in ppo.roles
    assert ppo.rollout(next(iter(Prompts()))).metrics["kl"] == 0.0  # B = 0: the adapters change nothing yet
    rows = fit(ppo, 8)
    assert rows[-1]["train/kl"] > 0.01  # the adapters moved the policy away from its base
    assert all(not p.requires_grad for n, p in ppo.model.named_parameters() if "lora_" not in n)


def test_prompt_longer_than_context_is_one_line():
    ppo = make_ppo(response_length=8)
    with pytest.raises(UserError, match=r"a prompt of 10 tokens \+ 8 response tokens exceeds the policy's context of 16"):
        ppo.generate(["abcdefghij"])


# ---------------------------------------------------------------------------- scorers


def test_vader_scores_positive_above_negative():
    scores = VaderScorer()(["p", "p", "p"], ["what a wonderful, happy day", "a wooden table", "hateful, awful grief"], None)
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5
    assert VaderScorer(field="pos")(["p"], ["good"], None)[0] == 1.0
    with pytest.raises(UserError, match="reward.field"):
        VaderScorer(field="happy")


def test_arithmetic_parses_answers():
    scorer = build_scorer({"name": "arithmetic"})
    got = scorer(["q"] * 5, ["3 + 4 = 7. The answer is 7.", "The answer is 1,000.", "The answer is 8", "7", ""],
                 ["7", "1000", "3 + 4 = 7. The answer is 7", "7", "7"])
    assert got.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # a bare "7" states no answer; the reference may be a chain
    with pytest.raises(UserError, match="data=arithmetic_cot"):
        ArithmeticScorer()(["q"], ["The answer is 7"], [None])
    with pytest.raises(UserError, match="reward=vader"):
        build_scorer(None)
    with pytest.raises(UserError, match="not a scorer"):
        build_scorer({"name": "bleu"})


@pytest.fixture(scope="module")
def reward_ckpt(tmp_path_factory) -> Path:
    """A (randomly initialised) reward model of the bandit's tokenizer, saved as llmlab train would."""
    from llmlab.methods.reward import RewardModel
    from llmlab.models.build import config_dict

    gpt = tiny_gpt(3)
    rm = RewardModel({"model": gpt})
    rm.model_config = config_dict(gpt, "gpt")
    rm.attach_tokenizer(TOK)
    ckpt = {"state_dict": rm.state_dict(), "hyper_parameters": dict(rm.hparams)}
    rm.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("rm") / "rm.ckpt"
    torch.save(ckpt, path)
    return path


def test_model_scorer_reads_the_policy_ids_and_refuses_another_tokenizer(reward_ckpt):
    scorer = ModelScorer(reward_ckpt, tokenizer=TOK)
    ids, mask = left_pad([[1, 2, 3, TOK.eos_id], [4, TOK.eos_id]], TOK.eos_id)
    torch.testing.assert_close(scorer.score_ids(ids, mask), scorer.module(ids, mask))
    assert scorer.record["source"] == str(reward_ckpt.resolve()) and len(scorer.record["sha256"]) == 64
    texts = scorer(["bc", "e"], ["d", ""])  # prompt + response + EOS, encoded as the reward model trained
    torch.testing.assert_close(texts, scorer.score_ids(ids, mask))
    other = CharTokenizer("abcdefghijk", eos=True)
    with pytest.raises(UserError) as err:
        ModelScorer(reward_ckpt, tokenizer=other)
    message = str(err.value)
    assert "\n" not in message and repr(TOK) in message and repr(other) in message
    ppo = make_ppo()
    ppo.scorer, ppo.run_config = None, {"reward": {"name": "model", "path": str(reward_ckpt)}, "generation": {}}
    assert ppo.reward_scorer().name == "model" and ppo.role_records["reward"]["sha256"] == scorer.record["sha256"]


def test_write_preferences_from_a_tiny_policy(reward_ckpt, tmp_path):
    from omegaconf import OmegaConf

    from llmlab.alignment.preferences import write_preferences
    from llmlab.data.instructions import read_records

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("abc", "de", "fgh", "ij", "a", "b")))
    ppo = make_ppo()
    ppo.run_config = {"template": {"name": "plain"}}
    out = tmp_path / "prefs.jsonl"
    cfg = OmegaConf.create({"prompts": str(prompts), "out": str(out), "num_samples": 4,
                            "reward": {"name": "model", "path": str(reward_ckpt)},
                            "generation": {"max_new_tokens": 4, "temperature": 1.0, "seed": 0}})
    counts = write_preferences(ppo, cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["pairs"] == len(rows) >= 3 and counts["pairs"] + counts["ties"] + counts["short"] == 6
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert row["prompt"] in ("abc", "de", "fgh", "ij", "a", "b") and row["chosen"] and row["rejected"]
        assert row["chosen_score"] > row["rejected_score"]
    assert len(read_records(out, "preferences")) == len(rows)  # data=preferences reads the file back
    with pytest.raises(UserError, match="num_samples"):
        write_preferences(ppo, OmegaConf.merge(cfg, {"num_samples": 1}))


# ---------------------------------------------------------------------------- the CLI

FAST = ["trainer.enable_model_summary=false", "callbacks.progress.kind=plain", "model.n_layer=1", "model.n_embd=32",
        "model.n_head=2", "generation.max_new_tokens=8", "callbacks.samples.max_new_tokens=8"]


def test_ppo_sentiment_fast_dev_run_eval_and_infer(tmp_path):
    prompts = tmp_path / "prompts.txt"  # one prompt a line
    prompts.write_text("Continue this line joyfully: Now is\nContinue this line joyfully: O\n")
    sft, ppo, evaluate, infer, prefs, fresh, wrong_data = llmlab_batch(
        tmp_path,
        ["train", "method=sft", "data=shakespeare_instruct", "tokenizer.eos=true", "template=plain", "trainer.max_steps=3",
         "trainer.val_check_interval=3", "method.eval_examples=2", "test=false", "data.builder.examples_per_play=10", *FAST],
        ["train", "experiment=ppo_sentiment", "model.init_from={run0}", "trainer.fast_dev_run=true",
         "method.response_length=6", "data.builder.prompts_per_play=4", "trainer.enable_model_summary=false",
         "callbacks.progress.kind=plain"],
        ["eval", "ckpt_path={run1}", "limit_batches=1"],
        ["infer", "ckpt_path={run1}", "prompt=Continue this line joyfully: Now is the winter"],
        ["infer", "ckpt_path={run1}", f"prompts={prompts}", "generation.num_samples=3", f"out={tmp_path / 'prefs.jsonl'}"],
        ["train", "method=ppo", "template=plain", "data.builder.prompts_per_play=4", "trainer.fast_dev_run=true", *FAST],
        ["train", "method=ppo", "data=arithmetic_cot", "template=plain", "data.truncation=truncate", "model.init_from={run0}",
         "trainer.fast_dev_run=true", *FAST],
    )
    sft.ok()
    run = ppo.ok().run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"train/score", "train/kl", "train/clipfrac", "val/score", "val/kl", "test/score", "test/kl"} <= set(metrics)
    assert (run / "hf" / "model.safetensors").is_file() and (run / "reward_kl.png").is_file()
    assert "[score " in (run / "samples.md").read_text()  # held-out prompts, responses and scores
    scored = json.loads((evaluate.ok().run / "metrics.json").read_text())
    assert {"test/score", "test/kl", "test/response_length"} <= set(scored)
    infer.ok()
    assert "preference pairs" in prefs.ok().output and (tmp_path / "prefs.jsonl").is_file()
    assert fresh.returncode == 2 and "model.init_from" in fresh.stderr  # no reference to hold the policy near
    assert wrong_data.returncode == 2 and "data=arithmetic_prompts" in wrong_data.stderr  # instructions are not prompts
