"""The generation loop: KV cache equivalence, context cropping, EOS, modes, reproducibility."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from llmlab.errors import UserError
from llmlab.inference.generate import generate
from llmlab.models.gpt import GPT, GPTConfig


def tiny(seed: int = 0, sharp: bool = True, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw}))
    if sharp:  # peakier logits than the 0.02 init gives, so greedy paths have no near-ties
        with torch.no_grad():
            model.transformer.wte.weight.mul_(20)
    return model.eval()


def prompts(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("T0,new", [(4, 8), (5, 30), (20, 6)])  # within, past, and prompt > block_size
def test_cached_and_uncached_greedy_are_identical(T0, new):
    model = tiny()
    x = prompts(3, T0)  # three different prompts in one batch
    a = generate(model, x, new, greedy=True, use_kv_cache=True)
    b = generate(model, x, new, greedy=True, use_kv_cache=False)
    assert a.shape == (3, T0 + new)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :T0], x)
    # and each row is what a batch of one would give
    for r in range(3):
        assert torch.equal(generate(model, x[r : r + 1], new, greedy=True), a[r : r + 1])


def test_uncached_greedy_is_argmax_of_cropped_context():
    model = tiny(seed=2)
    x = prompts(2, 10)
    out = generate(model, x, 12, greedy=True, use_kv_cache=False)
    for t in range(10, 22):
        context = out[:, max(0, t - 16) : t]
        assert torch.equal(model(context)[:, -1].argmax(-1), out[:, t])


def test_cached_sampling_is_reproducible_and_matches_uncached():
    model = tiny(seed=3, sharp=False)  # near-uniform logits: every draw matters
    x = prompts(2, 3)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    a = generate(model, x, 20, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, x, 20, generator=torch.Generator().manual_seed(5), **kw)
    c = generate(model, x, 20, generator=torch.Generator().manual_seed(5), use_kv_cache=False, **kw)
    d = generate(model, x, 20, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)


def test_generation_restores_train_and_eval_modes():
    model = tiny().train()
    model.transformer.h[1].eval()  # a mixed state must survive too
    before = [m.training for m in model.modules()]
    generate(model, prompts(1, 3), 4)
    model.generate(prompts(1, 3), 4, use_kv_cache=False)
    assert [m.training for m in model.modules()] == before
    model.eval()
    generate(model, prompts(1, 3), 2)
    assert not any(m.training for m in model.modules())


def test_generation_runs_without_dropout_noise():
    model = tiny(dropout=0.5).train()
    x = prompts(2, 4)
    assert torch.equal(generate(model, x, 6, greedy=True), generate(model, x, 6, greedy=True))


class Scripted(nn.Module):
    """A stub LM that emits ``script[row][step]`` whatever the input (no KV cache support)."""

    def __init__(self, script: list[list[int]], prompt_len: int, vocab: int = 10) -> None:
        super().__init__()
        self.config = SimpleNamespace(block_size=64)
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab
        self.calls = 0

    def forward(self, idx, kv_cache=None, last_only=False):
        self.calls += 1
        step = idx.size(1) - self.prompt_len
        tokens = torch.tensor([row[step] for row in self.script])
        return nn.functional.one_hot(tokens, self.vocab).float()[:, None, :] * 10.0  # (B, 1, V)


def test_eos_stops_each_row_and_finished_rows_keep_emitting_eos():
    x = torch.ones(3, 2, dtype=torch.long)
    script = [[5, 0, 7, 7, 7], [3, 4, 0, 6, 6], [1, 2, 3, 4, 5]]
    out = generate(Scripted(script, 2), x, 5, greedy=True, eos_id=0)
    assert out.shape == (3, 7)  # row 2 never finishes, so all 5 steps run
    assert out[:, 2:].tolist() == [[5, 0, 0, 0, 0], [3, 4, 0, 0, 0], [1, 2, 3, 4, 5]]


def test_loop_ends_when_every_row_is_finished():
    x = torch.ones(2, 2, dtype=torch.long)
    model = Scripted([[5, 0, 7, 7, 7, 7], [3, 4, 0, 6, 6, 6]], 2)
    out = generate(model, x, 6, greedy=True, eos_id=0)
    assert out[:, 2:].tolist() == [[5, 0, 0], [3, 4, 0]]  # shorter than T0 + max_new_tokens
    assert model.calls == 3
    assert generate(Scripted([[5, 0]], 2), x[:1], 2, greedy=True).shape == (1, 4)  # no eos_id: no stop


def test_eos_with_the_real_model_and_cache():
    model = tiny(seed=4)
    x = prompts(2, 3)
    free = generate(model, x, 10, greedy=True)
    eos = int(free[0, 5])  # row 0 emits this at step 2; make it the end-of-sequence token
    a = generate(model, x, 10, greedy=True, eos_id=eos)
    b = generate(model, x, 10, greedy=True, eos_id=eos, use_kv_cache=False)
    assert torch.equal(a, b)
    first = (free[0, 3:] == eos).nonzero()[0, 0].item() + 3
    assert torch.all(a[0, first:] == eos) and torch.equal(a[0, : first + 1], free[0, : first + 1])


def test_zero_new_tokens_returns_the_prompt():
    x = prompts(2, 5)
    assert torch.equal(generate(tiny(), x, 0), x)


@pytest.mark.parametrize(
    "args,kw",
    [((prompts(1, 3), -1), {}), ((prompts(1, 3)[0], 2), {}), ((prompts(1, 3), 2), dict(temperature=-0.5)),
     ((prompts(1, 3), 2), dict(top_k=0)), ((prompts(1, 3), 2), dict(top_p=2.0)),
     ((torch.zeros(1, 0, dtype=torch.long), 2), {})],
)
def test_invalid_arguments_are_user_errors(args, kw):
    with pytest.raises(UserError):
        generate(tiny(), *args, **kw)


# ----------------------------------------------------------------------------- the lean decode step
@pytest.mark.parametrize("kw", [dict(), dict(attn_impl="eager"), dict(bias=False, tie_embeddings=False)])
def test_lean_decode_step_is_bit_identical_to_forward(kw):
    model = tiny(seed=5, **kw)
    step = model.lean_decode_step()
    assert step is not None
    x = prompts(3, 5)
    a, b = model.new_kv_cache(3), model.new_kv_cache(3)
    with torch.no_grad():
        model(x, kv_cache=a, last_only=True)
        model(x, kv_cache=b, last_only=True)
        tok = x[:, -1:]
        for _ in range(10):  # to the end of the 16-position context
            ref = model(tok, kv_cache=a, last_only=True)[:, -1]
            got = step(tok, b)
            assert torch.equal(got, ref) and a.length == b.length
            assert torch.equal(a.k[:, :, :, : a.length], b.k[:, :, :, : b.length])
            tok = ref.argmax(-1, keepdim=True)
        assert a.length == 15
        assert torch.equal(step(tok, b), model(tok, kv_cache=a, last_only=True)[:, -1])  # the last position


@pytest.mark.parametrize("kw", [dict(), dict(attn_impl="eager")])
def test_lean_multi_token_step_is_bit_identical_to_forward(kw):
    """Speculative decoding verifies gamma + 1 tokens in one cached pass: every position's logits."""
    model = tiny(seed=6, **kw)
    step = model.lean_decode_step()
    x = prompts(2, 4)
    a, b = model.new_kv_cache(2), model.new_kv_cache(2)
    with torch.no_grad():
        model(x, kv_cache=a)
        model(x, kv_cache=b)
        for T in (3, 1, 5):
            new = prompts(2, T, seed=T)
            ref = model(new, kv_cache=a)
            assert torch.equal(step(new, b, all_logits=True), ref) and a.length == b.length
            assert torch.equal(a.k[:, :, :, : a.length], b.k[:, :, :, : b.length])
        assert torch.equal(step(x[:, :3], b), model(x[:, :3], kv_cache=a, last_only=True)[:, -1])  # the last slots


