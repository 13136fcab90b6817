"""Instruction, preference and prompt data: the records, their JSONL readers and three datamodules.

Records (text level, no tokenizer): :class:`Instruction` (SFT), :class:`Preference` (reward model,
DPO), :class:`PromptRow` (PPO). A file's format is detected per row from its keys:

============  ==================================================================================
alpaca        ``{"instruction", "input"?, "output"}`` (Stanford Alpaca)
seed          ``{"input", "output", "chain"?, "task_type"?}`` (spec seed000_part2 §8.1; its JSON-array
              file reads too)
chat          ``{"messages": [{"role", "content"}, ...]}``: the last assistant message is the output,
              the user message before it the instruction, a system message the system prompt, earlier
              turns the history the template renders into the prompt
preference    ``{"prompt", "chosen", "rejected"}`` (TRL's; chosen/rejected may be message lists,
              TRL's conversational form, with the prompt a message list or implicit in them)
ranked        ``{"prompt", "responses": [...], "ranking": [...]}`` (indices best first) or ``"scores"``
              (higher better), expanded to all C(K,2) pairs (InstructGPT ranks K = 4-9 responses)
prompt        ``{"prompt", "answer"? | "output"?}`` (PPO prompts; instruction rows read as prompts
              with their output as the answer)
============  ==================================================================================

A row that fits no format, has an empty side or is not JSON ends the run with one line naming
``file:line`` and the fix. One file is split into train/val/test by prompt (every row of one prompt,
e.g. all pairs of a ranking, lands in one split), seeded, by ``val_fraction`` / ``test_fraction``;
``val_path`` / ``test_path`` name held-out files instead.

Encoding (:func:`encode_pair`): prompt and response are tokenised **separately** and concatenated,
then EOS, so the loss mask is exact at the token level (the seed masked by ``text.find('Output:')``
and trained on the question). Length rule, with ``L = min(data.max_length, model.block_size)``:

* training / held-out examples longer than ``L`` are **dropped** (counted, logged; ``truncation=drop``),
  or with ``truncation=truncate`` the response is cut from its end and EOS kept; an example whose
  prompt + EOS alone exceeds ``L`` is always dropped;
* a PPO prompt whose tokens + 1 exceed ``L`` is an error naming the row (the policy could not answer it).

Batches (pad id = EOS id, :func:`llmlab.data.classification.pad_id`):

* SFT (:class:`InstructionDataModule`): ``input_ids``, ``attention_mask`` (B, T) right-padded and
  ``targets`` (B, T) pre-shifted: ``targets[t] = input_ids[t+1]`` where that is a response token or the
  EOS, else -100. With ``packing`` whole examples are packed best-fit-decreasing (TRL's
  ``packing_strategy="bfd"``) into rows of ``L`` tokens, never split, plus ``segment_ids`` (1, 2, ...
  per example, 0 = padding) so no example attends to another; held-out loaders are never packed.
* Preferences (:class:`PreferenceDataModule`): ``input_ids``, ``attention_mask``, ``targets`` (2B, T),
  rows ``[0, B)`` chosen and ``[B, 2B)`` rejected (TRL's order).
* Prompts (:class:`PromptDataModule`): ``prompt_ids``, ``prompt_mask`` (B, T) **left**-padded for
  generation, ``prompts`` (rendered), ``raw`` and ``answers``.

Training batch ``i`` is a pure function of ``(seed, i)`` (a fresh permutation per epoch), so a resumed
run continues with the batches it would have seen.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from llmlab.data.base import Collate, ResumableBatches, SPLITS, ShuffledBatches, eval_loader
from llmlab.data.classification import _check_fraction
from llmlab.data.corpora import read_text_documents
from llmlab.data.templates import Template, build_template
from llmlab.data.tokenizers import Tokenizer
from llmlab.errors import UserError

__all__ = [
    "FORMATS",
    "Instruction",
    "InstructionDataModule",
    "Preference",
    "PreferenceDataModule",
    "PromptDataModule",
    "PromptRow",
    "collate_preferences",
    "collate_prompts",
    "collate_sft",
    "detect_format",
    "encode_pair",
    "pack",
    "read_records",
]

log = logging.getLogger(__name__)
FORMATS = ("alpaca", "seed", "chat", "preference", "ranked", "prompt")
IGNORE = -100  # targets that carry no loss (PyTorch's cross_entropy ignore_index)


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One SFT example. ``chain``: the chain of thought (the response with ``template.include_cot``);
    ``task_type``: ``qa`` | ``classification`` | ``reasoning`` (FLAN picks its templates by it);
    ``history``: earlier chat turns ``((role, content), ...)``; ``source``: ``file:line`` or a play."""

    instruction: str
    output: str
    input: str = ""
    chain: str | None = None
    task_type: str = "qa"
    system: str | None = None
    source: str = ""
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Preference:
    """A comparison: ``chosen`` is preferred to ``rejected`` as a response to the RAW ``prompt``
    (the template renders it)."""

    prompt: str
    chosen: str
    rejected: str
    source: str = ""


