"""Prompt templates for instruction tuning: an example -> (prompt text, response text).

SFT trains on the response only, so every template has one exact split point: the **prompt** is
everything before the response part, the **response** is what the model must produce (with chain
of thought the chain counts as response: the model learns to reason, not just to answer). The two
are tokenised separately (:func:`llmlab.data.instructions.encode_pair`), so the prompt/response
boundary is a token boundary whatever the tokenizer does across it. Spaces at the split point
start the response (``"Answer:" + " 4"``): byte-level BPE attaches a space to the following word
(``" 4"`` is one GPT-2 token), and a prompt ending in a space is a token a model rarely saw.
``prompt + response`` is always the template's full text.

Templates (``template=`` group, :func:`build_template`):

* ``alpaca`` — Stanford Alpaca's two prompt strings (Taori et al. 2023, ``train.py``'s ``PROMPT_DICT``),
  with and without an input, verbatim. They end at ``"### Response:"``: LLaMA's SentencePiece put a
  word boundary before the separately tokenised output; byte-level and char tokenizers have none, so
  llmlab follows the prompt with ``"\\n"`` (alpaca-lora's layout).
* ``flan`` — the seed's FLAN-style strings (spec seed000_part2 §8.2; FLAN: Wei et al. 2021), chosen per
  example with a seeded ``random.Random``. Unlike the seed (which used them only for CoT examples and
  otherwise a fallback), the qa / classification templates apply by ``task_type``; with
  ``include_cot`` an example with a ``chain`` uses the reasoning templates; an unknown task type
  uses ``"Input: {input}\\nOutput: {output}"``.
* ``chatml`` — ``<|im_start|>role\\n...<|im_end|>\\n`` turns (OpenAI's ChatML, Qwen's chat format);
  the assistant turn is the response, ended by the tokenizer's EOS (which plays ``<|im_end|>``, as in
  Qwen, whose EOS is ``<|im_end|>``).
* ``plain`` — ``"{instruction}\\n"`` then the response.

Chain of thought (Wei et al. 2022): outside ``flan`` a chain renders as ``"{chain} The answer is
{output}."``; :func:`answer_of` parses the answer back (``"The answer is X"``, ``"Therefore, the answer
is: X"``, ``"A: X"``), normalised, so "14" never matches "4" (the seed's substring test did).

This module must stay free of Lightning and Hydra imports.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmlab.errors import UserError

if TYPE_CHECKING:  # the records live with the readers; templates only read their fields
    from llmlab.data.instructions import Instruction

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "FLAN_TEMPLATES",
    "FLAN_FALLBACK",
    "TEMPLATES",
    "Template",
    "answer_of",
    "build_template",
    "exact_match",
    "normalize_answer",
    "split_template",
]

# Stanford Alpaca, train.py PROMPT_DICT (verbatim)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# spec seed000_part2 §8.2 (verbatim)
FLAN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "qa": (
        "Question: {input}\nAnswer: {output}",
        "Answer the following question: {input}\n{output}",
        "Q: {input}\nA: {output}",
    ),
    "classification": (
        "Task: Classify the text\nInput: {input}\nLabel: {output}",
        "Determine the category: {input}\nCategory: {output}",
    ),
    "reasoning": (
        "Problem: {input}\nLet's think step by step. {chain}\nTherefore, the answer is: {output}",
        "Q: {input}\nA: {chain} The answer is {output}.",
    ),
}
FLAN_FALLBACK = "Input: {input}\nOutput: {output}"

TEMPLATES = ("alpaca", "flan", "chatml", "plain")  # names build_template() accepts
COT_RESPONSE = "{chain} The answer is {output}."  # chain of thought outside flan


def split_template(template: str, **fields: str) -> tuple[str, str]:
    """``template`` filled with ``fields``, cut where the response starts (at ``{chain}`` if the
    template has one, else at ``{output}``); trailing spaces of the prompt move to the response.
    ``prompt + response == template.format(**fields)``."""
    cut = template.find("{chain}") if "{chain}" in template else template.find("{output}")
    if cut < 0:
        raise ValueError(f"template {template!r} has no {{output}} field")
    prompt, response = template[:cut].format(**fields), template[cut:].format(**fields)
    stripped = prompt.rstrip(" ")
    return stripped, prompt[len(stripped):] + response


def _transcript(history) -> str:
    """Earlier chat turns as plain lines, for templates without roles."""
    return "".join(f"{role.capitalize()}: {content}\n" for role, content in history)


@dataclass(frozen=True)
class Template:
    """Renders :class:`~llmlab.data.instructions.Instruction` records (see the module docstring)."""

    name: str = "alpaca"
    include_cot: bool = False  # an example's chain is part of the response (the model learns to reason)
    seed: int = 1337  # flan: which of a task type's templates an example gets

    def __post_init__(self) -> None:
        if self.name not in TEMPLATES:
            raise UserError(f"unknown template {self.name!r}: use template={'|'.join(TEMPLATES)}")

    # ---------------------------------------------------------------- public
    def render(self, ex: "Instruction", rng: random.Random | None = None) -> tuple[str, str]:
        """(prompt text, response text) of one example; the response is what the model must produce."""
        return self._render(ex, cot=self.include_cot and bool(ex.chain), rng=rng)

    def prompt_of(self, ex: "Instruction", rng: random.Random | None = None) -> str:
        """The prompt to generate from for ``ex`` (held-out evaluation): as :meth:`render`, except
        that with ``include_cot`` a ``reasoning`` example asks for a chain even if it has none."""
        cot = self.include_cot and (bool(ex.chain) or ex.task_type == "reasoning")
        return self._render(ex, cot=cot, rng=rng)[0]

    def prompt(self, text: str) -> str:
        """A raw prompt (PPO prompts, ``llmlab infer``) rendered as an instruction without input
        (with ``include_cot``: as a reasoning problem)."""
        return self.render_raw(text, "")[0]

    def render_raw(self, text: str, response: str) -> tuple[str, str]:
        """(prompt, response) of a raw prompt and a free-text response (preference pairs, reward
        scoring): the prompt is exactly :meth:`prompt`'s, the response gets the template's separator
        (``flan``'s ``"Answer:" + " ..."``)."""
        from llmlab.data.instructions import Instruction

        cot = self.include_cot
        mark = "\x00"  # stands for the response fields, to find the whitespace before them
        ex = Instruction(instruction=text, output=mark, chain=mark if cot else None, task_type="reasoning" if cot else "qa")
        prompt, rest = self._render(ex, cot=cot, rng=None)
        return prompt, rest[: len(rest) - len(rest.lstrip(" "))] + response

    # ---------------------------------------------------------------- per template
    def _rng(self, ex: "Instruction") -> random.Random:
        # a string seed is hashed with sha512: the same example gets the same template in every process
        return random.Random(f"{self.seed}\x00{ex.instruction}\x00{ex.input}")

    def _render(self, ex: "Instruction", *, cot: bool, rng: random.Random | None) -> tuple[str, str]:
        chain, output = (ex.chain or ""), ex.output
        if self.name == "flan":
            return self._flan(ex, cot, rng or self._rng(ex))
        response = COT_RESPONSE.format(chain=chain, output=output) if cot else output
        system = f"{ex.system}\n\n" if ex.system else ""
        history = getattr(ex, "history", ()) or ()
        if self.name == "alpaca":
            instruction = _transcript(history) + ex.instruction
            fmt = ALPACA_PROMPT_INPUT if ex.input else ALPACA_PROMPT_NO_INPUT
            return system + fmt.format(instruction=instruction, input=ex.input) + "\n", response
        if self.name == "chatml":
            turns = ([("system", ex.system)] if ex.system else []) + list(history)
            user = ex.instruction + (f"\n\n{ex.input}" if ex.input else "")
            turns.append(("user", user))
            head = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
            return head + "<|im_start|>assistant\n", response
        # plain
        body = _transcript(history) + ex.instruction + (f"\n{ex.input}" if ex.input else "")
        return system + body + "\n", response

    def _flan(self, ex: "Instruction", cot: bool, rng: random.Random) -> tuple[str, str]:
        task = "reasoning" if cot else ex.task_type
        if task == "reasoning" and not cot:
            task = "qa"  # a reasoning problem answered without its chain is a question
        options = FLAN_TEMPLATES.get(task, (FLAN_FALLBACK,))
        template = options[rng.randrange(len(options))] if len(options) > 1 else options[0]
        text = _transcript(getattr(ex, "history", ()) or ()) + ex.instruction + (f"\n{ex.input}" if ex.input else "")
        prompt, response = split_template(template, input=text, chain=ex.chain or "", output=ex.output)
        if ex.system:
            prompt = f"{ex.system}\n\n{prompt}"
        return prompt, response


def build_template(cfg: Any = None) -> Template:
    """The ``template`` group (``{name, include_cot, seed}``, a dict or DictConfig) as a :class:`Template`;
    None = alpaca; a Template is returned as is."""
    if isinstance(cfg, Template):
        return cfg
    if cfg is None:
        return Template()
    if isinstance(cfg, str):
        return Template(name=cfg)
    try:
        items = dict(cfg.items())
    except AttributeError:
        raise UserError(f"template={cfg!r} is not a template config: use template={'|'.join(TEMPLATES)}") from None
    unknown = sorted(set(items) - {"name", "include_cot", "seed"})
    if unknown:
        raise UserError(f"template config has unknown keys {unknown}: the keys are name, include_cot, seed")
    name = str(items.get("name") or "alpaca").strip().lower()
    seed = items.get("seed")
    return Template(name=name, include_cot=bool(items.get("include_cot", False)),
                    seed=1337 if seed is None else int(seed))


# ------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------

# the answer runs to the end of its sentence ("." + space / end) or line: "3.5" stays whole
_ANSWER_IS = re.compile(r"the answer is\s*:?[ \t]*(.*?)(?=\.\s|\.?$|\n)", re.IGNORECASE)
_A_COLON = re.compile(r"(?:^|\n)A:[ \t]*(.*?)(?=\.\s|\.?$|\n)")
_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def normalize_answer(text: str | None) -> str:
    """``text`` stripped, without a final ``.``, thousands commas removed from numbers
    (``" 1,000."`` -> ``"1000"``); case is kept."""
    if text is None:
        return ""
    out = text.strip()
    while out.endswith("."):
        out = out[:-1].rstrip()
    if _NUMBER.fullmatch(out):
        out = out.replace(",", "")
    return out


def answer_of(text: str | None) -> str | None:
    """The final answer stated in ``text``: the last ``"The answer is X"`` / ``"Therefore, the answer
    is: X"``, else the last ``"A: X"`` line, up to the end of its sentence; normalised
    (:func:`normalize_answer`); None if none."""
    if not text:
        return None
    found = _ANSWER_IS.findall(text) or _A_COLON.findall(text)
    if not found:
        return None
    answer = normalize_answer(found[-1])
    return answer or None


def exact_match(generated: str, reference: str) -> bool:
    """Whether a generated response states ``reference``: its parsed answer (:func:`answer_of`) or,
    without one, the whole response, compared normalised."""
    got = answer_of(generated)
    if got is None:
        got = normalize_answer(generated)
    return got == normalize_answer(reference)
