"""Bottleneck adapters (llmlab.peft.adapter): placement, near-identity init, frozen base, exact counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.models.bert import Bert, BertConfig
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.t5 import T5, T5Config
from llmlab.nn.norms import RMSNorm
from llmlab.peft import apply_peft, count_parameters, disable_adapters, merge
from llmlab.peft.adapter import Adapter

ADAPTER = {"name": "adapter", "adapter_size": 8}


def gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw})).eval()


def bert() -> Bert:
    torch.manual_seed(0)
    return Bert(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=16)).eval()


def t5() -> T5:
    torch.manual_seed(0)
    return T5(T5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                       dropout_rate=0.0)).eval()


def ids(seed: int = 1, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def logits(model) -> torch.Tensor:
    """Full-sequence logits of any of the three architectures on fixed inputs."""
    x = ids()
    if isinstance(model, GPT):
        return model(x, targets=x)[0]
    if isinstance(model, Bert):
        return model(x).prediction_logits
    return model(x, decoder_input_ids=ids(2, (2, 7))).logits


def frozen(build):
    """The base model as apply_peft leaves it: all requires_grad=False (T5's CPU kernels take another,
    ~1e-7 different path when nothing needs a gradient, so exact comparisons use the frozen base)."""
    return build().requires_grad_(False)


def wrapped(build, **cfg):
    model = build()
    apply_peft(model, {**ADAPTER, **cfg})
    return model


def adapter_names(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if ".adapter." in n}


def norm_names(model) -> set[str]:
    return {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, (torch.nn.LayerNorm, RMSNorm))
            for pn, _ in m.named_parameters()}


# ------------------------------------------------------------------ the layer
def test_adapter_is_near_identity_at_init():
    torch.manual_seed(0)
    a = Adapter(512, 64)
    x = torch.randn(4, 10, 512)
    rel = ((a(x) - x).norm() / x.norm()).item()
    assert 0 < rel < 1e-3  # measured 9e-5: both projections are N(0, 1e-3)
    assert a.down.weight.std().item() == pytest.approx(1e-3, rel=0.05)  # the seed's 0.02 re-init is not here
    assert torch.count_nonzero(a.down.bias) == 0 and torch.count_nonzero(a.up.bias) == 0
    a.disabled = True
    assert a(x) is x


def test_adapter_formula_and_relu():
    torch.manual_seed(0)
    a = Adapter(16, 4, non_linearity="relu", init_scale=0.5)
    x = torch.randn(3, 16)
    ref = x + F.linear(F.relu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    torch.testing.assert_close(a(x), ref)


def test_exact_parameter_counts_spec_3_2():
    assert sum(p.numel() for p in Adapter(512, 64, device="meta").parameters()) == 66_112  # 2md + m + d
    with torch.device("meta"):  # the spec's d=512, 6-layer model: counts only, no memory
        base = GPT(GPTConfig(vocab_size=1000, block_size=2048, n_layer=6, n_head=8, n_embd=512))
    counts = {}
    for placement, ln in (("houlsby", False), ("houlsby", True), ("pfeiffer", False)):
        model = copy.deepcopy(base)
        apply_peft(model, {"name": "adapter", "adapter_size": 64, "placement": placement, "train_layernorm": ln})
        counts[placement, ln] = count_parameters(model)["trainable"]
    assert counts["houlsby", False] == 793_344  # 2 per block x 6 x 66,112
    assert counts["houlsby", True] == 806_656  # + 12 LayerNorms x 1,024 + ln_f 1,024
    assert counts["pfeiffer", False] == 396_672  # 1 per block


def test_reduction_factor_sets_bottleneck():
    model = wrapped(gpt, adapter_size=None, reduction_factor=4)  # m = 32 // 4
    assert model.transformer.h[0].attn.adapter.down.weight.shape == (8, 32)


# ------------------------------------------------------------------ in a model
@pytest.mark.parametrize("build", [gpt, bert, t5], ids=["gpt", "bert", "t5"])
def test_zero_init_up_is_exactly_the_base(build):
    base = logits(frozen(build))
    model = wrapped(build, zero_init_up=True)
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("build", [gpt, bert, t5], ids=["gpt", "bert", "t5"])
def test_near_identity_init_is_close_to_base_and_keys_are_kept(build):
    base_model = frozen(build)
    base, keys = logits(base_model), set(base_model.state_dict())
    model = wrapped(build)
    out = logits(model)
    assert not torch.equal(out, base)  # the adapters really run ...
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)  # ... and start near the identity
    new = set(model.state_dict())
    assert keys <= new and all(".adapter." in k for k in new - keys)
    blocks = 2 if build is not t5 else 4
    assert len(new - keys) == 4 * 2 * blocks  # down/up weight/bias, attn + ffn, every block


def test_houlsby_placement_gpt_block():
    """Adapters transform each sub-layer's output before the residual add (Houlsby Fig. 2)."""
    model = wrapped(gpt, init_scale=0.3)
    blk = model.transformer.h[0]
    x = torch.randn(2, 5, 32)
    h = x + blk.attn.adapter(blk.attn.c_proj(_gpt_attn(blk.attn, blk.ln_1(x))))
    ref = h + blk.mlp.adapter(blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(blk.ln_2(h)), approximate="tanh")))
    torch.testing.assert_close(blk(x), ref)
    with disable_adapters(model):
        assert not torch.allclose(blk(x), ref, atol=1e-3)  # the adapters are not negligible here


