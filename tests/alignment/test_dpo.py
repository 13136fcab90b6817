"""method=dpo: ln 2 and zero implicit rewards at step 0 (reference == policy), a toy preference learnt
(chosen responses end with token A, rejected with B), the adapter-disabled reference under LoRA (only LoRA
weights change), bad settings in one line, and experiment=dpo_sentiment through the CLI from a tiny
pretrained run (fast_dev_run; peft=lora builds no reference copy)."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from llmlab.errors import UserError
from llmlab.methods.dpo import DPO
from llmlab.models.gpt import GPT, GPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the CLI harness of test_peft_e2e

V, EOS, A, B = 12, 0, 3, 4  # toy vocabulary: 0 = EOS/pad; chosen responses end with A, rejected ones with B
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=32))


def encode(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    """ids = prompt + response + EOS; pre-shifted targets on the response and its EOS only (the data's format)."""
    ids = prompt + response + [EOS]
    targets = [-100] * len(ids)
    for t in range(len(prompt) - 1, len(ids) - 1):
        targets[t] = ids[t + 1]
    return ids, targets


def preference_batch(prompts, chosen, rejected) -> dict:
    rows = [encode(p, r) for p, r in zip(prompts + prompts, chosen + rejected)]
    T = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": torch.full((len(rows), T), EOS), "attention_mask": torch.zeros((len(rows), T), dtype=torch.long),
             "targets": torch.full((len(rows), T), -100)}
    for i, (ids, targets) in enumerate(rows):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["targets"][i, :len(ids)] = torch.tensor(targets)
    return batch


