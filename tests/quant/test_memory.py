"""`llmlab memory`: the spec's figures (seed000_part3 §2.4 QLoRA, §3.3 KV cache), exact counts from the
meta-device build, the accounting against real quantized layers, and the CLI."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmlab.cli import CONF_DIR
from llmlab.quant.memory import (
    GB,
    QLORA_QUANT,
    WEIGHT_FORMATS,
    activation_bytes,
    double_quant_saving_bytes,
    fine_tuning,
    kv_cache_bytes_per_token,
    layout_of,
    linear_weight_bytes,
    nf4_bits_per_param,
    weights_bytes,
)
from llmlab.tasks.memory import build_layout

MiB, KiB = 2**20, 2**10


def preset(name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("memory", overrides=[f"model={name}", *overrides])
    return OmegaConf.to_container(cfg, resolve=False)


# ---------------------------------------------------------------------------- spec §2.4: weights, NF4, double quant


def test_65b_weights_at_32_16_8_4_bits():
    assert [weights_bytes(65e9, b) / GB for b in (32, 16, 8, 4)] == [260.0, 130.0, 65.0, 32.5]
    assert WEIGHT_FORMATS["fp32"] == 32 and WEIGHT_FORMATS["bf16"] == 16


def test_nf4_overhead_and_double_quant_saving():
    assert nf4_bits_per_param(64, double_quant=False) == 4.5  # one fp32 absmax per 64 weights: 0.5 bits
    assert round(nf4_bits_per_param(64, double_quant=True) - 4, 3) == 0.127  # 8/64 + 32/(64*256)
    assert round(double_quant_saving_bytes(65e9) / GB, 2) == 3.03  # spec: 0.373 bits/param x 65B ("~3 GB")


def test_nf4_layer_storage_4096x4096():
    # spec §2.4: NF4 data 8 MiB + fp32 absmax 1 MiB; with double quant 8 MiB + 256 KiB + 4 KiB
    nf4 = {"name": "nf4", "blocksize": 64}
    assert linear_weight_bytes(4096, 4096, {**nf4, "bnb_4bit_use_double_quant": False}, "bf16") == 8 * MiB + 1 * MiB
    assert linear_weight_bytes(4096, 4096, {**nf4, "bnb_4bit_use_double_quant": True}, "bf16") == 8 * MiB + 256 * KiB + 4 * KiB


# ---------------------------------------------------------------------------- spec §3.3: KV cache


def test_kv_cache_opt13b_and_llama2_7b():
    opt = build_layout(preset("gpt_13b")["model"], {"name": "none"}, None)
    per_token = kv_cache_bytes_per_token(opt, "fp16")
    assert per_token == 819_200  # vLLM's "800 KB"
    assert round(per_token * 2048 / GB, 2) == 1.68  # "up to 1.6 GB" per 2048-token request
    llama = build_layout(preset("gpt_7b")["model"], {"name": "none"}, None)
    assert kv_cache_bytes_per_token(llama, "fp16") == 0.5 * MiB
    assert kv_cache_bytes_per_token(llama, "fp16") * 4096 == 2 * 2**30  # 2 GiB per 4096-token sequence
    assert kv_cache_bytes_per_token(llama, "fp32") == 1 * MiB


def test_activations_match_korthikanti_formula():
    # 16-bit, no recomputation: 34sbh + 5as²b per layer (+ the fp32 logits)
    layout = build_layout(preset("gpt_nano")["model"], {"name": "none"}, None, vocab_size=65)
    s, b, h, a, n = 128, 2, 128, 4, 4
    expected = n * (34 * s * b * h + 5 * a * s * s * b) + 4 * b * s * 65
    assert activation_bytes(layout, b, s, "bf16", checkpointing=False) == expected
    recomputed = n * 2 * s * b * h + (34 * s * b * h + 5 * a * s * s * b) + 4 * b * s * 65
    assert activation_bytes(layout, b, s, "bf16", checkpointing=True) == recomputed


# ---------------------------------------------------------------------------- exact counts (meta device)


def test_meta_count_equals_real_model_and_lora_trainable_equals_peft_count():
    from llmlab.models.build import build_model
    from llmlab.peft import apply_peft, count_parameters

    cfg = preset("gpt_nano", "vocab_size=65", "peft.r=4", "peft.target_modules=all-linear")
    layout = build_layout(cfg["model"], cfg["peft"], None, vocab_size=65)
    real = build_model(cfg["model"], vocab_size=65)
    assert layout.params == count_parameters(real)["total"] == real.num_params()
    tuned = apply_peft(build_model(cfg["model"], vocab_size=65), cfg["peft"])
    counts = count_parameters(tuned)
    assert layout.trainable == counts["trainable"] > 0
    assert layout.tuner_params == counts["total"] - layout.params


@pytest.mark.parametrize("quant", [
    {"name": "int8", "bits": 8, "group_size": None},
    {"name": "int4", "bits": 4, "group_size": 32},
    {"name": "int4", "bits": 4, "group_size": None},
    {"name": "llm_int8", "llm_int8_threshold": 6.0},
    {"name": "nf4", "blocksize": 64, "bnb_4bit_use_double_quant": False},
    {"name": "nf4", "blocksize": 64, "bnb_4bit_use_double_quant": True},
])
def test_accounting_equals_real_quantized_storage(quant):
    """The formula per layer = the bytes llmlab's quantized layers really hold (biases aside; NF4 with
    double quant also keeps one fp32 mean per layer, which the per-parameter accounting leaves out)."""
    from llmlab.models.build import build_model
    from llmlab.quant import apply_quant, storage

    model_cfg = preset("gpt_nano")["model"]
    layout = layout_of(build_model(model_cfg, vocab_size=65), quant=quant)
    real = storage(apply_quant(build_model(model_cfg, vocab_size=65), dict(quant)))
    assert real["layers"] == len(layout.linears) == 4 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block; lm_head tied
    per_layer_constants = 4 * real["layers"] if quant.get("bnb_4bit_use_double_quant") else 0
    assert sum(linear_weight_bytes(o, i, quant, "fp32") for o, i in layout.linears) + per_layer_constants == real["bytes"]


# ---------------------------------------------------------------------------- the paper's 65B totals


def test_full_fine_tuning_65b_is_780_gb_and_qlora_under_48_gb():
    cfg = preset("gpt_65b", "peft.r=64", "peft.lora_alpha=16", "peft.target_modules=all-linear")
    layout = build_layout(cfg["model"], cfg["peft"], None)
    assert layout.params == 64_974_110_720
    acts = activation_bytes(layout, 1, 2048, "bf16", checkpointing=True)
    common = dict(precision="bf16", optimizer_bytes=8.0, activations=acts, params=65e9)
    full = fine_tuning("full", layout, tuned=False, quant=None, master_weights=False, **common)
    # QLoRA §1 ">780GB": 2 (bf16 weights) + 2 (grads) + 8 (AdamW moments) bytes x 65e9, before activations
    assert (full.weights + full.gradients + full.optimizer) / GB == 780.0
    assert full.total / GB > 780
    mixed = fine_tuning("full", layout, tuned=False, quant=None, master_weights=True, **common)
    assert (mixed.weights + mixed.gradients + mixed.optimizer) / GB == 1040.0  # + fp32 master weights (16 B/param)
    qlora = fine_tuning("qlora", layout, tuned=True, quant=QLORA_QUANT, master_weights=False, **common)
    assert qlora.total / GB < 48  # "<48GB": one 48 GB GPU
    assert qlora.trainable == layout.trainable == 80 * 64 * (8192 + 3 * 8192 + 8192 + 8192 + 2 * (8192 + 4 * 8192))


# ---------------------------------------------------------------------------- CLI


def test_cli_prints_tables_and_writes_metrics(run_cli):
    proc = run_cli("memory", "model=gpt_nano", "vocab_size=65", "peft.target_modules=all-linear", "batch_size=2")
    out = proc.stdout
    for text in ("weights per precision", "full fine-tuning", "QLoRA", "KV cache", "metrics:"):
        assert text in out, out
    (run,) = (run_cli.root / "outputs" / "memory" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    params = metrics["model/params"]
    assert metrics["memory/weights_gb/fp32"] == params * 4 / GB
    assert metrics["memory/kv_cache_bytes_per_token"] == 2 * 4 * 128 * 2  # 2 x layers x width x bf16
    assert metrics["memory/kv_cache_gb"] == 2 * 4 * 128 * 2 * 128 * 2 / GB  # x block_size x batch
    assert metrics["memory/lora_nf4/total_gb"] < metrics["memory/lora/total_gb"] < metrics["memory/full/total_gb"]
    assert metrics["memory/full/optimizer_gb"] == params * 8 / GB


@pytest.mark.parametrize("args, message", [
    (["model=gpt_nope"], "unknown model=gpt_nope"),
    (["batch_size=-1"], "batch_size=-1"),
    (["precision=int3"], "precision=int3"),
])
def test_cli_bad_input_is_one_line_exit_2(run_cli, args, message):
    proc = run_cli("memory", *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not (run_cli.root / "outputs" / "memory" / "runs").exists() or not any(
        (d / "metrics.json").exists() for d in (run_cli.root / "outputs" / "memory" / "runs").iterdir())
