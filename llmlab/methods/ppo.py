"""RLHF with PPO: InstructGPT's third stage (Ouyang et al. 2022, §3.5 "Reinforcement learning"),
in the form of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") and TRL's
``PPOTrainer``; PPO's clipped surrogate from Schulman et al. 2017, advantages by GAE (Schulman et al.
2016). Formulas live in :mod:`llmlab.alignment.losses`; sampling in :mod:`llmlab.alignment.rollout`.

One training step = one PPO iteration on a batch of prompts (the datamodule's, template-rendered):

1. **Rollout.** Sample a response to every prompt from the policy with the KV cache (left-padded
   prompts, ``response_length`` new tokens at most, the ``generation`` group's ``temperature`` /
   ``top_k`` / ``top_p``; PPO's defaults sample the policy itself: temperature 1, no truncation).
   Record, without gradient, the old log-probs ``logp_old``, the reference's ``logp_ref`` (frozen role
   ``ref``, or the policy with its ``peft`` adapters switched off), the critic's values ``V`` and the
   scorer's sequence score ``s`` (the ``reward`` group: VADER, arithmetic correctness or a trained
   reward model; TRL's ``missing_eos_penalty`` is subtracted from responses that never end).
2. **Rewards.** Per token ``r_t = -kl_coef * k1_t`` with ``k1_t = logp_old - logp_ref`` on the
   sampled response tokens, plus ``s`` at the last response token (EOS included). ``kl_coef`` is
   fixed, or adapted towards ``target`` nats per sequence over ``horizon`` episodes (``adap_kl_ctrl``).
3. **Advantages.** GAE(``gamma``, ``lam``) along the response of each row, returns ``A + V``,
   advantages whitened over the batch's response tokens.
4. **Update.** ``ppo_epochs`` passes over the rollout in ``num_mini_batches`` shuffled minibatches;
   each recomputes the log-probs, values and entropies **with gradient on the stored tokens** and
   minimises ``policy loss (cliprange) + vf_coef * clipped value loss (cliprange_value) -
   entropy_coef * entropy`` (entropy of the full next-token distribution), then clips the gradient
   norm (``max_grad_norm``) and steps. ``early_stopping`` ends the iteration once the old-vs-new
   policy KL exceeds 1.5 x ``target_kl`` (legacy TRL).

Dropout is off for every forward pass (rollout, reference, update), as TRL's PPO does, so the first
minibatch of an iteration has ratio exactly 1 and KL(pi||pi_ref) is exactly 0 while pi = pi_ref.
``trainer.max_steps`` counts PPO iterations (the minibatch updates inside one iteration are one
Lightning step); the learning-rate schedule advances once per iteration.

The critic: ``critic: shared`` puts a ``Linear(n_embd, 1)`` value head on the policy's own final
hidden states (TRL's ``AutoModelForCausalLMWithValueHead``); ``critic: separate`` trains a copy of the
starting GPT with its own head (TRL's PPOv2 value model), so value errors never touch the policy.
The value of the state before response token ``t`` is read where the policy predicts token ``t``.

Logged each iteration (spec §10.5): ``train/score`` (mean scorer output), ``train/score_std``,
``train/kl`` (mean per-sequence sum of k1 over the response), ``train/reward_total`` (score minus the
KL penalty, summed per sequence), ``train/policy_loss``, ``train/value_loss``, ``train/entropy``,
``train/clipfrac``, ``train/approx_kl`` (old vs new policy, TRL's ``mean(log_ratio^2)/2``),
``train/value_explained_variance``, ``train/kl_coef``, ``train/response_length``.
Validation / test generate responses to held-out prompts (greedy by default, ``eval_greedy``) and
report ``{split}/score`` with the true scorer, ``{split}/kl`` (the exact KL to the reference summed
over the response: ``sum_v pi(v) (log pi(v) - log pi_ref(v))`` at every response position, since a
greedy response is not a sample) and ``{split}/response_length``; ``{split}/loss`` is ``-score`` (so
``best.ckpt`` keeps the highest-scoring policy). The validation before training scores the starting
policy (``val/score_untrained``). ``reward_kl.png`` plots score and KL per step and score against KL;
``samples.md`` / the dashboards get a table of held-out prompts, responses and scores.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from llmlab.alignment import losses as L
from llmlab.alignment.rollout import forward_response
from llmlab.checkpoint import CKPT_KEY
from llmlab.errors import UserError
from llmlab.inference.generate import eval_mode
from llmlab.methods.base import Step
from llmlab.methods.gpt import GPTLM, _unwrap
from llmlab.methods.policy import AlignedPolicy, answers_of, prompt_rows
from llmlab.utils import plain

log = logging.getLogger(__name__)

CRITICS = ("shared", "separate")


@dataclass
class Rollout:
    """What one PPO iteration stores from its rollout (``N`` rows, ``Tr`` response tokens)."""

    prompt_ids: torch.Tensor  # (N, Tp) left-padded
    prompt_mask: torch.Tensor  # (N, Tp)
    response_ids: torch.Tensor  # (N, Tr)
    response_mask: torch.Tensor  # (N, Tr) 1 up to and including EOS
    logp: torch.Tensor  # (N, Tr) old policy log-probs
    values: torch.Tensor  # (N, Tr) old values
    advantages: torch.Tensor  # (N, Tr) whitened (if asked)
    returns: torch.Tensor  # (N, Tr)
    metrics: dict[str, float]  # rollout statistics (score, kl, ...)


class PPO(AlignedPolicy, GPTLM):
    """PPO on a GPT policy (``models["model"]``) against a frozen reference and a scorer; see the
    module docstring. Reference, scorer, held-out score/KL, ``llmlab eval`` and ``reward_kl.png`` are
    :class:`~llmlab.methods.policy.AlignedPolicy`'s; plain sampling and the ``hf/`` export GPTLM's."""

    name = "ppo"
    loss_is_token_nll = False  # no perplexity of a policy-gradient objective
    eval_ppl = False

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, kl_coef: float = 0.05,
                 adap_kl_ctrl: bool = False, target: float = 6.0, horizon: float = 10000.0, kl_estimator: str = "k1",
                 cliprange: float = 0.2, cliprange_value: float = 0.2, vf_coef: float = 0.1, entropy_coef: float = 0.0,
                 gamma: float = 1.0, lam: float = 0.95, ppo_epochs: int = 4, num_mini_batches: int = 1,
                 whiten_advantages: bool = True, whiten_rewards: bool = False, response_length: int = 32,
                 critic: str = "shared", max_grad_norm: float | None = 1.0, early_stopping: bool = False,
                 target_kl: float = 1.0, missing_eos_penalty: float | None = None, eval_greedy: bool = True,
                 eval_samples: int = 4, **method_keys) -> None:
        models = dict(models)
        # a reward model recorded as a role (source + hash) comes back as its bare backbone: the scorer loads it whole
        models.pop("reward", None)
        super().__init__(models, optim)  # save_hyperparameters collects kl_coef, cliprange ... from this frame too
        self.automatic_optimization = False  # ppo_epochs x num_mini_batches updates per rollout
        from llmlab.models.gpt import GPT

        policy = _unwrap(self.model)
        if not isinstance(policy, GPT):
            raise UserError(f"method=ppo trains a GPT policy, not {type(policy).__name__}: start from an SFT run "
                            "(model.init_from=SFT_RUN) or use model=gpt_nano")
        _check(kl_estimator in L.KL_KINDS, f"method.kl_estimator={kl_estimator!r}: use {', '.join(L.KL_KINDS)}")
        _check(critic in CRITICS, f"method.critic={critic!r}: use shared (a head on the policy) or separate")
        _check(float(kl_coef) >= 0, f"method.kl_coef={kl_coef}: use a number >= 0 (TRL: 0.05)")
        for key, value in (("cliprange", cliprange), ("cliprange_value", cliprange_value), ("target", target),
                           ("horizon", horizon), ("target_kl", target_kl)):
            _check(float(value) > 0, f"method.{key}={value}: use a positive number")
        for key, value in (("ppo_epochs", ppo_epochs), ("num_mini_batches", num_mini_batches),
                           ("response_length", response_length)):
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   f"method.{key}={value!r}: use a positive integer")
        _check(0 <= float(gamma) <= 1 and 0 <= float(lam) <= 1,
               f"method.gamma={gamma}, method.lam={lam}: use values in [0, 1]")
        self.kl_estimator, self.critic_kind = kl_estimator, critic
        self.cliprange, self.cliprange_value = float(cliprange), float(cliprange_value)
        self.vf_coef, self.entropy_coef = float(vf_coef), float(entropy_coef)
        self.gamma, self.lam = float(gamma), float(lam)
        self.ppo_epochs, self.num_mini_batches = ppo_epochs, num_mini_batches
        self.whiten_advantages, self.whiten_rewards = bool(whiten_advantages), bool(whiten_rewards)
        self.init_policy(response_length=response_length, eval_greedy=eval_greedy, eval_samples=eval_samples)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.early_stopping, self.target_kl = bool(early_stopping), float(target_kl)
        self.missing_eos_penalty = None if missing_eos_penalty is None else float(missing_eos_penalty)
        self.kl_ctl = (L.AdaptiveKLController(kl_coef, target, horizon) if adap_kl_ctrl
                       else L.FixedKLController(kl_coef))

        # the critic: a value head on the policy's states, or on a trainable copy of the starting GPT
        self.critic = None
        if critic == "separate":
            self.critic = copy.deepcopy(policy).requires_grad_(True)
            if not policy.config.tie_embeddings:
                self.critic.lm_head.requires_grad_(False)  # the critic never predicts tokens
        self.value_head = nn.Linear(policy.config.n_embd, 1)
        nn.init.normal_(self.value_head.weight, std=0.02)
        nn.init.zeros_(self.value_head.bias)
        weight = policy.transformer.wte.weight
        self.value_head.to(device=weight.device, dtype=weight.dtype)

        self.generation: dict | None = None  # decoding settings of `llmlab eval`/`infer` (else the run's)

    # ----------------------------------------------------------------- checks before training
    def on_fit_start(self) -> None:
        """Fail before the first rollout: no reference, no scorer, greedy rollouts, prompts too long."""
        from llmlab.data.instructions import PromptDataModule

        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and not isinstance(dm, PromptDataModule):
            raise UserError(f"method=ppo samples responses to prompts, not to data={getattr(dm, 'corpus', type(dm).__name__)}: "
                            "use data=sentiment_prompts, data=arithmetic_prompts or data=prompts data.path=FILE "
                            "(prompt-only, instruction or preference JSONL)")
        self.check_reference()
        self.reward_scorer()
        self.sampling()
        longest = getattr(dm, "max_prompt_length", None)
        if longest and longest + self.response_length > self.context():
            raise UserError(f"the longest prompt has {longest} tokens; with method.response_length={self.response_length} "
                            f"it exceeds the policy's context of {self.context()} tokens: use shorter prompts (or a "
                            "shorter template, e.g. template=plain) or a smaller method.response_length")

    # ----------------------------------------------------------------- sampling
    def sampling(self) -> dict:
        """Decoding settings of the rollouts: the ``generation`` group (temperature, top_k, top_p)."""
        gen = dict(self.generation or (self.run_config or {}).get("generation") or {})
        temperature = float(gen.get("temperature", 1.0) if gen.get("temperature") is not None else 1.0)
        if temperature <= 0 or gen.get("greedy"):
            raise UserError("PPO learns from sampled responses: set generation.temperature > 0 and generation.greedy=false "
                            "(method.eval_greedy decides how held-out prompts are answered)")
        return {"temperature": temperature, "top_k": gen.get("top_k"), "top_p": gen.get("top_p")}

    # ----------------------------------------------------------------- forward passes
    @property
    def temperature(self) -> float:
        return self.sampling()["temperature"]

    def policy_forward(self, model: nn.Module, P, Pm, R, Rm):
        """(output, log-probs of the response tokens) under ``model`` at the sampling temperature (TRL
        divides the logits by it, so the ratio compares the distributions the tokens came from)."""
        out = forward_response(model, P, Pm, R, Rm)
        t = self.temperature
        if t == 1.0:
            return out, out.logp
        out.logits = out.logits / t
        return out, L.token_logprobs(out.logits, R) * Rm.to(out.logits.dtype)

    def values(self, out, P, Pm, R, Rm) -> torch.Tensor:
        """``(N, Tr)`` value of the state before each response token (shared: from the policy's pass)."""
        if self.critic is None:
            hidden = out.hidden
        else:
            ids, mask = torch.cat([P, R], dim=1), torch.cat([Pm, Rm], dim=1)
            hidden = self.critic.encode(ids, attention_mask=mask)[:, P.size(1) - 1: P.size(1) + R.size(1) - 1]
        return self.value_head(hidden).squeeze(-1).float()

    # ----------------------------------------------------------------- one PPO iteration
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with eval_mode(self):  # no dropout anywhere in PPO (TRL disables it): ratio 1 on the first minibatch
            return super().training_step(batch, batch_idx)

    def model_step(self, batch: dict) -> Step:
        """One PPO iteration (rollout, rewards, advantages, minibatch updates); val/test use :meth:`eval_step`."""
        step = float(self.global_step)  # iterations done before this one
        roll = self.rollout(batch)
        updates = self.update(roll)
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(roll.metrics["kl"], roll.response_ids.size(0))  # legacy TRL: n_steps = episodes
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        metrics = {**roll.metrics, **updates, "kl_coef": kl_coef}
        self.history.append({"step": step, "train/score": metrics["score"], "train/kl": metrics["kl"]})
        loss = torch.tensor(metrics.pop("loss"))
        return Step(loss, int(roll.response_mask.sum()), metrics)

    @torch.no_grad()
    def rollout(self, batch: dict) -> Rollout:
        prompts, answers = list(batch["prompts"]), answers_of(batch)
        done = self.generate(prompts, prompt_rows(batch))
        P, Pm, R, Rm = done.prompt_ids, done.prompt_mask, done.response_ids, done.response_mask
        out, logp = self.policy_forward(self.model, P, Pm, R, Rm)
        values = self.values(out, P, Pm, R, Rm)
        with self.reference() as ref:
            _, ref_logp = self.policy_forward(ref, P, Pm, R, Rm)
        scores = self.score(done, prompts, answers)
        raw_scores = scores
        eos = self.tokenizer.eos_id
        if self.missing_eos_penalty is not None:
            if eos is None:
                raise UserError("method.missing_eos_penalty needs a tokenizer with an EOS (tokenizer.eos=true)")
            ended = ((R == eos) & Rm.bool()).any(1)
            scores = scores - self.missing_eos_penalty * (~ended).float()
        rewards, _ = L.kl_penalized_rewards(scores, logp, ref_logp, Rm, self.kl_ctl.value, kind=self.kl_estimator)
        if self.whiten_rewards:
            rewards = L.masked_whiten(rewards, Rm, shift_mean=False)
        advantages, returns = L.gae(rewards, values, Rm, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = L.masked_whiten(advantages, Rm)
        k1 = L.kl_estimate(logp, ref_logp, "k1") * Rm  # (N, Tr): reported KL is always k1 (spec §10.5)
        metrics = {"score": float(raw_scores.mean()),
                   "score_std": float(raw_scores.std()) if len(raw_scores) > 1 else 0.0,
                   "kl": float(k1.sum(1).mean()), "reward_total": float((rewards * Rm).sum(1).mean()),
                   "value_explained_variance": float(L.explained_variance(values, returns, Rm)),
                   "response_length": float(Rm.sum(1).float().mean())}
        return Rollout(P, Pm, R, Rm, logp, values, advantages, returns, metrics)

    def update(self, roll: Rollout) -> dict[str, float]:
        """``ppo_epochs`` x ``num_mini_batches`` gradient steps on the stored rollout; mean statistics."""
        opt = self.optimizers()
        n = roll.response_ids.size(0)
        size = math.ceil(n / self.num_mini_batches)
        stats: dict[str, list[float]] = {}
        counted = False
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n, device=roll.response_ids.device)
            for start in range(0, n, size):
                i = order[start:start + size]
                P, Pm, R, Rm = roll.prompt_ids[i], roll.prompt_mask[i], roll.response_ids[i], roll.response_mask[i]
                out, logp = self.policy_forward(self.model, P, Pm, R, Rm)
                values = self.values(out, P, Pm, R, Rm)
                pg_loss, pg = L.ppo_policy_loss(logp, roll.logp[i], roll.advantages[i], Rm, self.cliprange)
                vf_loss, vf = L.ppo_value_loss(values, roll.values[i], roll.returns[i], Rm, self.cliprange_value)
                entropy = L.masked_mean(L.entropy_from_logits(out.logits), Rm)
                loss = pg_loss + self.vf_coef * vf_loss - self.entropy_coef * entropy
                opt.zero_grad()
                self.manual_backward(loss)
                if self.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                # Lightning counts one step per PPO iteration (trainer.max_steps = iterations); the other
                # minibatch updates go to the torch optimizer directly
                (opt.optimizer if counted else opt).step()
                counted = True
                for key, value in {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy,
                                   **pg, **vf}.items():
                    stats.setdefault(key, []).append(float(value.detach()))
                if self.early_stopping and float(pg["approx_kl_k1"]) > 1.5 * self.target_kl:
                    return _means(stats, early_stop=1.0)
        return _means(stats, early_stop=0.0)

    # ----------------------------------------------------------------- validation / test / eval
    def on_validation_epoch_start(self) -> None:
        self.records["val"] = []

    def on_test_epoch_start(self) -> None:
        self.records["test"] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._accumulate("val", self.eval_step(batch, "val"))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._accumulate("test", self.eval_step(batch, "test"))

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        records = self.records.get("val") or []
        means = {k: sum(r[k] for r in records) / len(records) for k in ("score", "kl")} if records else {}
        self.track_validation(means)  # val/score, val/kl are logged by the Step accumulators

    def evaluate(self, cfg) -> dict[str, float]:
        """``llmlab eval ckpt_path=PPO_RUN [reward=...] [data=...]``: :meth:`AlignedPolicy.evaluate_policy`."""
        return self.evaluate_policy(cfg)

    # ----------------------------------------------------------------- samples, plots, export
    def sample_text(self, prompt: str, generation: dict) -> str | None:
        """With a prompt: the policy's response to it (template-rendered). Without: the last
        validation's first ``eval_samples`` prompts, responses and scores as a small table."""
        if prompt:
            return self.respond([prompt], {**generation, "num_samples": 1})[0]
        rows = (self.records.get("val") or [])[: self.eval_samples]
        if not rows:
            return None
        return "\n".join(f"[score {r['score']:+.3f} | kl {r['kl']:.2f}] {_one_line(r['prompt'])} => "
                         f"{_one_line(r['response'])}" for r in rows)

    # ----------------------------------------------------------------- inference
    def template(self, asked: dict | None = None):
        """``asked`` (a ``template=`` of infer), else the datamodule's, else the run's template."""
        from llmlab.data.templates import build_template

        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return build_template(asked) if asked else (
            getattr(dm, "template", None) or build_template((self.run_config or {}).get("template")))

    def respond(self, raw_prompts: list[str], generation: dict, template: dict | None = None) -> list[str]:
        """Responses to raw prompts rendered by the run's template (or ``template``), decoded as
        ``generation`` says (``greedy`` / ``temperature`` 0: greedy; ``num_samples`` per prompt, adjacent)."""
        template = self.template(template)
        seed = generation.get("seed")
        gen = torch.Generator(device=self.device).manual_seed(int(seed)) if seed is not None else None
        greedy = bool(generation.get("greedy")) or float(generation.get("temperature", 1.0) or 0.0) == 0.0
        previous, self.generation = self.generation, {**generation, "greedy": False,
                                                      "temperature": generation.get("temperature") or 1.0}
        try:
            done = self.generate([template.prompt(p) for p in raw_prompts], greedy=greedy,
                                 max_new_tokens=generation.get("max_new_tokens") or self.response_length,
                                 num_samples=int(generation.get("num_samples") or 1), generator=gen, fit=True)
        finally:
            self.generation = previous
        return done.texts

    def infer(self, cfg):
        """``llmlab infer ckpt_path=PPO_RUN prompt="..."``: the policy's response(s); with ``prompts=FILE|builtin
        reward=... out=FILE``: preference data from its samples (:func:`llmlab.alignment.preferences.write_preferences`)."""
        if cfg.get("prompts"):
            from llmlab.alignment.preferences import write_preferences

            return write_preferences(self, cfg)
        prompt = str(cfg.get("prompt") or "").replace("\\n", "\n")
        if not prompt:
            raise UserError('method=ppo answers a prompt: llmlab infer ckpt_path=X prompt="Continue joyfully: The day"')
        generation = (plain(cfg.generation) if cfg.get("generation") is not None
                      else dict((self.run_config or {}).get("generation") or {}))
        texts = self.respond([prompt], generation, plain(cfg.get("template")))
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- sample {i + 1}/{len(texts)} ---")
            print(text)
        return texts

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CKPT_KEY]["ppo"] = {"kl_coef": self.kl_ctl.value}  # history: AlignedPolicy's "policy"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = (checkpoint.get(CKPT_KEY) or {}).get("ppo") or {}
        if state.get("kl_coef") is not None:
            self.kl_ctl.value = float(state["kl_coef"])  # the adaptive coefficient continues where it was


# ---------------------------------------------------------------------------- helpers


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _means(stats: dict[str, list[float]], **extra: float) -> dict[str, float]:
    return {**{k: sum(v) / len(v) for k, v in stats.items()}, **extra}


def _one_line(text: str, limit: int = 160) -> str:
    """``text`` on one line: newlines and tabs shown escaped (a response of newlines is not empty)."""
    text = str(text).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= limit else text[: limit - 1] + "…"
