"""What every aligned *policy* (SFT, DPO, PPO) shares: its reference, the true score of its held-out
responses and their KL to that reference — the measure of InstructGPT's pipeline (Ouyang et al. 2022,
§4: "PPO and DPO raise the mean true score over the SFT policy, at a KL cost").

:class:`AlignedPolicy` is a mixin for :class:`~llmlab.methods.gpt.GPTLM` subclasses:

* **Reference.** ``reference()`` is a context in which the reference policy runs: the frozen ``ref`` role
  (``method.roles.ref``), else the policy itself with its additive ``peft`` adapters switched off
  (:func:`llmlab.peft.disable_adapters`, TRL's ``ref_model=None`` with a PEFT model); eval mode, no gradient.
  SFT has no reference unless it was given a ``ref`` role (its adapters-off model is the pretrained base,
  not a policy to stay near), so its evaluation reports no KL.
* **True score.** The ``reward`` group's scorer (VADER, arithmetic correctness, a reward model), built once.
* **Held-out evaluation.** ``eval_step`` answers a batch of prompts (greedy by default: the policy's best
  answer, comparable across policies), scores the answers and computes the *exact* KL to the reference
  summed over each response, ``sum_t sum_v pi(v) (log pi(v) - log pi_ref(v))`` (a greedy response is not a
  sample, so k1 of its tokens would be biased). ``{split}_generations.jsonl`` keeps every answer.
* ``llmlab eval ckpt_path=X reward=vader data=sentiment_prompts``: :meth:`evaluate_policy` — the mean
  score (``{split}/score``), KL (``{split}/kl``, with a reference), response length; ``{split}/loss = -score``.
  Prompts: ``data=`` if given, else the run's own held-out prompts — a prompts dataset as is, an instruction
  dataset's prompts (answers = their outputs), a preference dataset's distinct prompts; the built-in
  ``sentiment_preferences`` is replaced by the built-in ``sentiment_prompts`` with the same seed, fractions,
  genres and prompt words, so DPO is scored on exactly the held-out plays' prompts PPO is scored on.
* **Curves.** ``history`` holds score/KL points per step; ``reward_kl.png`` plots them
  (:func:`plot_reward_kl`); the validation before training scores the starting policy (``val/score_untrained``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.alignment.rollout import Completions, complete, forward_response
from llmlab.checkpoint import CKPT_KEY
from llmlab.errors import UserError
from llmlab.inference.generate import eval_mode
from llmlab.methods.base import Step
from llmlab.utils import atomic_write_bytes, atomic_write_text, plain, png_bytes

DEFAULT_RESPONSE_LENGTH = 32  # new tokens of a held-out answer when the method names none (PPO's response_length)
SENTIMENT_PROMPTS = "llmlab.data.builtin_alignment.sentiment_prompts"


class AlignedPolicy:
    """Mixin for GPT policies: reference, scorer, held-out score and KL, ``reward_kl.png``; see the module
    docstring. Subclasses call :meth:`init_policy` in ``__init__``."""

    adapter_reference = True  # without a `ref` role, the adapters-off policy is the reference (SFT: False)

    def init_policy(self, *, response_length: int, eval_greedy: bool = True, eval_samples: int = 4) -> None:
        self.response_length = int(response_length)  # new tokens per held-out answer (and PPO rollout)
        self.eval_greedy, self.eval_samples = bool(eval_greedy), int(eval_samples)
        self.scorer = None  # built from the run's `reward` group on first use (or set by the caller)
        self.history: list[dict[str, float]] = []  # per step: score / kl points (train and val): reward_kl.png
        self.records: dict[str, list[dict]] = {}  # split -> prompt/response/score/kl of its last pass
        self.initial_val_score: float | None = None

    # ----------------------------------------------------------------- the reference
    def has_reference(self) -> bool:
        from llmlab.peft import tuner_layers

        return "ref" in self.roles or (self.adapter_reference and bool(tuner_layers(self.model)))

    def check_reference(self) -> None:
        if not self.has_reference():
            raise UserError(f"method={self.name} needs a reference policy: start from one with model.init_from=SFT_RUN "
                            "(method.roles.ref: null is a frozen copy of it), or set method.roles.ref=RUN; a peft "
                            "tuner that changes the base weights (bitfit, freeze) needs method.roles.ref=RUN too")

    @contextlib.contextmanager
    def reference(self):
        """The reference policy inside the block: the frozen ``ref`` role, or the policy with its
        adapters switched off (eval mode, no gradient)."""
        if "ref" in self.roles:
            with torch.no_grad(), eval_mode(self.roles["ref"]):
                yield self.roles["ref"]
            return
        from llmlab.peft import disable_adapters

        self.check_reference()
        with torch.no_grad(), eval_mode(self.model), disable_adapters(self.model):
            yield self.model

    # ----------------------------------------------------------------- the true score
    def reward_scorer(self):
        """The scorer of the ``reward`` group of the run's config (``self.run_config["reward"]``; ``llmlab
        eval``/``infer`` may pass another), built once; a reward model is recorded as role ``reward``."""
        if self.scorer is None:
            from llmlab.alignment.rewards import build_scorer

            self.scorer = build_scorer((self.run_config or {}).get("reward"), tokenizer=self.tokenizer)
            record = getattr(self.scorer, "record", None)
            if record is not None:
                self.role_records = {**self.role_records, "reward": record}
        return self.scorer

    def score(self, done: Completions, prompts: list[str], answers: list[str | None]) -> torch.Tensor:
        """``(N,)`` scores of the completions (:func:`llmlab.alignment.rewards.score_completions`)."""
        from llmlab.alignment.rewards import score_completions

        return score_completions(self.reward_scorer(), done, prompts, answers)

    # ----------------------------------------------------------------- generation
    def sampling(self) -> dict:
        """Decoding settings of sampled (not greedy) answers: the ``generation`` group's."""
        gen = dict(getattr(self, "generation", None) or (self.run_config or {}).get("generation") or {})
        temperature = float(gen.get("temperature") or 1.0)
        return {"temperature": temperature, "top_k": gen.get("top_k"), "top_p": gen.get("top_p")}

    def context(self) -> int:
        """Tokens a prompt and its response may take: the policy's block_size minus virtual tokens."""
        policy = _unwrap(self.model)
        return policy.config.block_size - int(getattr(policy, "num_virtual_tokens", 0) or 0)

    def generate(self, prompts: list[str], prompt_ids: list[list[int]] | None = None, *, greedy: bool = False,
                 max_new_tokens: int | None = None, num_samples: int = 1, generator=None,
                 fit: bool = False) -> Completions:
        """Responses to rendered ``prompts``. A prompt that leaves no room for ``max_new_tokens`` (default
        ``response_length``) is one line; with ``fit`` (inference) the response is shortened instead."""
        tok = self.tokenizer
        if tok is None:
            raise UserError(f"this {self.name} policy has no tokenizer attached: load it with llmlab infer ckpt_path=...")
        ids = prompt_ids if prompt_ids is not None else [tok.encode(p) for p in prompts]
        n = int(max_new_tokens or self.response_length)
        room = self.context() - max(len(row) for row in ids)
        if fit and room >= 1:
            n = min(n, room)
        elif n > room:
            raise UserError(f"a prompt of {self.context() - room} tokens + {n} response tokens exceeds the policy's "
                            f"context of {self.context()} tokens: use shorter prompts or a smaller method.response_length")
        policy = _unwrap(self.model)
        sampling = self.sampling()
        with eval_mode(policy):
            return complete(policy, tok, prompts, max_new_tokens=n, num_samples=num_samples, greedy=greedy,
                            temperature=sampling["temperature"], top_k=sampling["top_k"], top_p=sampling["top_p"],
                            generator=generator, prompt_ids=ids)

    def policy_forward(self, model: nn.Module, P, Pm, R, Rm):
        """(output, log-probs of the response tokens) under ``model`` (PPO: at its sampling temperature)."""
        out = forward_response(model, P, Pm, R, Rm)
        return out, out.logp

    # ----------------------------------------------------------------- held-out evaluation
    @torch.no_grad()
    def eval_step(self, batch: dict, split: str) -> Step:
        """Responses to held-out prompts (greedy unless ``eval_greedy=false``), their true scores and,
        with a reference, their exact KL to it; weights = prompts."""
        prompts, answers = list(batch["prompts"]), answers_of(batch)
        done = self.generate(prompts, prompt_rows(batch), greedy=self.eval_greedy)
        P, Pm, R, Rm = done.prompt_ids, done.prompt_mask, done.response_ids, done.response_mask
        kl = None
        if self.has_reference():
            with eval_mode(self.model):
                out, _ = self.policy_forward(self.model, P, Pm, R, Rm)
            with self.reference() as ref:
                ref_out, _ = self.policy_forward(ref, P, Pm, R, Rm)
            logq, logq_ref = F.log_softmax(out.logits.float(), -1), F.log_softmax(ref_out.logits.float(), -1)
            kl = ((logq.exp() * (logq - logq_ref)).sum(-1) * Rm).sum(1)  # (N,): sum over the response of KL(pi_t || ref_t)
        scores = self.score(done, prompts, answers)
        raw, lengths = list(batch.get("raw") or prompts), Rm.sum(1)
        for row, (i, text) in enumerate(zip(done.prompt_index, done.texts)):
            record = {"prompt": raw[i], "response": text, "score": float(scores[row])}
            if kl is not None:
                record["kl"] = float(kl[row])
            self.records.setdefault(split, []).append({**record, "response_length": int(lengths[row])})
        n = len(prompts)
        metrics = {"score": (scores.mean(), n), "response_length": (lengths.float().mean(), n)}
        if kl is not None:
            metrics["kl"] = (kl.mean(), n)
        return Step(-scores.mean(), n, metrics)

    def score_prompts(self, batches, split: str, limit: int | None = None) -> dict[str, float]:
        """Run :meth:`eval_step` over prompt batches (the first ``limit``); the means of the split's records
        (``score``, ``kl`` with a reference, ``response_length``), ``{}`` without prompts."""
        self.records[split] = []
        for i, batch in enumerate(batches):
            if limit and i >= int(limit):
                break
            self.eval_step(batch, split)
        records = self.records[split]
        keys = [k for k in ("score", "kl", "response_length") if records and k in records[0]]
        return {k: sum(r[k] for r in records) / len(records) for k in keys}

    def track_validation(self, means: dict[str, float], *, log_means: bool = False) -> None:
        """After a validation's held-out scoring: the sanity pass's score is the starting policy's
        (``val/score_untrained``); later passes add a point to ``history`` and redraw ``reward_kl.png``.
        ``log_means``: also log ``val/score`` / ``val/kl`` (when the Step accumulators did not)."""
        if not means:
            return
        point = {f"val/{k}": v for k, v in means.items() if k in ("score", "kl")}
        if self.trainer.sanity_checking:
            if self.global_step == 0:
                self.initial_val_score = means["score"]  # the starting (SFT) policy's score
                self.history.append({"step": 0.0, **point})
            return
        if log_means:
            self.log_dict(point)
        if self.initial_val_score is not None:
            self.log("val/score_untrained", self.initial_val_score)
        if self.trainer.state.fn == "fit":
            self.history.append({"step": float(self.global_step), **point})
            if self.trainer.is_global_zero and self.trainer.default_root_dir:
                self.write_plot(self.trainer.default_root_dir)

    def evaluate_policy(self, cfg) -> dict[str, float]:
        """``llmlab eval ckpt_path=X [reward=...] [data=...] [template=...]``: mean true score (and KL to
        the reference) of responses to the split's prompts; ``{split}_generations.jsonl`` has them all."""
        from llmlab.alignment.rewards import build_scorer
        from llmlab.tasks.common import build_data, print_metrics

        split = str(cfg.get("split") or "test")
        if split not in ("train", "val", "test"):
            raise UserError(f"split={split!r}: use test, val or train")
        if cfg.get("reward") is not None:  # score with another scorer than the one the policy trained on
            self.scorer = build_scorer(plain(cfg.reward), tokenizer=self.tokenizer)
        if cfg.get("response_length"):
            self.response_length = int(cfg.response_length)
        overrides = {"eval_batch_size": int(cfg.batch_size)} if cfg.get("batch_size") else {}
        datamodule, _ = build_data(eval_data_config(cfg, self.run_config), tokenizer_state=self.tokenizer.state_dict(),
                                   **overrides)
        datamodule.setup("test" if split == "test" else "fit")
        self.eval()
        means = self.score_prompts(prompt_batches(datamodule, split), split, cfg.get("limit_batches"))
        if not means:
            raise UserError(f"the {split} split has no prompts: pass split=val or data with held-out prompts")
        metrics = {f"{split}/{k}": v for k, v in means.items()}
        metrics[f"{split}/loss"] = -metrics[f"{split}/score"]
        self.write_generations(cfg.paths.output_dir, split)
        print_metrics(metrics, f"method={self.name} on the {split} prompts ({cfg.paths.output_dir}/metrics.json)")
        return metrics

    # ----------------------------------------------------------------- artifacts, checkpoints
    def write_generations(self, out_dir, split: str) -> None:
        """``{split}_generations.jsonl``: prompt, response, score (and KL) of every held-out prompt."""
        records = self.records.get(split)
        if records:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            atomic_write_text(Path(out_dir) / f"{split}_generations.jsonl", text)

    def write_eval_artifacts(self, out_dir, split: str) -> None:
        self.write_generations(out_dir, split)

    def write_plot(self, out_dir) -> None:
        if self.history:
            atomic_write_bytes(Path(out_dir) / "reward_kl.png", plot_reward_kl(self.history))

    def save_artifacts(self, run_dir: str) -> None:
        super().save_artifacts(run_dir)  # hf/: the policy as a Hugging Face GPT-2 directory
        self.write_plot(run_dir)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CKPT_KEY]["policy"] = {"history": self.history, "initial_val_score": self.initial_val_score}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        meta = checkpoint.get(CKPT_KEY) or {}
        state = meta.get("policy") or meta.get("ppo") or {}  # "ppo": PPO checkpoints written before this mixin
        self.history = list(state.get("history") or [])
        self.initial_val_score = state.get("initial_val_score")