def test_generate_is_the_same_with_and_without_the_lean_step(monkeypatch):
    model = tiny(seed=6, sharp=False)
    x = prompts(2, 4)
    kw = dict(temperature=0.8, top_k=30, repetition_penalty=1.2)
    fast = generate(model, x, 30, generator=torch.Generator().manual_seed(1), **kw)  # slides past block_size too
    monkeypatch.setattr(GPT, "lean_decode_step", lambda self: None)
    assert torch.equal(generate(model, x, 30, generator=torch.Generator().manual_seed(1), **kw), fast)


def test_lean_step_refuses_wrapped_hooked_or_training_models():
    class Wrapped(nn.Linear):  # e.g. LoRA's LoraLinear subclasses nn.Linear with its own forward
        pass

    model = tiny()
    assert model.lean_decode_step() is not None
    assert model.train().lean_decode_step() is None
    model.eval().transformer.h[1].train()  # one submodule left in training mode (dropout)
    assert model.lean_decode_step() is None
    model.eval()
    handle = model.transformer.h[0].mlp.register_forward_hook(lambda m, i, o: o * 2)
    assert model.lean_decode_step() is None
    handle.remove()
    old = model.transformer.h[0].attn.c_attn
    model.transformer.h[0].attn.c_attn = Wrapped(old.in_features, old.out_features)
    assert model.lean_decode_step() is None


def test_model_generate_takes_the_generation_group_as_it_is():
    """`model.generate(idx, **cfg.generation)`: every key of conf/generation/default.yaml is an option."""
    import yaml

    from llmlab.cli import CONF_DIR

    group = yaml.safe_load((CONF_DIR / "generation" / "default.yaml").read_text())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    draft = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=1, n_embd=8)).eval()
    idx = torch.randint(0, 40, (2, 4))
    opts = {**group, "max_new_tokens": 6}
    assert model.generate(idx, **opts).shape == (2, 10)
    three = model.generate(idx, **{**opts, "num_samples": 3})  # rows b*3 .. b*3+2 continue prompt b
    assert three.shape == (6, 10) and torch.equal(three[::3, :4], idx)
    assert torch.equal(model.generate(idx, **{**opts, "seed": 5}), model.generate(idx, **{**opts, "seed": 5}))
    # beam search ignores the group's sampling values (as HF does with do_sample=False)
    beams = model.generate(idx, **{**opts, "num_beams": 3, "num_return_sequences": 2})
    assert torch.equal(beams, model.generate(idx, 6, num_beams=3, num_return_sequences=2))
    greedy = {**opts, "greedy": True}
    assert torch.equal(model.generate(idx[:1], **{**greedy, "draft": draft}), model.generate(idx[:1], **greedy))
