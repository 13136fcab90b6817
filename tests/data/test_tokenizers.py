"""Tokenizers: GPT-2 BPE (tiktoken, offline) checked against Hugging Face, and characters."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.data.corpora import shakespeare_plays
from llmlab.data.tokenizers import (
    CharTokenizer,
    GPT2Tokenizer,
    build_tokenizer,
    gpt2_bpe_files,
    split_for_parallel,
    tokenizer_from_state,
)
from llmlab.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture(scope="module")
def shakespeare_lines() -> list[str]:
    """A few hundred lines from three plays (speaker lines, verse, punctuation)."""
    lines = []
    for _, text in shakespeare_plays()[::13]:
        lines += text.splitlines()[:150]
    return lines


# ------------------------------------------------------------------------------------------------
# GPT-2
# ------------------------------------------------------------------------------------------------


def test_gpt2_basics(gpt2):
    assert gpt2.name == "gpt2" and gpt2.vocab_size == 50257 and gpt2.eos_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.encode("<|endoftext|>") == [50256]  # prompts may contain the separator
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert GPT2Tokenizer().enc is gpt2.enc  # the Encoding is built once per process


def test_gpt2_corpus_text_treats_special_token_as_text(gpt2):
    stream = gpt2.encode_documents(["Hello world", "x <|endoftext|> y"])
    assert stream.dtype == np.uint16
    ids = stream.tolist()
    assert ids[:3] == [15496, 995, 50256]  # documents joined by EOS
    assert ids.count(50256) == 1  # the literal "<|endoftext|>" inside a document is ordinary text
    assert gpt2.decode(ids[3:]) == "x <|endoftext|> y"


def test_gpt2_matches_transformers(gpt2, shakespeare_lines, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import GPT2TokenizerFast

    files = gpt2_bpe_files()
    shutil.copy(files["encoder.json"], tmp_path / "vocab.json")
    shutil.copy(files["vocab.bpe"], tmp_path / "merges.txt")
    hf = GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert len(hf) == 50257 and hf.eos_token_id == 50256
    assert len(shakespeare_lines) >= 300
    for line in shakespeare_lines:
        assert gpt2.encode(line) == hf.encode(line), line
    block = "\n".join(shakespeare_lines)  # newlines and blank-line runs too
    assert gpt2.encode(block) == hf.encode(block)
    odd = "naïve café — 日本語 🎭  two  spaces\n\n\n  indented\ttab it's we'll 1234567"
    assert gpt2.encode(odd) == hf.encode(odd)


def test_gpt2_round_trip(gpt2, shakespeare_lines):
    for text in shakespeare_lines + ["", " ", "\n\n", "naïve café — 日本語 🎭", "  x  \t\n y"]:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_decode_accepts_arrays_and_tolerates_padded_ids(gpt2):
    ids = [15496, 995]
    assert gpt2.decode(np.array(ids)) == gpt2.decode(torch.tensor(ids)) == "Hello world"
    # a model with vocab padded past 50,257 can sample ids the tokenizer does not have
    assert gpt2.decode([15496, 50300, 995]) == "Hello\ufffd world"


def test_parallel_chunks_give_identical_ids(gpt2, monkeypatch):
    text = "\n\n".join(t for _, t in shakespeare_plays()[:2])
    pieces = split_for_parallel(text, 5_000)
    assert len(pieces) > 20 and "".join(pieces) == text
    whole = gpt2.enc.encode_ordinary(text)
    assert [i for p in pieces for i in gpt2.enc.encode_ordinary(p)] == whole
    monkeypatch.setattr(GPT2Tokenizer, "chunk_chars", 5_000)
    assert gpt2.encode_documents([text]).tolist() == whole


_ws_text = st.text(
    # letters, digits, punctuation, emoji and every kind of whitespace Python and tiktoken may disagree on
    alphabet=st.sampled_from(list("ab Z,.'\n\t") + ["\n", "é", "1", "🎭", "\r", "\x1c", "\u00a0", "\u2028", "\u3000"]),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(text=_ws_text, chunk=st.integers(min_value=1, max_value=40))
def test_parallel_chunks_property(gpt2, text, chunk):
    pieces = split_for_parallel(text, chunk)
    assert "".join(pieces) == text
    assert [i for p in pieces for i in gpt2.enc.encode_ordinary(p)] == gpt2.enc.encode_ordinary(text)


def test_gpt2_builds_offline_without_writing_a_cache(tmp_path):
    """Fresh process: no network needed, no tiktoken cache written, no Lightning/Hydra imported,
    and the user's TIKTOKEN_CACHE_DIR setting is left as it was."""
    cache = tmp_path / "tiktoken-cache"
    code = (
        "import os, sys\n"
        "from llmlab.data.tokenizers import build_tokenizer\n"
        "t = build_tokenizer('gpt2')\n"
        "assert t.encode('Hello world') == [15496, 995]\n"
        "assert os.environ['TIKTOKEN_CACHE_DIR'] == sys.argv[1]\n"
        "import llmlab.data.corpora\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra', 'omegaconf')]\n"
        "assert not bad, bad\n"
        "print(t.fingerprint)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "TIKTOKEN_CACHE_DIR": str(cache), "TMPDIR": str(tmp_path),
           "HOME": str(tmp_path), "no_proxy": "*", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code, str(cache)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not cache.exists()
    assert not (tmp_path / "data-gym-cache").exists()
    assert out.stdout.strip() == GPT2Tokenizer().fingerprint  # stable across processes


# ------------------------------------------------------------------------------------------------
# Characters
# ------------------------------------------------------------------------------------------------


def test_char_round_trip_and_sorted_vocab():
    tok = CharTokenizer.train(["hello world", "bye"])
    assert tok.chars == "".join(sorted(set("hello world\nbye")))  # "\n" joins the documents
    assert tok.vocab_size == len(tok.chars) + 1 and tok.unk_id == len(tok.chars)  # <unk> is the last id
    assert tok.eos_id is None
    ids = tok.encode("hello bye")
    assert ids == [tok.chars.index(c) for c in "hello bye"]
    assert tok.decode(ids) == "hello bye"
    assert tok.decode(torch.tensor(ids)) == "hello bye"
    stream = tok.encode_documents(["hello", "bye"])
    assert stream.dtype == np.uint16 and tok.decode(stream) == "hello\n\nbye"
    assert CharTokenizer("cba").chars == "abc" and CharTokenizer.train(["ab"]).chars == "ab"


def test_char_on_shakespeare():
    docs = [t for _, t in shakespeare_plays()]
    tok = build_tokenizer("char", docs)
    assert tok.vocab_size == len(set("\n\n".join(docs))) + 1  # and <unk>
    stream = tok.encode_documents(docs)
    assert len(stream) == sum(map(len, docs)) + 2 * (len(docs) - 1)
    assert tok.decode(stream[:40]) == "\n\n".join(docs)[:40]


def test_char_unknown_characters_become_unk_and_are_counted():
    tok = CharTokenizer.train(["abc", "b"])
    unk = tok.unk_id
    assert tok.unknown_count == 0
    assert tok.encode("abz") == [tok.stoi["a"], tok.stoi["b"], unk]
    assert tok.unknown_count == 1
    assert tok.encode("a🎭é") == [tok.stoi["a"], unk, unk]  # beyond the lookup table, and inside it
    assert tok.unknown_count == 3
    stream = tok.encode_documents(["ab", "é"])
    assert stream.tolist() == [tok.stoi[c] for c in "ab\n\n"] + [unk] and tok.unknown_count == 4
    assert tok.encode("cab") == [tok.chars.index(c) for c in "cab"] and tok.unknown_count == 4
    assert tok.decode(tok.encode("a🎭b")) == "a\ufffdb"  # unk decodes to U+FFFD
    assert tok.decode([unk]) == "\ufffd"


def test_char_state_from_before_unk_support():
    """A checkpoint's state without "unk": same ids and vocab size as before, unknown characters refused."""
    new = CharTokenizer.train(["to be or not", "to be"])
    old = tokenizer_from_state({"name": "char", "chars": new.chars})  # what checkpoints stored so far
    assert old.unk_id is None and old.vocab_size == len(new.chars) == new.vocab_size - 1
    assert old.encode("not to be\n") == new.encode("not to be\n")
    assert old.decode(old.encode("to be")) == "to be"
    assert old.state_dict() == {"name": "char", "chars": new.chars}  # written back unchanged
    assert old.fingerprint != new.fingerprint  # another vocabulary: another token cache
    with pytest.raises(UserError) as e:
        old.encode("to bez")
    msg = str(e.value)
    assert "'z'" in msg and "predates unknown-character support" in msg and "retrain" in msg and "\n" not in msg
    with pytest.raises(UserError, match="U\\+1F3AD"):
        old.encode_documents(["to", "🎭"])
    assert old.unknown_count == 0
    again = tokenizer_from_state(json.loads(json.dumps(new.state_dict())))
    assert again.unk_id == new.unk_id and again.fingerprint == new.fingerprint


def test_state_dict_round_trip_and_fingerprints(gpt2):
    char = CharTokenizer.train(["to be or not to be"])
    for tok in (gpt2, char):
        state = json.loads(json.dumps(tok.state_dict()))  # JSON-serialisable
        again = tokenizer_from_state(state)
        assert type(again) is type(tok)
        assert again.fingerprint == tok.fingerprint
        assert again.encode("to be") == tok.encode("to be")
        assert again.vocab_size == tok.vocab_size and again.eos_id == tok.eos_id
    assert gpt2.fingerprint != char.fingerprint
    assert CharTokenizer.train(["to be"]).fingerprint != char.fingerprint
    assert CharTokenizer.train(["eb ot"]).fingerprint == CharTokenizer.train(["to be"]).fingerprint
    assert len(char.fingerprint) == 64 and char.fingerprint == CharTokenizer(char.chars).fingerprint


def test_factory_errors():
    with pytest.raises(UserError, match="gpt2, char"):
        build_tokenizer("sentencepiece")
    with pytest.raises(UserError, match="tokenizer=char"):
        build_tokenizer("char")
    with pytest.raises(UserError, match="empty corpus"):
        build_tokenizer("char", [""])
    for bad in ({}, {"name": "bpe"}, {"name": "char"}, {"name": "char", "chars": "ba"},
                {"name": "char", "chars": "ab", "unk": "yes"}, None):
        with pytest.raises(UserError, match="invalid tokenizer state"):
            tokenizer_from_state(bad)
    assert isinstance(build_tokenizer(" GPT2 "), GPT2Tokenizer)
