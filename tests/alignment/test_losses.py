"""``llmlab.alignment.losses`` against code we did not write, on the same tensors, and against golden numbers.

* TRL 1.16 (installed): ``DPOTrainer._compute_loss`` (sigmoid, ipo, hinge) and ``RewardTrainer.compute_loss``,
  called unbound with a stub ``self`` and a stub model whose per-token log-probs / logits we choose.
* Legacy TRL 0.11.4, the last TRL with the classic PPO trainer (``PPOTrainer.loss``, ``compute_advantages``,
  ``compute_rewards``, ``AdaptiveKLController``) and with cDPO (label smoothing in ``dpo_loss``). Its modules
  do not import next to TRL 1.x / transformers 5, so the test reads exactly those functions out of the wheel
  that ``make install`` downloads (``pip download --no-deps trl==0.11.4 -d .venv/reference``) with ``ast``
  and runs them on our tensors.
* Golden numbers from spec part 2, sec. 10.5 and 12 (BT ln 2, GAE vector, clip examples, KL(pi||pi) = 0).
"""

from __future__ import annotations

import ast
import math
import sys
import typing
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from enum import Enum
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmlab.alignment import losses as L
from llmlab.errors import UserError

REPO = Path(__file__).resolve().parents[2]
LEGACY_WHEEL = "trl-0.11.4-py3-none-any.whl"
DT = torch.float64  # both sides in float64: differences are then rounding only


# --------------------------------------------------------------------------- fixtures: tensors and references


def _rollout(seed=0, B=4, T=7, V=11):
    """A PPO-like batch: right-aligned response masks of lengths T, 5, 3, 1; new logp near old logp."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 5, 3, 1])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T)
    r = partial(torch.randn, generator=g, dtype=DT)
    logits = r(B, T, V)
    old_logp = -torch.rand(B, T, generator=g, dtype=DT) * 3
    return SimpleNamespace(
        mask=mask,
        logits=logits,
        old_logp=old_logp,
        logp=old_logp + 0.3 * r(B, T),  # ratios on both sides of [0.8, 1.2]
        ref_logp=old_logp + 0.5 * r(B, T),
        values=r(B, T),
        vpreds=r(B, T),
        rewards=r(B, T),
        advantages=r(B, T),
        returns=r(B, T),
        scores=r(B),
    )


def _legacy_wheel() -> Path | None:
    for d in (Path(sys.prefix) / "reference", REPO / ".venv" / "reference"):
        if (d / LEGACY_WHEEL).is_file():
            return d / LEGACY_WHEEL
    return None


def _definitions(source: str, names: list[str], cls: str | None = None) -> list[ast.stmt]:
    """The top-level defs ``names`` of ``source`` (or the methods ``names`` of class ``cls``)."""
    body = ast.parse(source).body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    found = {n.name: n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names}
    assert set(found) == set(names), f"legacy TRL lacks {set(names) - set(found)}"
    return [found[n] for n in names]


@pytest.fixture(scope="module")
def legacy():
    """Functions of trl==0.11.4, compiled from the wheel's source into one namespace."""
    wheel = _legacy_wheel()
    if wheel is None:
        pytest.skip(f"{LEGACY_WHEEL} absent from .venv/reference; `make install` downloads it (legacy PPO reference)")
    ns = dict(torch=torch, F=F, nn=torch.nn, np=np, warnings=warnings, Mapping=Mapping, Enum=Enum)
    ns.update({k: getattr(typing, k) for k in ("Any", "Dict", "List", "Literal", "Optional", "Tuple", "Union")})
    wanted = [
        ("trl/core.py", None, ["flatten_dict", "masked_mean", "masked_var", "masked_whiten", "clip_by_value",
                               "entropy_from_logits", "logprobs_from_logits"]),
        ("trl/trainer/utils.py", None, ["AdaptiveKLController", "FixedKLController"]),
        ("trl/trainer/dpo_config.py", None, ["FDivergenceType", "FDivergenceConstants"]),
        ("trl/trainer/ppo_trainer.py", "PPOTrainer", ["compute_rewards", "_kl_penalty", "compute_advantages",
                                                      "loss"]),
        ("trl/trainer/dpo_trainer.py", "DPOTrainer", ["dpo_loss"]),
    ]
    with zipfile.ZipFile(wheel) as zf:
        for path, cls, names in wanted:
            module = ast.Module(body=_definitions(zf.read(path).decode(), names, cls), type_ignores=[])
            exec(compile(module, f"{wheel.name}/{path}", "exec"), ns)  # methods land as plain functions
    return SimpleNamespace(**ns)