def _gpt_attn(attn, x):
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 2, C // 2).transpose(1, 2) for t in attn.c_attn(x).split(C, dim=2))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)


def test_houlsby_placement_bert_before_post_layernorm():
    model = wrapped(bert, init_scale=0.3)
    layer = model.layers[0]
    x = torch.randn(2, 5, 32)
    with disable_adapters(model):
        a = layer.attn(x, None)  # the plain sub-layer outputs
    h = layer.attn_norm(x + layer.attn.adapter(a))
    with disable_adapters(model):
        f = layer.ffn(h)
    ref = layer.ffn_norm(h + layer.ffn.adapter(f))
    torch.testing.assert_close(layer(x, None), ref)
    assert not torch.allclose(layer(x, None), layer.ffn_norm(h + f), atol=1e-3)


def test_pfeiffer_only_after_ffn():
    model = wrapped(t5, placement="pfeiffer")
    for block in [*model.encoder.blocks, *model.decoder.blocks]:
        assert not hasattr(block.self_attn, "adapter") and isinstance(block.ffn.adapter, Adapter)


@pytest.mark.parametrize("ln", [True, False])
@pytest.mark.parametrize("build", [gpt, t5], ids=["gpt", "t5"])
def test_only_adapters_and_norms_train(build, ln):
    model = wrapped(build, train_layernorm=ln)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names(model) | (norm_names(model) if ln else set())
    if build is t5 and ln:
        assert "encoder.blocks.0.self_attn_norm.weight" in trainable  # RMSNorm gains


def test_training_changes_adapters_only_and_disable_gives_base():
    base_model = frozen(gpt)
    base_state = {k: v.clone() for k, v in base_model.state_dict().items()}
    base = logits(base_model)
    model = wrapped(gpt, train_layernorm=False)
    init = {k: v.clone() for k, v in model.state_dict().items() if ".adapter." in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        x = ids(10 + step)
        _, loss = model(x, targets=x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())  # base bit-identical
    assert all(not torch.equal(state[k], v) for k, v in init.items())  # every adapter tensor moved
    assert not torch.allclose(logits(model), base, atol=1e-4)
    with disable_adapters(model):
        assert torch.equal(logits(model), base)
    assert not torch.allclose(logits(model), base, atol=1e-4)  # re-enabled on exit


def test_adapters_follow_base_dtype_and_survive_deepcopy():
    model = gpt().double()
    apply_peft(model, ADAPTER)
    assert model.transformer.h[1].mlp.adapter.up.weight.dtype == torch.float64
    twin = copy.deepcopy(model)  # the hook is a module-level function: copies and pickles
    with torch.no_grad():
        twin.transformer.h[0].mlp.adapter.up.weight.add_(1.0)
    assert not torch.equal(logits(twin), logits(model))  # the copy runs its own adapters


def test_merge_is_refused():
    with pytest.raises(UserError, match="cannot be merged"):
        merge(wrapped(gpt))


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"reduction_factor": 4}, "exactly one of adapter_size, reduction_factor"),
        ({"adapter_size": None}, "exactly one of adapter_size, reduction_factor"),
        ({"adapter_size": 0}, "positive integer"),
        ({"adapter_size": None, "reduction_factor": 64}, "reduction_factor"),
        ({"placement": "seed"}, "houlsby"),
        ({"non_linearity": "tanh"}, "gelu, relu"),
        ({"init_scale": -1.0}, "init_scale"),
        ({"train_layernorm": "yes"}, "true or false"),
        ({"adapter_dim": 8}, "no key adapter_dim: valid keys are adapter_size"),
    ],
)
def test_bad_config_is_one_line_user_error(cfg, match):
    with pytest.raises(UserError, match=match) as err:
        wrapped(gpt, **cfg)
    assert "\n" not in str(err.value)


def test_applying_twice_is_refused():
    model = wrapped(gpt)
    with pytest.raises(UserError, match="already has a tuner applied"):
        apply_peft(model, ADAPTER)
