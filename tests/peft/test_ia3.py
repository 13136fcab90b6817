"""(IA)^3 (llmlab.peft.ia3): the behaviour matrix on tiny GPT, BERT and T5 models, peft's shapes and
feed-forward rule, config errors and the peft-format round trip."""

from __future__ import annotations

import pytest
import torch

from llmlab.errors import UserError
from llmlab.models.bert import Bert, BertConfig
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.t5 import T5, T5Config
from llmlab.peft import (apply_peft, count_parameters, disable_adapters, load_adapter, merge, save_adapter,
                         trainable_state_dict, unmerge)
from llmlab.peft.ia3 import IA3Linear

V = 53
ARCHS = ["gpt", "bert", "t5"]


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt":
        model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32))
    elif arch == "bert":
        model = Bert(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))
    else:
        model = T5(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                            relative_attention_num_buckets=8, dropout_rate=0.0))
    with torch.no_grad():  # non-zero biases (IA3 scales them) and larger weights than the init's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


X = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(1))
DEC = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(2))


def run(model, arch: str) -> torch.Tensor:
    if arch == "t5":
        return model(X, decoder_input_ids=DEC).logits
    if arch == "bert":
        out = model(X)
        return torch.cat([out.prediction_logits.flatten(), out.seq_relationship_logits.flatten()])
    return model(X)


def ia3_layers(model) -> dict[str, IA3Linear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, IA3Linear)}


