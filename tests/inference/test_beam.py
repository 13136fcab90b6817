"""Beam search: token-for-token parity with Hugging Face's generate(num_beams=...), KV cache, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmlab.errors import UserError
from llmlab.inference.beam import beam_search
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.nn.kv_cache import KVCache

transformers = pytest.importorskip("transformers")
T0, NEW = 5, 10
EOS = 3  # made likely in every context (see _pair), so hypotheses end at different lengths


def _pair(seed: int, vocab: int, tmp_path):
    """A random tiny GPT2LMHeadModel and the llmlab GPT loaded from its saved directory."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                  bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # peakier logits than the init: fewer near-ties between beams
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        hf.transformer.wte.weight.mul_(10)
        hf.lm_head.weight.mul_(10)
        # point EOS's output row along the mean final hidden state: p(EOS) ~ 0.1-0.2 at every step
        x = torch.randint(0, vocab, (16, 12), generator=torch.Generator().manual_seed(99))
        mean = hf.transformer(x).last_hidden_state.reshape(-1, 32).mean(0)
        hf.lm_head.weight[EOS] += 5.0 * mean / mean.norm() ** 2
    hf.eval().save_pretrained(tmp_path / f"hf{seed}")
    return hf, GPT.from_pretrained(tmp_path / f"hf{seed}").eval()


def _hf(hf, x, eos, **kw):  # the configs have no eos: eos_token_id=None is no eos at all
    return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                       eos_token_id=eos, pad_token_id=eos if eos is not None else 0, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("beam")
    return [_pair(seed, vocab, tmp) for seed, vocab in ((0, 50), (1, 77), (2, 100))]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_beam_search_matches_hf(models, which):
    hf, ours = models[which]
    vocab = hf.config.vocab_size
    x = torch.randint(0, vocab, (2, T0), generator=torch.Generator().manual_seed(which))  # two prompts, one batch
    lengths = set()
    # every (num_beams, length_penalty, early_stopping), with (num_return_sequences, eos) cycling through their
    # 4 combinations at a different phase per model: a representative grid, a quarter of the product (time)
    for i, (K, lp, es) in enumerate(itertools.product([2, 4], [1.0, 0.0, -0.7, 2.0], [False, True, "never"])):
        R, eos = [(1, None), (2, EOS), (1, EOS), (2, None)][(i + which) % 4]
        ref = _hf(hf, x, eos, num_beams=K, length_penalty=lp, early_stopping=es, num_return_sequences=R)
        got = beam_search(ours, x, NEW, K, lp, es, R, eos_id=eos)
        assert got.shape == ref.shape and torch.equal(got, ref), (K, lp, es, R, eos)
        lengths.add(got.size(1))
        # through GPT.generate too (the dispatch), without the cache
        via = ours.generate(x, NEW, num_beams=K, length_penalty=lp, early_stopping=es, num_return_sequences=R,
                            eos_id=eos, use_kv_cache=False)
        assert torch.equal(via, ref), ("uncached", K, lp, es, R, eos)
    assert len(lengths) > 1  # some settings stop before max_new_tokens: the eos rules are exercised


def test_pad_id_fills_after_eos(models):
    hf, ours = models[0]
    x = torch.randint(0, 50, (2, T0), generator=torch.Generator().manual_seed(5))
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False, num_beams=4,
                      num_return_sequences=4, eos_token_id=EOS, pad_token_id=1, length_penalty=0.0)
    got = ours.generate(x, NEW, num_beams=4, num_return_sequences=4, eos_id=EOS, pad_id=1, length_penalty=0.0)
    assert torch.equal(got, ref)
    ended_early = [row for row in got.tolist() if EOS in row[T0:-1]]
    assert ended_early and all(set(row[row.index(EOS, T0) + 1:]) <= {1} for row in ended_early)  # padded with pad_id


@pytest.mark.parametrize("eos", [None, EOS])
def test_greedy_matches_hf(models, eos):
    hf, ours = models[1]
    x = torch.randint(0, 77, (6, T0), generator=torch.Generator().manual_seed(7))
    ref = _hf(hf, x, eos)
    got = ours.generate(x, NEW, greedy=True, eos_id=eos, num_beams=1)
    assert torch.equal(got, ref)


