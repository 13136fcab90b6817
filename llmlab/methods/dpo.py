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
"""

from __future__ import annotations

import contextlib

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

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, **method_keys) -> None:
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
        self.beta, self.loss_type, self.label_smoothing = float(beta), str(loss_type), float(label_smoothing)

    # ----------------------------------------------------------------- the reference
    def on_fit_start(self) -> None:
        self.check_reference()
        if "ref" not in self.roles and self.base_record is None:  # a tuner on a fresh model: nothing to align
            raise UserError("method=dpo needs a starting policy: pass model.init_from=SFT_RUN (with peft=... the "
                            "reference is that model with the adapters switched off)")

    def check_reference(self) -> None:
        """A reference exists: the ``ref`` role, or adapters that can be switched off."""
        from llmlab.peft import tuner_layers

        if "ref" not in self.roles and not tuner_layers(self.model):
            raise UserError("method=dpo needs a reference policy: start from one with model.init_from=SFT_RUN "
                            "(method.roles.ref: null is a frozen copy of it), or set method.roles.ref=RUN; a peft "
                            "tuner that changes the base weights (bitfit, freeze) needs method.roles.ref=RUN too")

    @contextlib.contextmanager
    def reference(self):
        """The reference model inside the block: the frozen ``ref`` role, or the policy with its
        adapters switched off (in eval mode, no dropout), without gradient."""
        if "ref" in self.roles:
            with torch.no_grad():
                yield self.roles["ref"]
            return
        from llmlab.inference.generate import eval_mode
        from llmlab.peft import disable_adapters

        self.check_reference()
        with torch.no_grad(), eval_mode(self.model), disable_adapters(self.model):
            yield self.model

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
