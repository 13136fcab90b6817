"""Span corruption (T5): exact noise and span counts, alternating non-adjacent spans, the paper's
example, sentinel ids, input lengths that fill exactly, and uncorrupt() as an exact inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmlab.data.span_corruption import (
    SpanCorruptionCollator,
    compute_input_and_target_lengths,
    corrupt_with_mask,
    noise_span_counts,
    random_spans_noise_mask,
    sentinel_id,
    span_corruption,
    uncorrupt,
)
from llmlab.errors import UserError

VOCAB = 1000 + 100  # 1000 text ids + 100 sentinels (ids 1000..1099)


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """Maximal runs of a boolean mask as (value, length)."""
    out: list[tuple[bool, int]] = []
    for v in mask.tolist():
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


# ---------------------------------------------------------------------------- noise mask
@pytest.mark.parametrize("length", [2, 5, 7, 10, 20, 33, 100, 128, 512, 568, 1000])
def test_exact_counts_and_alternating_spans(length):
    expect_noise = min(max(round(length * 0.15), 1), length - 1)
    expect_spans = max(round(expect_noise / 3), 1)
    assert noise_span_counts(length) == (expect_noise, expect_spans)
    for seed in range(20):
        mask = random_spans_noise_mask(length, rng=seed)
        assert mask.dtype == bool and mask.shape == (length,)
        assert int(mask.sum()) == expect_noise
        r = runs(mask)
        # kept, noise, kept, noise ...: every noise run is its own span (none adjacent) and the
        # sequence starts with a kept token
        assert [v for v, _ in r] == [False, True] * expect_spans
        assert sum(v for v, _ in r) == expect_spans


def test_known_counts():
    assert noise_span_counts(100) == (15, 5)
    assert noise_span_counts(512) == (77, 26)
    assert noise_span_counts(568) == (85, 28)
    assert noise_span_counts(3) == (1, 1)  # round(0.45) = 0 noise tokens is clamped to 1


def test_span_lengths_are_a_uniform_composition():
    """Every span has the same expected length (num_noise / num_spans); lengths vary."""
    first, last, lengths = [], [], []
    for seed in range(400):
        r = [n for v, n in runs(random_spans_noise_mask(200, rng=seed)) if v]  # 30 noise in 10 spans
        first.append(r[0])
        last.append(r[-1])
        lengths.extend(r)
    assert np.mean(lengths) == 3.0  # exact by construction
    assert abs(np.mean(first) - 3.0) < 0.3 and abs(np.mean(last) - 3.0) < 0.3
    assert min(lengths) == 1 and max(lengths) >= 8  # not fixed-length spans


def test_mean_span_length_parameter_is_respected():
    for mean in (1.0, 2.0, 5.0, 10.0):
        noise, spans = noise_span_counts(400, 0.15, mean)
        mask = random_spans_noise_mask(400, 0.15, mean, rng=0)
        assert int(mask.sum()) == noise == 60
        assert sum(v for v, _ in runs(mask)) == spans == max(round(60 / mean), 1)


def test_determinism_and_generators():
    a = random_spans_noise_mask(300, rng=5)
    assert np.array_equal(a, random_spans_noise_mask(300, rng=5))
    assert np.array_equal(a, random_spans_noise_mask(300, rng=np.random.default_rng(5)))
    assert not np.array_equal(a, random_spans_noise_mask(300, rng=6))
    t1 = random_spans_noise_mask(300, rng=torch.Generator().manual_seed(1))
    t2 = random_spans_noise_mask(300, rng=torch.Generator().manual_seed(1))
    assert np.array_equal(t1, t2)
    # a shared generator advances: consecutive draws differ
    g = np.random.default_rng(0)
    assert not np.array_equal(random_spans_noise_mask(300, rng=g), random_spans_noise_mask(300, rng=g))


# ---------------------------------------------------------------------------- golden example
WORDS = ["<pad>", "</s>", "Thank", "you", "for", "inviting", "me", "to", "your", "party", "last", "week", "."]


def test_paper_example():
    """Raffel et al. 2020, Figure 2, with the figure's mask and a word-level vocabulary."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab_size = len(WORDS) + 100
    itos = {i: w for w, i in vocab.items()}
    itos |= {sentinel_id(k, vocab_size): f"<extra_id_{k}>" for k in range(100)}
    text = "Thank you for inviting me to your party last week .".split()
    tokens = [vocab[w] for w in text]
    mask = [w in ("for", "inviting", "last") for w in text]
    inputs, targets = corrupt_with_mask(tokens, mask, vocab_size, eos_id=vocab["</s>"])
    decoded_inputs = " ".join(itos[i] for i in inputs)
    decoded_targets = " ".join(itos[i] for i in targets)
    assert decoded_inputs == "Thank you <extra_id_0> me to your party <extra_id_1> week . </s>"
    assert decoded_targets == "<extra_id_0> for inviting <extra_id_1> last <extra_id_2> </s>"
    # HF order: <extra_id_0> is the top id, numbering downwards
    assert [sentinel_id(k, vocab_size) for k in range(3)] == [vocab_size - 1, vocab_size - 2, vocab_size - 3]
    assert inputs[2] == targets[0] == vocab_size - 1 and inputs[7] == targets[3] == vocab_size - 2
    assert list(uncorrupt(inputs, targets, vocab_size)) == tokens


def test_t5_tokenizer_sentinel_ids():
    # the HF T5 tokenizer has 32,100 ids: <extra_id_0> = 32099 ... <extra_id_99> = 32000
    assert sentinel_id(0, 32100) == 32099 and sentinel_id(99, 32100) == 32000


