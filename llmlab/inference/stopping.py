"""Stop strings: end a sample as soon as its text contains one of them (OpenAI ``stop``, Hugging
Face ``stop_strings``).

Token boundaries do not follow text: a stop string can span several tokens ("\\n\\n" from two
"\\n"), start in the middle of one (" the end" contains "end"), or sit next to a character that
byte-level BPE splits over several tokens (an "é" whose two bytes arrive one step apart). So the
check runs on the *decoded text* of everything generated so far, never on token ids, as the
:class:`~llmlab.inference.detokenize.IncrementalDetokenizer` emits it: a half character is held
back until the step that completes it, and the match is found then.

As in OpenAI's API, the returned text ends *before* the stop string (Hugging Face keeps it).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from llmlab.errors import UserError
from llmlab.inference.detokenize import IncrementalDetokenizer


class StopStrings:
    """``check(text) -> int | None``: where to cut ``text`` (start of the earliest stop string), or None."""

    def __init__(self, stop: Sequence[str] | str | None, tokenizer=None) -> None:
        if stop is None:
            stop = []
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop)
        bad = [s for s in stop if not isinstance(s, str) or s == ""]
        if bad:
            raise UserError(f"stop strings must be non-empty strings, got {bad!r}: e.g. stop_strings='[\"\\n\\n\"]'")
        self.stop = stop
        self.tokenizer = tokenizer
        self.max_len = max((len(s) for s in stop), default=0)

    def __bool__(self) -> bool:
        return bool(self.stop)

    def check(self, text: str, start: int = 0) -> int | None:
        """Index in ``text`` where the first stop string begins (earliest of all), or None.

        ``start``: only matches ending after ``start`` are new (text up to ``start`` was checked
        before), so a caller feeding growing text searches ``text[start - max_len + 1:]`` only."""
        begin = max(0, start - self.max_len + 1)
        hits = [i for i in (text.find(s, begin) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def cut(self, text: str) -> str:
        """``text`` up to (not including) its first stop string; unchanged without one."""
        i = self.check(text)
        return text if i is None else text[:i]

    def decode(self, ids: Iterable[int]) -> str:
        if self.tokenizer is None:
            raise UserError("stop strings need a tokenizer to read the generated text: pass tokenizer=")
        return self.tokenizer.decode(list(ids))


class StopTracker:
    """Per-row stop-string state for a decoding loop: ``update(rows_new_ids) -> finished flags``.

    Each row's text comes from its own :class:`~llmlab.inference.detokenize.IncrementalDetokenizer`
    (whole characters only: a half character is never matched, nor ends a match) and only the part
    that could hold a new match is searched."""

    def __init__(self, stop: StopStrings, batch_size: int) -> None:
        self.stop = stop
        # the StopStrings decode like their tokenizer (and say what is missing without one)
        self.rows = [IncrementalDetokenizer(stop) for _ in range(batch_size)]
        self.done = [False] * batch_size

    def update(self, generated: list[list[int]]) -> list[bool]:
        """``generated[b]``: row ``b``'s new token ids so far; returns which rows hit a stop string."""
        for b, ids in enumerate(generated):
            if self.done[b]:
                continue
            row = self.rows[b]
            searched = len(row.text)  # text before this step was searched already
            row.feed(ids[len(row.ids):])
            if self.stop.check(row.text, searched) is not None:
                self.done[b] = True
        return self.done
