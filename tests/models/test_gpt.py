"""GPT-2 model: shapes, causality, loss, init, parameter counts, attention kernels, KV cache, HF parity."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.nn.losses import cross_entropy
from llmlab.nn import KVCache, attention, causal_mask, key_padding_mask


TINY = dict(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


def ids(B: int, T: int, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- forward
def test_shapes_and_return_types():
    model = tiny()
    x = ids(3, 10)
    logits = model(x)
    assert logits.shape == (3, 10, 97)
    logits2, loss = model(x, x)
    assert torch.equal(logits, logits2) and loss.dim() == 0
    assert model(x, last_only=True).shape == (3, 1, 97)


def test_last_only_is_the_last_row():
    model = tiny()
    x = ids(2, 12)
    torch.testing.assert_close(model(x, last_only=True), model(x)[:, -1:], atol=1e-6, rtol=0)


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny()
    x = ids(2, 16)
    t = 7
    y = x.clone()
    y[:, t + 1 :] = (y[:, t + 1 :] + 1 + torch.arange(16 - t - 1)) % 97  # change every later token
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_sdpa_and_eager_models_agree(tie):
    sdpa = tiny(tie_embeddings=tie)
    eager = tiny(tie_embeddings=tie, attn_impl="eager")
    eager.load_state_dict(sdpa.state_dict())
    x = ids(3, 16)
    torch.testing.assert_close(sdpa(x), eager(x), atol=1e-5, rtol=0)


def test_loss_matches_manual_cross_entropy_and_ignores_minus_100():
    model = tiny()
    x = ids(2, 9)
    targets = ids(2, 9, seed=5)
    logits, loss = model(x, targets)
    logp = torch.log_softmax(logits, dim=-1)
    manual = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=1e-6)

    masked = targets.clone()
    masked[0, 3:] = -100
    masked[1, :2] = -100
    keep = masked != -100
    _, loss_masked = model(x, masked)
    manual_masked = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[keep].mean()
    torch.testing.assert_close(loss_masked, manual_masked, atol=1e-6, rtol=1e-6)


def test_cross_entropy_matches_torch_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(40, 300, generator=g) * 4).requires_grad_()
    targets = torch.randint(0, 300, (40,), generator=g)
    targets[::7] = -100
    logits[3, targets[3]].data.fill_(-300.0)  # a target probability that underflows to 0 in fp32
    ours = cross_entropy(logits, targets)
    (g_ours,) = torch.autograd.grad(ours * 3.0, logits)
    ref = F.cross_entropy(logits, targets, ignore_index=-100)
    (g_ref,) = torch.autograd.grad(ref * 3.0, logits)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-7, rtol=1e-5)
    small = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cross_entropy, (small, torch.tensor([0, 8, -100, 3, 3, 1])))


def test_cross_entropy_half_precision_and_all_ignored():
    logits = torch.randn(5, 11).bfloat16().requires_grad_()
    targets = torch.tensor([1, 2, 3, -100, 10])
    ours = cross_entropy(logits, targets)
    ours.backward()
    assert ours.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.float(), targets)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.isnan(cross_entropy(torch.randn(2, 5), torch.tensor([-100, -100])))  # as torch


def test_initial_loss_is_about_log_vocab():
    model = tiny(vocab_size=2000)
    x = ids(4, 16, vocab=2000)
    _, loss = model(x, ids(4, 16, vocab=2000, seed=9))
    assert abs(loss.item() - math.log(2000)) < 0.2


def test_loss_backward_reaches_every_parameter():
    model = tiny().train()
    _, loss = model(ids(2, 8), ids(2, 8, seed=3))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------------------- config / sizes
def _count(**kw) -> int:
    with torch.device("meta"):  # no memory, no init cost
        return GPT(GPTConfig(**kw)).num_params()


def test_gpt2_small_parameter_counts():
    assert _count() == 124_439_808  # HF gpt2, tied
    assert _count(tie_embeddings=False) == 163_037_184
    # bias=False removes *every* Linear and LayerNorm bias (12 x 8448 + 768 for ln_f); the spec's
    # "qkv_bias=False" row (124,412,160) only drops the 12 x 2304 c_attn biases
    assert _count(bias=False) == 124_439_808 - 12 * 8448 - 768 == 124_337_664
    assert _count(n_layer=24, n_head=16, n_embd=1024) == 354_823_168  # gpt2-medium


def test_non_embedding_count_excludes_embeddings_and_untied_head():
    with torch.device("meta"):
        tied, untied = GPT(GPTConfig()), GPT(GPTConfig(tie_embeddings=False))
    emb = 50257 * 768 + 1024 * 768
    assert tied.num_params(non_embedding=True) == 124_439_808 - emb
    assert untied.num_params(non_embedding=True) == 124_439_808 - emb


def test_tied_weights_are_one_parameter():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - model.num_params() == 97 * 32


def test_init_statistics():
    torch.manual_seed(0)
    L = 8
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=L, n_head=4, n_embd=128))
    resid = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h]
                      + [b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    assert abs(resid.std().item() / (0.02 / math.sqrt(2 * L)) - 1) < 0.03
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert abs(fc.std().item() / 0.02 - 1) < 0.03
    assert abs(model.transformer.wte.weight.std().item() / 0.02 - 1) < 0.03
    b0 = model.transformer.h[0]
    assert torch.all(b0.attn.c_attn.bias == 0) and torch.all(b0.ln_1.weight == 1)
    assert torch.all(b0.ln_1.bias == 0)


@pytest.mark.parametrize(
    "kw", [dict(n_embd=30, n_head=4), dict(attn_impl="flash"), dict(n_layer=0), dict(dropout=1.0)]
)
def test_bad_config_is_a_user_error(kw):
    with pytest.raises(UserError):
        GPTConfig(**{**TINY, **kw})


def test_too_long_context_is_a_user_error():
    model = tiny()
    with pytest.raises(UserError, match="block_size=16"):
        model(ids(1, 17))
    cache = model.new_kv_cache(1)
    model(ids(1, 10), kv_cache=cache)
    with pytest.raises(UserError, match="cached"):
        model(ids(1, 7), kv_cache=cache)


def test_generate_method_keeps_train_mode():
    model = tiny().train()
    out = model.generate(ids(2, 3), 5, greedy=True)
    assert out.shape == (2, 8) and model.training
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------------------- attention()
def _qkv(B=2, nh=3, tq=5, tk=5, hs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, nh, tq, hs, generator=g), torch.randn(B, nh, tk, hs, generator=g),
            torch.randn(B, nh, tk, hs, generator=g))


def _both(q, k, v, **kw):
    a = attention(q, k, v, impl="sdpa", **kw)
    b = attention(q, k, v, impl="eager", **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    return a


def _reference(q, k, v, allowed):
    """softmax over allowed keys only, written without any masking trick."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def test_causal_mask_helper():
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(causal_mask(2, 5), torch.ones(5, 5, dtype=torch.bool).tril()[3:])
    assert torch.equal(causal_mask(2, 5, q_offset=0), torch.ones(2, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("tq,tk,offset", [(5, 5, 0), (1, 7, 6), (3, 7, 4), (3, 7, 0), (4, 4, 2)])
def test_attention_causal_with_offset(tq, tk, offset):
    q, k, v = _qkv(tq=tq, tk=tk)
    out = _both(q, k, v, causal=True, q_offset=offset)
    ref = _reference(q, k, v, causal_mask(tq, tk, q_offset=offset))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_attention_unmasked_and_scale():
    q, k, v = _qkv(tq=4, tk=6)
    out = _both(q, k, v, causal=False)
    everything = torch.ones(4, 6, dtype=torch.bool)
    torch.testing.assert_close(out, _reference(q, k, v, everything), atol=1e-5, rtol=0)
    out1 = _both(q, k, v, causal=False, scale=1.0)  # T5-style unscaled scores
    torch.testing.assert_close(out1, torch.softmax(q @ k.transpose(-2, -1), -1) @ v, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_padding_mask_bool_and_additive(causal):
    q, k, v = _qkv(B=3, tq=6, tk=6)
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    bool_mask = key_padding_mask(pad)  # (B, 1, 1, Tk)
    additive = torch.zeros(pad.shape).masked_fill(pad == 0, torch.finfo(torch.float32).min)[:, None, None, :]
    out_b = _both(q, k, v, causal=causal, mask=bool_mask)
    out_a = _both(q, k, v, causal=causal, mask=additive)
    allowed = bool_mask & causal_mask(6, 6) if causal else bool_mask.expand(3, 1, 6, 6)
    rows = allowed.any(-1, keepdim=True)  # left-padded row 2 has query rows that see nothing
    ref = torch.where(rows, _reference(q, k, v, allowed).nan_to_num(0.0), 0.0)
    torch.testing.assert_close(out_b, ref, atol=1e-5, rtol=0)
    live = rows.expand_as(out_a)
    torch.testing.assert_close(out_a[live], ref[live], atol=1e-5, rtol=0)


def test_attention_mask_with_cache_offset():
    q, k, v = _qkv(B=2, tq=3, tk=8)
    pad = key_padding_mask(torch.tensor([[1] * 8, [0, 0] + [1] * 6]))
    out = _both(q, k, v, causal=True, mask=pad, q_offset=5)
    torch.testing.assert_close(out, _reference(q, k, v, pad & causal_mask(3, 8)), atol=1e-5, rtol=0)


def test_attention_unknown_impl():
    q, k, v = _qkv()
    with pytest.raises(UserError):
        attention(q, k, v, causal=True, impl="flash")


# ---------------------------------------------------------------------------- KV cache
def test_kv_cache_prefill_then_decode_matches_full_forward():
    model = tiny()
    x = ids(3, 14)
    full = model(x)
    cache = model.new_kv_cache(3)
    assert isinstance(cache, KVCache) and cache.max_len == 16
    step_logits = [model(x[:, :5], kv_cache=cache)]
    for t in range(5, 14):
        step_logits.append(model(x[:, t : t + 1], kv_cache=cache))
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(step_logits, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_cache_multi_token_append(impl):
    model = tiny(attn_impl=impl)
    x = ids(2, 15)
    full = model(x)
    cache = model.new_kv_cache(2)
    a = model(x[:, :4], kv_cache=cache)
    b = model(x[:, 4:9], kv_cache=cache)  # T > 1 on a non-empty cache: causal mask with offset
    c = model(x[:, 9:15], kv_cache=cache, last_only=True)
    torch.testing.assert_close(torch.cat([a, b], 1), full[:, :9], atol=1e-5, rtol=0)
    torch.testing.assert_close(c, full[:, -1:], atol=1e-5, rtol=0)


def test_kv_cache_truncate_reset_and_overflow():
    model = tiny()
    x = ids(1, 10)
    cache = model.new_kv_cache(1, max_len=12)
    model(x[:, :8], kv_cache=cache)
    cache.truncate(6)  # drop two tokens (as speculative decoding rejects drafts)
    out = model(x[:, 6:10], kv_cache=cache)
    torch.testing.assert_close(out, model(x)[:, 6:10], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="overflow"):
        model(x[:, :3], kv_cache=cache)
    cache.reset()
    assert cache.length == 0 and cache.remaining == 12
    torch.testing.assert_close(model(x[:, :3], kv_cache=cache), model(x[:, :3]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- Hugging Face parity
transformers = pytest.importorskip("transformers")


def _hf_model(tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=2, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial biases and LayerNorm params so every mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _check_parity(ours: GPT, hf) -> None:
    x = ids(3, 16)
    with torch.no_grad():
        ref = hf(input_ids=x, labels=x)
        logits, loss = ours(x, torch.cat([x[:, 1:], torch.full((3, 1), -100)], 1))
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_from_pretrained_safetensors_matches_hf(tmp_path, tie):
    hf = _hf_model(tie)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config.tie_embeddings is tie and ours.config.block_size == 16
    assert (ours.lm_head.weight is ours.transformer.wte.weight) is tie
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    _check_parity(ours, hf)


def test_from_pretrained_pytorch_model_bin_without_prefix(tmp_path):
    hf = _hf_model(tie=True, seed=3)
    hf.config.save_pretrained(tmp_path)
    # a GPT2Model-style checkpoint: no "transformer." prefix, plus the legacy causal-mask buffers
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 16, 16, dtype=torch.bool).tril()
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(tmp_path, attn_impl="eager", allow_bin=True).eval()
    assert ours.config.attn_impl == "eager"
    _check_parity(ours, hf)


def _save_pickled(hf, path) -> None:
    """What ``save_pretrained(path, safe_serialization=False)`` wrote before transformers 5 (which
    ignores the option and always writes safetensors): config.json + a pickled pytorch_model.bin."""
    hf.save_pretrained(path, safe_serialization=False)
    if not (path / "pytorch_model.bin").is_file():
        (path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), path / "pytorch_model.bin")


def test_pytorch_model_bin_needs_allow_bin(tmp_path):
    """A pickle is read only when asked for: refused with one line naming the flag, then equal logits."""
    hf = _hf_model(tie=False, seed=5)
    _save_pickled(hf, tmp_path)
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and f"{tmp_path} has only pytorch_model.bin (a pickle)" in msg
    assert "allow_bin=True / model.allow_bin=true" in msg and "model.safetensors" in msg
    ours = GPT.from_pretrained(tmp_path, allow_bin=True).eval()
    assert not hasattr(ours.config, "allow_bin")  # a loading option, not a config field
    _check_parity(ours, hf)
    hf.save_pretrained(tmp_path)  # safetensors next to the pickle: read without the flag
    assert (tmp_path / "model.safetensors").is_file()
    _check_parity(GPT.from_pretrained(tmp_path).eval(), hf)


def test_to_hf_state_dict_round_trip():
    ours = tiny(seed=4)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**ours.to_hf_config())).eval()
    hf.load_state_dict(ours.to_hf_state_dict(), strict=True)
    _check_parity(ours, hf)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="config.json"):
        GPT.from_pretrained(tmp_path)
    hf = _hf_model()
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model.safetensors"):
        GPT.from_pretrained(tmp_path)  # config but no weights
    hf.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unknown GPT config override"):
        GPT.from_pretrained(tmp_path, n_hidden=3)

    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 101}))
    with pytest.raises(UserError, match="shape"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_inner": 100}))
    with pytest.raises(UserError, match="n_inner"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(UserError, match="activation_function"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(UserError, match="lm_head"):
        GPT.from_pretrained(tmp_path)  # the tied checkpoint stores no separate head
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="model.safetensors|weights"):
        GPT.from_pretrained(tmp_path)