def test_left_padded_batch_matches_hf(models):
    """Prompts of different lengths in one batch (left padding + attention_mask), as HF generate takes them."""
    hf, ours = models[2]
    x = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    mask[2, :5] = 0
    x = x.masked_fill(mask == 0, 7)  # whatever sits under the padding must not matter
    grid = [(2, 1.0, False, 1, EOS, True), (3, 0.0, True, 2, EOS, False), (3, 2.0, "never", 3, EOS, True),
            (2, -0.7, False, 2, None, True)]
    for K, lp, es, R, eos, cache in grid:
        ref = hf.generate(x, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=K, length_penalty=lp,
                          early_stopping=es, num_return_sequences=R, eos_token_id=eos, pad_token_id=EOS)
        got = ours.generate(x, NEW, num_beams=K, length_penalty=lp, early_stopping=es, num_return_sequences=R,
                            eos_id=eos, pad_id=EOS, attention_mask=mask, use_kv_cache=cache)
        assert torch.equal(got, ref), (K, lp, es, R, eos, cache)
    # each padded row is searched as if alone: the short prompt without its padding gives the same beams
    alone = ours.generate(x[2:, 5:], NEW, num_beams=3, num_return_sequences=3, eos_id=EOS, pad_id=EOS)
    padded = ours.generate(x, NEW, num_beams=3, num_return_sequences=3, eos_id=EOS, pad_id=EOS, attention_mask=mask)
    n = alone.size(1) - 2
    assert torch.equal(padded[6:, 7:7 + n], alone[:, 2:]) and (padded[6:, 7 + n:] == EOS).all()


def test_processors_in_beam_search_match_hf(models):
    """repetition_penalty / no_repeat_ngram_size act on each beam's log-softmax (HF's _beam_search), padded rows too."""
    hf, ours = models[2]
    x = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(x)
    mask[2, :4] = 0
    plain = ours.generate(x, NEW, num_beams=3, num_return_sequences=2, eos_id=EOS, attention_mask=mask)
    for kw in (dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2),
               dict(repetition_penalty=0.7, no_repeat_ngram_size=3)):
        ref = hf.generate(x, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=3,
                          num_return_sequences=2, eos_token_id=EOS, pad_token_id=EOS, **kw)
        got = ours.generate(x, NEW, num_beams=3, num_return_sequences=2, eos_id=EOS, attention_mask=mask, **kw)
        assert torch.equal(got, ref), kw
        assert not torch.equal(got, plain), kw  # the processor changed the search


def test_cached_equals_uncached_and_sliding_window():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, block_size=12, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(20)
    x = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(3))
    for new in (5, 20):  # within the context, and sliding past block_size=12
        a = beam_search(model, x, new, 3, num_return_sequences=3, use_kv_cache=True)
        b = beam_search(model, x, new, 3, num_return_sequences=3, use_kv_cache=False)
        assert a.shape == (6, 6 + new) and torch.equal(a, b)
        assert torch.equal(a[:, :6], x.repeat_interleave(3, 0))
    # one beam is greedy decoding
    assert torch.equal(beam_search(model, x, 8, 1), model.generate(x, 8, greedy=True))
    assert model.training is False and torch.equal(beam_search(model, x, 0, 2, num_return_sequences=2),
                                                   x.repeat_interleave(2, 0))


def test_kv_cache_reorder():
    c = KVCache(1, 3, 1, 2, 4)
    c.k[0, :, 0, 0, 0] = torch.tensor([10.0, 11.0, 12.0])
    c.reorder(torch.tensor([2, 2, 0]))
    assert c.k[0, :, 0, 0, 0].tolist() == [12.0, 12.0, 10.0]
    with pytest.raises(UserError, match="3 row indices"):
        c.reorder(torch.tensor([0, 1]))


@pytest.mark.parametrize("kw,msg", [
    (dict(num_beams=0), "num_beams=0 must be an integer >= 1"),
    (dict(num_beams=2.5), "num_beams=2.5 must be an integer >= 1"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 must be <= num_beams=2"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping='sometimes' must be true, false or never"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty=nan must be a finite number"),
    (dict(num_beams=2, temperature=-1), "temperature=-1 must be finite and >= 0"),
    (dict(num_beams=2, beam_width=3), "unknown generate() option(s) beam_width"),
    (dict(num_beams=1, num_return_sequences=2), "num_return_sequences=2 must be <= num_beams=1"),
    (dict(num_beams=2, attention_mask=torch.ones(1, 4, dtype=torch.long)), "attention_mask shape (1, 4) must equal"),
])
def test_bad_input_is_one_line(kw, msg):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=31, block_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    with pytest.raises(UserError) as e:
        model.generate(torch.zeros(1, 3, dtype=torch.long), 4, **kw)
    assert msg in str(e.value) and "\n" not in str(e.value)