@dataclass(frozen=True)
class PromptRow:
    """A prompt to generate from (PPO, preference building); ``answer`` for correctness rewards;
    ``example``: the instruction it came from (then the template renders that, chain-aware)."""

    prompt: str
    answer: str | None = None
    source: str = ""
    example: Instruction | None = None


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

_EXAMPLES = {
    "alpaca": '{"instruction": "...", "input": "", "output": "..."}',
    "seed": '{"input": "...", "output": "...", "chain": "...", "task_type": "reasoning"}',
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "preference": '{"prompt": "...", "chosen": "...", "rejected": "..."}',
    "ranked": '{"prompt": "...", "responses": ["...", "..."], "ranking": [1, 0]}',
    "prompt": '{"prompt": "...", "answer": "..."}',
}


def detect_format(row: dict) -> str | None:
    """The format a row's keys say it is (see the module docstring), or None."""
    if "chosen" in row and "rejected" in row:
        return "preference"
    if "responses" in row and ("ranking" in row or "scores" in row):
        return "ranked"
    if "messages" in row:
        return "chat"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "input" in row and "output" in row:
        return "seed"
    if "prompt" in row:
        return "prompt"
    return None


def _json_rows(p: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) of a JSONL file, or of the elements of a JSON-array file (the seed's)."""
    if text.lstrip().startswith("["):
        decoder, pos = json.JSONDecoder(), text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\n,":
                pos += 1
            if pos >= len(text):
                raise UserError(f"{p}: the JSON array is not closed with ']': fix the file or write JSONL (one object a line)")
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{text.count(chr(10), 0, e.pos) + 1}: not valid JSON ({e.msg}): fix the element "
                                "or write JSONL (one object a line)") from None
            yield line, value
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{line}: not valid JSON ({e.msg}): write one JSON object per line, "
                            f"e.g. {_EXAMPLES['alpaca']}") from None