# ---------------------------------------------------------------------------- lengths
def test_expanded_length_matches_the_t5_recipe():
    # HF's run_t5_mlm_flax / the T5 reference: 512 corrupted inputs need 568 raw tokens, 114 targets
    assert compute_input_and_target_lengths(512, 0.15, 3.0, final_sentinel=False) == (568, 114)
    assert compute_input_and_target_lengths(512) == (568, 115)  # + the final sentinel
    # 141 raw tokens: 21 noise in 7 spans -> 120 kept + 7 sentinels + EOS = 128; 21 + 7 + 1 + EOS = 30.
    # 142 would give 121 + 7 + 1 = 129.
    assert compute_input_and_target_lengths(128) == (141, 30)


def test_corrupted_input_fills_inputs_length_exactly():
    rng = np.random.default_rng(0)
    for inputs_length in list(range(3, 200)) + [256, 511, 512, 1024]:
        tokens_length, targets_length = compute_input_and_target_lengths(inputs_length)
        tokens = rng.integers(2, 1000, tokens_length)
        inputs, targets = span_corruption(tokens, VOCAB, rng=rng)
        assert len(inputs) == inputs_length, (inputs_length, tokens_length)
        assert len(targets) == targets_length
        # one more raw token would overflow: the input is as full as it can be
        noise, spans = noise_span_counts(tokens_length + 1)
        assert tokens_length + 1 - noise + spans + 1 > inputs_length


@pytest.mark.parametrize("length", [7, 10, 50, 128, 333])
def test_input_and_target_lengths_formula(length):
    noise, spans = noise_span_counts(length)
    inputs, targets = span_corruption(np.arange(2, length + 2), VOCAB, rng=length)
    assert len(inputs) == length - noise + spans + 1  # kept + one sentinel per span + EOS
    assert len(targets) == noise + spans + 1 + 1  # noise + one sentinel per span + final sentinel + EOS
    assert inputs[-1] == targets[-1] == 1


# ---------------------------------------------------------------------------- round trip
@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.integers(min_value=2, max_value=999), min_size=1, max_size=400),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    density=st.sampled_from([0.15, 0.3, 0.5]),
    mean=st.sampled_from([1.0, 3.0, 8.0]),
)
def test_uncorrupt_inverts_span_corruption(tokens, seed, density, mean):
    inputs, targets = span_corruption(
        tokens, VOCAB, noise_density=density, mean_noise_span_length=mean, rng=seed
    )
    assert list(uncorrupt(inputs, targets, VOCAB)) == tokens
    first_sentinel = VOCAB - 100
    in_sent = [t for t in inputs if t >= first_sentinel]
    tg_sent = [t for t in targets if t >= first_sentinel]
    # sentinel k in the input is sentinel k in the target, numbered from the top id down, + a final one
    assert in_sent == [VOCAB - 1 - k for k in range(len(in_sent))]
    assert tg_sent == in_sent + [VOCAB - 1 - len(in_sent)]
    assert inputs[-1] == 1 and targets[-1] == 1 and 1 not in inputs[:-1].tolist()
    if len(tokens) >= 2:  # every sequence of 2+ tokens gets at least one noise span
        assert len(in_sent) >= 1


def test_uncorrupt_ignores_padding_and_tolerates_missing_spans():
    tokens = np.arange(2, 60)
    inputs, targets = span_corruption(tokens, VOCAB, rng=3)
    padded_in = np.concatenate([inputs, np.zeros(7, dtype=np.int64)])
    padded_tg = np.concatenate([targets, np.full(5, 0)])
    assert np.array_equal(uncorrupt(torch.from_numpy(padded_in), padded_tg, VOCAB), tokens)
    # a prediction that stops after the first span: the other spans come back empty
    cut = np.flatnonzero(targets == VOCAB - 2)[0]
    partial = uncorrupt(inputs, targets[:cut], VOCAB)
    n_first = cut - 1
    assert len(partial) == len(tokens) - (np.sum(targets < VOCAB - 100) - 1 - n_first)


# ---------------------------------------------------------------------------- errors and collator
def test_errors():
    with pytest.raises(UserError, match="sentinel"):
        span_corruption([5, 1050, 7, 8], VOCAB, rng=0)  # 1050 is a sentinel id
    with pytest.raises(UserError, match="at least one token"):
        span_corruption([], VOCAB, rng=0)
    with pytest.raises(UserError, match="sentinels"):  # 101 spans need 102 sentinels
        corrupt_with_mask(np.arange(2, 204), np.arange(202) % 2 == 1, VOCAB)
    with pytest.raises(UserError, match="noise_density"):
        random_spans_noise_mask(10, noise_density=0.0)
    with pytest.raises(UserError, match="inputs_length"):
        compute_input_and_target_lengths(2)


def test_collator_pads_and_round_trips():
    collate = SpanCorruptionCollator(vocab_size=VOCAB, seed=0)
    seqs = [np.arange(2, 2 + n) for n in (40, 25, 60)]
    batch = collate(seqs)
    x, m, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert x.shape[0] == m.shape[0] == y.shape[0] == 3 and x.dtype == torch.long
    for row, seq in enumerate(seqs):
        n_in = int(m[row].sum())
        assert (m[row, :n_in] == 1).all() and (m[row, n_in:] == 0).all() and (x[row, n_in:] == 0).all()
        assert x[row, n_in - 1] == 1  # EOS is the last real input token
        tgt = y[row][y[row] != -100]
        assert (y[row, len(tgt) :] == -100).all()
        assert np.array_equal(uncorrupt(x[row, :n_in], tgt, VOCAB), seq)
    # the same seed gives the same batches; the next call draws new masks
    again = SpanCorruptionCollator(vocab_size=VOCAB, seed=0)(seqs)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(collate(seqs)["input_ids"], batch["input_ids"])