def _legacy_ppo(legacy, kl_coef=0.2, **config):
    """A stub legacy ``PPOTrainer`` ``self``: its config and KL controller, and ``_kl_penalty`` bound to it."""
    cfg = dict(gamma=1.0, lam=0.95, whiten_rewards=False, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
               ratio_threshold=10.0, kl_penalty="kl")
    cfg.update(config)
    self = SimpleNamespace(config=SimpleNamespace(**cfg), kl_ctl=SimpleNamespace(value=kl_coef))
    self._kl_penalty = partial(legacy._kl_penalty, self)
    return self


def _trl_stub(**attrs):
    """A stub TRL 1.x trainer ``self``: single-process accelerator, metric store, in training mode."""
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, _tp_size=1,
                           _total_train_tokens=0, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    stub.__dict__.update(attrs)
    return stub


# --------------------------------------------------------------------------- golden numbers (spec sec. 10.5, 12)


def test_bradley_terry_is_ln2_at_equal_rewards_and_shift_invariant():
    r = torch.tensor([0.3, -1.2, 2.0, 0.0])
    loss, metrics = L.bradley_terry_loss(r, r.clone())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)  # 0.693147
    assert metrics["accuracy"].item() == 0.0 and metrics["margin"].item() == 0.0
    rc, rr = torch.tensor([1.0, -0.5, 0.2]), torch.tensor([0.0, 0.5, 0.3])
    base, _ = L.bradley_terry_loss(rc, rr)
    shifted, _ = L.bradley_terry_loss(rc + 7.5, rr + 7.5)
    assert shifted.item() == pytest.approx(base.item(), abs=1e-6)
    assert base.item() == pytest.approx(float(np.mean(np.log1p(np.exp([-1.0, 1.0, 0.1])))), rel=1e-6)