class _Row:
    """One row being converted: its location for messages and typed field access."""

    def __init__(self, p: Path, line: int, row: dict) -> None:
        self.p, self.line, self.row = p, line, row
        self.where = f"{p.name}:{line}"

    def fail(self, problem: str, fix: str) -> UserError:
        return UserError(f"{self.p}:{self.line}: {problem}: {fix}")

    def text(self, key: str, required: bool = True, empty_ok: bool = False) -> str | None:
        value = self.row.get(key)
        if value is None:
            if required:
                raise self.fail(f"no {key!r} field", "add it or remove the row")
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise self.fail(f"{key!r} is a JSON {type(value).__name__}, not a string", "write it as a string")
        if not value.strip() and not empty_ok:
            if required:
                raise self.fail(f"empty {key!r}", f"give {key!r} text or remove the row")
            return None
        return value

    def messages(self, key: str) -> list[tuple[str, str]]:
        value = self.row.get(key)
        if not isinstance(value, list) or not value:
            raise self.fail(f"{key!r} is not a non-empty list of messages",
                            'write [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
        out = []
        for k, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise self.fail(f"message {k} of {key!r} is not {{\"role\": str, \"content\": str}}",
                                "give every message a role and a content string")
            role = m["role"].strip().lower()
            if role not in ("system", "user", "assistant"):
                raise self.fail(f"message {k} of {key!r} has role {m['role']!r}", "use system, user or assistant")
            out.append((role, m["content"]))
        return out


def _chat_prompt(r: _Row, turns: list[tuple[str, str]], key: str) -> tuple[str, str | None, tuple]:
    """(last user message, system prompt, earlier turns) of a conversation that ends with a user turn."""
    system = "\n\n".join(c for role, c in turns if role == "system") or None
    turns = [(role, c) for role, c in turns if role != "system"]
    if not turns or turns[-1][0] != "user":
        raise r.fail(f"the conversation of {key!r} does not end with a user message before the response",
                     "end the prompt turns with a user message")
    if not turns[-1][1].strip():
        raise r.fail(f"the last user message of {key!r} is empty", "give it text or remove the row")
    return turns[-1][1], system, tuple(turns[:-1])


def _instruction(r: _Row, fmt: str) -> Instruction:
    task_type = (r.text("task_type", required=False) or "qa").strip().lower()
    chain = r.text("chain", required=False)
    system = r.text("system", required=False)
    if fmt == "alpaca":
        return Instruction(r.text("instruction"), r.text("output"), r.text("input", required=False, empty_ok=True) or "",
                           chain, task_type, system, r.where)
    if fmt == "seed":
        return Instruction(r.text("input"), r.text("output"), "", chain, task_type, system, r.where)
    turns = r.messages("messages")  # chat
    if turns[-1][0] != "assistant":
        raise r.fail("the conversation does not end with an assistant message (the response to learn)",
                     "end it with {\"role\": \"assistant\", ...}, or read it as a prompt with data=prompts")
    output = turns[-1][1]
    if not output.strip():
        raise r.fail("the last assistant message is empty", "give it text or remove the row")
    instruction, sys_prompt, history = _chat_prompt(r, turns[:-1], "messages")
    return Instruction(instruction, output, "", chain, task_type, sys_prompt or system, r.where, history)


def _flatten_prompt(text: str, system: str | None, history: tuple) -> str:
    """A conversation's prompt as one raw text (preferences and prompts carry no roles)."""
    lines = "".join(f"{role.capitalize()}: {c}\n" for role, c in history)
    return (f"{system}\n\n" if system else "") + lines + text


def _preferences(r: _Row, fmt: str) -> list[Preference]:
    row = r.row
    if fmt == "ranked":
        prompt = r.text("prompt")
        responses = row.get("responses")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(x, str) for x in responses):
            raise r.fail("'responses' is not a list of at least two strings", "list the candidate responses")
        for k, resp in enumerate(responses):
            if not resp.strip():
                raise r.fail(f"response {k} is empty", "give every response text or remove it")
        if "ranking" in row:
            ranking = row["ranking"]
            ok = isinstance(ranking, list) and len(ranking) >= 2 and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(responses) for i in ranking)
            if not ok or len(set(ranking)) != len(ranking):
                raise r.fail(f"'ranking' {ranking!r} is not a list of distinct response indices (0..{len(responses) - 1})",
                             "list the indices of 'responses' best first, e.g. [2, 0, 1]")
            order = list(ranking)
        else:
            scores = row["scores"]
            if not isinstance(scores, list) or len(scores) != len(responses) or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
                raise r.fail("'scores' is not one number per response", "give one score per response (higher = better)")
            order = sorted(range(len(responses)), key=lambda i: -scores[i])
        pairs = []
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                i, j = order[a], order[b]
                if "scores" in row and "ranking" not in row and row["scores"][i] == row["scores"][j]:
                    continue  # a tie states no preference
                pairs.append(Preference(prompt, responses[i], responses[j], r.where))
        return pairs
    # {prompt, chosen, rejected}: strings, or TRL's conversational message lists
    sides = {}
    for key in ("chosen", "rejected"):
        if isinstance(row.get(key), list):
            turns = r.messages(key)
            if turns[-1][0] != "assistant":
                raise r.fail(f"{key!r} does not end with an assistant message", "end it with the response")
            sides[key] = (turns[-1][1], turns[:-1])
        else:
            sides[key] = (r.text(key), None)
        if not sides[key][0].strip():
            raise r.fail(f"empty {key!r}", "give both responses text or remove the row")
    if isinstance(row.get("prompt"), list):
        prompt = _flatten_prompt(*_chat_prompt(r, r.messages("prompt"), "prompt"))
    elif "prompt" in row:
        prompt = r.text("prompt")
    else:  # implicit prompt: the turns chosen and rejected share
        c_turns, r_turns = sides["chosen"][1], sides["rejected"][1]
        if not c_turns or c_turns != r_turns:
            raise r.fail("no 'prompt' and chosen/rejected do not share their turns before the response",
                         "add a \"prompt\" field")
        prompt = _flatten_prompt(*_chat_prompt(r, c_turns, "chosen"))
    if sides["chosen"][0] == sides["rejected"][0]:
        raise r.fail("'chosen' and 'rejected' are the same text", "remove the row (it states no preference)")
    return [Preference(prompt, sides["chosen"][0], sides["rejected"][0], r.where)]


