"""Direct Preference Optimization — Rafailov et al. 2023, "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model" (Eq. 7); IPO: Azar et al. 2023, "A General Theoretical Paradigm to
Understand Learning from Human Preferences" (Eq. 17); conservative DPO (``label_smoothing``): Mitchell
2023; hinge: Zhao et al. 2023 (SLiC). Names and metrics follow TRL's ``DPOTrainer``.

The policy (``models["model"]``, a GPT started from an SFT run with ``model.init_from``, optionally
wrapped by ``peft=``) learns from preference pairs without a reward model. For every row the sequence
log-probability ``log pi(y|x)`` is the sum of the token log-probs of the response and its EOS (the
positions where the data's pre-shifted ``targets`` are not -100); the implicit reward of a response
is ``beta * (log pi(y|x) - log pi_ref(y|x))`` and the loss (``loss_type``) is

* ``sigmoid``: ``-log sigma(beta * margin)`` (DPO; with ``label_smoothing = eps``:
  ``-(1-eps) log sigma(beta m) - eps log sigma(-beta m)``),
* ``ipo``: ``(margin - 1/(2 beta))^2`` on length-averaged log-probs,
* ``hinge``: ``relu(1 - beta * margin)``,

where ``margin = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``
(:func:`llmlab.alignment.losses.dpo_loss`). The reference ``pi_ref`` is the frozen role ``ref``
(``method.roles.ref: null`` = a frozen copy of the starting weights) or, when a ``peft`` tuner is
active and the builder built no copy, the policy itself with its adapters switched off
(:func:`llmlab.peft.disable_adapters`, TRL's ``ref_model=None`` with a PEFT model). Reference
log-probs are computed on the fly (nothing precomputed), without gradient, in eval mode.

Logged for train/val/test with TRL's names, weighted by pairs: ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
Generation (training samples, ``llmlab infer prompt=...`` with the prompt rendered by the run's
template) and the ``hf/`` export are those of the SFT policy it continues
(:class:`~llmlab.methods.sft.InstructionTuning`, itself a :class:`~llmlab.methods.gpt.GPTLM`);
the SFT exact-match evaluation is off (preference data has no reference answers).

The true score (:class:`~llmlab.methods.policy.AlignedPolicy`): when the run has a ``reward`` group
(``experiment=dpo_sentiment``: ``reward=vader``), every validation also answers the distinct prompts of
the first validation pairs (``method.eval_prompts``) greedily with ``method.response_length`` tokens and
reports ``val/score`` (the scorer's mean) and ``val/kl`` (exact KL to the reference, summed over the
response), ``val/score_untrained`` (the starting policy's, from the sanity pass) and ``reward_kl.png``.
``llmlab eval ckpt_path=DPO_RUN reward=vader [data=sentiment_prompts]`` scores a checkpoint the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.methods.base import Step
from llmlab.methods.sft import InstructionTuning

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


class DPO(InstructionTuning):
    """DPO / IPO / hinge on preference pairs against a frozen (or adapter-disabled) reference; see the
    module docstring."""

    name = "dpo"
    loss_is_token_nll = False  # a loss over pairs: no perplexity
    eval_ppl = False
    adapter_reference = True  # peft=lora without a ref role: the reference is the policy with adapters off

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, response_length: int = 32,
                 eval_prompts: int = 64, **method_keys) -> None:
        # a policy like SFT's (template-rendered generation, EOS required), without exact match; the
        # hyperparameters Lightning collects include beta, loss_type ... of this frame
        super().__init__(models, optim, eval_examples=0, val_exact_match=False)
        if loss_type not in LOSS_TYPES:
            raise UserError(f"method.loss_type={loss_type!r}: use {', '.join(LOSS_TYPES)}")
        if not float(beta) > 0:
            raise UserError(f"method.beta={beta}: use a positive number (TRL's default is 0.1)")
        if not 0.0 <= float(label_smoothing) < 0.5:
            raise UserError(f"method.label_smoothing={label_smoothing}: use a probability in [0, 0.5), e.g. 0.1")
        if float(label_smoothing) and loss_type != "sigmoid":
            raise UserError(f"method.label_smoothing={label_smoothing} applies to loss_type=sigmoid only: set it to 0 "
                            f"for loss_type={loss_type}")
        for key, value in (("response_length", response_length), ("eval_prompts", eval_prompts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"method.{key}={value!r}: use a positive integer")
        self.beta, self.loss_type, self.label_smoothing = float(beta), str(loss_type), float(label_smoothing)
        self.response_length, self.eval_prompts = response_length, eval_prompts

    # ----------------------------------------------------------------- the reference, the true score
    def on_fit_start(self) -> None:
        self.check_reference()
        if "ref" not in self.roles and self.base_record is None:  # a tuner on a fresh model: nothing to align
            raise UserError("method=dpo needs a starting policy: pass model.init_from=SFT_RUN (with peft=... the "
                            "reference is that model with the adapters switched off)")
        if self.scores_policy():
            self.reward_scorer()  # a bad reward group fails before training

    def scores_policy(self) -> bool:
        """Whether validation also measures the true score: the run has a ``reward`` group."""
        return (self.run_config or {}).get("reward") is not None

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        dm = getattr(self.trainer, "datamodule", None)
        if not self.scores_policy() or dm is None:
            return
        from llmlab.methods.policy import prompt_batches

        limit = min(self.eval_prompts, 4) if self.trainer.fast_dev_run else self.eval_prompts  # a smoke test: 4
        self.track_validation(self.score_prompts(prompt_batches(dm, "val", limit), "val"), log_means=True)

    # ----------------------------------------------------------------- the step contract
    @staticmethod
    def sequence_logps(model: nn.Module, batch: dict) -> torch.Tensor:
        """``(N,)`` sum of the log-probs of every target token (response + EOS) of each row."""
        from llmlab.alignment.losses import token_logprobs

        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (N, T, V)
        return token_logprobs(logits.float(), batch["targets"]).sum(-1)  # (N,): -100 positions count 0

    def model_step(self, batch: dict) -> Step:
        from llmlab.alignment.losses import dpo_loss

        logps = self.sequence_logps(self.model, batch)  # (2B,): chosen rows, then rejected rows
        with self.reference() as ref:
            ref_logps = self.sequence_logps(ref, batch)
        n = logps.size(0) // 2
        lengths = (batch["targets"] != -100).sum(-1)  # (2B,): IPO averages log-probs over them
        loss, metrics = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=self.beta,
                                 loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                 chosen_len=lengths[:n], rejected_len=lengths[n:])
        return Step(loss, n, {k: (v, n) for k, v in metrics.items()})  # weights = pairs
