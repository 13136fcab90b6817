"""Prompt tuning, prefix tuning and P-tuning v2 (llmlab/peft/prompt.py) on GPT, BERT and T5:
the prompt is used, disabling it gives the base back, only it trains, every layer's prefix learns,
KV-cache generation equals uncached generation, the MLP can be dropped, counts, bad input."""

from __future__ import annotations

import pytest
import torch

from llmlab.errors import UserError
from llmlab.models.bert import Bert, BertConfig
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.t5 import T5, T5Config
from llmlab.peft import apply_peft, count_parameters, disable_adapters, merge
from llmlab.peft.prompt import PrefixEncoder, materialize

V, P = 53, 3
TUNERS = {
    "prompt": {"name": "prompt", "num_virtual_tokens": P},
    "prefix": {"name": "prefix", "num_virtual_tokens": P, "encoder_hidden_size": 24},
    "ptuning_v2": {"name": "ptuning_v2", "num_virtual_tokens": P},
}


def make(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    if arch == "gpt":
        return GPT(GPTConfig(**{**dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw})).eval()
    if arch == "bert":
        return Bert(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=48, max_position_embeddings=24, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)).eval()
    return T5(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)).eval()


X = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
DEC = torch.randint(1, V, (2, 4), generator=torch.Generator().manual_seed(2))


def run(model, arch: str) -> torch.Tensor:
    if arch == "gpt":
        return model(X)
    if arch == "bert":
        return model(X, MASK).prediction_logits
    return model(X, MASK, decoder_input_ids=DEC).logits


def loss(model, arch: str) -> torch.Tensor:
    if arch == "gpt":
        return model(X, X)[1]
    if arch == "bert":
        return model(X, MASK, labels=X).loss
    return model(X, MASK, labels=DEC).loss


def tuned(arch: str, tuner: str, seed: int = 0, model_kw: dict | None = None, **cfg):
    model = make(arch, seed, **(model_kw or {}))
    apply_peft(model, {**TUNERS[tuner], **cfg})
    return model


CASES = [(a, t) for a in ("gpt", "bert", "t5") for t in TUNERS]


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("arch,tuner", CASES)
def test_prompt_is_used_disabled_is_base_and_shapes_are_unprompted(arch, tuner):
    with torch.no_grad():  # (grad mode can change the SDPA kernel, hence the last bits)
        base = run(make(arch), arch)
    model = tuned(arch, tuner)
    with torch.no_grad():
        out = run(model, arch)
        assert out.shape == base.shape  # the P virtual positions are stripped
        assert (out - base).abs().max() > 1e-4  # the prompt / prefix is attended at init
        with disable_adapters(model):
            assert torch.equal(run(model, arch), base)
            assert model.num_virtual_tokens == 0
    assert model.num_virtual_tokens == P


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
def test_encode_returns_real_positions(arch):
    model = tuned(arch, "prompt")
    with torch.no_grad():
        h = model.encode(X) if arch == "gpt" else model.encode(X, MASK)
        assert h.shape == (2, 7, 32)
        if arch == "gpt":  # encode is what the LM head reads
            torch.testing.assert_close(model.lm_head(h), model(X), atol=1e-6, rtol=0)
        if arch == "t5":  # the decoder sees the prompt positions too
            full = model.encode(X, MASK, keep_virtual=True)
            assert full.shape == (2, 7 + P, 32) and torch.equal(full[:, P:], h)
            assert model(X, MASK, decoder_input_ids=DEC).encoder_last_hidden_state.shape == (2, 7 + P, 32)


def test_gpt_prefix_keeps_causality_among_real_tokens():
    model = tuned("gpt", "ptuning_v2")
    y = X.clone()
    y[:, 4:] = (y[:, 4:] + 1) % V
    with torch.no_grad():
        a, b = model(X), model(y)
    torch.testing.assert_close(a[:, :4], b[:, :4], atol=1e-6, rtol=0)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-4