# ---------------------------------------------------------------------------- held-out prompts


def eval_data_config(cfg, run_config: dict | None):
    """The data config ``llmlab eval`` scores a policy on (see the module docstring): ``data=`` (rendered
    with ``template=``, else the run's template), else the run's data (built-in sentiment preferences ->
    the built-in sentiment prompts of the same plays)."""
    import copy

    from omegaconf import OmegaConf, open_dict

    run = run_config or {}
    if cfg.get("data") is not None:
        if cfg.get("template") is None:  # data=... without template=: the template the policy trained with
            cfg = copy.deepcopy(cfg)
            with open_dict(cfg):
                cfg.template = run.get("template")
        return OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    data_cfg = OmegaConf.create(run.get("data"))
    if not data_cfg:
        raise UserError("this checkpoint records no data config: pass one, e.g. data=sentiment_prompts")
    builder = data_cfg.get("builder") or {}
    if str(builder.get("_target_", "")).endswith(".sentiment_preferences"):
        data_cfg = _sentiment_prompts_like(data_cfg)
    if cfg.get("template") is not None:  # template=...: the recorded prompts, rendered anew
        data_cfg.template = cfg.template
    return data_cfg


def _sentiment_prompts_like(prefs):
    """conf/data/sentiment_prompts.yaml with the preference data's seed, fractions, template, genres and
    prompt words: the same held-out plays, the prompts PPO is evaluated on."""
    from omegaconf import OmegaConf

    from llmlab.cli import CONF_DIR

    data_cfg = OmegaConf.load(CONF_DIR / "data" / "sentiment_prompts.yaml")
    for key in ("template", "seed", "val_fraction", "test_fraction", "max_length", "block_size", "eval_batch_size"):
        data_cfg[key] = prefs.get(key)
    for key in ("genres", "prompt_words", "instruction"):
        if key in prefs.builder:
            data_cfg.builder[key] = prefs.builder[key]
    return data_cfg