def randomize(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ia3_layers(model).values():
            m.ia3_l.copy_(1 + 0.5 * torch.randn(m.ia3_l.shape, generator=g))


@pytest.mark.parametrize("arch", ARCHS)
def test_at_init_the_output_is_the_base_output_exactly(arch):
    model = tiny(arch)
    with torch.no_grad():
        base = run(model, arch)
        apply_peft(model, {"name": "ia3"})
        assert torch.equal(run(model, arch), base)
    assert all(torch.equal(m.ia3_l, torch.ones_like(m.ia3_l)) for m in ia3_layers(model).values())


def test_gpt_defaults_shapes_and_count():
    """peft's GPT-2 default: c_attn scales its output (3d, 1); mlp.c_proj its input (1, 4d)."""
    model = tiny("gpt")
    apply_peft(model, {"name": "ia3"})
    layers = ia3_layers(model)
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                              "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    assert layers["transformer.h.0.attn.c_attn"].ia3_l.shape == (96, 1)
    assert layers["transformer.h.0.mlp.c_proj"].ia3_l.shape == (1, 128)
    assert not layers["transformer.h.0.attn.c_attn"].is_feedforward
    assert count_parameters(model)["trainable"] == 2 * (96 + 128)


def test_bert_and_t5_defaults():
    bert = ia3_layers(apply_peft(tiny("bert"), {"name": "ia3"}))
    assert sorted(p.split(".", 2)[2] for p in bert if p.startswith("layers.0.")) == \
        ["attn.key", "attn.proj", "attn.value", "ffn.proj"]
    assert {p.split(".", 2)[2] for p, m in bert.items() if m.is_feedforward} == {"attn.proj", "ffn.proj"}
    t5 = ia3_layers(apply_peft(tiny("t5"), {"name": "ia3"}))
    assert len(t5) == 2 * 3 + 2 * 5  # encoder k, v, wo; decoder self/cross k, v and wo
    assert {p for p, m in t5.items() if m.is_feedforward} == {p for p in t5 if p.endswith(".wo")}


def test_output_and_input_scaling():
    base = torch.nn.Linear(5, 4)
    x = torch.randn(3, 5)
    out_scaled = IA3Linear(base, is_feedforward=False, init_ia3_weights=False)
    torch.testing.assert_close(out_scaled(x), base(x) * out_scaled.ia3_l.flatten(), atol=1e-6, rtol=0)
    in_scaled = IA3Linear(base, is_feedforward=True, init_ia3_weights=False)
    torch.testing.assert_close(in_scaled(x), base(x * in_scaled.ia3_l.flatten()), atol=1e-6, rtol=0)
    assert out_scaled.weight is base.weight and in_scaled.bias is base.bias


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_ia3_vectors(arch):
    model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, {"name": "ia3"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    init = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    assert init and all(k.endswith(".ia3_l") for k in init)
    for _ in range(3):
        opt.zero_grad()
        out = run(model, arch)
        ((out**2).mean() + out.mean()).backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(after) - set(before) == set(init)
    assert all(not torch.equal(init[k], after[k]) for k in init)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_disable(arch):
    model = tiny(arch)
    with torch.no_grad():
        base = run(model, arch)
        apply_peft(model, {"name": "ia3"})
        randomize(model)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        adapted = run(model, arch)
        assert (adapted - base).abs().max() > 1e-2
        with disable_adapters(model):
            assert torch.equal(run(model, arch), base)
        merge(model)
        merged = model.state_dict()
        bias = {"gpt": "transformer.h.0.attn.c_attn.bias", "bert": "layers.0.attn.value.bias"}.get(arch)
        if bias:  # an output-scaled layer's bias is scaled with its rows (T5 has no biases)
            assert not torch.equal(weights[bias], merged[bias])
        torch.testing.assert_close(run(model, arch), adapted, atol=1e-5, rtol=0)
        unmerge(model)
        torch.testing.assert_close(run(model, arch), adapted, atol=1e-5, rtol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


def test_feedforward_default_follows_the_chosen_targets():
    model = tiny("gpt")
    apply_peft(model, {"name": "ia3", "target_modules": ["c_attn", "c_fc"]})
    assert not any(m.is_feedforward for m in ia3_layers(model).values())
    model = tiny("gpt")
    apply_peft(model, {"name": "ia3", "target_modules": ["c_fc", "mlp.c_proj"], "feedforward_modules": ["c_fc"]})
    assert {p: m.is_feedforward for p, m in ia3_layers(model).items() if ".h.0." in p} == \
        {"transformer.h.0.mlp.c_fc": True, "transformer.h.0.mlp.c_proj": False}


@pytest.mark.parametrize("bad, match", [
    ({"target_modules": ["c_attn"], "feedforward_modules": ["c_fc"]},
     "feedforward_modules selects transformer.h.0.mlp.c_fc.* must be a subset of target_modules"),
    ({"feedforward_modules": ["nope"]}, "peft.feedforward_modules names 'nope', which is no Linear layer"),
    ({"target_modules": ["q"]}, "c_attn, c_proj, c_fc, lm_head"),
    ({"init_ia3_weights": "yes"}, "init_ia3_weights='yes' must be true or false"),
    ({"r": 8}, "peft=ia3 has no key r: valid keys are target_modules, feedforward_modules, init_ia3_weights"),
])
def test_bad_config_is_a_one_line_user_error(bad, match):
    with pytest.raises(UserError, match=match) as e:
        apply_peft(tiny("gpt"), {"name": "ia3", **bad})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_adapter_round_trip(arch, tmp_path):
    model = tiny(arch)
    apply_peft(model, {"name": "ia3"})
    randomize(model)
    with torch.no_grad():
        want = run(model, arch)
    save_adapter(model, tmp_path)
    fresh = tiny(arch)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(run(fresh, arch), want)
    assert {p: m.is_feedforward for p, m in ia3_layers(fresh).items()} == \
        {p: m.is_feedforward for p, m in ia3_layers(model).items()}


def test_conf_file_holds_the_code_defaults():
    from pathlib import Path

    from omegaconf import OmegaConf

    from llmlab.peft import RUN_KEYS
    from llmlab.peft.ia3 import DEFAULTS

    conf = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/peft/ia3.yaml"))
    run_keys = {k: conf.pop(k) for k in RUN_KEYS if k in conf}  # the run's (peft.lr), not the tuner's
    assert conf == {"name": "ia3", **DEFAULTS} and set(run_keys) == {"lr"}
    apply_peft(tiny("gpt"), conf)
