"""Instruction tuning (supervised fine-tuning, SFT) of a GPT on prompt/response pairs, with chain
of thought and self-consistency at evaluation.

* FLAN (Wei et al. 2021, "Finetuned Language Models Are Zero-Shot Learners") and InstructGPT's
  first stage (Ouyang et al. 2022, §3.5 "Supervised fine-tuning"): next-token cross-entropy on the
  **response tokens only**. The datamodule (:mod:`llmlab.data.instructions`) renders every example
  with a template into ``(prompt, response)``, tokenises the two separately, appends EOS and sets
  ``targets = -100`` on the prompt and the padding; this method averages the loss over the rest
  (response + EOS: the model learns to stop). The seed's bug of masking only the first token
  (spec §8.3) cannot happen here: the boundary is the prompt's own token count.
* Packing (``data.packing=true``, TRL's ``packing``): several examples share one row; the batch's
  ``segment_ids`` go to the GPT, whose attention lets a token see only earlier tokens of its own
  example (positions restart per example), so a packed batch gives the same per-token losses as
  the unpacked one.
* Chain of thought (Wei et al. 2022): the response is a rationale ending in "The answer is X";
  the answer is parsed from the generation (:func:`llmlab.data.templates.answer_of`), never found
  by substring (spec §8.5). Self-consistency (Wang et al. 2022, "Self-Consistency Improves Chain of
  Thought Reasoning in Language Models"): sample ``generation.num_samples=k`` chains and take the
  majority of their parsed answers.

Validation and test report the response loss / perplexity (base class) and the **exact match** of
greedily generated answers on up to ``eval_examples`` held-out examples (``{split}/exact_match``;
with ``num_samples=k>1`` at test also ``{split}/exact_match_sc``); the validation before training
(the sanity check) scores the untrained model, reported as ``val/exact_match_untrained``.
``{split}_generations.jsonl`` records every prompt, target, generation, parsed answer and verdict.

The SFT model is the starting policy of RLHF and DPO: ``llmlab eval ckpt_path=SFT_RUN reward=vader
data=sentiment_prompts`` scores its greedy answers with the true scorer instead
(:class:`~llmlab.methods.policy.AlignedPolicy`: ``{split}/score``; no reference, hence no KL, unless the
run had a ``ref`` role), the number PPO and DPO must raise.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from llmlab.checkpoint import CKPT_KEY
from llmlab.errors import UserError
from llmlab.inference.generate import eval_mode
from llmlab.methods.base import Step
from llmlab.methods.gpt import GPTLM, _unwrap
from llmlab.methods.policy import DEFAULT_RESPONSE_LENGTH, AlignedPolicy
from llmlab.nn.losses import cross_entropy
from llmlab.utils import atomic_write_text, plain

log = logging.getLogger(__name__)

SAMPLE_PROMPT = "What is 3 + 4?"  # the training samples' question when the data has no held-out example
GEN_BATCH = 64  # prompts generated together at evaluation (x num_samples rows)


# ---------------------------------------------------------------------------- answers


def majority_vote(answers: list[str | None]) -> str | None:
    """Self-consistency's answer (Wang et al. 2022): the most frequent of the normalised parsed
    answers, unparsable samples (None) left out; a tie goes to the answer seen first (None: no
    sample parsed)."""
    from llmlab.data.templates import normalize_answer

    parsed = [normalize_answer(a) for a in answers if a is not None]
    votes = Counter(a for a in parsed if a)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in parsed if a and votes[a] == best)


def is_cot(template, example) -> bool:
    """Whether the template asks ``example`` for a chain of thought (then its answer is parsed)."""
    return bool(template.include_cot) and (bool(example.chain) or example.task_type == "reasoning")


def parse_answer(generation: str, cot: bool) -> str | None:
    """The answer in a generation, normalised: parsed from its "The answer is X" sentence with
    chain of thought (None without one), else the whole generation."""
    from llmlab.data.templates import answer_of, normalize_answer

    return answer_of(generation) if cot else normalize_answer(generation)


# ---------------------------------------------------------------------------- the method


class InstructionTuning(AlignedPolicy, GPTLM):
    """SFT of a GPT (``models["model"]``, fresh, ``model.init_from=`` a pretrained one, or with a
    ``peft=`` tuner); see the module docstring. Export (``hf/``) and plain sampling are GPTLM's; the
    true-score evaluation of a policy (``llmlab eval ... reward=``) is AlignedPolicy's."""

    name = "sft"
    adapter_reference = False  # LoRA off = the pretrained base, not a policy the SFT model should stay near

    def __init__(self, models: dict[str, nn.Module], optim: dict | None = None, eval_examples: int = 200,
                 max_new_tokens: int | None = None, val_exact_match: bool = True, **method_keys) -> None:
        super().__init__(models, optim, **method_keys)
        from llmlab.models.gpt import GPT

        if not isinstance(_unwrap(self.model), GPT):
            raise UserError(f"method=sft fine-tunes a GPT, not {type(_unwrap(self.model)).__name__}: use "
                            "model=gpt_nano (or model.init_from=RUN of a GPT run / a Hugging Face GPT-2 dir)")
        if isinstance(eval_examples, bool) or not isinstance(eval_examples, int) or eval_examples < 0:
            raise UserError(f"method.eval_examples={eval_examples!r}: use a count >= 0 (0 = no exact match)")
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise UserError(f"method.max_new_tokens={max_new_tokens!r}: use a positive count or null (from the data)")
        self.eval_examples = eval_examples
        self.max_new_tokens = max_new_tokens
        self.val_exact_match = bool(val_exact_match)
        self.generation: dict | None = None  # decoding settings of `llmlab eval` (else the run's generation group)
        self.generations: dict[str, list[dict]] = {}  # split -> records of its last exact-match pass
        self.initial_exact_match: float | None = None  # the untrained model's val/exact_match
        # `llmlab eval reward=...`: greedy answers of method.max_new_tokens tokens (PPO's default length without one)
        self.init_policy(response_length=max_new_tokens or DEFAULT_RESPONSE_LENGTH)

    def attach_tokenizer(self, tokenizer) -> None:
        if tokenizer.eos_id is None:
            raise UserError(f"method=sft needs a tokenizer with an end-of-text token, which {tokenizer.name} lacks here, "
                            "or the model never learns where a response ends: use tokenizer=char tokenizer.eos=true "
                            "(a model.init_from run must have been pretrained with it) or tokenizer=gpt2")
        vocab = _unwrap(self.model).config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size:,} ids but the model reads {vocab:,}: use the "
                            "tokenizer the model was trained with (model.init_from brings it along)")
        super().attach_tokenizer(tokenizer)

    # ----------------------------------------------------------------- the step contract
    def model_step(self, batch: dict) -> Step:
        """Mean next-token cross-entropy over the response + EOS targets (prompt and padding are -100)."""
        ids, targets = batch["input_ids"], batch["targets"]
        if batch.get("segment_ids") is not None:  # packing: attention and positions stay inside each example
            logits = self.model(ids, segment_ids=batch["segment_ids"])  # (B, T, V)
        else:  # right padding: the mask keeps the padding out of every real token's attention
            logits = self.model(ids, attention_mask=batch.get("attention_mask"))
        loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        mask = targets != -100
        n = int(mask.sum())
        accuracy = ((logits.argmax(-1) == targets) & mask).sum() / max(n, 1)  # TRL's mean_token_accuracy
        return Step(loss, n, {"token_accuracy": accuracy.detach()})

    # ----------------------------------------------------------------- exact match at val / test
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.val_exact_match:
            return
        metrics = self.exact_match("val", self_consistency=False)
        if metrics is None:
            return
        if self.trainer.sanity_checking and self.global_step == 0:
            self.initial_exact_match = metrics["exact_match"]  # the base model's, before any training
            log.info("val/exact_match of the untrained model: %.4f", self.initial_exact_match)
            return
        self.log("val/exact_match", metrics["exact_match"])
        if self.initial_exact_match is not None:
            self.log("val/exact_match_untrained", self.initial_exact_match)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        metrics = self.exact_match("test", self_consistency=True)
        for key, value in (metrics or {}).items():
            self.log(f"test/{key}", value)

    def evaluate(self, cfg):
        """``llmlab eval``: the Lightning test loop (loss, ppl, exact match) with the command's
        ``generation`` settings (e.g. ``generation.num_samples=5`` for self-consistency); with
        ``reward=...`` the policy's mean true score instead (:meth:`AlignedPolicy.evaluate_policy`)."""
        if cfg.get("reward") is not None:
            return self.evaluate_policy(cfg)
        if cfg.get("generation") is not None:
            self.generation = plain(cfg.generation)
        return None

    def exact_match(self, split: str, *, self_consistency: bool) -> dict[str, float] | None:
        """Generate answers for the split's held-out examples and score them (None: no examples)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "examples") or self.eval_examples == 0:
            return None
        limit = self.eval_examples
        if getattr(self.trainer, "fast_dev_run", False):
            limit = min(limit, 4)  # a smoke test: exercise the path, not the benchmark
        examples = list(dm.examples(split))[:limit]
        if not examples:
            return None
        generation = self._generation()
        k = int(generation.get("num_samples") or 1) if self_consistency else 1
        metrics, records = score_examples(self, examples, self.template_of(dm), generation, num_samples=k,
                                          max_new_tokens=self.max_new_tokens)
        self.generations[split] = records
        return metrics

    def _generation(self) -> dict:
        return dict(self.generation or (self.run_config or {}).get("generation") or {})

    def template_of(self, datamodule=None):
        """The template the run trained with: the datamodule's, else the run config's ``template``."""
        template = getattr(datamodule, "template", None)
        if template is None and self._trainer is not None:
            template = getattr(getattr(self.trainer, "datamodule", None), "template", None)
        if template is None:
            from llmlab.data.templates import build_template

            template = build_template((self.run_config or {}).get("template"))
        return template

    def write_eval_artifacts(self, out_dir, split: str) -> None:
        """``{split}_generations.jsonl``: prompt, target, generation, parsed, correct per example."""
        records = self.generations.get(split)
        if records is None:
            return super().write_eval_artifacts(out_dir, split)  # a policy evaluation's records, if any
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(Path(out_dir) / f"{split}_generations.jsonl", text)

    # ----------------------------------------------------------------- inference
    def sample_text(self, prompt: str, generation: dict) -> str:
        """One greedy-or-sampled response (generation group) to ``prompt`` rendered by the template;
        with ``prompt=""`` to the first held-out validation question, shown with its prompt."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        template = self.template_of(dm)
        if prompt:
            rendered = template.prompt(prompt)
        else:
            examples = list(dm.examples("val"))[:1] if dm is not None and hasattr(dm, "examples") else []
            rendered = template.prompt_of(examples[0]) if examples else template.prompt(SAMPLE_PROMPT)
        done = self.complete([rendered], {**generation, "num_samples": 1}, max_new_tokens=generation.get("max_new_tokens"))
        return done.texts[0] if prompt else f"{rendered}{done.texts[0]}"

    def complete(self, prompts: list[str], generation: dict, *, max_new_tokens: int | None = None,
                 num_samples: int = 1):
        """:func:`llmlab.alignment.rollout.complete` with the generation group's settings, the new
        tokens capped so that the longest prompt plus its response fits the model's context."""
        from llmlab.alignment.rollout import complete

        model = _unwrap(self.model)
        longest = max(len(self.tokenizer.encode(p)) for p in prompts)
        room = model.config.block_size - int(getattr(model, "num_virtual_tokens", 0) or 0) - longest
        if room < 1:
            raise UserError(f"a prompt of {longest} tokens fills the model's context of {model.config.block_size}: "
                            "shorten it, or use a model with a larger block_size")
        n = min(int(max_new_tokens or generation.get("max_new_tokens") or 200), room)
        seed = generation.get("seed")
        gen = torch.Generator(device=self.device).manual_seed(int(seed)) if seed is not None else None
        temperature = float(generation.get("temperature", 1.0) or 0.0)  # the generation group: 0 = greedy
        with eval_mode(model):
            return complete(model, self.tokenizer, prompts, max_new_tokens=n, num_samples=num_samples,
                            greedy=bool(generation.get("greedy")) or temperature == 0.0, temperature=temperature or 1.0,
                            top_k=generation.get("top_k"), top_p=generation.get("top_p"), generator=gen)

    def infer(self, cfg):
        """``llmlab infer ckpt_path=X prompt="What is 3 + 4?"``: the template-rendered prompt's response;
        with ``generation.num_samples=k`` every sample, its parsed answer and the majority answer."""
        # ---- hook (ppo helper): `llmlab infer ckpt_path=SFT_RUN reward=vader prompts=FILE out=FILE` samples
        # ---- responses per prompt, scores them with the reward group and writes {prompt, chosen, rejected} JSONL
        if cfg.get("reward") is not None and cfg.get("prompts"):
            from llmlab.alignment.preferences import write_preferences

            return write_preferences(self, cfg)
        prompt = str(cfg.get("prompt") or "").replace("\\n", "\n")
        if not prompt:
            raise UserError('method=sft answers an instruction: llmlab infer ckpt_path=X prompt="What is 3 + 4?"')
        generation = plain(cfg.generation) if cfg.get("generation") is not None else self._generation()
        k = int(generation.get("num_samples") or 1)
        template = self.template_of()
        texts = self.complete([template.prompt(prompt)], generation, num_samples=k).texts
        if k == 1:
            print(texts[0])
            return texts
        answers = [parse_answer(t, bool(template.include_cot)) for t in texts]
        for i, (text, answer) in enumerate(zip(texts, answers)):
            print(f"--- sample {i + 1}/{k} (answer: {answer}) ---\n{text}")
        majority = majority_vote(answers)
        print(f"majority answer of {k} samples (self-consistency): {majority}")
        return {"samples": texts, "answers": answers, "majority": majority}

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CKPT_KEY]["initial_exact_match"] = self.initial_exact_match

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.initial_exact_match = (checkpoint.get(CKPT_KEY) or {}).get("initial_exact_match")


