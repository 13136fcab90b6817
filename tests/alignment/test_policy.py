"""AlignedPolicy (llmlab/methods/policy.py): the reference context gives the ref role's / the adapter-free
base's log-probs (KL exactly 0 at init, the exact KL of a moved policy matches a direct computation); SFT has
no reference (score, no KL); the held-out prompts of any alignment data; and through the CLI: DPO validation
reports val/score, val/kl, val/score_untrained and reward_kl.png, `llmlab eval ... reward=vader` scores SFT
and DPO checkpoints (DPO without data= on the sentiment prompts of the same held-out plays)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: test_peft_e2e's CLI harness
from test_peft_e2e import llmlab_batch  # noqa: E402

from llmlab.alignment.rollout import forward_response, left_pad  # noqa: E402
from llmlab.data.tokenizers import CharTokenizer  # noqa: E402
from llmlab.methods.dpo import DPO  # noqa: E402
from llmlab.methods.policy import eval_data_config  # noqa: E402
from llmlab.methods.sft import InstructionTuning  # noqa: E402
from llmlab.models.gpt import GPT, GPTConfig  # noqa: E402

TOK = CharTokenizer("abcdefghij", eos=True)  # ids 0..9, <unk> 10, <|endoftext|> 11
LORA = {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": None}


class CountA:
    """A toy true score: the number of a's in the response."""

    name = "count_a"

    def __call__(self, prompts, responses, answers):
        return torch.tensor([float(r.count("a")) for r in responses])


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))


def policy(cls, models: dict, **keys):
    method = cls(models, **keys)
    method.attach_tokenizer(TOK)
    method.scorer = CountA()
    return method


def batch(texts=("abc", "de", "fghij", "a")) -> dict:
    rows = [TOK.encode(t) for t in texts]
    ids, mask = left_pad(rows, TOK.eos_id)
    return {"prompt_ids": ids, "prompt_mask": mask, "prompts": list(texts), "raw": list(texts), "answers": [None] * len(texts)}


def nudge(model: GPT, seed: int = 7) -> None:
    """Move every weight a little (the policy after some training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def exact_kl(model: GPT, ref: GPT, prompt: list[int], response: list[int]) -> float:
    """sum over the response of KL(model_t || ref_t), from plain unpadded forwards of prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logq, logr = model(ids)[0].log_softmax(-1), ref(ids)[0].log_softmax(-1)
    rows = slice(len(prompt) - 1, len(prompt) + len(response) - 1)  # the positions predicting response tokens
    return float((logq[rows].exp() * (logq[rows] - logr[rows])).sum())


def test_ref_role_reference_kl_zero_at_init_then_exact():
    gpt = tiny_gpt()
    original = copy.deepcopy(gpt)
    dpo = policy(DPO, {"model": gpt, "ref": copy.deepcopy(gpt)}, response_length=4)
    step = dpo.eval_step(batch(), "val")
    assert float(step.metrics["kl"][0]) == 0.0 and all(r["kl"] == 0.0 for r in dpo.records["val"])
    assert step.loss.item() == -sum(r["score"] for r in dpo.records["val"]) / 4  # loss = -mean true score

    nudge(gpt)
    b = batch(("abc",))
    done = dpo.generate(b["prompts"], greedy=True)
    with dpo.reference() as ref:  # the frozen role, untouched by the nudge
        assert ref is dpo.roles["ref"] and not ref.training
        got = forward_response(ref, done.prompt_ids, done.prompt_mask, done.response_ids, done.response_mask).logp
    want = forward_response(original, done.prompt_ids, done.prompt_mask, done.response_ids, done.response_mask).logp
    torch.testing.assert_close(got, want)
    dpo.eval_step(b, "test")
    (record,) = dpo.records["test"]
    response = done.response_ids[0][done.response_mask[0].bool()].tolist()
    assert record["kl"] > 0.01
    assert record["kl"] == pytest.approx(exact_kl(gpt, original, TOK.encode("abc"), response), rel=1e-4)


def test_lora_reference_is_the_base_and_sft_has_none():
    from llmlab.peft import apply_peft

    gpt = tiny_gpt(1)
    original = copy.deepcopy(gpt)
    apply_peft(gpt, LORA, TOK)
    dpo = policy(DPO, {"model": gpt}, response_length=4)
    assert "ref" not in dpo.roles and dpo.has_reference()
    assert float(dpo.eval_step(batch(), "val").metrics["kl"][0]) == 0.0  # B = 0: adapters change nothing yet
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    b = batch()
    done = dpo.generate(b["prompts"], greedy=True)
    with dpo.reference() as ref:
        got = forward_response(ref, done.prompt_ids, done.prompt_mask, done.response_ids, done.response_mask).logp
    want = forward_response(original, done.prompt_ids, done.prompt_mask, done.response_ids, done.response_mask).logp
    torch.testing.assert_close(got, want)  # adapters off = the original weights
    assert float(dpo.eval_step(b, "val").metrics["kl"][0]) > 0.01
    assert not any(m.disabled for m in gpt.modules() if hasattr(m, "disabled"))  # switched back on

    sft = policy(InstructionTuning, {"model": gpt}, max_new_tokens=4)  # LoRA off = the pretrained base: no reference
    step = sft.eval_step(b, "test")
    assert not sft.has_reference() and "kl" not in step.metrics and "kl" not in sft.records["test"][0]
    assert set(step.metrics) == {"score", "response_length"} and all(1 <= r["response_length"] <= 4
                                                                     for r in sft.records["test"])


