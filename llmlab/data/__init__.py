"""Corpora, tokenizers and datamodules.

``corpora`` and ``tokenizers`` are plain Python (numpy, tiktoken); ``lm`` holds the Lightning
datamodule. Names are imported lazily so that ``import llmlab.data.tokenizers`` never pulls in
Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_corpus": "corpora",
    "read_text_documents": "corpora",
    "shakespeare_plays": "corpora",
    "clean_play_markdown": "corpora",
    "Tokenizer": "tokenizers",
    "GPT2Tokenizer": "tokenizers",
    "CharTokenizer": "tokenizers",
    "WordTokenizer": "tokenizers",
    "build_tokenizer": "tokenizers",
    "tokenizer_from_state": "tokenizers",
    "LMDataModule": "lm",
    "RandomWindows": "lm",
    "StridedWindows": "lm",
    "split_stream": "lm",
    "tokenize_cached": "lm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
