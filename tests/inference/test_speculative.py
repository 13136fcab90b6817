"""Speculative decoding (llmlab.inference.speculative) against the paper's theory, spec §3.2's golden
numbers, the target model alone and Hugging Face's assisted generation."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from llmlab.errors import UserError
from llmlab.inference.generate import generate
from llmlab.inference.sampling import warp_logits
from llmlab.inference.speculative import (
    acceptance_probability,
    best_gamma,
    expected_tokens,
    residual_distribution,
    speculative_generate,
    speculative_step,
    speedup,
)
from llmlab.models.gpt import GPT, GPTConfig

P_MIN = 1e-3  # chi-square p-value below which the distributions differ (seeds fixed: deterministic)


def tiny(seed: int, vocab: int = 32, init_std: float = 0.3, **kw) -> GPT:
    """A random GPT whose distributions are peaked enough (init_std 0.3) to disagree with another's."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, block_size=64, n_layer=2, n_head=2, n_embd=32, init_std=init_std)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


def perturbed(model: GPT, noise: float, seed: int) -> GPT:
    """A copy of ``model`` with Gaussian noise on every weight: a draft that agrees only partly."""
    draft = tiny(0, vocab=model.config.vocab_size, init_std=model.config.init_std,
                 **{k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size")})
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return draft


class LogitBias(torch.nn.Module):
    """A GPT with a fixed vector added to its logits (-1e4 = a token it never emits)."""

    def __init__(self, gpt: GPT, bias: torch.Tensor) -> None:
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.register_buffer("bias", bias)

    def new_kv_cache(self, *args, **kw):
        return self.gpt.new_kv_cache(*args, **kw)

    def forward(self, idx, **kw):
        return self.gpt(idx, **kw) + self.bias


# ----------------------------------------------------------------------------- theory: spec §3.2's tables
def test_expected_tokens_and_speedup_reproduce_the_spec_tables():
    e = [expected_tokens(0.6, g) for g in (1, 2, 3, 4, 5, 6, 7, 8, 10)]
    assert e == pytest.approx([1.6, 1.96, 2.176, 2.3056, 2.3834, 2.43, 2.458, 2.4748, 2.4909], abs=5e-5)
    assert expected_tokens(0.6, 200) == pytest.approx(2.5)  # the limit 1 / (1 - alpha)
    s = {g: speedup(0.6, g, 0.1) for g in (1, 2, 3, 4, 6, 8, 10)}
    table = {1: 1.4545, 2: 1.6333, 3: 1.6738, 4: 1.6469, 6: 1.5188, 8: 1.3749, 10: 1.2455}
    assert s == pytest.approx(table, abs=5e-5)
    assert best_gamma(0.6, 0.1) == 3
    assert (best_gamma(0.8, 0.05), round(speedup(0.8, 8, 0.05), 3)) == (8, 3.092)
    assert (best_gamma(0.7, 0.02), round(speedup(0.7, 8, 0.02), 3)) == (8, 2.758)
    assert expected_tokens(1.0, 4) == 5.0 and expected_tokens(0.0, 4) == 1.0
    with pytest.raises(UserError, match="alpha"):
        expected_tokens(1.5, 3)


# ----------------------------------------------------------------------------- the golden single step
def test_golden_single_step_reproduces_p():
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.6, 0.2, 0.1], dtype=torch.float64)
    assert float(acceptance_probability(p, q)) == pytest.approx(0.6)
    assert residual_distribution(p, q).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    x = torch.multinomial(q, n, replacement=True, generator=gen)  # drafts x ~ q
    accepted, token = speculative_step(p.expand(n, 4), q.expand(n, 4), x, gen)
    counts = torch.bincount(token, minlength=4).double()
    assert chisquare(counts.numpy(), (n * p).numpy()).pvalue > P_MIN
    assert float(accepted.double().mean()) == pytest.approx(0.6, abs=0.005)
    # the test has power: the drafts themselves (q) are rejected as samples of p
    assert chisquare(torch.bincount(x, minlength=4).double().numpy(), (n * p).numpy()).pvalue < 1e-10


# ----------------------------------------------------------------------------- greedy: the target's tokens
def test_greedy_equals_target_greedy():
    target = tiny(0)
    drafts = [tiny(1, n_layer=1, n_embd=16), perturbed(target, 0.05, 1), perturbed(target, 0.15, 2)]
    accepted = drafted = 0
    for seed, draft in enumerate(drafts):
        prompt = torch.randint(0, 32, (1, 1 + 3 * seed), generator=torch.Generator().manual_seed(seed))
        want = generate(target, prompt, 30, greedy=True)
        for gamma in range(1, 6):
            out, stats = speculative_generate(target, draft, prompt, 30, gamma=gamma, greedy=True)
            assert torch.equal(out, want), (seed, gamma)
            assert stats.target_calls == stats.iterations and stats.emitted == 30
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
        out, _ = speculative_generate(target, draft, prompt, 30, gamma=3, temperature=0)  # temperature 0 = greedy
        assert torch.equal(out, want)
    assert 0.1 < accepted / drafted < 0.9  # both accepting and rejecting were exercised