def test_gae_reproduces_the_spec_vector_and_ignores_padding():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5)
    adv, ret = L.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.45125, 0.475, 0.5]]))
    torch.testing.assert_close(ret, adv + 0.5)
    # the same row followed by padding with garbage rewards/values: V after the last valid token is 0
    padded_r, padded_v = torch.tensor([[0.0, 0.0, 1.0, 9.0, -4.0]]), torch.tensor([[0.5, 0.5, 0.5, 3.0, 7.0]])
    adv_p, ret_p = L.gae(padded_r, padded_v, torch.tensor([[1, 1, 1, 0, 0]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv_p, torch.tensor([[0.45125, 0.475, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(ret_p[:, :3], ret)


@pytest.mark.parametrize(("ratio", "adv", "loss", "clipped"), [(1.5, 1.0, -1.2, 1.0), (0.5, -1.0, 0.8, 1.0),
                                                                (1.1, 1.0, -1.1, 0.0), (0.5, 1.0, -0.5, 0.0)])
def test_ppo_clip_examples(ratio, adv, loss, clipped):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    value, metrics = L.ppo_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), 0.2)
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert metrics["clipfrac"].item() == clipped
    value.backward()  # a clipped token gives no gradient; an unclipped one d(-A ratio)/dlogp = -A ratio
    assert logp.grad.item() == pytest.approx(0.0 if clipped else -adv * ratio, abs=1e-6)


@pytest.mark.parametrize("kind", L.KL_KINDS)
def test_kl_of_a_policy_with_itself_is_zero(kind):
    x = _rollout()
    assert torch.equal(L.kl_estimate(x.logp, x.logp.clone(), kind), torch.zeros_like(x.logp))
    rewards, kl = L.kl_penalized_rewards(x.scores, x.logp, x.logp.clone(), x.mask, kl_coef=0.2, kind=kind)
    assert torch.equal(kl, torch.zeros_like(kl))
    expected = torch.zeros_like(rewards)
    expected[torch.arange(4), x.mask.sum(1) - 1] = x.scores  # the score sits on the last response token only
    assert torch.equal(rewards, expected)


def test_kl_estimators_signs_and_unbiasedness():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        logp, ref = (torch.randn(20000, generator=g) * 6).to(dtype), (torch.randn(20000, generator=g) * 6).to(dtype)
        assert (L.kl_estimate(logp, ref, "k3") >= 0).all()
        assert (L.kl_estimate(logp, ref, "k2") >= 0).all()
        assert (L.kl_estimate(logp, ref, "k1") < 0).any()  # k1 is only non-negative in expectation
    # sampled from pi, k1 and k3 average to the exact KL(pi || pi_ref); k2 is biased
    p_logits, q_logits = torch.randn(7, generator=g, dtype=DT), torch.randn(7, generator=g, dtype=DT)
    logp_all, ref_all = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    exact = (logp_all.exp() * (logp_all - ref_all)).sum().item()
    y = torch.multinomial(logp_all.exp(), 400_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        assert L.kl_estimate(logp_all[y], ref_all[y], kind).mean().item() == pytest.approx(exact, rel=0.03)
    with pytest.raises(UserError, match="k1, k2, k3"):
        L.kl_estimate(logp_all, ref_all, "k4")


def test_masked_statistics():
    x = _rollout()
    bad = x.values.masked_fill(x.mask == 0, float("nan"))  # whatever sits in padding must not leak
    valid = x.values[x.mask.bool()]
    assert L.masked_mean(bad, x.mask).item() == pytest.approx(valid.mean().item())
    torch.testing.assert_close(L.masked_mean(bad, x.mask, dim=1),
                               torch.stack([x.values[i, : n].mean() for i, n in enumerate(x.mask.sum(1))]))
    assert L.masked_var(x.values, x.mask).item() == pytest.approx(valid.var().item())
    w = L.masked_whiten(x.values, x.mask)[x.mask.bool()]
    assert w.mean().item() == pytest.approx(0.0, abs=1e-9) and w.std().item() == pytest.approx(1.0, abs=1e-6)
    kept = L.masked_whiten(x.values, x.mask, shift_mean=False)[x.mask.bool()]
    assert kept.mean().item() == pytest.approx(valid.mean().item()) and kept.std().item() == pytest.approx(1.0, 1e-6)
    assert L.masked_mean(x.values, torch.zeros_like(x.mask)).item() == 0.0  # empty mask: 0, not nan
    assert L.explained_variance(x.returns, x.returns, x.mask).item() == pytest.approx(1.0)
    flat = torch.full_like(x.returns, L.masked_mean(x.returns, x.mask).item())
    assert L.explained_variance(flat, x.returns, x.mask).item() == pytest.approx(0.0, abs=1e-9)


def test_entropy_and_token_logprobs():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    x = _rollout()
    p = F.softmax(x.logits, -1)
    torch.testing.assert_close(L.entropy_from_logits(x.logits), -(p * p.log()).sum(-1))
    torch.testing.assert_close(L.entropy_from_logits(x.logits), entropy_from_logits(x.logits))
    targets = torch.randint(0, x.logits.shape[-1], x.mask.shape, generator=torch.Generator().manual_seed(2))
    ref = selective_log_softmax(x.logits, targets)  # TRL 1.16
    torch.testing.assert_close(L.token_logprobs(x.logits, targets), ref)
    ignored = targets.masked_fill(x.mask == 0, -100)
    torch.testing.assert_close(L.token_logprobs(x.logits, ignored), ref * x.mask)


# --------------------------------------------------------------------------- TRL 1.16: reward model and DPO


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(with_margin):
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(2 * 6, 1, generator=g, dtype=DT)  # rows [0, 6) chosen, [6, 12) rejected (TRL's order)
    inputs = {"input_ids": torch.zeros(12, 4, dtype=torch.long), "attention_mask": torch.ones(12, 4)}
    margin = torch.rand(6, generator=g, dtype=DT) if with_margin else None
    if with_margin:
        inputs["margin"] = margin
    stub = _trl_stub(args=SimpleNamespace(center_rewards_coefficient=None))
    expected = RewardTrainer.compute_loss(stub, lambda **kw: SimpleNamespace(logits=rewards), inputs)
    loss, metrics = L.bradley_terry_loss(rewards[:6, 0], rewards[6:, 0], margin=margin)
    torch.testing.assert_close(loss, expected)
    for key in ("accuracy", "margin"):
        assert metrics[key].item() == pytest.approx(stub._metrics["train"][key][-1], rel=1e-12)


def _dpo_batch(B=3, T=9, seed=4):
    """Inputs for TRL's ``_compute_loss``: (2B, T) prompt + completion rows and the per-token log-probs its
    model would return for the shifted completion mask (0 elsewhere, as TRL's fused head gives for label -100)."""
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.tensor([2, 3, 4, 2, 3, 4])[: 2 * B]
    total_len = torch.tensor([9, 6, 7, 5, 9, 8])[: 2 * B]  # chosen and rejected lengths differ
    pos = torch.arange(T)[None, :]
    attention_mask = (pos < total_len[:, None]).long()
    completion_mask = ((pos >= prompt_len[:, None]) & (pos < total_len[:, None])).long()
    per_token = -torch.rand(2 * B, T - 1, generator=g, dtype=DT) * 2 * completion_mask[:, 1:]
    inputs = {
        "input_ids": torch.randint(0, 20, (2 * B, T), generator=g),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": -torch.rand(B, generator=g, dtype=DT) * 2 * (T - 3),
        "ref_rejected_logps": -torch.rand(B, generator=g, dtype=DT) * 2 * (T - 3),
    }
    return inputs, per_token


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 1.0),
                                                 ("hinge", 0.3)])
def test_dpo_matches_trl(loss_type, beta):
    from trl.trainer.dpo_trainer import DPOTrainer

    inputs, per_token = _dpo_batch()
    out = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                          mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token, dtype=bool))
    stub = _trl_stub(beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=0.0,
                     f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True, use_weighting=False,
                     aux_loss_enabled=False)
    expected = DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, return_outputs=False)

    logps = per_token.sum(1)  # (2B,) summed response log-probs
    lengths = inputs["completion_mask"].sum(1)
    loss, metrics = L.dpo_loss(logps[:3], logps[3:], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
                               beta=beta, loss_type=loss_type, chosen_len=lengths[:3], rejected_len=lengths[3:])
    torch.testing.assert_close(loss, expected)
    trl_metrics = stub._metrics["train"]
    assert set(metrics) <= set(trl_metrics)  # exactly TRL's names
    for key, value in metrics.items():
        assert value.item() == pytest.approx(trl_metrics[key][-1], rel=1e-12, abs=1e-12), key
    assert 0 < metrics["rewards/accuracies"].item() < 1  # the batch has pairs on both sides


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_label_smoothing_matches_legacy_trl(legacy, label_smoothing):
    """cDPO lives in legacy TRL's ``sigmoid`` loss (TRL 1.x keeps ``label_smoothing`` for robust/EXO only)."""
    inputs, per_token = _dpo_batch()
    logps = per_token.sum(1)
    stub = SimpleNamespace(beta=0.2, label_smoothing=label_smoothing, loss_type="sigmoid", reference_free=False,
                           f_divergence_type="reverse_kl", f_divergence_params={},
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    args = (logps[:3], logps[3:], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
    losses, chosen_rewards, rejected_rewards = legacy.dpo_loss(stub, *args)
    loss, metrics = L.dpo_loss(*args, beta=0.2, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, losses.mean())
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean())
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean())