def as_prompt_row(record) -> PromptRow:
    """A prompt row from any record: an :class:`Instruction` keeps its output as the answer and is
    rendered from the instruction itself (chain-aware); a :class:`Preference` gives its prompt."""
    if isinstance(record, Instruction):
        raw = record.instruction + (f"\n{record.input}" if record.input else "")
        return PromptRow(raw, record.output or None, record.source, record)
    if isinstance(record, Preference):
        return PromptRow(record.prompt, None, record.source)
    return record


def _prompt_row(r: _Row, fmt: str) -> PromptRow:
    if fmt in ("alpaca", "seed", "chat"):
        if fmt == "chat" and r.messages("messages")[-1][0] != "assistant":
            text, system, history = _chat_prompt(r, r.messages("messages"), "messages")
            return PromptRow(_flatten_prompt(text, system, history), None, r.where,
                             Instruction(text, "", system=system, source=r.where, history=history))
        return as_prompt_row(_instruction(r, fmt))
    if fmt in ("preference", "ranked"):
        return PromptRow(_preferences(r, fmt)[0].prompt, None, r.where)
    answer = r.text("answer", required=False, empty_ok=True)
    if answer is None:
        answer = r.text("output", required=False, empty_ok=True)
    return PromptRow(r.text("prompt"), answer if answer is None or answer.strip() else None, r.where)


# what each kind of datamodule reads: kind -> (formats, converter, the data option for each other kind)
_KINDS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "instructions": (("alpaca", "seed", "chat"), lambda r, f: [_instruction(r, f)]),
    "preferences": (("preference", "ranked"), _preferences),
    "prompts": (("prompt", "alpaca", "seed", "chat", "preference", "ranked"), lambda r, f: [_prompt_row(r, f)]),
}
_DATA_FOR = {"alpaca": "instructions", "seed": "instructions", "chat": "instructions", "preference": "preferences",
             "ranked": "preferences", "prompt": "prompts"}


def read_records(path, kind: str) -> list:
    """Every record of a JSONL (or JSON-array) file for a datamodule of ``kind``
    (``instructions`` | ``preferences`` | ``prompts``); one line naming ``file:line`` per bad row."""
    formats, convert = _KINDS[kind]
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"{p} does not exist or is not a file: pass data.path=FILE (JSONL, one object a line)")
    text = read_text_documents(p)[0]  # UTF-8 checked, BOM and CR stripped; empty -> one line
    out: list = []
    for line, row in _json_rows(p, text):
        r = _Row(p, line, row) if isinstance(row, dict) else None
        if r is None:
            raise UserError(f"{p}:{line}: a JSON {type(row).__name__}, not an object: write one object per line, "
                            f"e.g. {_EXAMPLES[formats[0]]}")
        fmt = detect_format(row)
        if fmt is None:
            raise r.fail(f"fits no {kind} format (keys: {', '.join(map(str, row)) or 'none'})",
                         "write " + " or ".join(_EXAMPLES[f] for f in formats[:3]))
        if fmt not in formats:
            raise r.fail(f"is a {fmt} row, but data={kind} reads {'/'.join(formats)} rows",
                         f"use data={_DATA_FOR[fmt]} for this file")
        out.extend(convert(r, fmt))
    if not out:
        raise UserError(f"{p} has no rows: add {kind} rows, e.g. {_EXAMPLES[formats[0]]}")
    return out


def _prompt_key(record) -> str:
    """Rows with the same key always share a split (all pairs of one ranking, repeated prompts)."""
    if isinstance(record, Instruction):
        return f"{record.system}\x00{record.history}\x00{record.instruction}\x00{record.input}"
    return record.prompt