def prompt_items(datamodule, split: str) -> list[tuple[list[int], str, str, str | None]]:
    """``(ids, rendered prompt, raw prompt, answer)`` of the split's held-out prompts, for any alignment
    datamodule: prompt rows, instruction examples (answer = their output), or the distinct prompts of
    preference pairs (in order of first appearance)."""
    tok, template = datamodule.tokenizer, datamodule.template
    if hasattr(datamodule, "rows"):
        rows = [(datamodule.rendered(r), r.prompt, r.answer) for r in datamodule.rows(split)]
    elif hasattr(datamodule, "examples"):
        rows = [(template.prompt_of(ex), ex.instruction + (f"\n{ex.input}" if ex.input else ""), ex.output)
                for ex in datamodule.examples(split)]
    elif hasattr(datamodule, "pairs"):
        raw = list(dict.fromkeys(p.prompt for p in datamodule.pairs(split)))
        rows = [(template.prompt(p), p, None) for p in raw]
    else:
        raise UserError(f"{type(datamodule).__name__} has no prompts to answer: pass data=sentiment_prompts or "
                        "data=prompts data.path=FILE")
    return [(tok.encode(text), text, raw, answer) for text, raw, answer in rows]


def prompt_batches(datamodule, split: str, limit: int | None = None):
    """Batches of PromptDataModule's format (left-padded ``prompt_ids`` ...) of the split's first ``limit``
    prompts, ``data.eval_batch_size`` at a time."""
    from llmlab.data.instructions import collate_prompts, eos_of

    items = prompt_items(datamodule, split)[:limit]
    size, pad = datamodule.eval_batch_size, eos_of(datamodule.tokenizer)
    return [collate_prompts(items[i:i + size], pad) for i in range(0, len(items), size)]


