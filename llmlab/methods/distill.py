"""Knowledge distillation: a small student learns from a frozen teacher (Hinton et al. 2015; Kim & Rush 2016;
Sanh et al. 2019, DistilBERT; Gu et al., ICLR 2024, MiniLLM). The losses live in :mod:`llmlab.distill.losses`.

``llmlab train method=distill method.teacher=RUN [model=gpt_nano_half] [method.objective=...]``

* **Teacher** = the frozen role ``teacher`` (``method.roles.teacher: ${method.teacher}``: an llmlab run dir /
  .ckpt, ``last`` or a local Hugging Face directory): eval mode, no gradient, never in the student's checkpoint
  (which records its source and hash). The run's tokenizer is the teacher's (``method.tokenizer_from:
  teacher``); a teacher of another tokenizer or vocabulary is one line.
* **Student** = the ``model=`` preset (e.g. ``gpt_nano_half``), or ``method.student_init=every_other``:
  DistilBERT's init from teacher layers 0, 2, 4 ... with half the layers (:mod:`llmlab.distill.student`).
* **Objectives** (``method.objective``), every one a per-token mean over the non-pad, shifted target
  positions, mixed with the student's cross-entropy on the data as ``alpha * KD + (1 - alpha) * CE``
  (``alpha`` weights the distillation term):

  - ``forward_kl``: Hinton's ``T^2 KL(p_T || q_T)`` on the data's tokens (``temperature``;
    ``temperature_anneal_every=N``: ``T = max(1, T0 - step // N)``, the seed's ``max(1, T0 - epoch)`` with an
    epoch of N steps — llmlab's training stream is endless, so Lightning's epoch stays 0);
  - ``reverse_kl``: ``T^2 KL(q_T || p_T)``, exact over the vocabulary, on the data's tokens;
  - ``minillm``: responses to the first ``prompt_length`` tokens of each window sampled from the teacher-mixed
    ``p~`` (``teacher_mixed_alpha``), then MiniLLM's single-step reverse KL + clipped, length-normalised policy
    gradient (:func:`llmlab.distill.losses.minillm_loss`; the CE term is its language-modelling loss L_PT);
  - ``seq_kd``: the teacher continues each prompt (``decoding: greedy`` = beam 1, Kim & Rush's mode
    approximation, or ``sample``) and the student's NLL of those continuations is the KD term.

* **Logged**: ``train/kd`` (the distillation term alpha weights), ``train/ce`` (the student's CE on the
  data), ``train/loss`` = that CE (so ``train/ppl`` is the student's); ``val/loss`` / ``test/loss`` = the
  student's CE, ``val/ppl``; ``val/kd`` for the token-level objectives.
* **Students are ordinary models**: :class:`Distillation` is a :class:`~llmlab.methods.gpt.GPTLM` (eval,
  ``infer prompt=...``, the ``hf/`` GPT-2 export) and :class:`BertDistillation` a
  :class:`~llmlab.methods.bert.BertPretraining` (MLM logits at the masked positions of BERT's data module;
  ``infer text="... [MASK]"``), with DistilBERT's optional cosine loss between hidden states.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.distill import OBJECTIVES
from llmlab.distill.losses import (annealed_temperature, forward_kl, hinton_loss, masked_mean, minillm_loss,
                                   reverse_kl, token_nll)
from llmlab.errors import UserError
from llmlab.methods.base import Step
from llmlab.methods.bert import BertPretraining
from llmlab.methods.gpt import GPTLM, _unwrap

log = logging.getLogger(__name__)
TOKEN_LEVEL = ("forward_kl", "reverse_kl")  # objectives computed on the data's own tokens (no generation)
DECODINGS = ("greedy", "sample")


class Distiller:
    """What GPT and BERT students share: the teacher role, the settings, the student's architecture record."""

    arch = "gpt"  # the student's architecture (what checkpoints record)
    loss_is_token_nll = True  # train/loss is the student's CE on the data: train/ppl is its perplexity
    eval_loss = None
    objectives = OBJECTIVES

    def init_distill(self, *, objective: str, temperature: float, alpha: float, temperature_anneal_every: int | None,
                     student_init: str | None, cosine_weight: float = 0.0) -> None:
        if objective not in self.objectives:
            raise UserError(f"method.objective={objective!r}: use {', '.join(self.objectives)}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise UserError(f"method.temperature={temperature!r}: use a positive number (Hinton: 1-20; the seed's 4.0)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise UserError(f"method.alpha={alpha!r}: use a weight in [0, 1] (the distillation term's; CE gets 1 - alpha)")
        every = temperature_anneal_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise UserError(f"method.temperature_anneal_every={every!r}: use null (constant T) or a number of steps >= 1")
        if student_init not in (None, "every_other"):
            raise UserError(f"method.student_init={student_init!r}: use null (the model= preset) or every_other (DistilBERT)")
        if not float(cosine_weight) >= 0:
            raise UserError(f"method.cosine_weight={cosine_weight!r}: use a number >= 0 (DistilBERT's alpha_cos)")
        if "teacher" not in self.roles:
            raise UserError("method=distill needs a trained teacher: pass method.teacher=RUN_DIR (an llmlab run dir or "
                            ".ckpt, `last`, or a local Hugging Face directory)")
        self.objective, self.temperature, self.alpha = str(objective), float(temperature), float(alpha)
        self.temperature_anneal_every, self.cosine_weight = every, float(cosine_weight)
        if objective not in TOKEN_LEVEL and (self.temperature != 1.0 or every):
            log.warning("method.temperature=%s applies to forward_kl / reverse_kl; %s works at T = 1 (the paper's)",
                        temperature, objective)
        teacher = self.teacher
        if student_init == "every_other":
            from llmlab.distill.student import every_other_layer

            self.check_kinds(teacher, teacher)
            self.model = every_other_layer(teacher)  # replaces the model= preset's fresh student
        student = _unwrap(self.model)
        self.check_kinds(teacher, student)
        v_s, v_t = student.config.vocab_size, teacher.config.vocab_size
        if v_s != v_t:
            raise UserError(f"the teacher has a {v_t:,}-token vocabulary but the student {v_s:,}: the student must use "
                            f"the teacher's tokenizer and vocabulary (set model.vocab_size={v_t} or drop it)")

    def check_kinds(self, teacher: nn.Module, student: nn.Module) -> None:
        """Teacher, student and method are of one architecture (GPT: method=distill, BERT: distill_bert)."""
        kinds = {"GPTConfig": "gpt", "BertConfig": "bert"}
        t, s = (kinds.get(type(m.config).__name__, type(m.config).__name__) for m in (teacher, student))
        fixes = {"bert": "method=distill_bert (experiment=distill_bert_shakespeare)",
                 "gpt": "method=distill and a GPT model= preset (experiment=distill_shakespeare)"}
        if t != self.arch:
            raise UserError(f"method={self.name} distils a {self.arch} teacher, not a {t}: distil it with "
                            f"{fixes.get(t, 'a GPT or BERT teacher')}")
        if s != t:
            raise UserError(f"the teacher is a {t} model but the student a {s}: use {fixes[t]}")

    @property
    def teacher(self) -> nn.Module:
        return self.roles["teacher"]

    @property
    def model_config(self) -> dict | None:
        """The student's architecture as it is (a DistilBERT student is not the ``model=`` preset)."""
        from llmlab.models.build import config_dict

        model = self.__dict__.get("_modules", {}).get("model")
        return None if model is None else config_dict(_unwrap(model), self.arch)

    @model_config.setter
    def model_config(self, value) -> None:
        pass  # derived from the student itself (the builder's record would name the preset's architecture)

    def current_temperature(self) -> float:
        """T, or ``max(1, T0 - step // temperature_anneal_every)``."""
        if self.temperature_anneal_every:
            return annealed_temperature(self.temperature, self.global_step // self.temperature_anneal_every)
        return self.temperature

    def token_kd(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """The token-level distillation term of ``objective`` (forward or reverse KL, x T^2)."""
        fn = forward_kl if self.objective == "forward_kl" else reverse_kl
        return fn(student_logits, teacher_logits, mask, self.current_temperature())

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.temperature_anneal_every:
            self.log("train/temperature", self.current_temperature())


class Distillation(Distiller, GPTLM):
    """A GPT student distilled from a frozen GPT teacher; see the module docstring."""

    name = "distill"

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, objective: str = "forward_kl",
                 temperature: float = 1.0, alpha: float = 0.5, temperature_anneal_every: int | None = None,
                 student_init: str | None = None, teacher_mixed_alpha: float = 0.2, cliprange: float = 0.2,
                 length_norm: bool = True, prompt_length: int = 32, response_length: int = 32,
                 decoding: str = "greedy", **method_keys) -> None:
        super().__init__(models, optim)  # Lightning's hyperparameters collect this frame's arguments too
        self.init_distill(objective=objective, temperature=temperature, alpha=alpha,
                          temperature_anneal_every=temperature_anneal_every, student_init=student_init)
        for key, value in (("prompt_length", prompt_length), ("response_length", response_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"method.{key}={value!r}: use a positive integer")
        if not 0.0 <= float(teacher_mixed_alpha) <= 1.0:
            raise UserError(f"method.teacher_mixed_alpha={teacher_mixed_alpha!r}: use a probability in [0, 1] (MiniLLM: 0.2)")
        if not 0.0 < float(cliprange) < 1.0:
            raise UserError(f"method.cliprange={cliprange!r}: use a number in (0, 1) (MiniLLM / PPO: 0.2)")
        if decoding not in DECODINGS:
            raise UserError(f"method.decoding={decoding!r}: use {' or '.join(DECODINGS)}")
        self.teacher_mixed_alpha, self.cliprange, self.length_norm = float(teacher_mixed_alpha), float(cliprange), bool(length_norm)
        self.prompt_length, self.response_length, self.decoding = prompt_length, response_length, decoding

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> Step:
        x, y = batch  # y pre-shifted: y[t] = x[t + 1], -100 = no target
        mask = y != -100
        n = int(mask.sum())
        logits = self.model(x)  # (B, T, V)
        ce = token_nll(logits, y, mask)
        metrics: dict = {"ce": ce.detach()}
        if self.objective in TOKEN_LEVEL:
            with torch.no_grad():
                teacher_logits = self.teacher(x)  # (B, T, V)
            kd = self.token_kd(logits, teacher_logits, mask)
        elif not self.training:  # generation-based objectives: val/test measure the student's CE only
            return Step(ce.detach(), n, metrics)
        elif self.objective == "minillm":
            kd = self.minillm_term(x, metrics)
        else:
            kd = self.seq_kd_term(x)
        metrics["kd"] = kd.detach()
        return Step(ce.detach(), n, metrics, objective=hinton_loss(kd, ce, self.alpha))

    # ----------------------------------------------------------------- generation-based objectives
    def prompts(self, x: torch.Tensor) -> torch.Tensor:
        """The first ``prompt_length`` tokens of every training window: what responses continue."""
        if self.prompt_length >= x.size(1):
            raise UserError(f"method.prompt_length={self.prompt_length} must be shorter than the {x.size(1)}-token "
                            "training windows (data.block_size)")
        return x[:, : self.prompt_length]

    def responses(self, prompts: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt mask, response ids, response mask) of ``full`` = prompts + generated tokens."""
        from llmlab.alignment.rollout import response_mask_of

        response = full[:, prompts.size(1):]
        eos = getattr(self.tokenizer, "eos_id", None) if self.tokenizer is not None else None
        return torch.ones_like(prompts), response, response_mask_of(response, eos)

    def minillm_term(self, x: torch.Tensor, metrics: dict) -> torch.Tensor:
        from llmlab.alignment.rollout import forward_response
        from llmlab.distill.sampling import teacher_mixed_sample

        prompts = self.prompts(x)
        eos = getattr(self.tokenizer, "eos_id", None) if self.tokenizer is not None else None
        full = teacher_mixed_sample(_unwrap(self.model), self.teacher, prompts, self.response_length,
                                    teacher_mixed_alpha=self.teacher_mixed_alpha, eos_id=eos)
        Pm, R, Rm = self.responses(prompts, full)
        student = forward_response(self.model, prompts, Pm, R, Rm)  # with gradient
        with torch.no_grad():
            teacher = forward_response(self.teacher, prompts, Pm, R, Rm)
        out = minillm_loss(student.logits, teacher.logits, R, Rm, teacher_mixed_alpha=self.teacher_mixed_alpha,
                           cliprange=self.cliprange, length_norm=self.length_norm)
        metrics.update({"reverse_kl": out.reverse_kl, "single": out.single, "pg_loss": out.long,
                        "reward": out.reward, "importance_weight": out.weight})
        return out.loss

    def seq_kd_term(self, x: torch.Tensor) -> torch.Tensor:
        from llmlab.alignment.rollout import forward_response
        from llmlab.inference.generate import generate

        prompts = self.prompts(x)
        eos = getattr(self.tokenizer, "eos_id", None) if self.tokenizer is not None else None
        full = generate(self.teacher, prompts, self.response_length, greedy=self.decoding == "greedy", eos_id=eos)
        Pm, R, Rm = self.responses(prompts, full)
        student = forward_response(self.model, prompts, Pm, R, Rm)
        return token_nll(student.logits, R, Rm)  # -log q(y_hat | x) per teacher token


class BertDistillation(Distiller, BertPretraining):
    """A BERT student distilled from a frozen BERT teacher on the MLM logits of the masked positions
    (DistilBERT, without NSP), with DistilBERT's optional cosine loss between the last hidden states."""

    name = "distill_bert"
    arch = "bert"
    objectives = TOKEN_LEVEL  # a bidirectional encoder generates no text: no minillm / seq_kd

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, objective: str = "forward_kl",
                 temperature: float = 1.0, alpha: float = 0.5, temperature_anneal_every: int | None = None,
                 student_init: str | None = None, cosine_weight: float = 0.0, **method_keys) -> None:
        super().__init__(models, optim)
        if objective in OBJECTIVES and objective not in TOKEN_LEVEL:
            raise UserError(f"method.objective={objective} samples text from a causal LM: a BERT student distils with "
                            f"{' or '.join(TOKEN_LEVEL)}")
        self.init_distill(objective=objective, temperature=temperature, alpha=alpha, student_init=student_init,
                          temperature_anneal_every=temperature_anneal_every, cosine_weight=cosine_weight)
        widths = _unwrap(self.model).config.hidden_size, self.teacher.config.hidden_size
        if self.cosine_weight and widths[0] != widths[1]:
            raise UserError(f"method.cosine_weight compares hidden states, but the student is {widths[0]} wide and the "
                            f"teacher {widths[1]}: use method.student_init=every_other or method.cosine_weight=0")

    def model_step(self, batch: dict) -> Step:
        labels = batch["labels"]
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        out = self.model(*inputs, labels=labels, masked_only=True)  # logits (N, V) at the N masked positions
        with torch.no_grad():
            teacher = self.teacher(*inputs, labels=labels, masked_only=True)
        targets = labels[labels != -100]
        n = len(targets)
        ce = out.mlm_loss
        kd = self.token_kd(out.prediction_logits, teacher.prediction_logits)  # every row is a masked position
        objective = hinton_loss(kd, ce, self.alpha)
        metrics = {"ce": ce.detach(), "kd": kd.detach(),
                   "mlm_acc": (out.prediction_logits.argmax(-1) == targets).float().mean()}
        if self.cosine_weight:  # DistilBERT: align the directions of the last hidden states (real tokens only)
            cos = 1.0 - F.cosine_similarity(out.hidden_states, teacher.hidden_states, dim=-1)  # (B, T)
            cos = masked_mean(cos, batch["attention_mask"].bool())
            objective = objective + self.cosine_weight * cos
            metrics["cos"] = cos.detach()
        return Step(ce.detach(), n, metrics, objective=objective)
