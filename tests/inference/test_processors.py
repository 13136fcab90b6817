"""Repetition penalty, no-repeat n-gram and the warpers against transformers' LogitsProcessors, and
greedy / sampled generation token-for-token against transformers' generate on the same weights."""

from __future__ import annotations

import pytest
import torch

from llmlab.errors import UserError
from llmlab.inference.generate import generate
from llmlab.inference.processors import apply_processors
from llmlab.inference.sampling import sample_next, warp_logits
from llmlab.models.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")
lp = pytest.importorskip("transformers.generation.logits_process")


def _hf_pair(seed: int, vocab: int):
    """A random tiny llmlab GPT and the GPT2LMHeadModel with the same weights (GPT.to_hf_state_dict)."""
    torch.manual_seed(seed)
    ours = GPT(GPTConfig(vocab_size=vocab, block_size=48, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    with torch.no_grad():  # peakier logits than the 0.02 init: greedy paths without near-ties
        ours.transformer.wte.weight.mul_(5)
    cfg = {k: v for k, v in ours.to_hf_config().items() if k not in ("model_type", "architectures")}
    cfg.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    hf.load_state_dict(ours.to_hf_state_dict(), strict=True)
    return ours.eval(), hf.eval()


@pytest.fixture(scope="module")
def pairs():
    return [_hf_pair(seed, vocab) for seed, vocab in ((0, 13), (1, 50), (2, 97))]


def _hf_generate(hf, x, n, **kw):
    return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw)


# ----------------------------------------------------------------------------- processors alone
@pytest.mark.parametrize("penalty", [1.3, 0.6, 2.0])
def test_repetition_penalty_equals_hf(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=g) * 3  # both signs: divided when > 0, multiplied when < 0
    ctx = torch.randint(0, 30, (4, 12), generator=g)  # with duplicates: penalised once
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(ctx, logits.clone())
    assert torch.equal(apply_processors(logits, ctx, repetition_penalty=penalty), ref)
    # left padding: HF skips each row's first `prompt_ignore_length` ids (what generate passes for padding)
    pad = torch.tensor([0, 3, 5, 11])
    mask = (torch.arange(12)[None] >= pad[:, None]).long()
    ref = lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pad)(ctx, logits.clone())
    assert torch.equal(apply_processors(logits, ctx, repetition_penalty=penalty, context_mask=mask), ref)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_hf(n):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(6, 5, generator=g)
    for T in (1, 3, 9, 20):  # shorter than n (nothing banned) up to many repeats over a 5-token vocabulary
        ctx = torch.randint(0, 5, (6, T), generator=g)
        ref = lp.NoRepeatNGramLogitsProcessor(n)(ctx, logits.clone())
        got = apply_processors(logits, ctx, no_repeat_ngram_size=n)
        assert torch.equal(got, ref), (n, T)
    assert torch.isinf(got).any()  # the case is not vacuous


def test_no_repeat_ngram_ignores_padding_and_both_processors_chain_like_hf():
    ctx = torch.tensor([[7, 7, 1, 2, 1], [0, 0, 1, 2, 1]])  # row 1: two pads then the same tokens
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    logits = torch.zeros(2, 8)
    got = apply_processors(logits, ctx, no_repeat_ngram_size=2, context_mask=mask)
    assert torch.isinf(got[:, 2]).all()  # "1 2" occurred: 2 is banned after 1 in both rows
    # padding ids (0) in windows do not ban: row 0 with "7 7" would ban 7 after 7, row 1 has no real "0 0"
    ctx2 = torch.tensor([[5, 0, 0, 3, 0], [0, 0, 0, 3, 0]])
    mask2 = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    got2 = apply_processors(logits, ctx2, no_repeat_ngram_size=2, context_mask=mask2)
    assert torch.isinf(got2[0, 0]) and torch.isinf(got2[0, 3])
    assert torch.isfinite(got2[1, 0]) and torch.isinf(got2[1, 3])
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, generator=g)
    ctx = torch.randint(0, 6, (3, 10), generator=g)
    chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.5), lp.NoRepeatNGramLogitsProcessor(2)])
    assert torch.equal(apply_processors(logits, ctx, repetition_penalty=1.5, no_repeat_ngram_size=2),
                       chain(ctx, logits.clone()))
    assert apply_processors(logits, ctx) is logits  # everything off: untouched


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1),
                                dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05),
                                dict(temperature=0.5, top_p=0.6, min_p=0.2)])
