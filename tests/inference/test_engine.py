"""Continuous batching: every request of a ragged, changing batch gets what it would alone.

The reference is :func:`llmlab.inference.generate.generate` on one prompt with a contiguous KV cache
(which is itself tested against Hugging Face's generate); the engine runs the same prompts together,
joining at different steps, with a paged cache, preemptions, forks and per-request settings.
"""

from __future__ import annotations

import threading

import pytest
import torch

from llmlab.errors import UserError
from llmlab.inference.engine import Engine, SamplingParams
from llmlab.inference.generate import generate
from llmlab.models.gpt import GPT, GPTConfig

V, CTX = 60, 48
EOS = 26  # a token the greedy runs below emit mid-way in several requests (checked)


class ToyTokenizer:
    """Token i <-> one character; EOS decodes to nothing (as llmlab's char tokenizer does)."""

    eos_id = EOS
    vocab_size = V

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 64 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(64 + i) for i in ids if i != EOS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, block_size=CTX, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False))
    with torch.no_grad():  # peakier, more varied logits than the init (no near-ties, no single-token loops)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def _prompts(n: int, seed: int = 1) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, 18, (1,), generator=g))
        out.append((torch.randint(8, V, (length,), generator=g).tolist(), int(torch.randint(1, 28, (1,), generator=g))))
    return out


def _alone(model, prompt: list[int], new: int, eos: int | None = EOS, **kw) -> list[int]:
    """generate() on this prompt alone (contiguous cache), cut after the first EOS."""
    out = generate(model, torch.tensor([prompt]), new, eos_id=eos, **kw)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos is not None and eos in out else out


def _run_staggered(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Add requests a few at a time between steps; gather each sample's streamed tokens and text."""
    got: dict[str, dict[int, list]] = {}

    def collect(outputs):
        for o in outputs:
            entry = got.setdefault(o.request_id, {}).setdefault(o.index, [[], "", None])
            entry[0] += o.token_ids
            entry[1] += o.text
            entry[2] = o.finish_reason

    ids = []
    for i, (prompt, params) in enumerate(requests):
        ids.append(engine.add_request(prompt, params))
        if i % 3 == 2:
            collect(engine.step())
    while engine.has_unfinished():
        collect(engine.step())
    return {rid: [got[rid][k] for k in sorted(got[rid])] for rid in ids}


@pytest.mark.parametrize("num_blocks", [None, 14])
def test_greedy_batch_equals_each_prompt_alone(model, num_blocks):
    """Many prompts of different lengths and max_new_tokens, joining at different steps: token-identical
    to running each alone; a tiny pool (14 blocks of 4) forces recompute preemptions with the same result."""
    reqs = _prompts(14)
    engine = Engine(model, ToyTokenizer(), block_size=4, num_blocks=num_blocks, max_num_seqs=6)
    out = _run_staggered(engine, [(p, SamplingParams(max_new_tokens=n, greedy=True)) for p, n in reqs])
    stopped = 0
    for (prompt, new), [(tokens, text, reason)] in zip(reqs, out.values()):
        ref = _alone(model, prompt, new, greedy=True)
        assert tokens == ref
        assert text == ToyTokenizer().decode(ref)
        assert reason == ("stop" if ref[-1] == EOS else "length")
        stopped += reason == "stop"
    stats = engine.stats
    assert stopped >= 1  # the EOS path was exercised
    assert stats["generated_tokens"] == sum(len(v[0][0]) for v in out.values())
    assert stats["blocks_in_use"] == 0 and stats["running"] == 0  # everything freed
    if num_blocks is None:
        assert stats["preemptions"] == 0
    else:
        assert stats["preemptions"] > 0 and stats["peak_blocks_in_use"] <= 14


def test_per_request_settings_in_one_batch(model):
    """A greedy and a sampled request decoded together: each equals its own run alone (the sampler's
    generator is its own, seeded with the request's seed)."""
    p1, p2 = [10, 20, 30, 40, 50], [11, 22, 33]
    engine = Engine(model, ToyTokenizer(), block_size=4)
    sampled = SamplingParams(max_new_tokens=20, temperature=0.9, top_k=20, top_p=0.95, seed=123, stop_at_eos=False)
    processed = SamplingParams(max_new_tokens=20, greedy=True, repetition_penalty=1.5, no_repeat_ngram_size=2)
    out = engine.run([p1, p2, p1], [SamplingParams(max_new_tokens=20, greedy=True), sampled, processed])
    assert out[0].outputs[0]["token_ids"] == _alone(model, p1, 20, greedy=True)
    gen = torch.Generator().manual_seed(123)
    ref = _alone(model, p2, 20, eos=None, temperature=0.9, top_k=20, top_p=0.95, generator=gen)
    assert out[1].outputs[0]["token_ids"] == ref
    ref = _alone(model, p1, 20, greedy=True, repetition_penalty=1.5, no_repeat_ngram_size=2)
    assert out[2].outputs[0]["token_ids"] == ref != out[0].outputs[0]["token_ids"]


def test_parallel_samples_fork_and_are_reproducible(model):
    """n=3 shares the prompt's blocks (fork, copy-on-write); the same seed gives the same samples
    whatever else is in the batch, and the samples differ from each other."""
    prompt = list(range(10, 27))  # 17 tokens: 4 full blocks of 4 shared, the 5th copied on write
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=7, n=3, stop_at_eos=False)
    a = Engine(model, ToyTokenizer(), block_size=4).run([prompt], params)[0]
    others = [(p, SamplingParams(max_new_tokens=n, greedy=True)) for p, n in _prompts(4, seed=5)]
    engine = Engine(model, ToyTokenizer(), block_size=4, num_blocks=40)
    b = engine.run([prompt] + [p for p, _ in others], [params] + [s for _, s in others])[0]
    samples = [o["token_ids"] for o in a.outputs]
    assert samples == [o["token_ids"] for o in b.outputs]
    assert len({tuple(s) for s in samples}) == 3 and all(len(s) == 12 for s in samples)
    # sample i is what generate() draws alone with seed 7 + i
    for i, s in enumerate(samples):
        gen = torch.Generator().manual_seed(7 + i)
        assert s == _alone(model, prompt, 12, eos=None, temperature=1.5, generator=gen)