def test_eval_data_config_maps_sentiment_preferences_to_the_same_plays_prompts():
    run = {"template": {"name": "plain"},
           "data": {"_target_": "llmlab.data.instructions.PreferenceDataModule", "corpus": "sentiment_preferences",
                    "builder": {"_target_": "llmlab.data.builtin_alignment.sentiment_preferences", "_partial_": True,
                                "lines_per_play": 300, "prompt_words": 3, "min_gap": 0.5, "genres": ["comedy"]},
                    "template": {"name": "plain"}, "seed": 7, "val_fraction": 0.2, "test_fraction": 0.3,
                    "max_length": 100, "block_size": 64, "eval_batch_size": 5}}
    got = eval_data_config(OmegaConf.create({"data": None, "template": None}), run)
    assert got.builder._target_ == "llmlab.data.builtin_alignment.sentiment_prompts"
    assert got._target_ == "llmlab.data.instructions.PromptDataModule"
    assert (got.seed, got.val_fraction, got.test_fraction, got.eval_batch_size) == (7, 0.2, 0.3, 5)
    assert (got.builder.prompt_words, list(got.builder.genres), got.template.name) == (3, ["comedy"], "plain")
    asked = OmegaConf.create({"data": {"_target_": "x", "template": "${template}"}})
    OmegaConf.set_struct(asked, True)  # as Hydra hands it over; eval's template group is null: no key at all
    given = eval_data_config(asked, run)
    assert given.template == {"name": "plain"}  # data= without template=: the template the policy trained with


# ---------------------------------------------------------------------------- through the CLI

QUIET = ["trainer.enable_model_summary=false", "callbacks.progress.kind=plain", "callbacks.samples.max_new_tokens=8",
         "generation.max_new_tokens=8"]
SCORE = ["reward=vader", "data=sentiment_prompts", "data.builder.prompts_per_play=2", "limit_batches=1"]


def test_sft_and_dpo_checkpoints_get_the_true_score(tmp_path):
    sft, dpo, dpo_eval, dpo_own, sft_eval, sft_plain = llmlab_batch(
        tmp_path,
        ["train", "method=sft", "data=shakespeare_instruct", "tokenizer.eos=true", "template=plain", "model.n_layer=1",
         "model.n_head=2", "model.n_embd=32", "model.block_size=128", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "method.eval_examples=2", "test=false", "data.builder.examples_per_play=5", *QUIET],
        ["train", "experiment=dpo_sentiment", "model.init_from={run0}", "data.batch_size=4", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "method.eval_prompts=3",
         "method.response_length=8", "optim.lr=1e-2", "optim.scheduler.warmup_steps=0", "test=false", *QUIET],
        ["eval", "ckpt_path={run1}", *SCORE],
        ["eval", "ckpt_path={run1}", "reward=vader", "limit_batches=1", "batch_size=3"],
        ["eval", "ckpt_path={run0}", "response_length=8", *SCORE],
        ["eval", "ckpt_path={run0}", "limit_batches=1"],
    )
    sft.ok()
    run = dpo.ok().run
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/score", "val/kl", "val/score_untrained", "val/rewards/accuracies"} <= set(metrics)
    assert metrics["val/kl"] > 0  # two steps of DPO moved the policy off its reference
    assert (run / "reward_kl.png").is_file()

    scored = json.loads((dpo_eval.ok().run / "metrics.json").read_text())
    assert {"test/score", "test/kl", "test/response_length", "test/loss"} <= set(scored)
    assert scored["test/loss"] == -scored["test/score"] and 1 <= scored["test/response_length"] <= 8
    rows = [json.loads(line) for line in (dpo_eval.run / "test_generations.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt"].startswith("Continue this line joyfully:") for r in rows)
    assert sum(r["score"] for r in rows) / len(rows) == pytest.approx(scored["test/score"])

    # without data=: the built-in sentiment prompts of the preference run's held-out plays (same seed and fractions)
    own = [json.loads(line)["prompt"] for line in (dpo_own.ok().run / "test_generations.jsonl").read_text().splitlines()]
    from llmlab.data.builtin_alignment import sentiment_prompts

    assert own == [r.prompt for r in sentiment_prompts(seed=1337)["test"][:3]]

    sft_scored = json.loads((sft_eval.ok().run / "metrics.json").read_text())
    assert "test/score" in sft_scored and "test/kl" not in sft_scored  # SFT: no reference, no KL
    assert "test/exact_match" in json.loads((sft_plain.ok().run / "metrics.json").read_text())  # no reward=: as before