def answers_of(batch: dict) -> list[str | None]:
    answers = batch.get("answers")
    return list(answers) if answers is not None else [None] * len(batch["prompts"])


def prompt_rows(batch: dict) -> list[list[int]] | None:
    """The batch's prompt token ids (left-padded tensors) as one list per prompt, padding dropped."""
    ids, mask = batch.get("prompt_ids"), batch.get("prompt_mask")
    if ids is None or mask is None:
        return None
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the GPT itself


# ---------------------------------------------------------------------------- the plot


def plot_reward_kl(history: list[dict[str, float]]) -> bytes:
    """PNG: score and KL to the reference per step (train: lines, held-out: markers), and score
    against KL (the reward-KL trade-off, Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, frontier) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120)
    kl_ax = ax.twinx()
    curves = (("train/score", ax, "tab:green", {"lw": 1}), ("val/score", ax, "tab:green", {"marker": "o", "lw": 2}),
              ("train/kl", kl_ax, "tab:red", {"lw": 1}), ("val/kl", kl_ax, "tab:red", {"marker": "s", "lw": 2}))
    for key, axis, color, style in curves:
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            axis.plot(*zip(*pts), color=color, label=key, alpha=0.8 if key.startswith("train") else 1.0, **style)
        frontier_pts = [(r[key.replace("score", "kl")], r[key]) for r in history
                        if key in r and key.replace("score", "kl") in r] if key.endswith("score") else []
        if frontier_pts:
            frontier.plot(*zip(*frontier_pts), marker="o" if key.startswith("val") else ".", lw=0.8, label=key, alpha=0.8)
    ax.set_xlabel("training step (PPO: iteration)")
    ax.set_ylabel("score (scorer output)", color="tab:green")
    kl_ax.set_ylabel("KL to the reference (nats per response)", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + kl_ax.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left")
    frontier.set_xlabel("KL to the reference (nats per response)")
    frontier.set_ylabel("score")
    frontier.set_title("reward vs KL")
    if frontier.get_legend_handles_labels()[0]:
        frontier.legend(fontsize=8)
    for a in (ax, frontier):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return png_bytes(fig)