def test_draft_equal_to_target_accepts_everything():
    target = tiny(3)
    # top-k and top-p on both models: a q processed differently from p would reject some drafts
    for gamma, warp in ((1, {}), (3, dict(temperature=0.8, top_k=5)), (4, dict(top_p=0.8))):
        # 3 full rounds of gamma + 1 tokens, then a last round cut to 2 tokens (never overshoot)
        n_new = 3 * (gamma + 1) + 2
        out, stats = speculative_generate(target, target, torch.tensor([[1, 2]]), n_new, gamma=gamma,
                                          generator=torch.Generator().manual_seed(gamma), **warp)
        assert out.shape == (1, 2 + n_new)
        assert stats.acceptance_rate == 1.0 and stats.alpha == 1.0
        assert (stats.iterations, stats.drafted) == (4, 3 * gamma + 1)
        assert stats.emitted == n_new and stats.target_calls == 4
        assert (stats.emitted - 2) / 3 == gamma + 1  # the 3 full rounds: gamma + 1 tokens per target call


def test_disjoint_support_rejects_everything_and_samples_the_target():
    gpt = tiny(4, vocab=8)
    low, high = torch.zeros(8), torch.zeros(8)
    low[4:], high[:4] = -1e4, -1e4  # target emits only ids 0-3, the draft only 4-7
    target, draft = LogitBias(gpt, low), LogitBias(tiny(5, vocab=8), high)
    out, stats = speculative_generate(target, draft, torch.tensor([[0]]), 20, gamma=3,
                                      generator=torch.Generator().manual_seed(0))
    assert stats.accepted == 0 and stats.acceptance_rate == 0.0
    assert stats.iterations == 20 and stats.tokens_per_target_call == 1.0
    assert int(out[0, 1:].max()) < 4  # every token from the target's support


# ----------------------------------------------------------------------------- sampling: the target's distribution
def test_first_two_tokens_follow_the_target():
    """Over many seeded runs the joint law of the first two tokens equals the target's, with top-k on
    both models (an off-by-one between the drafts and the target's logits, or a q that is not the one
    the draft sampled from, would change it)."""
    V, runs, warp = 4, 600, dict(temperature=0.8, top_k=3)
    target = tiny(6, vocab=V, init_std=0.5, n_layer=1, n_embd=16)
    draft = tiny(7, vocab=V, init_std=0.5, n_layer=1, n_embd=8)
    prompt = torch.tensor([[1, 3]])

    def law(model) -> torch.Tensor:  # exact P(a, b) of the first two tokens
        with torch.no_grad():
            first = torch.softmax(warp_logits(model(prompt)[:, -1], **warp), -1)[0]
            rows = torch.cat([prompt.expand(V, 2), torch.arange(V)[:, None]], 1)
            second = torch.softmax(warp_logits(model(rows)[:, -1], **warp), -1)
        return (first[:, None] * second).flatten().double()

    p = law(target)
    gen = torch.Generator().manual_seed(0)
    # gamma 1 over 2 new tokens: a draft then a bonus (or a replacement, then the next round's token);
    # gamma 2 over 3 new tokens: two drafts of one round (or a replacement and the next round's)
    for gamma, n_new in ((1, 2), (2, 3)):
        counts = torch.zeros(V * V, dtype=torch.float64)
        for _ in range(runs):
            out, _ = speculative_generate(target, draft, prompt, n_new, gamma=gamma, generator=gen, **warp)
            counts[int(out[0, 2]) * V + int(out[0, 3])] += 1
        assert counts[p == 0].sum() == 0  # pairs top-k rules out for the target never occur
        big = p * runs >= 5  # chi-square cells; the rare (possible) pairs pooled into one
        rare = ~big & (p > 0)
        observed, expected = counts[big].tolist(), (p[big] * runs).tolist()
        if rare.any():
            observed.append(float(counts[rare].sum()))
            expected.append(float(p[rare].sum() * runs))
        expected = [e * runs / sum(expected) for e in expected]  # float32 softmax: sums to 1 within 1e-7 only
        assert chisquare(observed, expected).pvalue > P_MIN, gamma
    # the test has power: the draft's own law is far from the target's
    assert 0.5 * (law(draft) - p).abs().sum() > 0.15