def test_context_counts_the_virtual_tokens():
    model = tuned("gpt", "prefix")  # block_size 16, P = 3
    model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(UserError, match="virtual"):
        model(torch.zeros(1, 14, dtype=torch.long))


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch,tuner", CASES)
def test_only_the_prompt_trains_and_every_layer_learns(arch, tuner):
    model = tuned(arch, tuner)
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("virtual_tokens", "prefix_kv"))}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    for step in range(2):
        opt.zero_grad()
        loss(model, arch).backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        if step == 0 and tuner != "prompt":  # every layer's keys and values get a gradient
            enc = model.prefix_kv
            g = enc.transform[2].weight.grad if tuner == "prefix" else enc.embedding.weight.grad.T  # (L*2*d, .)
            per_layer = g.reshape(enc.n_layer * 2, -1).abs().sum(dim=1)  # one row per layer's k and v
            assert (per_layer > 0).all(), per_layer
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the base is bit-identical
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"virtual_tokens" if tuner == "prompt" else "prefix_kv"}


def test_prompt_learning_cannot_be_merged():
    model = tuned("gpt", "ptuning_v2")
    with pytest.raises(UserError, match="cannot be merged"):
        merge(model)


# ---------------------------------------------------------------------------- generation
@pytest.mark.parametrize("tuner", list(TUNERS))
def test_gpt_kv_cache_generation_equals_uncached(tuner):
    model = tuned("gpt", tuner, model_kw={"init_std": 0.3})  # a less degenerate random LM
    start = X[:, :5]
    # 5 + 14 = 19 tokens > block_size - P = 13: the window slides and the cache is re-prefilled
    cached = model.generate(start, 14, greedy=True, use_kv_cache=True)
    uncached = model.generate(start, 14, greedy=True, use_kv_cache=False)
    assert torch.equal(cached, uncached)
    with disable_adapters(model):
        base = model.generate(start, 14, greedy=True)
    assert not torch.equal(cached, base)


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_t5_cached_generation_equals_uncached(tuner):
    model = tuned("t5", tuner)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(5)
    cached = model.generate(X, MASK, max_new_tokens=8, use_cache=True, eos_token_id=None)
    uncached = model.generate(X, MASK, max_new_tokens=8, use_cache=False, eos_token_id=None)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # and the cached step logits equal a full teacher-forced pass
        full = model(X, MASK, decoder_input_ids=cached[:, :-1]).logits
        out = model(X, MASK, decoder_input_ids=cached[:, :1], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(1, cached.size(1) - 1):
            steps.append(model(X, MASK, decoder_input_ids=cached[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- reparameterisation
@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
def test_materialize_drops_the_mlp_and_keeps_outputs(arch):
    model = tuned(arch, "prefix")
    with torch.no_grad():
        before = run(model, arch)
    L = 4 if arch == "t5" else 2
    assert count_parameters(model)["trainable"] == P * 32 + (32 * 24 + 24) + (24 * L * 2 * 32 + L * 2 * 32)
    materialize(model)
    assert not hasattr(model.prefix_kv, "transform")
    assert count_parameters(model)["trainable"] == P * L * 2 * 32
    with torch.no_grad():
        torch.testing.assert_close(run(model, arch), before, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- counts (spec §4.2, §12 #5/#6)
def test_prefix_counts_of_the_spec():
    """L=6, d=512, P=20, MLP hidden 512: 10,240 + 262,656 + 3,151,872 = 3,424,768 trainable;
    122,880 = 20 x 6 x 2 x 512 after export (0.58% of the seed's model)."""
    model = make("gpt", vocab_size=8, block_size=24, n_layer=6, n_head=8, n_embd=512)
    apply_peft(model, {"name": "prefix", "num_virtual_tokens": 20, "encoder_hidden_size": 512})
    assert count_parameters(model)["trainable"] == 3_424_768
    materialize(model)
    assert count_parameters(model)["trainable"] == 122_880
    # the per-layer output shapes the seed meant: (L, B, H, P, d_h) = (6, B, 8, 20, 64)
    kv = model.prefix_kv(2)
    assert len(kv) == 6 and kv[0][0].shape == kv[0][1].shape == (2, 8, 20, 64)


@pytest.mark.parametrize("tuner,expected", [("prompt", 20 * 256), ("ptuning_v2", 2 * 4 * 10 * 256)])
def test_prompt_and_deep_prompt_counts(tuner, expected):
    """Soft prompt P x d = 5,120 (spec §5.1 demo); KV deep prompts 2 x L x P x d = 20,480 for the
    P-tuning v2 demo's L=4, P=10, d=256 (the seed's replace-hidden variant: L x P x d = 10,240)."""
    model = make("gpt", vocab_size=8, block_size=24, n_layer=4, n_head=4, n_embd=256)
    apply_peft(model, {"name": tuner, "num_virtual_tokens": 20 if tuner == "prompt" else 10})
    assert count_parameters(model)["trainable"] == expected


def test_prefix_table_layout_is_peft_s():
    """Row p of the flat table holds layer l's key at [(2l)d, (2l+1)d) and value at [(2l+1)d, (2l+2)d)."""
    enc = PrefixEncoder(2, n_layer=3, n_head=2, head_dim=4, token_dim=8)
    t = enc.table()  # (P, L*2*d)
    kv = enc(1)
    for layer, (k, v) in enumerate(kv):
        assert torch.equal(k[0].transpose(0, 1).reshape(2, 8), t[:, 2 * layer * 8:(2 * layer + 1) * 8])
        assert torch.equal(v[0].transpose(0, 1).reshape(2, 8), t[:, (2 * layer + 1) * 8:(2 * layer + 2) * 8])


# ---------------------------------------------------------------------------- init
class _Tok:
    def encode(self, text):
        return [5 + len(w) for w in text.split()]


def test_text_and_vocab_init():
    model = make("gpt")
    apply_peft(model, {"name": "prompt", "num_virtual_tokens": 5, "prompt_tuning_init": "TEXT",
                       "prompt_tuning_init_text": "ab cde f"}, tokenizer=_Tok())
    ids = torch.tensor([7, 8, 6, 7, 8])  # the text's ids repeated, cropped to P = 5
    assert torch.equal(model.virtual_tokens.embedding.weight, model.transformer.wte.weight[ids])
    model = make("gpt")
    apply_peft(model, {"name": "prompt", "prompt_tuning_init": "sample_vocab", "num_virtual_tokens": 4})
    W, E = model.transformer.wte.weight, model.virtual_tokens.embedding.weight
    assert all((W == row).all(dim=1).any() for row in E)  # every row is some token's embedding


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cfg,match", [
    ({"name": "prompt", "num_virtual_tokens": 0}, "num_virtual_tokens=0 must be a positive integer"),
    ({"name": "prefix", "num_virtual_tokens": -2}, "must be a positive integer"),
    ({"name": "ptuning_v2", "num_virtual_tokens": "20"}, "must be a positive integer"),
    ({"name": "prompt", "num_virtual_tokens": 16}, "leaves no room"),
    ({"name": "prompt", "prompt_tuning_init": "TEXT", "num_virtual_tokens": 3},
     "needs peft.prompt_tuning_init_text"),
    ({"name": "prompt", "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi", "num_virtual_tokens": 3},
     "needs the model's tokenizer"),
    ({"name": "prompt", "prompt_tuning_init": "zeros", "num_virtual_tokens": 3}, "prompt_tuning_init='zeros' is unknown"),
    ({"name": "prefix", "prefix_projection": "yes", "num_virtual_tokens": 3}, "must be true or false"),
    ({"name": "prefix", "encoder_hidden_size": 0, "num_virtual_tokens": 3}, "encoder_hidden_size=0"),
    ({"name": "prompt", "prefix_projection": True}, "valid keys are num_virtual_tokens"),
])
def test_bad_config_is_one_line_user_error(cfg, match):
    with pytest.raises(UserError, match=match) as e:
        apply_peft(make("gpt", n_layer=1), cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_conf_files_apply(tuner):
    """conf/peft/<tuner>.yaml is a valid config (its defaults: P = 20)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[2] / "conf" / "peft" / f"{tuner}.yaml"))
    assert cfg["name"] == tuner
    model = make("gpt", n_layer=1, block_size=32)
    apply_peft(model, cfg)
    assert model.num_virtual_tokens == 20 and model(X).shape == (2, 7, V)


def test_soft_prompts_and_prefixes_are_not_weight_decayed():
    """The optimizer's decayed group holds matrices of the model, never a tuner's embedding table."""
    from llmlab.models.gpt import GPT, GPTConfig
    from llmlab.optim import param_groups
    from llmlab.peft import apply_peft

    for cfg in ({"name": "prompt", "num_virtual_tokens": 4}, {"name": "ptuning_v2", "num_virtual_tokens": 4}):
        model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=1, n_head=2, n_embd=16))
        apply_peft(model, cfg)
        decayed, undecayed = param_groups(model, 0.1)
        assert decayed["params"] == [] and len(undecayed["params"]) == 1, cfg
        assert undecayed["weight_decay"] == 0.0