def toy_pairs(n: int, gen: torch.Generator):
    """Random prompt (2-5 tokens) and body (1-4 tokens); chosen = body + A, rejected = body + B."""
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        prompts.append(torch.randint(5, V, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist())
        body = torch.randint(5, V, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
        chosen.append(body + [A])
        rejected.append(body + [B])
    return prompts, chosen, rejected


def a_minus_b(model: GPT, prompts, chosen) -> float:
    """Mean log p(A) - log p(B) where the chosen response puts its A."""
    diffs = []
    with torch.no_grad():
        for p, c in zip(prompts, chosen):
            logp = model(torch.tensor([p + c[:-1]]))[0, -1].log_softmax(-1)
            diffs.append(float(logp[A] - logp[B]))
    return sum(diffs) / len(diffs)


def train(dpo: DPO, steps: int, lr: float = 3e-3) -> None:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW([p for p in dpo.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    dpo.train()
    for _ in range(steps):
        loss = dpo.model_step(preference_batch(*toy_pairs(16, gen))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def metrics_of(step) -> dict[str, float]:
    return {k: float(v[0]) for k, v in step.metrics.items()}


# ---------------------------------------------------------------------------- step 0


@pytest.mark.parametrize("loss_type,expected", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0)])
def test_step_zero_with_reference_equal_to_policy(loss_type, expected):
    policy = tiny_gpt()
    dpo = DPO({"model": policy, "ref": copy.deepcopy(policy)}, loss_type=loss_type)
    step = dpo.model_step(preference_batch(*toy_pairs(8, torch.Generator().manual_seed(0))))
    assert step.loss.item() == pytest.approx(expected, abs=1e-5) and step.n_tokens == 8  # weights = pairs
    m = metrics_of(step)
    assert set(m) == set(METRICS)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert m[k] == pytest.approx(0.0, abs=1e-6), k
    assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0


def test_sequence_logps_sum_the_response_and_eos_tokens_only():
    policy = tiny_gpt()
    batch = preference_batch([[5, 6]], [[7, A]], [[8, 9, B]])
    with torch.no_grad():
        got = DPO.sequence_logps(policy, batch)
        logp = policy(torch.tensor([[5, 6, 7, A, EOS]]))[0].log_softmax(-1)
    want = logp[1, 7] + logp[2, A] + logp[3, EOS]  # tokens 7, A, EOS given what precedes them
    assert float(got[0]) == pytest.approx(float(want), abs=1e-5)


# ---------------------------------------------------------------------------- learning


def test_dpo_learns_the_toy_preference():
    policy = tiny_gpt()
    dpo = DPO({"model": policy, "ref": copy.deepcopy(policy)}, beta=0.5)
    held_out = toy_pairs(64, torch.Generator().manual_seed(99))
    before = a_minus_b(policy, held_out[0], held_out[1])
    train(dpo, 40)
    with torch.no_grad():
        m = metrics_of(dpo.eval().model_step(preference_batch(*held_out)))
    assert m["rewards/accuracies"] == 1.0 and m["rewards/margins"] > 1.0
    assert a_minus_b(policy, held_out[0], held_out[1]) > before + 3.0
    ref = dpo.roles["ref"]
    assert a_minus_b(ref, held_out[0], held_out[1]) == pytest.approx(before, abs=1e-6)  # the reference stayed frozen


def test_lora_dpo_uses_the_policy_with_adapters_off_as_reference():
    from llmlab.peft import apply_peft

    policy = tiny_gpt()
    original = copy.deepcopy(policy)
    apply_peft(policy, {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None,
                        "use_rslora": False, "init_lora_weights": True, "bias": "none"})
    dpo = DPO({"model": policy}, beta=0.5)
    dpo.check_reference()
    assert "ref" not in dpo.roles
    batch = preference_batch(*toy_pairs(8, torch.Generator().manual_seed(0)))
    assert dpo.model_step(batch).loss.item() == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == base
    base = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    lora = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    train(dpo, 30, lr=1e-2)
    state = policy.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the base never moves
    assert any(not torch.equal(state[k], v) for k, v in lora.items() if "lora_B" in k)  # LoRA trained
    with dpo.reference() as ref:  # adapters off = the original model
        torch.testing.assert_close(DPO.sequence_logps(ref, batch), DPO.sequence_logps(original, batch))
    assert not any(m.disabled for m in policy.modules() if hasattr(m, "lora_A"))  # switched back on
    with torch.no_grad():
        m = metrics_of(dpo.eval().model_step(preference_batch(*toy_pairs(64, torch.Generator().manual_seed(99)))))
    assert m["rewards/accuracies"] >= 0.95


def test_bad_settings_are_one_line():
    from llmlab.peft import apply_peft

    with pytest.raises(UserError, match="method.loss_type="):
        DPO({"model": tiny_gpt()}, loss_type="kto")
    with pytest.raises(UserError, match="method.beta="):
        DPO({"model": tiny_gpt()}, beta=0)
    with pytest.raises(UserError, match="label_smoothing"):
        DPO({"model": tiny_gpt()}, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(UserError, match="model.init_from"):  # no reference role, nothing to switch off
        DPO({"model": tiny_gpt()}).check_reference()
    bitfit = apply_peft(tiny_gpt(), {"name": "bitfit"})
    with pytest.raises(UserError, match="bitfit"):  # it changes base weights: no adapter-off reference
        DPO({"model": bitfit}).check_reference()


# ---------------------------------------------------------------------------- through the CLI

QUIET = ["trainer.enable_model_summary=false", "callbacks.progress.kind=plain", "callbacks.samples.max_new_tokens=8",
         "generation.max_new_tokens=8"]
DPO_FAST = ["data.batch_size=4", "data.eval_batch_size=8", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", *QUIET]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A 20-step 1-layer char GPT with an EOS token: the policy DPO starts from."""
    from test_peft_e2e import llmlab_batch

    root = tmp_path_factory.mktemp("dpo_base")
    (base,) = llmlab_batch(root, ["train", "tokenizer.eos=true", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                                  "model.block_size=128", "data.batch_size=8", "trainer.max_steps=20",
                                  "trainer.val_check_interval=20", "trainer.limit_val_batches=2", "test=false", *QUIET])
    return base.ok().run


def test_dpo_sentiment_through_the_cli(base_run, tmp_path):
    from test_peft_e2e import llmlab_batch

    from llmlab.checkpoint import read_checkpoint

    fdr, full, lora, evaluated, infer, no_init, fresh = llmlab_batch(
        tmp_path,
        ["train", "experiment=dpo_sentiment", f"model.init_from={base_run}", "trainer.fast_dev_run=true", *QUIET],
        ["train", "experiment=dpo_sentiment", f"model.init_from={base_run}", *DPO_FAST],
        ["train", "experiment=dpo_sentiment", f"model.init_from={base_run}", "peft=lora", *DPO_FAST],
        ["eval", "ckpt_path={run1}", "limit_batches=2"],
        ["infer", "ckpt_path={run2}", "prompt=The day", "generation.max_new_tokens=8"],
        ["train", "experiment=dpo_sentiment", *DPO_FAST],
        ["train", "method=dpo", "tokenizer.eos=true", *DPO_FAST])
    fdr.ok()
    metrics = json.loads((full.ok().run / "metrics.json").read_text())
    assert {f"test/{k}" for k in METRICS} <= set(metrics) and "test/ppl" not in metrics
    assert (full.run / "hf" / "model.safetensors").is_file()  # the policy exports like a GPT
    meta = read_checkpoint(full.run / "checkpoints" / "last.ckpt")["llmlab"]
    assert meta["method"] == "dpo" and set(meta["roles"]) == {"ref"}

    ckpt = read_checkpoint(lora.ok().run / "checkpoints" / "last.ckpt")
    assert ckpt["llmlab"]["roles"] == {}  # no reference copy: the adapters are switched off instead
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert "test/rewards/accuracies" in json.loads((lora.run / "metrics.json").read_text())

    scored = json.loads((evaluated.ok().run / "metrics.json").read_text())
    assert {f"test/{k}" for k in METRICS} <= set(scored)
    assert infer.ok().output.strip()

    for bad in (no_init, fresh):  # DPO needs a starting policy: one line, exit 2
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert "init_from" in bad.stderr.strip().splitlines()[-1] and "Traceback" not in bad.stderr