# ----------------------------------------------------------------------------- stopping and wiring
def test_eos_stops_like_generate_and_gpt_generate_takes_a_draft():
    target = tiny(8)
    draft = perturbed(target, 0.1, 3)
    prompt = torch.tensor([[5]])
    free = generate(target, prompt, 30, greedy=True)
    eos = int(free[0, 12])  # a token the greedy path emits: it must stop right after its first occurrence
    want = generate(target, prompt, 30, greedy=True, eos_id=eos)
    out, _ = speculative_generate(target, draft, prompt, 30, gamma=4, greedy=True, eos_id=eos)
    assert torch.equal(out, want) and int(out[0, -1]) == eos
    sampled = target.generate(prompt, 20, draft=draft, gamma=3, temperature=0.9, top_p=0.9,
                              generator=torch.Generator().manual_seed(1))
    again, _ = speculative_generate(target, draft, prompt, 20, gamma=3, temperature=0.9, top_p=0.9,
                                    generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, again) and sampled.shape == (1, 21)


def test_matches_hugging_face_assisted_generation_greedy():
    """transformers' assisted generation (assistant_model=) on the same weights emits the same tokens."""
    from llmlab.bench.speculative import to_hf

    target, draft = tiny(9), perturbed(tiny(9), 0.1, 4)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    hf_target, hf_draft = to_hf(target), to_hf(draft)
    hf_draft.generation_config.num_assistant_tokens = 3
    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
    theirs = hf_target.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=hf_draft,
                                do_sample=False, max_new_tokens=25, min_new_tokens=25)
    ours, _ = speculative_generate(target, draft, prompt, 25, gamma=3, greedy=True)
    assert torch.equal(ours, theirs)


def test_bad_inputs_are_one_line():
    target = tiny(10)
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(UserError, match="gamma=0 must be an integer >= 1"):
        speculative_generate(target, target, prompt, 5, gamma=0)
    with pytest.raises(UserError, match="draft model's vocabulary has 40 ids but the target's has 32"):
        speculative_generate(target, tiny(11, vocab=40), prompt, 5)
    with pytest.raises(UserError, match="batch of 2 prompts"):
        speculative_generate(target, target, prompt.expand(2, 2), 5)
    with pytest.raises(UserError, match="exceed the context of 16 tokens.*at most 14 new tokens"):
        speculative_generate(target, tiny(12, block_size=16), prompt, 15)
    with pytest.raises(UserError, match="does not support the KV cache"):
        target.generate(prompt, 5, draft=target, use_kv_cache=False)
    with pytest.raises(UserError, match="num_beams"):
        target.generate(prompt, 5, draft=target, num_beams=2)


# ----------------------------------------------------------------------------- the CLI
def _train(run_cli, corpus, *extra) -> str:
    from conftest import TINY, run_dirs

    run_cli("train", "data=text", f"data.path={corpus}", *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2",
            "test=false", "logger=csv", *extra)
    return str(run_dirs(run_cli.root)[-1])


@pytest.mark.slow
def test_infer_with_a_draft_checkpoint(run_cli, small_corpus, tmp_path):
    target = _train(run_cli, small_corpus, "model.n_layer=2")
    draft = _train(run_cli, small_corpus, "model.n_embd=16")
    gen = ["prompt=ROMEO:", "generation.max_new_tokens=20", "generation.greedy=true"]
    alone = run_cli("infer", f"ckpt_path={target}", *gen).stdout
    spec = run_cli("infer", f"ckpt_path={target}", f"generation.draft={draft}", "generation.gamma=3", *gen).stdout
    assert spec.startswith(alone) and "speculative decoding (gamma=3)" in spec and "tokens per target call" in spec
    # the same number of characters, other characters: the vocabulary differs, not its size
    text = small_corpus.read_text()
    assert "z" in text and "#" not in text
    other = tmp_path / "other.txt"
    other.write_text(text.replace("z", "#"))
    foreign = _train(run_cli, other, "model.n_embd=16")
    bad = run_cli("infer", f"ckpt_path={target}", f"generation.draft={foreign}", *gen, check=False)
    assert bad.returncode == 2 and not bad.stdout
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "has another tokenizer" in lines[0]
    assert "train the draft with the target's tokenizer" in lines[0]
    bad = run_cli("infer", f"ckpt_path={target}", f"generation.draft={draft}", "generation.gamma=0", *gen, check=False)
    assert bad.returncode == 2 and "generation.gamma=0" in bad.stderr