def test_warpers_equal_hf_in_hf_order(kw):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 40, generator=g) * 2
    chain = []
    if kw.get("temperature", 1.0) != 1.0:
        chain.append(lp.TemperatureLogitsWarper(kw["temperature"]))
    if kw.get("top_k"):
        chain.append(lp.TopKLogitsWarper(kw["top_k"]))
    if kw.get("top_p"):
        chain.append(lp.TopPLogitsWarper(kw["top_p"]))
    if kw.get("min_p"):
        chain.append(lp.MinPLogitsWarper(kw["min_p"]))
    assert torch.equal(warp_logits(logits, **kw), lp.LogitsProcessorList(chain)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7, 0.75, 0.9])
def test_top_p_breaks_ties_like_hf(p):
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 3, (16, 12), generator=g).float()  # only three distinct values: ties everywhere
    assert torch.equal(warp_logits(logits, top_p=p), lp.TopPLogitsWarper(p)(None, logits.clone()))
    assert torch.equal(warp_logits(logits, min_p=p), lp.MinPLogitsWarper(p)(None, logits.clone()))


def test_bad_processor_arguments_are_user_errors():
    logits, ctx = torch.zeros(1, 5), torch.zeros(1, 3, dtype=torch.long)
    for kw in (dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0), dict(no_repeat_ngram_size=-1),
               dict(no_repeat_ngram_size=1.5)):
        with pytest.raises(UserError):
            apply_processors(logits, ctx, **kw)
    with pytest.raises(UserError, match="context_ids"):
        sample_next(logits, repetition_penalty=1.2)


# ----------------------------------------------------------------------------- whole generations vs HF
@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(repetition_penalty=0.3),
                                dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3, repetition_penalty=1.2)])
def test_greedy_with_processors_matches_hf_generate(pairs, kw):
    changed = False
    for i, (ours, hf) in enumerate(pairs):
        x = torch.randint(0, ours.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(10 + i))
        ref = _hf_generate(hf, x, 20, do_sample=False, **kw)
        for cache in (True, False):
            assert torch.equal(generate(ours, x, 20, greedy=True, use_kv_cache=cache, **kw), ref), (i, kw, cache)
        changed |= not torch.equal(ref, _hf_generate(hf, x, 20, do_sample=False))
    if kw.get("repetition_penalty", 2.0) > 1:  # (a reward < 1 cannot change these self-repeating greedy paths)
        assert changed  # the option changed some greedy output


@pytest.mark.parametrize("kw", [dict(temperature=0.9, top_k=8), dict(top_p=0.8, repetition_penalty=1.3),
                                dict(temperature=1.2, min_p=0.1, no_repeat_ngram_size=2)])
def test_sampling_matches_hf_generate_draw_for_draw(pairs, kw):
    """Both libraries draw torch.multinomial from the global RNG once per step in the same order."""
    ours, hf = pairs[1]
    x = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    ref = _hf_generate(hf, x, 16, do_sample=True, **{"top_k": 0, **kw})  # HF's default top_k is 50: off here
    torch.manual_seed(123)
    assert torch.equal(generate(ours, x, 16, **kw), ref)
    torch.manual_seed(124)
    assert not torch.equal(generate(ours, x, 16, **kw), ref)  # the draws do matter


def test_left_padded_rows_with_processors_generate_what_they_would_alone(pairs):
    ours, _ = pairs[2]
    a = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 97, (1, 4), generator=torch.Generator().manual_seed(2))
    x = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    kw = dict(greedy=True, repetition_penalty=1.4, no_repeat_ngram_size=2)
    out = generate(ours, x, 12, attention_mask=mask, **kw)
    assert torch.equal(out[0:1], generate(ours, a, 12, **kw))
    assert torch.equal(out[1:2, 3:], generate(ours, b, 12, **kw))


def test_model_generate_and_cli_take_the_group_names(pairs):
    ours, hf = pairs[0]
    x = torch.randint(0, 13, (1, 5), generator=torch.Generator().manual_seed(0))
    ref = _hf_generate(hf, x, 10, do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert torch.equal(ours.generate(x, 10, greedy=True, repetition_penalty=1.3, no_repeat_ngram_size=2), ref)
