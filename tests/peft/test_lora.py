"""LoRA (llmlab.peft.lora): the behaviour matrix on tiny GPT, BERT and T5 models, target selection,
config errors, parameter counts (spec §2.3 / §12) and the peft-format round trip."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.errors import UserError
from llmlab.models.bert import Bert, BertConfig
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.t5 import T5, T5Config
from llmlab.peft import (apply_peft, count_parameters, disable_adapters, load_adapter, merge, save_adapter,
                         trainable_state_dict, unmerge)
from llmlab.peft.lora import LoraLinear

V = 53


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt":
        return GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    if arch == "bert":
        return Bert(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)).eval()
    return T5(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=8, dropout_rate=0.0)).eval()


X = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(1))
DEC = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(2))


def run(model, arch: str) -> torch.Tensor:
    if arch == "t5":
        return model(X, decoder_input_ids=DEC).logits
    if arch == "bert":
        out = model(X)
        return torch.cat([out.prediction_logits.flatten(), out.seq_relationship_logits.flatten()])
    return model(X)


def loss(model, arch: str) -> torch.Tensor:
    out = run(model, arch)
    return (out.float() ** 2).mean() + out.float().mean()  # any scalar that depends on every logit


def lora_layers(model) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def randomize_b(model, seed: int = 3, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


ARCHS = ["gpt", "bert", "t5"]


# ---------------------------------------------------------------------------- the behaviour matrix
@pytest.mark.parametrize("arch", ARCHS)
def test_at_init_the_output_is_the_base_output_exactly(arch):
    model = tiny(arch)
    with torch.no_grad():
        base = run(model, arch)
        apply_peft(model, {"name": "lora", "r": 4, "target_modules": "all-linear"})
        assert torch.equal(run(model, arch), base)  # B = 0: bit-identical, not just close
    assert lora_layers(model) and all(torch.equal(m.lora_B.weight, torch.zeros_like(m.lora_B.weight))
                                      for m in lora_layers(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_step0_grad_a_is_zero_and_grad_b_is_not(arch):
    model = tiny(arch)
    apply_peft(model, {"name": "lora", "r": 4})
    loss(model, arch).backward()
    for m in lora_layers(model):
        assert torch.equal(m.lora_A.weight.grad, torch.zeros_like(m.lora_A.weight))
        assert m.lora_B.weight.grad.abs().max() > 0
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert base and all(p.grad is None for p in base)  # the base is frozen: no gradient is even computed


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_lora_and_the_base_stays_bit_identical(arch):
    model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, {"name": "lora", "r": 4, "lora_dropout": 0.1})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    init = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    for _ in range(3):
        opt.zero_grad()
        loss(model, arch).backward()
        opt.step()
    after = model.state_dict()
    assert set(before) <= set(after)  # base keys unchanged by wrapping
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(after) - set(before) == set(init) and all(".lora_" in k for k in init)
    assert all(not torch.equal(init[k], after[k]) for k in init)  # A and B both moved


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_unmerge_restores_the_weights(arch):
    model = tiny(arch)
    apply_peft(model, {"name": "lora", "r": 4, "lora_alpha": 16, "target_modules": "all-linear"})
    randomize_b(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = run(tiny(arch), arch)
        adapted = run(model, arch)
        assert (adapted - base).abs().max() > 1e-2
        merge(model)
        assert all(m.merged for m in lora_layers(model))
        torch.testing.assert_close(run(model, arch), adapted, atol=1e-5, rtol=0)
        unmerge(model)
        torch.testing.assert_close(run(model, arch), adapted, atol=1e-5, rtol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapters_runs_the_base_model(arch):
    model = tiny(arch)
    with torch.no_grad():
        base = run(model, arch)
        apply_peft(model, {"name": "lora", "r": 4})
        randomize_b(model)
        adapted = run(model, arch)
        with disable_adapters(model):
            assert torch.equal(run(model, arch), base)
        assert torch.equal(run(model, arch), adapted)
        merge(model)
        with pytest.raises(UserError, match="unmerge"):
            with disable_adapters(model):
                pass


def test_forward_is_w_x_plus_scaled_b_a_x_with_rslora():
    base = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    for rslora, scaling in ((False, 16 / 4), (True, 16 / 2)):
        layer = LoraLinear(base, r=4, lora_alpha=16, use_rslora=rslora, init_lora_weights=False)
        assert layer.weight is base.weight and layer.bias is base.bias
        assert layer.scaling == scaling
        want = base(x) + scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
        torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=0)
    # spec §12.2: the seed's defaults r=8, alpha=16 scale the update by 2
    assert LoraLinear(base, r=8, lora_alpha=16).scaling == 2.0


def test_initialisations():
    base = torch.nn.Linear(400, 300)
    torch.manual_seed(0)
    kaiming = LoraLinear(base, r=16, lora_alpha=16)  # init_lora_weights: true
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert kaiming.lora_A.weight.abs().max() <= bound
    assert kaiming.lora_A.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    gaussian = LoraLinear(base, r=16, lora_alpha=16, init_lora_weights="gaussian")
    assert gaussian.lora_A.weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    for m in (kaiming, gaussian):
        assert not m.lora_B.weight.any()
    assert LoraLinear(base, r=16, lora_alpha=16, init_lora_weights=False).lora_B.weight.any()


def test_new_parameters_follow_the_base_dtype():
    model = tiny("gpt").double()
    apply_peft(model, {"name": "lora", "r": 2})
    assert {m.lora_A.weight.dtype for m in lora_layers(model)} == {torch.float64}


def test_wrapping_keeps_tied_weights_and_state_dict_keys():
    model = tiny("gpt")
    keys = list(model.state_dict())
    apply_peft(model, {"name": "lora", "r": 2, "target_modules": ["c_attn", "lm_head"]})
    assert model.lm_head.weight is model.transformer.wte.weight  # still one Parameter
    assert isinstance(model.lm_head, LoraLinear)
    new = list(model.state_dict())
    assert [k for k in new if ".lora_" not in k] == keys
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in new and "lm_head.lora_B.weight" in new
    with pytest.raises(UserError, match="tied weight"):  # folding into lm_head would change wte too
        merge(model)


# ---------------------------------------------------------------------------- parameter counts
def test_trainable_count_is_r_times_d_in_plus_d_out_per_layer():
    model = tiny("gpt")
    apply_peft(model, {"name": "lora", "r": 4, "target_modules": "all-linear"})
    layers = lora_layers(model)
    assert len(layers) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block; not lm_head
    d = 32
    per_block = 4 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    assert count_parameters(model)["trainable"] == 2 * per_block == 4096
    assert sum(p.numel() for m in layers for p in (m.lora_A.weight, m.lora_B.weight)) == \
        sum(4 * (m.in_features + m.out_features) for m in layers)


def test_gpt2_small_lora_r8_on_c_attn_has_294912_trainable_parameters():
    """Spec §2.3 / §12.1: 12 x 8 x (768 + 2304) = 294,912, the figure peft prints for GPT-2."""
    with torch.device("meta"):  # no 500 MB allocation: shapes only
        model = GPT(GPTConfig())
        apply_peft(model, {"name": "lora", "r": 8})
    counts = count_parameters(model)
    assert counts["trainable"] == 294_912
    assert counts["total"] == 124_439_808 + 294_912
    assert round(counts["trainable_pct"], 4) == 0.2364


def test_bert_and_t5_default_targets():
    bert = tiny("bert")
    apply_peft(bert, {"name": "lora", "r": 2})
    assert sorted({p.rsplit(".", 1)[-1] for p, m in bert.named_modules() if isinstance(m, LoraLinear)}) == \
        ["query", "value"]
    assert count_parameters(bert)["trainable"] == 2 * 2 * 2 * (32 + 32)
    t5 = tiny("t5")
    apply_peft(t5, {"name": "lora", "r": 2})
    paths = [p for p, m in t5.named_modules() if isinstance(m, LoraLinear)]
    assert len(paths) == 2 * 2 + 2 * 4  # encoder self-attn q, v; decoder self- and cross-attn q, v
    assert "decoder.blocks.1.cross_attn.v" in paths


# ---------------------------------------------------------------------------- target selection
def test_all_linear_leaves_out_only_the_output_layer():
    bert = tiny("bert")
    apply_peft(bert, {"name": "lora", "r": 2, "target_modules": "ALL-LINEAR"})
    paths = {p for p, m in bert.named_modules() if isinstance(m, LoraLinear)}
    assert {"pooler.dense", "mlm_head.dense", "nsp_head", "layers.1.ffn.proj"} <= paths
    assert "mlm_head.decoder" not in paths
    assert len(paths) == 2 * 6 + 3


def test_regex_must_match_the_whole_path():
    model = tiny("gpt")
    apply_peft(model, {"name": "lora", "r": 2, "target_modules": r"transformer\.h\.0\.(attn\.c_attn|mlp\.c_fc)"})
    assert [p for p, m in model.named_modules() if isinstance(m, LoraLinear)] == \
        ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    with pytest.raises(UserError, match="matches no Linear layer"):
        apply_peft(tiny("gpt"), {"name": "lora", "target_modules": "c_attn"})  # a regex: not a full path


def test_dotted_suffix_names():
    model = tiny("gpt")
    apply_peft(model, {"name": "lora", "r": 2, "target_modules": ["mlp.c_proj"]})
    assert [p for p, m in model.named_modules() if isinstance(m, LoraLinear)] == \
        ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


def test_unknown_target_lists_the_real_linear_names():
    with pytest.raises(UserError) as e:
        apply_peft(tiny("gpt"), {"name": "lora", "target_modules": ["q_proj", "c_attn"]})
    msg = str(e.value)
    assert "'q_proj'" in msg and "c_attn, c_proj, c_fc, lm_head" in msg and "all-linear" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="query, key, value, proj, fc, dense, decoder, nsp_head"):
        apply_peft(tiny("bert"), {"name": "lora", "target_modules": ["wte"]})


@pytest.mark.parametrize("bad, match", [
    ({"r": 0}, "peft.r=0 must be a positive integer"),
    ({"r": -2}, "peft.r=-2"),
    ({"r": 2.5}, "peft.r=2.5"),
    ({"lora_alpha": 0}, "lora_alpha=0 must be a positive"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1.0 must be in \[0, 1\)"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"bias": "some"}, "bias='some' is unknown: use one of none, all, lora_only"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is unknown"),
    ({"rank": 8}, "peft=lora has no key rank: valid keys are r, lora_alpha"),
    ({"target_modules": 3}, "must be a list of module names"),
])
def test_bad_config_is_a_one_line_user_error(bad, match):
    with pytest.raises(UserError, match=match) as e:
        apply_peft(tiny("gpt"), {"name": "lora", **bad})
    assert "\n" not in str(e.value)


def test_applying_a_second_tuner_is_refused():
    model = tiny("gpt")
    apply_peft(model, {"name": "lora", "r": 2})
    with pytest.raises(UserError, match="already has a tuner"):
        apply_peft(model, {"name": "lora", "r": 2})


@pytest.mark.parametrize("bias, n_bias", [("none", 0), ("lora_only", 2), ("all", 2 * 6 + 1)])
def test_bias_option_selects_the_biases_that_train(bias, n_bias):
    model = tiny("gpt")
    apply_peft(model, {"name": "lora", "r": 2, "bias": bias})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(n.endswith(".bias") for n in trainable) == n_bias
    assert all(n.endswith(".bias") or ".lora_" in n for n in trainable)


# ---------------------------------------------------------------------------- adapter directory round trip
@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_adapter_round_trip(arch, tmp_path):
    model = tiny(arch)
    apply_peft(model, {"name": "lora", "r": 3, "lora_alpha": 6, "use_rslora": True,
                       "target_modules": ["v", "wo"] if arch == "t5" else None})
    randomize_b(model)
    with torch.no_grad():
        want = run(model, arch)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny(arch)  # same seed: the same base weights
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(run(fresh, arch), want)
    assert fresh.peft_config["use_rslora"] and fresh.peft_config["r"] == 3
    assert count_parameters(fresh)["trainable"] == count_parameters(model)["trainable"]


def test_adapter_io_errors(tmp_path):
    with pytest.raises(UserError, match="peft=none has no peft-format adapter"):
        save_adapter(tiny("gpt"), tmp_path)
    with pytest.raises(UserError, match="not a peft adapter directory"):
        load_adapter(tiny("gpt"), tmp_path / "missing")
    model = tiny("gpt")
    apply_peft(model, {"name": "lora", "r": 2})
    save_adapter(model, tmp_path / "a")
    with pytest.raises(UserError, match="already has peft=lora"):
        load_adapter(model, tmp_path / "a")
    with pytest.raises(UserError, match=r"does not fit the gpt model .*another architecture or size"):
        load_adapter(GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16)), tmp_path / "a")
    with pytest.raises(UserError, match="no counterpart"):
        load_adapter(tiny("bert"), tmp_path / "a")
    merge(model)
    with pytest.raises(UserError, match="unmerge"):
        save_adapter(model, tmp_path / "b")


def test_conf_file_holds_the_code_defaults():
    from pathlib import Path

    from omegaconf import OmegaConf

    from llmlab.peft import RUN_KEYS
    from llmlab.peft.lora import DEFAULTS

    conf = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/peft/lora.yaml"))
    run_keys = {k: conf.pop(k) for k in RUN_KEYS if k in conf}  # the run's (peft.lr), not the tuner's
    assert conf == {"name": "lora", **DEFAULTS} and set(run_keys) == {"lr"}
    apply_peft(tiny("gpt"), conf)