def test_forked_samples_share_prompt_blocks(model):
    prompt = list(range(10, 27))
    engine = Engine(model, ToyTokenizer(), block_size=4, enable_prefix_caching=False)
    engine.add_request(prompt, SamplingParams(max_new_tokens=3, n=4, seed=0, stop_at_eos=False))
    engine.step()  # prefill once + fork, then one decode (each sample copies the partial last block)
    assert engine.stats["prefill_tokens"] == len(prompt)
    assert engine.stats["blocks_in_use"] == 4 + 4  # 4 shared full blocks + one own last block per sample
    while engine.has_unfinished():
        engine.step()
    assert engine.stats["blocks_in_use"] == 0


def test_stop_strings_and_streamed_text(model):
    """A stop string cuts the text before it (finish_reason stop) and is never streamed out."""
    prompt = [12, 13, 14, 15]
    ref = ToyTokenizer().decode(_alone(model, prompt, 30, eos=None, greedy=True))
    stop = ref[9:12]
    cut = ref.find(stop)
    engine = Engine(model, ToyTokenizer(), block_size=4)
    streamed = []
    engine.add_request(prompt, SamplingParams(max_new_tokens=30, greedy=True, stop=[stop], stop_at_eos=False),
                       on_output=streamed.append)
    while engine.has_unfinished():
        engine.step()
    assert "".join(o.text for o in streamed) == ref[:cut]
    assert streamed[-1].finished and streamed[-1].finish_reason == "stop"
    assert all(not o.finished for o in streamed[:-1])


def test_serve_forever_with_concurrent_add_request(model):
    engine = Engine(model, ToyTokenizer(), block_size=4, max_num_seqs=4)
    stop = threading.Event()
    thread = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    thread.start()
    done, texts, finished = threading.Event(), {}, set()
    reqs = _prompts(6, seed=3)

    def on_output(o):  # runs on the engine's thread
        texts.setdefault(o.request_id, []).extend(o.token_ids)
        if o.finished:
            finished.add(o.request_id)
            if len(finished) == len(reqs):
                done.set()

    adders = [threading.Thread(target=engine.add_request, args=(p, SamplingParams(max_new_tokens=n, greedy=True)),
                               kwargs={"request_id": f"c{i}", "on_output": on_output})
              for i, (p, n) in enumerate(reqs)]
    for t in adders:
        t.start()
    for t in adders:
        t.join()
    assert done.wait(30)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    for i, (p, n) in enumerate(reqs):
        assert texts[f"c{i}"] == _alone(model, p, n, greedy=True)


def test_refusals(model):
    engine = Engine(model, ToyTokenizer(), block_size=4, num_blocks=8)
    with pytest.raises(UserError, match="exceeds the model's context of 48"):
        engine.add_request(list(range(8, 48)), SamplingParams(max_new_tokens=9))
    with pytest.raises(UserError, match="num_blocks=8"):
        engine.add_request([9] * 10, SamplingParams(max_new_tokens=10, n=2))
    with pytest.raises(UserError, match="empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(UserError, match="unknown key 'max_tokens'.*max_new_tokens"):
        SamplingParams.from_dict({"max_tokens": 3})
    with pytest.raises(UserError, match="^top_p=1.5"):
        SamplingParams.from_dict({"top_p": 1.5})
    with pytest.raises(UserError, match="^stop="):
        SamplingParams.from_dict({"stop_strings": [""]})
    p = SamplingParams.from_dict({"num_samples": 2, "stop_strings": "\n\n", "repetition_penalty": 1.0},
                                 {"temperature": 0.0, "max_new_tokens": 5, "num_beams": 1, "use_kv_cache": True})
    assert (p.n, p.stop, p.repetition_penalty, p.max_new_tokens, p.is_greedy) == (2, ["\n\n"], 1.0, 5, True)


def _scripted_gpt2_engine(text: str):
    """An engine on the GPT-2 tokenizer whose every sample continues with ``text``'s tokens, whatever
    the logits (greedy over forced logits); returns ``(engine, tokenizer, ids of text)``."""
    from llmlab.data.tokenizers import build_tokenizer

    tok = build_tokenizer("gpt2")
    ids = tok.encode(text)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=CTX, n_layer=1, n_head=2, n_embd=16)).eval()
    engine = Engine(gpt, tok, num_blocks=16, block_size=4, max_num_seqs=1)
    sample = engine._sample

    def scripted(samples, logits):
        forced = torch.full_like(logits, -1e9)
        for row, s in enumerate(samples):
            forced[row, ids[min(len(s.tokens), len(ids) - 1)]] = 0.0
        sample(samples, forced)

    engine._sample = scripted
    return engine, tok, ids


