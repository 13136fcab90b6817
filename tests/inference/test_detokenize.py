"""The incremental detokeniser: whole characters out as BPE tokens come in, a split one held back."""

from __future__ import annotations

import pytest

from llmlab.data.tokenizers import CharTokenizer, GPT2Tokenizer, WordTokenizer
from llmlab.inference.detokenize import IncrementalDetokenizer


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def test_a_character_split_over_bpe_tokens_is_held_back_until_whole(gpt2):
    ids = gpt2.encode("a 日c")  # "日" is 3 UTF-8 bytes: byte-level BPE spreads them over 3 tokens, " " + byte 1 in one
    assert [gpt2.decode([i]) for i in ids] == ["a", " \ufffd", "\ufffd", "\ufffd", "c"]  # the case exists
    d = IncrementalDetokenizer(gpt2)
    # the space comes out with its token, the character once its last byte arrived, never a U+FFFD
    assert [d.feed([i]) for i in ids] == ["a", " ", "", "日", "c"]
    assert d.text == "a 日c" and d.ids == ids and d.flush() == ""
    d = IncrementalDetokenizer(gpt2)
    assert d.feed(ids[:3]) == "a " and d.feed(ids[3:]) == "日c"  # several tokens at once


def test_pieces_add_up_to_the_full_decode_and_flush_emits_a_half_character(gpt2):
    text = "naïve café — 日本語のテキスト 🙂 done"
    ids = gpt2.encode(text)
    d = IncrementalDetokenizer(gpt2)
    pieces = [d.feed(ids[i : i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == text == d.text and not any("\ufffd" in p for p in pieces)
    for n in range(1, len(ids) + 1):  # after any prefix: the decode of the prefix minus a trailing half character
        d = IncrementalDetokenizer(gpt2)
        d.feed(ids[:n])
        assert d.text == gpt2.decode(ids[:n]).rstrip("\ufffd")
    emoji = gpt2.encode("🙂")
    d = IncrementalDetokenizer(gpt2)
    assert d.feed(emoji[:-1]) == "" and d.flush() == gpt2.decode(emoji[:-1])  # ended mid-character: emitted as is
    assert d.flush() == "" and d.text == "\ufffd"


def test_concatenating_and_joining_tokenizers():
    char = CharTokenizer("ab\n ")
    d = IncrementalDetokenizer(char)
    assert [d.feed([i]) for i in char.encode("a b\n")] == ["a", " ", "b", "\n"]
    unk = char.unk_id  # decodes to U+FFFD: held back like a half character until text follows, or the end
    assert d.feed([unk]) == "" and d.feed(char.encode("a")) == "\ufffda"
    assert d.feed([unk]) == "" and d.flush() == "\ufffd"
    words = WordTokenizer.train(["the cat sat on the mat"])
    d = IncrementalDetokenizer(words)
    ids = words.encode("the cat sat on the mat")
    pieces = [d.feed([i]) for i in ids]
    assert pieces[:2] == ["the", " cat"] and "".join(pieces) == words.decode(ids)  # joined with spaces, as decode
