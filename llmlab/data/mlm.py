"""BERT pretraining data: a locally trained WordPiece tokenizer, next-sentence pairs and MLM masking
(Devlin et al. 2019, §3.1 "Task #1: Masked LM", "Task #2: Next Sentence Prediction", appendix A.1;
Google's ``create_pretraining_data.py`` for the pair packing and ``max_predictions_per_seq``).

* :class:`WordPieceTokenizer` — BERT's uncased WordPiece (lowercase, punctuation split off, ``##``
  marks a word-internal piece), learned from the corpus because nothing may be downloaded, or read
  from a Hugging Face ``vocab.txt`` (:meth:`WordPieceTokenizer.from_vocab_file`). Each tokenizer
  carries its own special ids (``pad_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``, looked
  up by token text): the ones llmlab trains have ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at ids 0–4 (the
  module constants ``PAD_ID`` ... ``MASK_ID``), Google's vocabularies have them at 0, 100–103.
* :func:`build_nsp_pairs` — ``[CLS] A [SEP] B [SEP] [PAD]...`` rows from documents made of
  segments (Shakespeare: a play is a document, a speech a segment). B is the text that really
  follows A (label 0, IsNext) or a span of a *different* document (label 1, NotNext).
* :func:`mask_tokens` — the 15% / 80-10-10 masked-LM corruption, vectorised and seeded; applied
  per batch by :class:`MLMCollator`, so every epoch sees new masks (RoBERTa's "dynamic masking").

Avoided seed bugs (spec §4.4): special tokens and padding are never masked, random replacements
are never special tokens (wherever their ids are), every sequence with a maskable token gets at
least one prediction, NSP pairs respect document boundaries, labels follow Hugging Face (0 = IsNext).

This module must stay free of Lightning and Hydra imports.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from llmlab.data.tokenizers import Tokenizer, _as_id_list
from llmlab.errors import UserError

__all__ = [
    "CLS_ID",
    "MASK_ID",
    "PAD_ID",
    "SEP_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "MLMCollator",
    "NSPExample",
    "WordPieceTokenizer",
    "build_nsp_pairs",
    "make_nsp_examples",
    "mask_tokens",
    "pack_pair",
    "split_segments",
    "tokenize_documents",
    "truncate_pair",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # pad, unk, cls, sep, mask: in this order
# the special ids of the WordPiece vocabularies llmlab trains (and the defaults of the pair builders);
# a tokenizer read from elsewhere has its own (WordPieceTokenizer.pad_id ...)
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
IGNORE_INDEX = -100  # label of positions the MLM loss skips

# ------------------------------------------------------------------------------------------------
# WordPiece
# ------------------------------------------------------------------------------------------------

# Training workaround. tokenizers' WordPieceTrainer (BPE underneath) is not deterministic: the ids
# of the "##x" pieces follow a hash map's iteration order and decide ties between merges, so two
# trainings on the same text give different vocabularies (huggingface/tokenizers#1794). We train
# the plain BpeTrainer instead, after writing every word-internal character c as the private-use
# character U+F0000 + ord(c): a word-internal piece is then a distinct symbol without any prefix,
# the alphabet is sorted, and the result is the same every time. Afterwards a token whose first
# character is shifted becomes "##" + the unshifted text, which is exactly WordPiece's vocabulary.
_SHIFT = 0xF0000


class _ShiftTable(dict):
    """``str.translate`` table: BMP character -> private-use plane 15 (astral characters unchanged)."""

    def __missing__(self, o: int) -> str:
        if o >= 0x10000:
            raise LookupError(o)  # translate() keeps the character
        c = chr(_SHIFT + o)
        self[o] = c
        return c


def _unshift(token: str) -> str:
    return "".join(chr(ord(c) - _SHIFT) if ord(c) >= _SHIFT else c for c in token)


def _bert_normalizer(lowercase: bool, strip_accents: bool | None = None, handle_chinese_chars: bool = True):
    from tokenizers import normalizers

    # BERT's BasicTokenizer: drop control characters, space out CJK, lowercase + strip accents (uncased)
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=handle_chinese_chars,
                                      strip_accents=strip_accents, lowercase=lowercase)


class WordPieceTokenizer(Tokenizer):
    """BERT's WordPiece: trained locally (``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``) or read
    from a Hugging Face ``vocab.txt`` (bert-base-uncased: ``[PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102
    [MASK]=103``).

    Text is normalised (lowercased when ``lowercase``), split on whitespace and punctuation, and
    each word is cut greedily into the longest vocabulary pieces (``un ##fold ##eth``); a word with
    no such cut becomes ``[UNK]``. :meth:`encode` adds no ``[CLS]``/``[SEP]`` (the pair builder
    does) but recognises a literal ``[MASK]`` in a prompt, e.g. for fill-mask.

    The special ids are instance attributes looked up from the vocabulary by token text
    (``special_tokens``: the texts of pad, unk, cls, sep and mask, BERT's by default):
    ``pad_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``, ``special_ids`` (the five, sorted)
    and ``is_special`` (a boolean array over the vocabulary, True at the five). ``strip_accents``
    (None: strip when lowercasing, as BERT) and ``handle_chinese_chars`` are BERT's normaliser options.
    """

    name = "wordpiece"
    eos_id = None  # BERT has no end-of-text token; documents are kept apart by the pair builder

    def __init__(self, vocab: Sequence[str], lowercase: bool = True, max_input_chars_per_word: int = 100, *,
                 special_tokens: Sequence[str] = SPECIAL_TOKENS, strip_accents: bool | None = None,
                 handle_chinese_chars: bool = True) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = [str(t) for t in vocab]
        special_tokens = tuple(str(t) for t in special_tokens)
        if len(special_tokens) != len(SPECIAL_TOKENS) or len(set(special_tokens)) != len(special_tokens):
            raise UserError(f"invalid WordPiece special tokens {special_tokens!r}: name five distinct tokens "
                            "(pad, unk, cls, sep, mask)")
        index = {t: i for i, t in enumerate(vocab)}
        if len(index) != len(vocab):
            raise UserError("invalid WordPiece vocabulary: a token occurs twice; retrain the tokenizer")
        missing = [t for t in special_tokens if t not in index]
        if missing:
            raise UserError(
                f"invalid WordPiece vocabulary: it has no {', '.join(missing)} (it needs "
                f"{', '.join(special_tokens)}); retrain the tokenizer (tokenizer=wordpiece)"
            )
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.lowercase = bool(lowercase)
        self.max_input_chars_per_word = int(max_input_chars_per_word)
        self.special_tokens = special_tokens
        self.strip_accents = None if strip_accents is None else bool(strip_accents)
        self.handle_chinese_chars = bool(handle_chinese_chars)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (index[t] for t in special_tokens)
        self.special_ids = tuple(sorted(index[t] for t in special_tokens))
        self.is_special = np.zeros(self.vocab_size, dtype=bool)
        self.is_special[list(self.special_ids)] = True
        tok = HFTokenizer(models.WordPiece(
            vocab=index, unk_token=special_tokens[1],
            continuing_subword_prefix="##", max_input_chars_per_word=self.max_input_chars_per_word,
        ))
        tok.normalizer = _bert_normalizer(self.lowercase, self.strip_accents, self.handle_chinese_chars)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins "##" pieces, no space before punctuation
        tok.add_special_tokens(list(special_tokens))  # already in the vocabulary: keeps their ids
        self._tok = tok

    @classmethod
    def from_vocab_file(cls, path: str | Path, lowercase: bool = True, **options: Any) -> WordPieceTokenizer:
        """The tokenizer of a ``vocab.txt`` (one token per line, line number = id), read as
        ``transformers.BertTokenizer`` reads it; ``options``: ``max_input_chars_per_word``,
        ``special_tokens``, ``strip_accents``, ``handle_chinese_chars``."""
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                vocab = [line.rstrip("\n") for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the WordPiece vocabulary {path} ({e})") from None
        if not vocab:
            raise UserError(f"{path} is empty: a WordPiece vocabulary has one token per line")
        return cls(vocab, lowercase=lowercase, **options)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              lowercase: bool = True) -> WordPieceTokenizer:
        """Learn a vocabulary of at most ``vocab_size`` tokens (specials included) from ``texts``.

        Pieces are merged BPE-style (the way ``tokenizers``' WordPieceTrainer works) while a pair
        occurs at least ``min_frequency`` times; the same texts always give the same vocabulary.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        if int(vocab_size) <= len(SPECIAL_TOKENS):
            raise UserError(f"tokenizer.vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
        normalizer = _bert_normalizer(lowercase)
        pre = pre_tokenizers.BertPreTokenizer()
        table = _ShiftTable()
        seen = [False]

        def shifted_words() -> Iterable[str]:
            for text in texts:
                words = [w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))]
                if words:
                    seen[0] = True
                    yield " ".join(w[0] + w[1:].translate(table) for w in words)

        bpe = HFTokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the words are already split
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=int(min_frequency),
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False)
        bpe.train_from_iterator(shifted_words(), trainer)
        if not seen[0]:
            raise UserError(
                "cannot train a WordPiece vocabulary on an empty corpus: pass text via data.path=FILE_OR_DIR"
            )
        learned = sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])
        vocab = list(SPECIAL_TOKENS)
        for token, _ in learned[len(SPECIAL_TOKENS):]:
            vocab.append("##" + _unshift(token) if ord(token[0]) >= _SHIFT else _unshift(token))
        return cls(vocab, lowercase=lowercase)

    # -------------------------------------------------------------- text <-> ids
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` of many texts at once (parallel in Rust).

        ``special_tokens=False`` reads ``[MASK]``, ``[SEP]`` ... in the texts as ordinary text
        (corpus text, as opposed to a prompt).
        """
        tok = self._tok
        saved = tok.encode_special_tokens
        tok.encode_special_tokens = not special_tokens  # True = "encode them like any text"
        try:
            return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
        finally:
            tok.encode_special_tokens = saved

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of ``text`` (``["un", "##fold", "##eth"]``)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ids outside the vocabulary read as ``[UNK]``."""
        n, unk = self.vocab_size, self.unk_id
        clean = [i if 0 <= i < n else unk for i in _as_id_list(ids)]
        if skip_special_tokens:
            special = self.is_special
            clean = [i for i in clean if not special[i]]
        return self._tok.decode(clean, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        return self.vocab[i] if 0 <= i < self.vocab_size else self.vocab[self.unk_id]

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        return self.unk_id if i is None else i

    def _encode_corpus(self, docs: list[str]) -> list[np.ndarray]:
        # corpus text is ordinary text: a literal "[MASK]" in a file is not the mask token
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(docs, special_tokens=False)]

    def save_vocab(self, path: str | Path) -> None:
        """Write ``vocab.txt`` (one token per line, line number = id): the file Google's BERT code
        and ``transformers.BertTokenizer`` read."""
        Path(path).write_text("\n".join(self.vocab) + "\n", encoding="utf-8")

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = {"name": "wordpiece", "vocab": list(self.vocab), "lowercase": self.lowercase,
                 "max_input_chars_per_word": self.max_input_chars_per_word}
        # options at their defaults are left out: the states of tokenizers llmlab trains stay
        # exactly what they were before these options existed (same fingerprint, same cache)
        if self.special_tokens != SPECIAL_TOKENS:
            state["special_tokens"] = list(self.special_tokens)
        if self.strip_accents is not None:
            state["strip_accents"] = self.strip_accents
        if not self.handle_chinese_chars:
            state["handle_chinese_chars"] = False
        return state

    @classmethod
    def from_state(cls, state: dict) -> WordPieceTokenizer:
        valid = (isinstance(state, dict) and state.get("name") == "wordpiece" and isinstance(state.get("vocab"), list)
                 and isinstance(state.get("special_tokens", []), list)
                 and state.get("strip_accents") in (None, True, False)
                 and state.get("handle_chinese_chars", True) in (True, False))
        if not valid:
            raise UserError(
                f"invalid WordPiece tokenizer state {str(state)[:80]!r}: the checkpoint is damaged or was "
                "not written by llmlab; retrain"
            )
        return cls(state["vocab"], lowercase=state.get("lowercase", True),
                   max_input_chars_per_word=state.get("max_input_chars_per_word", 100),
                   special_tokens=state.get("special_tokens", SPECIAL_TOKENS),
                   strip_accents=state.get("strip_accents"),
                   handle_chinese_chars=state.get("handle_chinese_chars", True))


# ------------------------------------------------------------------------------------------------
# Documents -> segments -> ids
# ------------------------------------------------------------------------------------------------

_BLANK_LINES = re.compile(r"\n\s*\n")


def split_segments(text: str) -> list[str]:
    """The segments of one document: its blank-line separated paragraphs (a Shakespeare speech,
    ``SPEAKER:`` line included), or its non-empty lines when it has no blank line."""
    parts = [p.strip() for p in _BLANK_LINES.split(text)]
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        parts = [line.strip() for line in text.splitlines() if line.strip()]
    return parts


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> list[list[list[int]]]:
    """Documents (strings) -> per document, the ids of each segment (:func:`split_segments`);
    segments without tokens are dropped. Special-token text in the corpus is ordinary text."""
    segmented = [split_segments(d) for d in documents]
    flat = [s for segs in segmented for s in segs]
    if isinstance(tokenizer, WordPieceTokenizer):
        ids = tokenizer.encode_batch(flat, special_tokens=False)
    else:
        ids = [tokenizer.encode(s) for s in flat]
    out, k = [], 0
    for segs in segmented:
        out.append([list(i) for i in ids[k: k + len(segs)] if len(i)])
        k += len(segs)
    return out


# ------------------------------------------------------------------------------------------------
# Next-sentence pairs
# ------------------------------------------------------------------------------------------------


@dataclass
class NSPExample:
    tokens_a: list[int]
    tokens_b: list[int]
    next_sentence_label: int  # 0 = B is the text that follows A (IsNext), 1 = B is random (NotNext)
    doc_a: int  # index of the document A comes from
    doc_b: int  # ... and B (== doc_a exactly when IsNext)


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Cut the longer of ``a`` and ``b`` one token at a time until both fit in ``max_tokens``.

    A loses tokens at its start and B at its end, so the seam between them (what NSP looks at)
    survives. Google's script cuts either end at random; this keeps an IsNext pair contiguous.
    """
    a, b = list(a), list(b)
    cut_a = cut_b = 0
    while len(a) - cut_a + len(b) - cut_b > max_tokens:
        if len(a) - cut_a > len(b) - cut_b:
            cut_a += 1
        else:
            cut_b += 1
    return a[cut_a:], b[: len(b) - cut_b]


def pack_pair(a: list[int], b: list[int], max_seq_len: int, cls_id: int = CLS_ID, sep_id: int = SEP_ID,
              pad_id: int = PAD_ID) -> dict[str, list[int]]:
    """``[CLS] a [SEP] b [SEP]`` padded to ``max_seq_len`` (the pair is truncated to fit first).

    ``token_type_ids`` is 0 for ``[CLS] a [SEP]`` (and padding), 1 for ``b [SEP]``;
    ``attention_mask`` is 1 on tokens, 0 on padding; ``special_tokens_mask`` is 1 on
    ``[CLS]``, ``[SEP]`` and padding (the positions :func:`mask_tokens` must leave alone).
    """
    a, b = truncate_pair(a, b, max_seq_len - 3)
    ids = [cls_id, *a, sep_id, *b, sep_id]
    n, pad = len(ids), max_seq_len - len(ids)
    special = [1] + [0] * len(a) + [1] + [0] * len(b) + [1]
    return {
        "input_ids": ids + [pad_id] * pad,
        "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * pad,
        "attention_mask": [1] * n + [0] * pad,
        "special_tokens_mask": special + [1] * pad,
    }


def make_nsp_examples(documents: Sequence[Sequence[Sequence[int]]], max_seq_len: int, seed: int = 0,
                      nsp_probability: float = 0.5, short_seq_prob: float = 0.1) -> list[NSPExample]:
    """Sentence pairs for NSP from tokenised documents (lists of segments of ids), deterministic in ``seed``.

    As Google's ``create_instances_from_document``: consecutive segments of a document are
    gathered until they fill ``max_seq_len - 3`` tokens (with probability ``short_seq_prob`` a
    shorter random target, so the model also sees short inputs); the chunk is split at a random
    segment boundary into A and the rest. With probability ``nsp_probability`` B is that rest
    (IsNext); otherwise B is a span starting at a random segment of another document (NotNext),
    and the rest of the chunk is reused for the next pair. Unlike Google's script the label is
    drawn first, so a one-segment chunk is split inside the segment rather than forced to
    NotNext, keeping the labels balanced.
    """
    if max_seq_len < 5:
        raise UserError(f"data.max_seq_len={max_seq_len} is too short for [CLS] A [SEP] B [SEP]: use at least 5")
    if not 0.0 <= nsp_probability <= 1.0 or not 0.0 <= short_seq_prob <= 1.0:
        raise UserError("nsp_probability and short_seq_prob must be probabilities in [0, 1]")
    docs = [[list(s) for s in doc if len(s)] for doc in documents]
    nonempty = [d for d, doc in enumerate(docs) if doc]
    if len(nonempty) < 2:
        raise UserError(
            f"next-sentence pairs need at least 2 non-empty documents (a NotNext B comes from a different "
            f"document), got {len(nonempty)}: pass more documents, e.g. a directory with several files"
        )
    rng = random.Random(seed)
    max_tokens = max_seq_len - 3
    examples: list[NSPExample] = []

    def new_target() -> int:
        return rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens

    for k, d in enumerate(nonempty):
        doc = docs[d]
        chunk: list[list[int]] = []
        length, i, target = 0, 0, new_target()
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                is_next = rng.random() < nsp_probability
                if len(chunk) >= 2:
                    a_end = rng.randint(1, len(chunk) - 1)
                    a = [t for seg in chunk[:a_end] for t in seg]
                    rest = [t for seg in chunk[a_end:] for t in seg]
                else:
                    a_end, seg = 1, chunk[0]
                    if is_next and len(seg) >= 2:  # one long segment: A is its start, B the remainder
                        cut = rng.randint(1, len(seg) - 1)
                        a, rest = seg[:cut], seg[cut:]
                    else:
                        a, rest = seg, []
                        is_next = False  # (a one-token segment has no next text to split off)
                if is_next:
                    b, doc_b = rest, d
                else:
                    j = rng.randrange(len(nonempty) - 1)  # uniform over the *other* documents
                    doc_b = nonempty[j + 1 if j >= k else j]
                    other = docs[doc_b]
                    target_b = max(1, target - len(a))
                    b, j = [], rng.randrange(len(other))
                    while j < len(other) and len(b) < target_b:
                        b.extend(other[j])
                        j += 1
                    i -= len(chunk) - a_end  # the unused segments start the next chunk
                a, b = truncate_pair(a, b, max_tokens)
                examples.append(NSPExample(a, b, 0 if is_next else 1, d, doc_b))
                chunk, length, target = [], 0, new_target()
            i += 1
    return examples


def build_nsp_pairs(documents: Sequence[Sequence[Sequence[int]]], max_seq_len: int, cls_id: int = CLS_ID,
                    sep_id: int = SEP_ID, pad_id: int = PAD_ID, seed: int = 0, nsp_probability: float = 0.5,
                    short_seq_prob: float = 0.1) -> dict[str, torch.Tensor]:
    """:func:`make_nsp_examples` packed by :func:`pack_pair` into ``(N, max_seq_len)`` tensors.

    Keys: ``input_ids``, ``token_type_ids``, ``attention_mask``, ``special_tokens_mask`` (bool),
    ``next_sentence_label`` ``(N,)`` (0 = IsNext), and ``doc_a`` / ``doc_b`` ``(N,)``.
    """
    examples = make_nsp_examples(documents, max_seq_len, seed, nsp_probability, short_seq_prob)
    if not examples:
        raise UserError("the documents produced no sentence pairs: the corpus has no tokens")
    rows = [pack_pair(e.tokens_a, e.tokens_b, max_seq_len, cls_id, sep_id, pad_id) for e in examples]
    out = {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in rows[0]}
    out["special_tokens_mask"] = out["special_tokens_mask"].bool()
    out["next_sentence_label"] = torch.tensor([e.next_sentence_label for e in examples], dtype=torch.long)
    out["doc_a"] = torch.tensor([e.doc_a for e in examples], dtype=torch.long)
    out["doc_b"] = torch.tensor([e.doc_b for e in examples], dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------------------
# Masked LM
# ------------------------------------------------------------------------------------------------


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor | None,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    generator: torch.Generator | None = None,
    mlm_probability: float = 0.15,
    max_predictions: int | None = None,
    *,
    exact: bool = False,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption of ``input_ids`` ``(B, T)``; returns ``(inputs, labels)``.

    A position is *maskable* unless ``special_mask`` is true there or its id is in ``special_ids``
    (``[CLS]``, ``[SEP]``, padding ...) or is ``mask_id``; the special ids may lie anywhere in the
    vocabulary (Google's BERT: 0, 100-103): random replacements come from a boolean mask over it.
    Each maskable position is selected with probability ``mlm_probability``; with ``exact``
    instead exactly ``max(1, round(p * n))`` of the ``n`` maskable positions are (Google's
    ``create_pretraining_data.py``). Either way a sequence with a maskable token gets at least one
    selection and at most ``max_predictions`` (paper: 20 for length 128; the kept ones are a
    uniform random subset). A selected token becomes ``mask_id`` with probability 0.8, an id drawn
    uniformly from the non-special ids below ``vocab_size`` with 0.1, and stays itself with 0.1.
    ``labels`` holds the original id at selected positions and -100 everywhere else. The input is
    not modified; all randomness comes from ``generator``.
    """
    if input_ids.dim() != 2:
        raise UserError(f"mask_tokens expects ids of shape (batch, seq_len), got {tuple(input_ids.shape)}")
    if not 0.0 < mlm_probability < 1.0:
        raise UserError(f"mlm_probability={mlm_probability} must be in (0, 1)")
    if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1:
        raise UserError("mask_replace_prob and random_replace_prob must be >= 0 and sum to at most 1")
    if max_predictions is not None and int(max_predictions) < 1:
        raise UserError(f"max_predictions={max_predictions} must be at least 1 (or null for no cap)")
    device = input_ids.device
    special = torch.as_tensor(sorted({int(i) for i in special_ids} | {int(mask_id)}), dtype=input_ids.dtype,
                              device=device)
    maskable = ~torch.isin(input_ids, special)
    if special_mask is not None:
        maskable &= ~special_mask.to(device=device, dtype=torch.bool)

    B, T = input_ids.shape
    keys = torch.rand((B, T), generator=generator).to(device)  # one uniform per position
    keys = keys.masked_fill(~maskable, 2.0)  # unmaskable positions rank last
    rank = keys.argsort(dim=1).argsort(dim=1)  # 0 = smallest key of the row
    n_maskable = maskable.sum(dim=1, keepdim=True)  # (B, 1)
    if exact:
        k = torch.clamp(torch.round(n_maskable * mlm_probability), min=1).long()
        selected = rank < torch.minimum(k, n_maskable)
    else:
        # a Bernoulli(p) draw per position; rank 0 forces one pick in a row that drew none (uniform,
        # since given "no key < p" the keys are i.i.d. on [p, 1))
        selected = maskable & ((keys < mlm_probability) | (rank == 0))
    if max_predictions is not None:
        selected &= rank < int(max_predictions)  # the smallest keys: a uniform subset of the selection

    candidates = torch.ones(vocab_size, dtype=torch.bool)  # "may be drawn" over the vocabulary
    candidates[special[(special >= 0) & (special < vocab_size)].cpu()] = False
    candidates = candidates.nonzero().squeeze(1).to(device=device, dtype=input_ids.dtype)
    if candidates.numel() == 0:
        raise UserError(f"mask_tokens: every id below vocab_size={vocab_size} is special; nothing to draw")

    action = torch.rand((B, T), generator=generator).to(device)
    random_ids = candidates[torch.randint(candidates.numel(), (B, T), generator=generator).to(device)]
    inputs = input_ids.clone()
    to_mask = selected & (action < mask_replace_prob)
    to_random = selected & (action >= mask_replace_prob) & (action < mask_replace_prob + random_replace_prob)
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids[to_random]
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return inputs, labels


class MLMCollator:
    """Stacks rows of :func:`build_nsp_pairs` and masks them afresh on every call (dynamic masking).

    The mask stream is seeded by ``seed``; in a DataLoader worker it is reseeded from the worker's
    own seed (which the DataLoader draws anew each epoch), so workers do not repeat each other.
    The default ids are those of the vocabularies llmlab trains; :meth:`for_tokenizer` takes a
    tokenizer's own.
    """

    def __init__(self, vocab_size: int, mask_id: int = MASK_ID,
                 special_ids: Sequence[int] = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID),
                 mlm_probability: float = 0.15, max_predictions: int | None = None, exact: bool = False,
                 seed: int = 0) -> None:
        self.vocab_size = int(vocab_size)
        self.mask_id = int(mask_id)
        self.special_ids = tuple(int(i) for i in special_ids)
        self.mlm_probability = float(mlm_probability)
        self.max_predictions = max_predictions
        self.exact = bool(exact)
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._owner: Any = None  # (pid, worker seed) the generator belongs to

    @classmethod
    def for_tokenizer(cls, tokenizer: WordPieceTokenizer, **options: Any) -> MLMCollator:
        """A collator with ``tokenizer``'s vocabulary size, ``[MASK]`` id and special ids."""
        return cls(tokenizer.vocab_size, tokenizer.mask_id, tokenizer.special_ids, **options)

    def _rng(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(), None if info is None else info.seed)
        if self._generator is None or owner != self._owner:
            seed = self.seed if info is None else (self.seed * 1_000_003 + info.seed) % (2**63)
            self._generator = torch.Generator().manual_seed(seed)
            self._owner = owner
        return self._generator

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], batch.get("special_tokens_mask"), self.vocab_size, self.mask_id,
            self.special_ids, self._rng(), self.mlm_probability, self.max_predictions, exact=self.exact,
        )
        return batch