def test_dpo_rejects_bad_options():
    z = torch.zeros(2)
    with pytest.raises(UserError, match="sigmoid, ipo, hinge"):
        L.dpo_loss(z, z, z, z, loss_type="kto")
    with pytest.raises(UserError, match="label_smoothing"):
        L.dpo_loss(z, z, z, z, loss_type="ipo", label_smoothing=0.1, chosen_len=z + 1, rejected_len=z + 1)
    with pytest.raises(UserError, match=r"\[0, 0.5\)"):
        L.dpo_loss(z, z, z, z, label_smoothing=0.5)
    with pytest.raises(ValueError, match="chosen_len"):
        L.dpo_loss(z, z, z, z, loss_type="ipo")


# --------------------------------------------------------------------------- legacy TRL 0.11.4: PPO


@pytest.mark.parametrize(("cliprange", "cliprange_value"), [(0.2, 0.2), (0.1, 0.5)])
def test_ppo_losses_match_legacy_trl(legacy, cliprange, cliprange_value):
    x = _rollout()
    trainer = _legacy_ppo(legacy, cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=0.1)
    pg_loss, vf_loss, stats = legacy.loss(trainer, x.old_logp, x.values, x.logits, x.vpreds, x.logp, x.mask,
                                          x.advantages, x.returns)
    policy_loss, pm = L.ppo_policy_loss(x.logp, x.old_logp, x.advantages, x.mask, cliprange)
    value_loss, vm = L.ppo_value_loss(x.vpreds, x.values, x.returns, x.mask, cliprange_value)
    torch.testing.assert_close(policy_loss, pg_loss)
    torch.testing.assert_close(0.1 * value_loss, vf_loss)  # legacy returns vf_coef * value loss
    torch.testing.assert_close(pm["clipfrac"], stats["policy/clipfrac"])
    torch.testing.assert_close(pm["approx_kl"], stats["policy/approxkl"])
    torch.testing.assert_close(pm["approx_kl_k1"], stats["policy/policykl"])
    torch.testing.assert_close(vm["vf_clipfrac"], stats["val/clipfrac"])
    torch.testing.assert_close(L.masked_mean(L.entropy_from_logits(x.logits), x.mask), stats["policy/entropy"])
    assert 0 < pm["clipfrac"].item() < 1 and 0 < vm["vf_clipfrac"].item() < 1  # both branches exercised


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0)])
def test_gae_matches_legacy_trl(legacy, gamma, lam):
    x = _rollout()
    trainer = _legacy_ppo(legacy, gamma=gamma, lam=lam)
    _, legacy_adv, legacy_ret = legacy.compute_advantages(trainer, x.values, x.rewards, x.mask)
    adv, ret = L.gae(x.rewards, x.values, x.mask, gamma, lam)
    torch.testing.assert_close(ret, legacy_ret)
    torch.testing.assert_close(L.masked_whiten(adv, x.mask), legacy_adv)  # legacy always whitens advantages