@torch.no_grad()
def score_examples(method: InstructionTuning, examples: list, template, generation: dict, *, num_samples: int = 1,
                   max_new_tokens: int | None = None) -> tuple[dict[str, float], list[dict]]:
    """Exact match of greedy answers (and with ``num_samples > 1`` of the majority of sampled ones,
    self-consistency) on ``examples`` (Instruction records); returns the metrics and one record per
    example. Answers are parsed from chains of thought, else the whole response counts (both normalised).

    ``max_new_tokens`` None: the longest reference response (+EOS) plus a quarter, so an untrained
    model that never stops costs no more than a trained one."""
    from llmlab.data.templates import normalize_answer

    prompts = [template.prompt_of(ex) for ex in examples]  # the template choice is seeded per example
    cots = [is_cot(template, ex) for ex in examples]
    if max_new_tokens is None:
        longest = max(len(method.tokenizer.encode(template.render(ex)[1])) for ex in examples) + 1
        max_new_tokens = longest + longest // 4 + 1
    records = []
    for start in range(0, len(examples), GEN_BATCH):
        chunk = slice(start, start + GEN_BATCH)
        texts = method.complete(prompts[chunk], {**generation, "greedy": True}, max_new_tokens=max_new_tokens).texts
        for ex, prompt, cot, text in zip(examples[chunk], prompts[chunk], cots[chunk], texts):
            parsed = parse_answer(text, cot)
            records.append({"prompt": prompt, "target": ex.output, "generation": text, "parsed": parsed,
                            "correct": parsed is not None and parsed == normalize_answer(ex.output)})
        if num_samples > 1:
            sampled = method.complete(prompts[chunk], {**generation, "greedy": False}, max_new_tokens=max_new_tokens,
                                      num_samples=num_samples).texts
            for j, record in enumerate(records[start:start + GEN_BATCH]):
                rows = sampled[j * num_samples:(j + 1) * num_samples]  # the samples of one prompt are adjacent
                answers = [parse_answer(t, cots[start + j]) for t in rows]
                vote = majority_vote(answers)
                record.update(samples=rows, sample_answers=answers, majority=vote,
                              correct_sc=vote is not None and vote == normalize_answer(record["target"]))
    metrics = {"exact_match": sum(r["correct"] for r in records) / len(records)}
    if num_samples > 1:
        metrics["exact_match_sc"] = sum(r["correct_sc"] for r in records) / len(records)
    return metrics, records
