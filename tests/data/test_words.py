"""Word tokenizer, streamed word2vec windows and GloVe co-occurrence counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmlab.data.tokenizers import WordTokenizer, build_tokenizer, tokenizer_from_state
from llmlab.data.words import (
    CooccurrenceDataModule,
    Word2VecDataModule,
    Word2VecWindows,
    cooccurrence,
    window_pairs,
)
from llmlab.errors import UserError


def pairs_of(center, context, group) -> set[tuple[int, int]]:
    return {(int(center[g]), int(c)) for c, g in zip(context, group)}


def test_word_tokenizer_frequency_order_min_count_and_state():
    tok = build_tokenizer("word", ["The cat. the CAT, the dog's bone\nthe end"], min_count=2)
    assert tok.words == ["the", "cat"] and tok.counts == [4, 2]  # most frequent first
    assert tok.encode("the dog's cat") == [0, 1]  # OOV words are dropped
    again = tokenizer_from_state(tok.state_dict())
    assert again.words == tok.words and again.fingerprint == tok.fingerprint
    capped = build_tokenizer("word", ["a a a b b c"], max_vocab_size=2)
    assert capped.words == ["a", "b"]
    with pytest.raises(UserError, match="min_count"):
        build_tokenizer("word", ["a b c"], min_count=5)


def test_sentences_are_lines_and_oov_is_removed_before_windowing():
    tok = WordTokenizer(["a", "b", "c"], [3, 2, 1])
    ids, sent = tok.encode_sentences(["a x b\n\nc a", "b"])
    assert ids.tolist() == [0, 1, 2, 0, 1] and sent.tolist() == [0, 0, 1, 1, 2]


def test_pairs_of_a_three_word_sentence_window_1():
    ids, sent = np.array([0, 1, 2]), np.zeros(3, dtype=np.int64)  # "a b c"
    center, context, group = window_pairs(ids, sent, np.ones(3, dtype=np.int64), 0, 3)
    assert pairs_of(center, context, group) == {(0, 1), (1, 0), (1, 2), (2, 1)}
    assert np.all(np.diff(group) >= 0)


def test_windows_respect_sentences_and_reduced_windows():
    ids = np.array([0, 1, 2, 3, 4, 5])
    sent = np.array([0, 0, 0, 1, 1, 1])
    reduced = np.array([2, 1, 2, 2, 2, 2])
    center, context, group = window_pairs(ids, sent, reduced, 0, 6)
    got = pairs_of(center, context, group)
    assert (0, 3) not in got and (3, 2) not in got  # never across a line
    assert (1, 0) in got and (1, 2) in got and (0, 2) in got
    # word 1's reduced window is 1 (it does not see 3, which is in another line anyway)
    assert {c for (w, c) in got if w == 1} == {0, 2}


def test_epoch_stream_is_deterministic_and_subsamples():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=5000)
    sent = np.arange(5000) // 10
    keep = np.where(np.arange(50) < 5, 0.2, 1.0)  # the 5 most frequent are mostly dropped

    def epoch(e):
        ds = Word2VecWindows(ids, sent, keep, window=3, shrink_windows=True, batch_words=256,
                             shared_negatives=True, seed=7)
        ds.epoch = e
        return list(ds)

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert all(torch.equal(x["context"], y["context"]) for x, y in zip(a, b))
    assert not all(len(x["context"]) == len(y["context"]) and torch.equal(x["context"], y["context"]) for x, y in zip(a, c))
    centers = torch.cat([x["center"] for x in a])
    share = (centers < 5).float().mean().item()
    assert share < 0.1 * 0.5  # ~10 % before subsampling, ~2 % after
    assert a[-1]["progress"] == 1.0
    per_pair = Word2VecWindows(ids, sent, keep, 3, True, 256, False, 7)
    first = next(iter(per_pair))
    assert torch.equal(first["group"], torch.arange(len(first["group"])))


def test_cooccurrence_a_b_c_window_2_is_symmetric_with_1_over_d():
    i, j, x = cooccurrence(np.array([0, 1, 2]), np.zeros(3, dtype=np.int64), 3, window=2)
    X = torch.zeros(3, 3, dtype=torch.float64)
    X[i, j] = x
    expected = torch.tensor([[0, 1, 0.5], [1, 0, 1], [0.5, 1, 0]], dtype=torch.float64)
    assert torch.equal(X, expected)
    i, j, x = cooccurrence(np.array([0, 1, 2]), np.zeros(3, dtype=np.int64), 3, window=2, symmetric=False)
    X = torch.zeros(3, 3, dtype=torch.float64)
    X[i, j] = x
    assert X[0, 1] == 1 and X[0, 2] == 0.5 and X[1, 0] == 0  # left word's row (glove.c)


def test_cooccurrence_stays_inside_lines_and_sums_repeats():
    ids = np.array([0, 1, 0, 1])
    sent = np.array([0, 0, 1, 1])
    i, j, x = cooccurrence(ids, sent, 2, window=3)
    X = torch.zeros(2, 2, dtype=torch.float64)
    X[i, j] = x
    assert X[0, 1] == 2 and X[1, 0] == 2 and X[0, 0] == 0  # "0 1" twice; nothing across the line break


def _tok(texts, **kw):
    return build_tokenizer("word", texts, **kw)


def test_datamodules_need_the_word_tokenizer_and_enough_words(tmp_path):
    dm = Word2VecDataModule(corpus="text", path=str(tmp_path))
    with pytest.raises(UserError, match="tokenizer=word"):  # checked when the tokenizer is attached
        dm.tokenizer = build_tokenizer("char", ["abc"])
    (tmp_path / "one.txt").write_text("hello\n")
    dm = CooccurrenceDataModule(corpus="text", path=str(tmp_path / "one.txt"))
    dm.tokenizer = _tok(dm.documents())
    with pytest.raises(UserError, match="in-vocabulary words"):
        dm.setup()
    with pytest.raises(UserError, match="window"):
        Word2VecDataModule(window=0)