def split_records(records: list, val_fraction: float, test_fraction: float, seed: int,
                  held_out: dict[str, bool] | None = None) -> dict[str, list]:
    """A seeded split by prompt: ``round(fraction * prompts)`` prompts to test, then val (0 where
    ``held_out[split]``: that split comes from its own file)."""
    held_out = held_out or {}
    groups: dict[str, list] = {}
    for rec in records:
        groups.setdefault(_prompt_key(rec), []).append(rec)
    keys = list(groups)
    order = [keys[k] for k in np.random.default_rng(int(seed)).permutation(len(keys))]
    n_test = 0 if held_out.get("test") else round(test_fraction * len(keys))
    n_val = 0 if held_out.get("val") else round(val_fraction * len(keys))
    out = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {split: [rec for key in out[split] for rec in groups[key]] for split in SPLITS}


# ------------------------------------------------------------------------------------------------
# Encoding and batching
# ------------------------------------------------------------------------------------------------


def eos_of(tokenizer: Tokenizer) -> int:
    """The tokenizer's EOS id (responses end with it; it pads too), or one line naming the fix."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise UserError(f"tokenizer={getattr(tokenizer, 'name', '?')} has no end-of-text token, which instruction "
                        "tuning needs (the model must learn where a response ends): use tokenizer=char "
                        "tokenizer.eos=true, or tokenizer=gpt2")
    return int(eos)


def encode_pair(tokenizer: Tokenizer, prompt_text: str, response_text: str, max_length: int | None = None,
                where: str = "the prompt") -> tuple[list[int], int]:
    """``(ids, n_prompt)``: prompt and response tokenised separately, concatenated, then EOS.

    Longer than ``max_length``: the response is cut from its end and the EOS kept; a prompt with
    no room left for the EOS is an error naming ``where`` (the datamodules drop such examples first).
    """
    eos = eos_of(tokenizer)
    prompt, response = tokenizer.encode(prompt_text), tokenizer.encode(response_text)
    if max_length is not None:
        if len(prompt) + 1 > int(max_length):
            raise UserError(f"{where} is {len(prompt)} tokens, longer than the context ({max_length} tokens with the "
                            "EOS): shorten it, or raise data.max_length / model.block_size")
        response = response[: int(max_length) - len(prompt) - 1]
    return prompt + response + [eos], len(prompt)


def _fit(prompt: list[int], response: list[int], eos: int, limit: int, truncate: bool) -> list[int] | None:
    """prompt + response + EOS within ``limit`` tokens, or None (dropped)."""
    if len(prompt) + len(response) + 1 <= limit:
        return prompt + response + [eos]
    if truncate and len(prompt) + 2 <= limit:  # at least one response token besides the EOS
        return prompt + response[: limit - len(prompt) - 1] + [eos]
    return None


def _targets(ids: list[int], n_prompt: int) -> list[int]:
    """Pre-shifted next tokens, -100 where the next token is a prompt token (and at the end)."""
    return [ids[t + 1] if t + 1 >= n_prompt else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def collate_sft(items: list[tuple[list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """``(ids, n_prompt)`` examples -> right-padded ``input_ids``, ``targets``, ``attention_mask``."""
    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), int(pad), dtype=torch.long)
    targets = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for b, (ids, n_prompt) in enumerate(items):
        input_ids[b, : len(ids)] = torch.as_tensor(ids)
        targets[b, : len(ids)] = torch.as_tensor(_targets(ids, n_prompt))
        mask[b, : len(ids)] = 1
    return {"input_ids": input_ids, "targets": targets, "attention_mask": mask}


def collate_packed(rows: list[list[tuple[list[int], int]]], pad: int) -> dict[str, torch.Tensor]:
    """Packed rows (each a list of ``(ids, n_prompt)`` examples) -> the SFT batch + ``segment_ids``
    (1, 2, ... per example, 0 = padding); no target crosses from one example into the next."""
    flat = [([t for ids, _ in row for t in ids], [t for ids, n in row for t in _targets(ids, n)],
             [s for s, (ids, _) in enumerate(row, 1) for _ in ids]) for row in rows]
    width = max(len(ids) for ids, _, _ in flat)
    out = {k: torch.full((len(rows), width), v, dtype=torch.long)
           for k, v in (("input_ids", int(pad)), ("targets", IGNORE), ("attention_mask", 0), ("segment_ids", 0))}
    for b, (ids, targets, segments) in enumerate(flat):
        out["input_ids"][b, : len(ids)] = torch.as_tensor(ids)
        out["targets"][b, : len(ids)] = torch.as_tensor(targets)
        out["segment_ids"][b, : len(ids)] = torch.as_tensor(segments)
        out["attention_mask"][b, : len(ids)] = 1
    return out


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing (TRL's ``packing_strategy="bfd"``): example indices grouped into rows of
    at most ``capacity`` tokens; every example whole in exactly one row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row of {capacity}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def collate_preferences(items: list[tuple[list[int], int, list[int], int]], pad: int) -> dict[str, torch.Tensor]:
    """``(chosen_ids, n_prompt, rejected_ids, n_prompt)`` pairs -> (2B, T): chosen rows first."""
    rows = [(c, nc) for c, nc, _, _ in items] + [(r, nr) for _, _, r, nr in items]
    return collate_sft(rows, pad)


def collate_prompts(items: list[tuple[list[int], str, str, str | None]], pad: int) -> dict[str, Any]:
    """``(prompt_ids, rendered, raw, answer)`` -> ``prompt_ids`` / ``prompt_mask`` left-padded + the texts."""
    from llmlab.alignment.rollout import left_pad  # generation's own padding (lazy: keeps data free of inference)

    ids, mask = left_pad([it[0] for it in items], pad)
    return {"prompt_ids": ids, "prompt_mask": mask, "prompts": [it[1] for it in items],
            "raw": [it[2] for it in items], "answers": [it[3] for it in items]}


# ------------------------------------------------------------------------------------------------
# Datamodules
# ------------------------------------------------------------------------------------------------


class AlignmentDataModule(ResumableBatches, L.LightningDataModule):
    """Records per split -> encoded items -> batches. A file (``path``, split by prompt unless
    ``val_path`` / ``test_path``) or ``builder``, a callable ``(val_fraction=, test_fraction=, seed=)``
    returning ``{split: [records]}`` (built-in data, :mod:`llmlab.data.builtin_alignment`).
    The tokenizer is set after construction, before :meth:`setup`."""

    kind = "instructions"  # what read_records reads for this datamodule
    TRUNCATION = ("drop", "truncate")

    def __init__(self, path: str | None = None, val_path: str | None = None, test_path: str | None = None,
                 builder: Callable[..., dict[str, list]] | None = None, template: Any = None, corpus: str | None = None,
                 max_length: int = 256, block_size: int | None = None, batch_size: int = 16,
                 eval_batch_size: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 truncation: str = "drop", seed: int = 1337, num_workers: int = 0) -> None:
        super().__init__()
        if builder is None and (path is None or str(path).strip() in ("", "???")):
            raise UserError(f"data={self.kind} needs data.path=FILE: a JSONL file, one row a line, e.g. "
                            f"{_EXAMPLES[_KINDS[self.kind][0][0]]}")
        if builder is not None and not callable(builder):
            raise UserError(f"data.builder={builder!r} is not a function: give it a _target_ (as conf/data/"
                            "arithmetic_cot.yaml does) or drop it and pass data.path=FILE")
        self.path = None if builder is not None else str(path)
        self.val_path, self.test_path, self.builder = val_path, test_path, builder
        self.corpus = corpus or self.kind
        self.template: Template = build_template(template)
        limit = int(max_length) if block_size is None else min(int(max_length), int(block_size))
        self.max_length = limit  # tokens per example (prompt + response + EOS), within the model's context
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        for name in ("max_length", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"data.{name}={getattr(self, name)} must be at least 1: pass a positive number")
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        if truncation not in self.TRUNCATION:
            raise UserError(f"data.truncation={truncation!r}: use drop (leave long examples out) or truncate "
                            "(cut the response, keep the EOS)")
        self.truncation = truncation
        self.seed, self.num_workers = int(seed), int(num_workers)
        self._tokenizer: Tokenizer | None = None
        self.next_batch = 0
        self._records: dict[str, list] | None = None
        self.encoded: dict[str, list] | None = None
        self.dropped: dict[str, int] = {}
        self._setup_key: str | None = None

    # ---------------------------------------------------------------- records
    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer | None) -> None:
        if tokenizer is not None:
            eos_of(tokenizer)  # fail before any model is built
        self._tokenizer = tokenizer

    def read(self) -> dict[str, list]:
        """The records of each split (text level, no tokenizer)."""
        if self.builder is not None:
            splits = self.builder(val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed)
            return {split: list(splits.get(split, [])) for split in SPLITS}
        held = {"val": bool(self.val_path), "test": bool(self.test_path)}
        splits = split_records(read_records(self.path, self.kind), self.val_fraction, self.test_fraction, self.seed, held)
        for split, file in (("val", self.val_path), ("test", self.test_path)):
            if file:
                splits[split] = read_records(file, self.kind)
        return splits

    @property
    def records(self) -> dict[str, list]:
        if self._records is None:
            splits = self.read()
            if not splits["train"]:
                raise UserError(f"{self.path or self.corpus}: no training rows left: lower data.val_fraction / "
                                "data.test_fraction, or add rows")
            self._records = splits
        return self._records

    def method_kwargs(self) -> dict:
        return {}

    def texts(self, split: str) -> list[str]:
        """Rendered prompt + response texts of ``split``."""
        raise NotImplementedError

    def documents(self) -> list[str]:
        """The rendered training texts (a fresh char vocabulary is learned from them)."""
        return self.texts("train")

    # ---------------------------------------------------------------- encoding
    def encode_split(self, split: str) -> list:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self._tokenizer is None:
            raise UserError("the datamodule has no tokenizer: set datamodule.tokenizer before setup()")
        if self.encoded is not None and self._setup_key == self._tokenizer.fingerprint:
            return
        self.encoded, self.dropped = {}, {}
        for split in SPLITS:
            self.encoded[split] = self.encode_split(split)
            if self.dropped.get(split):
                log.warning("%s: %d %s examples longer than data.max_length=%d left out (data.truncation=drop)",
                            self.corpus, self.dropped[split], split, self.max_length)
        if not self.encoded["train"]:
            raise UserError(f"every training example of {self.corpus} is longer than data.max_length={self.max_length}: "
                            "raise data.max_length / model.block_size, or use data.truncation=truncate")
        self._setup_key = self._tokenizer.fingerprint
        log.info("%s: %s", self.corpus, ", ".join(f"{s} {len(self.encoded[s]):,}" for s in SPLITS))

    def _encoded(self, split: str) -> list:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        if self.encoded is None:
            self.setup()
        return self.encoded[split]

    def _pair(self, prompt_text: str, response_text: str, split: str) -> tuple[list[int], int] | None:
        prompt = self._tokenizer.encode(prompt_text)
        ids = _fit(prompt, self._tokenizer.encode(response_text), eos_of(self._tokenizer), self.max_length,
                   self.truncation == "truncate")
        if ids is None:
            self.dropped[split] = self.dropped.get(split, 0) + 1
            return None
        return ids, len(prompt)

    def _tokens(self, item) -> int:
        return len(item[0])

    def stats(self) -> dict[str, int]:
        """Tokens per split, ``{split}_examples`` and ``{split}_dropped`` (too long)."""
        if self.encoded is None:
            raise UserError("the datamodule is not set up yet: call setup() (after setting its tokenizer) before stats()")
        out = {split: int(sum(self._tokens(it) for it in self.encoded[split])) for split in SPLITS}
        out.update({f"{split}_examples": len(self.encoded[split]) for split in SPLITS})
        out.update({f"{split}_dropped": int(self.dropped.get(split, 0)) for split in SPLITS})
        return out

    # ---------------------------------------------------------------- loaders
    collate_fn: Callable = staticmethod(collate_sft)

    def _pad(self) -> int:
        return eos_of(self._tokenizer)  # pad id = EOS id (masked out everywhere)

    def train_items(self) -> tuple[list, Callable]:
        return self._encoded("train"), self.collate_fn

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if getattr(self, "trainer", None) is not None else 0
        items, fn = self.train_items()
        batches = ShuffledBatches(items, self.batch_size, Collate(fn, self._pad()), self.seed,
                                start_batch=self.next_batch, rank=rank)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, generator=self._loader_rng())

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every item of ``split`` once, in order (never packed)."""
        return eval_loader(self._encoded(split), self.eval_batch_size, getattr(self, "trainer", None), split,
                           collate_fn=Collate(self.collate_fn, self._pad()), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")


class InstructionDataModule(AlignmentDataModule):
    """SFT data: :class:`Instruction` records rendered by the template (``data=instructions``,
    ``shakespeare_instruct``, ``arithmetic_cot``); ``packing`` packs whole examples into rows."""

    kind = "instructions"

    def __init__(self, packing: bool = False, **options) -> None:
        super().__init__(**options)
        self.packing = bool(packing)

    def examples(self, split: str) -> list[Instruction]:
        """The examples of ``split`` (held-out exact match: generate from ``template.prompt_of(ex)``)."""
        return list(self.records[split])

    def texts(self, split: str) -> list[str]:
        return ["".join(self.template.render(ex)) for ex in self.records[split]]

    def encode_split(self, split: str) -> list:
        pairs = (self._pair(*self.template.render(ex), split) for ex in self.records[split])
        return [p for p in pairs if p is not None]

    def train_items(self) -> tuple[list, Callable]:
        items = self._encoded("train")
        if not self.packing:
            return items, collate_sft
        rows = pack([len(ids) for ids, _ in items], self.max_length)
        return [[items[i] for i in row] for row in rows], collate_packed


class PreferenceDataModule(AlignmentDataModule):
    """Reward-model / DPO data: :class:`Preference` pairs (``data=preferences``, ``sentiment_preferences``)."""

    kind = "preferences"
    collate_fn = staticmethod(collate_preferences)

    def pairs(self, split: str) -> list[Preference]:
        return list(self.records[split])

    def _render(self, pref: Preference, response: str) -> tuple[str, str]:
        return self.template.render_raw(pref.prompt, response)  # the prompt PPO's policy is given

    def texts(self, split: str) -> list[str]:
        return ["".join(self._render(p, side)) for p in self.records[split] for side in (p.chosen, p.rejected)]

    def encode_split(self, split: str) -> list:
        out = []
        for pref in self.records[split]:
            chosen = self._pair(*self._render(pref, pref.chosen), split)
            # a pair is dropped (and counted) once, at its first side that does not fit
            rejected = self._pair(*self._render(pref, pref.rejected), split) if chosen is not None else None
            if rejected is not None:
                out.append((*chosen, *rejected))
        return out

    def _tokens(self, item) -> int:
        return len(item[0]) + len(item[2])


class PromptDataModule(AlignmentDataModule):
    """PPO prompts: :class:`PromptRow` records (``data=prompts``, ``sentiment_prompts``); instruction
    and preference files read too (their prompts, with an instruction's output as the answer)."""

    kind = "prompts"
    collate_fn = staticmethod(collate_prompts)

    def read(self) -> dict[str, list]:
        """As every alignment datamodule; a builder of instructions (``arithmetic_cot``) gives its
        prompts, each with its output as the answer (``reward=arithmetic`` checks it)."""
        return {split: [as_prompt_row(r) for r in rows] for split, rows in super().read().items()}

    def rows(self, split: str) -> list[PromptRow]:
        return list(self.records[split])

    def rendered(self, row: PromptRow) -> str:
        """The prompt text the policy continues."""
        return self.template.prompt_of(row.example) if row.example is not None else self.template.prompt(row.prompt)

    def texts(self, split: str) -> list[str]:
        return [self.rendered(r) + (f" {r.answer}" if r.answer else "") for r in self.records[split]]

    def encode_split(self, split: str) -> list:
        out = []
        for row in self.records[split]:
            text = self.rendered(row)
            ids = self._tokenizer.encode(text)
            if len(ids) + 1 > self.max_length:
                raise UserError(f"prompt of {row.source or 'a ' + split + ' row'} is {len(ids)} tokens, longer than the "
                                f"context ({self.max_length} tokens, room for at least one response token): shorten "
                                "it, or raise data.max_length / model.block_size")
            out.append((ids, text, row.prompt, row.answer))
        return out

    @property
    def max_prompt_length(self) -> int:
        """The longest prompt in tokens (a policy needs ``max_new_tokens`` more of context)."""
        return max((len(it[0]) for split in SPLITS for it in self._encoded(split)), default=0)
