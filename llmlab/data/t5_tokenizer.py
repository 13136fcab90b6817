"""T5's vocabulary, trained locally: subword pieces plus the 100 span-corruption sentinels
(Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", §2.2 "The Colossal Clean Crawled Corpus" for the SentencePiece vocabulary and §3.1.4
for the sentinels; Hugging Face's ``T5Tokenizer`` for the id layout).

The released T5 vocabulary is a 32,000-piece SentencePiece model with 100 extra ids on top; it
cannot be downloaded here, so :class:`T5Tokenizer` learns a vocabulary of the same shape from the
corpus with the ``tokenizers`` library:

* ids 0, 1, 2 are ``<pad>`` (also the decoder start token), ``</s>`` (EOS) and ``<unk>``, as in T5;
* then byte-pair-encoding pieces learned from the corpus (BPE instead of SentencePiece's unigram
  model: ``tokenizers``' BPE trainer gives the same vocabulary every time for the same text);
* the top 100 ids are ``<extra_id_0> .. <extra_id_99>`` in Hugging Face's descending order:
  ``<extra_id_i> = vocab_size - 1 - i`` (:func:`llmlab.data.span_corruption.sentinel_id`).

Spaces are written ``▁`` as in SentencePiece and belong to the word after them (``▁you``); unlike
SentencePiece, no space is invented at the start of a text and every newline is a token of its
own, so ``decode(encode(text)) == text`` for any text made of the corpus's characters, and the
encoding of a concatenation is the concatenation of the encodings when the pieces meet at a space
or a newline (documents can be encoded in parallel).

:meth:`T5Tokenizer.encode` reads a literal ``<extra_id_N>`` in a prompt as that sentinel and drops
the spaces right before it (in the training inputs the space before a dropped span went with the
span), so ``"Thank you <extra_id_0> me"`` gives the ids a corrupted training input has. Corpus text
goes through :meth:`T5Tokenizer.encode_documents`, where ``<extra_id_0>`` is ordinary text.

This module must stay free of Lightning and Hydra imports.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

from llmlab.data.span_corruption import NUM_SENTINELS, sentinel_id
from llmlab.data.tokenizers import Tokenizer, _as_id_list, token_dtype
from llmlab.errors import UserError

__all__ = ["EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "T5Tokenizer", "UNK_ID", "sentinel_token"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
PAD_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
SPACE = "\u2581"  # "▁", SentencePiece's visible space
_SENTINEL = re.compile(r"<extra_id_(\d+)>")
_SPACES_BEFORE_SENTINEL = re.compile(r"[ ]+(?=<extra_id_\d+>)")
_WORD_BEFORE_SENTINEL = re.compile(r"(?<=\S)(<extra_id_\d+>)")


def sentinel_token(i: int) -> str:
    """``<extra_id_i>``."""
    return f"<extra_id_{i}>"


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    # every "\n" is a piece of its own; spaces become "▁" and start the next piece; no "▁" is
    # prepended to the text (prepend_scheme="never"), so encodings of pieces concatenate
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
    ])


class T5Tokenizer(Tokenizer):
    """T5 ids: ``<pad>=0 </s>=1 <unk>=2``, learned BPE pieces, ``<extra_id_i> = vocab_size-1-i``.

    ``pieces`` are the learned tokens in id order (ids 3 ..), ``merges`` the BPE merges in rank
    order; both are plain lists, so :meth:`state_dict` is JSON.
    """

    name = "t5"
    pad_id, eos_id, unk_id = PAD_ID, EOS_ID, UNK_ID
    num_sentinels = NUM_SENTINELS

    def __init__(self, pieces: Sequence[str], merges: Sequence[Sequence[str]]) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models

        pieces = [str(p) for p in pieces]
        merges = [(str(a), str(b)) for a, b in merges]
        sentinels = [sentinel_token(i) for i in reversed(range(NUM_SENTINELS))]  # ascending ids
        vocab = [*SPECIAL_TOKENS, *pieces, *sentinels]
        if len(set(vocab)) != len(vocab):
            raise UserError("invalid T5 vocabulary: a piece occurs twice or is a special token; retrain (tokenizer=t5)")
        if not pieces:
            raise UserError("invalid T5 vocabulary: no pieces; retrain the tokenizer on a corpus with text (tokenizer=t5)")
        self.pieces, self.merges = pieces, merges
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.first_sentinel = self.vocab_size - NUM_SENTINELS
        assert self.vocab[sentinel_id(0, self.vocab_size)] == sentinel_token(0)
        try:
            model = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, unk_token="<unk>")
        except Exception as e:  # merges that name unknown pieces
            raise UserError(f"invalid T5 tokenizer state ({e}): the checkpoint is damaged; retrain") from None
        tok = HFTokenizer(model)
        tok.pre_tokenizer = _pre_tokenizer()
        tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
        tok.add_special_tokens([*SPECIAL_TOKENS, *sentinels])  # already in the vocabulary: ids kept
        self._tok = tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> T5Tokenizer:
        """Learn ``vocab_size`` ids in all (3 specials + pieces + 100 sentinels) from ``texts``.

        The BPE alphabet is every character of the texts, so a small corpus may give fewer pieces
        than asked (merges stop when no pair occurs ``min_frequency`` times) or, for a tiny
        ``vocab_size``, more (the alphabet is always kept).
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, trainers

        vocab_size, min_frequency = int(vocab_size), int(min_frequency)
        reserved = len(SPECIAL_TOKENS) + NUM_SENTINELS
        if vocab_size <= reserved:
            raise UserError(
                f"tokenizer.vocab_size={vocab_size} leaves no room for text pieces next to the 3 special "
                f"tokens and {NUM_SENTINELS} sentinels: use more than {reserved} (e.g. tokenizer.vocab_size=4096)"
            )
        seen = [False]

        def nonempty() -> Iterable[str]:
            for t in texts:
                if t:
                    seen[0] = True
                    yield t

        bpe = HFTokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = _pre_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - NUM_SENTINELS, min_frequency=max(min_frequency, 1),
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        bpe.train_from_iterator(nonempty(), trainer)
        if not seen[0]:
            raise UserError("cannot train a T5 vocabulary on an empty corpus: pass text via data.path=FILE_OR_DIR")
        vocab = sorted(bpe.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        if tuple(t for t, _ in vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise RuntimeError(f"BPE trainer did not put {SPECIAL_TOKENS} first: {vocab[:3]}")
        import json

        merges = json.loads(bpe.to_str())["model"]["merges"]
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]  # old format: "a b"
        return cls([t for t, _ in vocab[len(SPECIAL_TOKENS):]], merges)

    # -------------------------------------------------------------- text <-> ids
    def encode(self, text: str) -> list[int]:
        """Ids of a prompt: literal ``<extra_id_N>``, ``</s>``, ``<pad>``, ``<unk>`` are those tokens."""
        for m in _SENTINEL.finditer(text):
            if int(m.group(1)) >= NUM_SENTINELS:
                raise UserError(f"{m.group(0)} does not exist: T5 has <extra_id_0> .. <extra_id_{NUM_SENTINELS - 1}>")
        text = _SPACES_BEFORE_SENTINEL.sub("", text)  # the space before a span went with the span
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, special_tokens: bool = False) -> list[list[int]]:
        """Ids of many texts at once (parallel in Rust); by default special-token text is ordinary
        text (corpus style); ``special_tokens=True`` reads it as :meth:`encode` does."""
        tok = self._tok
        saved = tok.encode_special_tokens
        tok.encode_special_tokens = not special_tokens  # True = "encode them like any text"
        try:
            if special_tokens:
                texts = [_SPACES_BEFORE_SENTINEL.sub("", t) for t in texts]
            return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
        finally:
            tok.encode_special_tokens = saved

    def _encode_corpus(self, docs: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(docs)]

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        """One stream: the documents joined by a blank line (as text, not by EOS).

        In T5 an EOS ends the input and the target, so a corpus EOS inside a span would end
        generation early and :func:`~llmlab.data.span_corruption.uncorrupt` would stop there.
        The ids equal those of ``"\\n\\n".join(docs)`` (pieces never cross a newline).
        """
        dtype = token_dtype(self.vocab_size)
        docs = list(docs)
        if not docs:
            return np.zeros(0, dtype=dtype)
        sep = np.asarray(self._tok.encode("\n\n", add_special_tokens=False).ids, dtype=dtype)
        pieces: list[np.ndarray] = []
        for i, ids in enumerate(self._encode_corpus(docs)):
            if i:
                pieces.append(sep)
            pieces.append(ids.astype(dtype))
        return np.concatenate(pieces)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; sentinels read ``<extra_id_N>`` (with a space before them), ids outside
        the vocabulary ``<unk>``; ``skip_special_tokens`` drops ``<pad>``, ``</s>``, ``<unk>``."""
        n = self.vocab_size
        clean = [i if 0 <= i < n else UNK_ID for i in _as_id_list(ids)]
        if skip_special_tokens:
            clean = [i for i in clean if i >= len(SPECIAL_TOKENS)]
        text = self._tok.decode(clean, skip_special_tokens=False)
        return _WORD_BEFORE_SENTINEL.sub(r" \1", text)

    def is_sentinel(self, i: int) -> bool:
        return self.first_sentinel <= int(i) < self.vocab_size

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>``."""
        if not 0 <= int(i) < NUM_SENTINELS:
            raise UserError(f"sentinel index {i} is out of range: T5 has {NUM_SENTINELS} sentinels")
        return sentinel_id(int(i), self.vocab_size)

    def id_to_token(self, i: int) -> str:
        return self.vocab[i] if 0 <= i < self.vocab_size else "<unk>"

    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text`` (``["Thank", "▁you", "<extra_id_0>", "▁me"]``)."""
        return [self.id_to_token(i) for i in self.encode(text)]

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"name": "t5", "pieces": list(self.pieces), "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_state(cls, state: dict) -> T5Tokenizer:
        valid = (isinstance(state, dict) and state.get("name") == "t5" and isinstance(state.get("pieces"), list)
                 and isinstance(state.get("merges"), list)
                 and all(isinstance(m, (list, tuple)) and len(m) == 2 for m in state["merges"]))
        if not valid:
            raise UserError(
                f"invalid T5 tokenizer state {str(state)[:80]!r}: the checkpoint is damaged or was not "
                "written by llmlab; retrain"
            )
        return cls(state["pieces"], state["merges"])