def test_whitened_rewards_match_legacy_trl_without_padding(legacy):
    """``whiten_rewards=True`` is ``masked_whiten(rewards, mask, shift_mean=False)`` before GAE. With padding,
    legacy TRL whitens *after* masking, so padded slots hold non-zero rewards that leak into the advantages of
    real tokens; our ``gae`` re-masks, so we compare on full rows and check our padding stays inert."""
    x = _rollout()
    full = torch.ones_like(x.mask)
    trainer = _legacy_ppo(legacy, whiten_rewards=True)
    _, legacy_adv, legacy_ret = legacy.compute_advantages(trainer, x.values, x.rewards, full)
    adv, ret = L.gae(L.masked_whiten(x.rewards, full, shift_mean=False), x.values, full, 1.0, 0.95)
    torch.testing.assert_close(ret, legacy_ret)
    torch.testing.assert_close(L.masked_whiten(adv, full), legacy_adv)
    junk = x.rewards + 100.0 * (1 - x.mask)
    adv_masked, _ = L.gae(L.masked_whiten(x.rewards, x.mask, shift_mean=False), x.values, x.mask, 1.0, 0.95)
    adv_junk, _ = L.gae(L.masked_whiten(junk, x.mask, shift_mean=False), x.values, x.mask, 1.0, 0.95)
    torch.testing.assert_close(adv_masked, adv_junk)


@pytest.mark.parametrize(("kind", "kl_penalty"), [("k1", "kl"), ("k2", "mse")])
def test_kl_penalized_rewards_match_legacy_trl(legacy, kind, kl_penalty):
    x = _rollout()
    trainer = _legacy_ppo(legacy, kl_coef=0.15, kl_penalty=kl_penalty)
    legacy_rewards, _, legacy_kl = legacy.compute_rewards(trainer, x.scores, x.logp, x.ref_logp, x.mask)
    rewards, kl = L.kl_penalized_rewards(x.scores, x.logp, x.ref_logp, x.mask, kl_coef=0.15, kind=kind)
    # legacy leaves -kl_coef * kl on padded slots (its GAE masks them later); ours zeroes them
    torch.testing.assert_close(rewards, legacy_rewards * x.mask)
    torch.testing.assert_close(kl, legacy_kl * x.mask)


def test_adaptive_kl_controller_matches_legacy_trl(legacy):
    ours, theirs = L.AdaptiveKLController(0.2, target=6.0, horizon=10000), legacy.AdaptiveKLController(0.2, 6, 10000)
    trajectory = []
    for kl, n_steps in [(12.0, 256), (6.5, 256), (0.0, 512), (5.0, 64), (30.0, 1000), (6.0, 256), (1.0, 4096)]:
        ours.update(torch.tensor(kl), n_steps)
        theirs.update(kl, n_steps)
        assert ours.value == pytest.approx(float(theirs.value), rel=1e-12)
        trajectory.append(ours.value)
    assert trajectory[0] > 0.2 and trajectory[2] < trajectory[1]  # rises above target, falls below it
    assert ours.value == pytest.approx(0.2 * (1 + .2 * 256 / 1e4) * (1 + 0.5 / 6 * 256 / 1e4) * (1 - .2 * 512 / 1e4)
                                       * (1 - 1 / 6 * 64 / 1e4) * (1 + .2 * 1000 / 1e4) * (1 - .2 * 4096 / 1e4))
    fixed = L.FixedKLController(0.05)
    fixed.update(100.0, 10**6)
    assert fixed.value == 0.05
