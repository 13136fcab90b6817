"""Incremental detokenisation: token ids in, newly completed text out (vLLM's
``detokenize_incrementally``, Hugging Face's ``TextStreamer``).

Byte-level BPE (GPT-2) may split one UTF-8 character over several tokens: until its last byte
arrives the text decodes to U+FFFD there. A trailing U+FFFD is therefore (usually) a character whose
bytes have not all arrived, and it is **held back**: :meth:`IncrementalDetokenizer.feed` returns the
whole characters before it now and the character itself once a later token completes it, so no
half character is ever emitted, searched for a stop string, or ends a match. :meth:`~IncrementalDetokenizer.flush`
(the sequence ended) returns whatever is left, a replacement character included.

Only the tokens not yet fully emitted are decoded, in context of a few earlier ones (``CONTEXT``):
tokenizers whose decode is not a plain concatenation (a word vocabulary joins with spaces) then
agree with decoding everything; if the decoded context does not reappear as the start of the new
decode, the text is held back too. For llmlab's tokenizers the emitted pieces add up to
``decode(all ids)`` (minus a trailing U+FFFD until :meth:`~IncrementalDetokenizer.flush`).

One detokeniser serves the stop-string check of :func:`~llmlab.inference.generate.generate`
(:class:`~llmlab.inference.stopping.StopTracker`) and the streamed text of the continuous-batching
engine (:mod:`llmlab.inference.engine`), which ``llmlab serve`` sends as server-sent events.
"""

from __future__ import annotations

from typing import Iterable

REPLACEMENT = "\ufffd"  # what a half character decodes to


class IncrementalDetokenizer:
    """One sequence's text as its token ids arrive.

    ``feed(ids)`` appends ids and returns the text they completed (whole characters only);
    ``flush()`` returns the rest. ``text`` is everything returned so far, ``ids`` every id fed.
    """

    CONTEXT = 4  # earlier tokens decoded along with the new ones

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # returned so far
        self._read = 0  # tokens whose whole text is in self.text
        self._partial = ""  # text of tokens after _read already returned (the characters before a held-back one)

    def feed(self, ids: Iterable[int]) -> str:
        """Append ``ids``; return the newly completed text (a held-back character is not in it)."""
        self.ids.extend(int(i) for i in ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text of every id not returned yet, a half character included (the sequence ended)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read >= len(self.ids):
            return ""
        start = max(0, self._read - self.CONTEXT)
        before = self.tokenizer.decode(self.ids[start:self._read])
        text = self.tokenizer.decode(self.ids[start:])
        if text.startswith(before):
            pending = text[len(before):]
        elif final:
            pending = self.tokenizer.decode(self.ids[self._read:])
        else:
            return ""  # the decoder merged the new tokens into the context: wait for more
        whole = pending if final else pending.rstrip(REPLACEMENT)
        if not (final or whole.startswith(self._partial)):
            return ""  # the characters returned before now decode differently: wait for more
        new = whole[len(self._partial):]
        if whole == pending:  # nothing held back: every token's text is out
            self._read, self._partial = len(self.ids), ""
        else:
            self._partial = whole
        self.text += new
        return new
