"""Scorers: the reward a policy is trained (PPO) or ranked (preference data) against.

InstructGPT (Ouyang et al. 2022, §3.5) scores a whole response once, with a learned reward model;
the classic small-scale substitutes are rule-based: the sentiment of a continuation (Ziegler et
al. 2019, "Fine-Tuning Language Models from Human Preferences", §4.1 "continue this line
positively", here with the VADER lexicon, Hutto & Gilbert 2014) and the correctness of a parsed
answer (a verifiable reward, as in GSM8K-style RL).

Every scorer is called as ``scorer(prompts, responses, answers) -> (B,) float tensor``:

* ``prompts``: the prompt texts the policy saw (template-rendered);
* ``responses``: the decoded responses (EOS and padding stripped);
* ``answers``: the reference answer of each row (or None).

:class:`ModelScorer` can also score token ids directly (``score_ids``), which PPO does when the
reward model shares the policy's tokenizer: the exact tokens the policy sampled, never a
decode/re-encode round trip. Scorers are built from the ``reward`` config group with
:func:`build_scorer` (``reward=vader|arithmetic|model``, ``reward.path=RUN`` for ``model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from llmlab.errors import UserError


class Scorer(Protocol):
    name: str

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str | None]) -> torch.Tensor: ...


class VaderScorer:
    """VADER sentiment of the response alone (the prompt is the task, not the answer): ``compound``
    in [-1, 1] (the normalised sum of valences; Hutto & Gilbert 2014), or ``pos``/``neg``/``neu``."""

    name = "vader"
    FIELDS = ("compound", "pos", "neg", "neu")

    def __init__(self, field: str = "compound") -> None:
        if field not in self.FIELDS:
            raise UserError(f"reward.field={field!r}: VADER reports {', '.join(self.FIELDS)}")
        self.field = field

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str | None] | None = None) -> torch.Tensor:
        from llmlab.alignment import vader

        if self.field == "compound":
            values = vader.compound(list(responses))
        else:
            values = vader.polarity(list(responses), self.field)
        return torch.as_tensor([float(v) for v in values], dtype=torch.float32)


def reference_answer(text: str) -> str:
    """The comparable form of a row's answer: parsed from a chain ("The answer is X") when it states
    one, else the whole text, normalised as :func:`llmlab.data.templates.normalize_answer` does."""
    from llmlab.data.templates import answer_of, normalize_answer

    return answer_of(text) or normalize_answer(text)


class ArithmeticScorer:
    """1.0 when the answer parsed from the response (``answer_of``: "The answer is X") equals the
    row's answer, else 0.0 (no parsable answer is wrong). Rows without an answer are a user error."""

    name = "arithmetic"

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str | None]) -> torch.Tensor:
        from llmlab.data.templates import answer_of

        if answers is None or any(a is None for a in answers):
            raise UserError("reward=arithmetic compares parsed answers with the data's answers, but some prompts "
                            "have none: use data=arithmetic_cot or prompt rows with an `answer` field")
        got = [answer_of(r) for r in responses]
        return torch.as_tensor([float(g is not None and g == reference_answer(a)) for g, a in zip(got, answers)],
                               dtype=torch.float32)


class ModelScorer:
    """A trained reward model (``method=reward`` run or checkpoint, Bradley-Terry; Ouyang et al. 2022
    §3.5): the scalar its head gives the last token of prompt + response + EOS.

    ``tokenizer``: the policy's. The reward model must read the very ids the policy writes, so its
    tokenizer must be the same (same fingerprint); otherwise one line naming both. ``record`` is what
    the policy's checkpoint keeps of it (``role_records["reward"]``: source + sha256 of its weights).
    """

    name = "model"

    def __init__(self, path: str | Path, tokenizer=None) -> None:
        from llmlab.checkpoint import find_checkpoint_file, load_method
        from llmlab.models.build import state_hash

        if path is None or str(path) in ("", "???"):
            raise UserError("reward=model needs the reward model: pass reward.path=RUN_DIR_OR_CKPT of a method=reward run")
        file = find_checkpoint_file(path)
        module, meta = load_method(file)
        if not hasattr(module, "score_ids"):
            raise UserError(f"reward.path={path} is a method={meta.get('method')} checkpoint, not a reward model: "
                            "pass a run of llmlab train method=reward (e.g. experiment=reward_sentiment)")
        self.module = module.eval()
        self.tokenizer = module.tokenizer
        if tokenizer is not None and self.tokenizer is not None and tokenizer.fingerprint != self.tokenizer.fingerprint:
            raise UserError(f"reward.path={path} reads tokenizer {self.tokenizer!r} ({self.tokenizer.fingerprint[:12]}…) "
                            f"but the policy writes {tokenizer!r} ({tokenizer.fingerprint[:12]}…): train the reward model "
                            "from the policy's run (model.init_from=SFT_RUN) so both share one tokenizer")
        if self.tokenizer is None or self.tokenizer.eos_id is None:
            raise UserError(f"reward.path={path} has no tokenizer with an EOS id: train it with tokenizer.eos=true")
        self.record = {"source": str(file.resolve()), "kind": "llmlab", "config": meta.get("model"),
                       "sha256": state_hash(module.model)}

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B,)`` rewards of token rows (any padding side; the last real token is pooled)."""
        device = input_ids.device
        out = self.module.score_ids(input_ids.to(self.device), attention_mask.to(self.device))
        return out.float().to(device)

    def __call__(self, prompts: list[str], responses: list[str], answers: list[str | None] | None = None) -> torch.Tensor:
        """Rewards of rendered ``prompts`` and their ``responses`` (encoded as the reward model trained)."""
        return self.module.score_texts(list(prompts), list(responses), rendered=True).float()


def score_completions(scorer: Scorer, done, prompts: list[str], answers: list[str | None] | None = None) -> torch.Tensor:
    """``(N,)`` scores of :class:`~llmlab.alignment.rollout.Completions` to ``prompts`` (rendered; row ``i``
    answers ``prompts[done.prompt_index[i]]``): the token ids themselves for a scorer that reads ids (a
    reward model with the policy's tokenizer), else (prompt text, response text, answer) per row."""
    if hasattr(scorer, "score_ids"):
        ids = torch.cat([done.prompt_ids, done.response_ids], dim=1)
        mask = torch.cat([done.prompt_mask, done.response_mask], dim=1)
        scores = scorer.score_ids(ids, mask)
    else:
        answers = list(answers) if answers is not None else [None] * len(prompts)
        rows = done.prompt_index
        scores = scorer([prompts[i] for i in rows], list(done.texts), [answers[i] for i in rows])
    return torch.as_tensor(scores, dtype=torch.float32).to(done.response_ids.device)


SCORERS = {"vader": VaderScorer, "arithmetic": ArithmeticScorer, "model": ModelScorer}


def build_scorer(cfg: dict | None, *, tokenizer=None) -> Scorer:
    """The scorer the ``reward`` group describes (``name`` + its keys)."""
    cfg = dict(cfg or {})
    name = cfg.pop("name", None)
    if not name:
        raise UserError("no reward to score responses with: pass reward=vader, reward=arithmetic or "
                        "reward=model reward.path=REWARD_RUN")
    if name not in SCORERS:
        raise UserError(f"reward={name!r} is not a scorer llmlab has: choose one of {', '.join(SCORERS)}")
    if name == "model":
        return ModelScorer(cfg.get("path"), tokenizer=tokenizer)
    if name == "vader":
        return VaderScorer(field=str(cfg.get("field", "compound")))
    return ArithmeticScorer()