def test_streamed_text_never_splits_a_character():
    """GPT-2 BPE splits multi-byte characters over tokens: the engine's streamed pieces are whole
    characters and add up to the full decode (the detokeniser itself: tests/inference/test_detokenize.py)."""
    text = "naïve café — 日本語のテキスト 🙂 done"
    engine, tok, ids = _scripted_gpt2_engine(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the case being tested exists
    pieces: list[str] = []
    engine.add_request("x", SamplingParams(max_new_tokens=len(ids), greedy=True, stop_at_eos=False),
                       on_output=lambda out: pieces.append(out.text))
    while engine.has_unfinished():
        engine.step()
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # an output whose token only began a character


def test_stop_string_before_a_split_character_stops_where_generate_does():
    """A space and the first byte of "日" are one GPT-2 token: its space completes the stop string "a ",
    so the sample stops at that token, as generate()'s stop check does, not once "日" is whole."""
    engine, tok, ids = _scripted_gpt2_engine("a 日c d")
    assert [tok.decode([i]) for i in ids[:2]] == ["a", " \ufffd"]
    (done,) = engine.run(["x"], SamplingParams(max_new_tokens=len(ids), greedy=True, stop=["a "]))
    assert done.outputs[0] == {"text": "", "token_ids": ids[:2], "finish_reason": "stop"}


def test_decode_mask_is_the_views(model):
    """The engine's decode mask is the paged view's, built from the lengths (as the engine's own
    ``decode_mask`` did before the view's mask stopped building an index plan)."""
    from llmlab.inference.paged import PagedKVCache

    cache = PagedKVCache.for_model(model, 20, 4)
    for i, n in enumerate([1, 7, 4, 9]):  # prefill ragged prompts (one forward), as the engine does
        cache.add_sequence(i, list(range(8, 8 + n)))
    x = torch.zeros(4, 9, dtype=torch.long)
    view = cache.view([0, 1, 2, 3], [1, 7, 4, 9])
    with torch.no_grad():
        model(x, kv_cache=view, attention_mask=view.attention_mask(9))
    view = cache.view([0, 1, 2, 3])
    lens = torch.tensor(view.lengths)
    L = int(lens.max())
    old = (torch.arange(L + 1)[None, :] >= (L - lens)[:, None]).long()  # the removed engine.decode_mask
    mask = view.attention_mask(1)
    assert mask.dtype == torch.long and torch.equal(mask, old)


@pytest.mark.parametrize("wrap", ["lora", "int8"])
def test_tuned_and_quantized_models_serve_like_generate(wrap):
    """The builder's wrappers (a LoRA tuner, quantized Linears) run on the paged engine unchanged."""
    from llmlab.data.tokenizers import CharTokenizer
    from llmlab.inference.engine import Engine, SamplingParams
    from llmlab.inference.generate import generate
    from llmlab.models.gpt import GPT, GPTConfig
    from llmlab.peft import apply_peft
    from llmlab.quant import apply_quant

    tok = CharTokenizer.train(["ROMEO: KING HENRY abcdefghijklmnopqrstuvwxyz\n"])
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16))
    if wrap == "lora":
        gpt = apply_peft(gpt, {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
                               "init_lora_weights": "gaussian"}) or gpt
        assert type(gpt.transformer.h[0].attn.c_attn).__name__ == "LoraLinear"
    else:
        gpt = apply_quant(gpt, {"name": "int8", "bits": 8}) or gpt
        assert type(gpt.transformer.h[0].attn.c_attn).__name__ == "AbsmaxLinear"
    gpt.eval()
    prompts = ["ROMEO:", "KING", "abc"]
    done = Engine(gpt, tok, max_num_seqs=4).run(prompts, SamplingParams(max_new_tokens=8, greedy=True))
    for prompt, completion in zip(prompts, done):
        ids = torch.tensor([tok.encode(prompt)])
        assert completion.outputs[0]["token_ids"] == generate(gpt, ids, 8, greedy=True)[0, ids.size(1):].tolist()
