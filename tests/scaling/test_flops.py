"""FLOPs and parameter accounting (Kaplan et al. 2020 Table 1) against code we did not write:
transformers' GPT-2 parameter count and torch's FlopCounterMode on llmlab's own GPT."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmlab.models.gpt import GPT, GPTConfig
from llmlab.scaling.flops import gpt_flops_per_token, gpt_param_counts, training_flops_per_token

GPT2_SMALL = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True, tie_embeddings=True)


def test_gpt2_small_against_transformers_and_the_formula():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config())
    hf_total = sum(p.numel() for p in hf.parameters())  # tied lm_head counted once
    hf_embeddings = hf.transformer.wte.weight.numel() + hf.transformer.wpe.weight.numel()
    counts = gpt_param_counts(GPT2_SMALL)
    assert counts["params"] == hf_total == 124_439_808
    assert counts["params_non_embedding"] == hf_total - hf_embeddings == 85_056_000
    # Kaplan's 12·n_layer·d_model² leaves out biases and LayerNorms: 0.14 % fewer
    assert 12 * 12 * 768**2 == 84_934_656
    assert counts["params_non_embedding"] / 84_934_656 - 1 == pytest.approx(0.0014, abs=1e-4)
    # 6N + 6·n_layer·n_ctx·d_model per training token; the attention term is ~10 % at n_ctx = 1024
    per_token = gpt_flops_per_token(GPT2_SMALL)
    assert per_token == 6 * 85_056_000 + 6 * 12 * 1024 * 768 == 566_959_104
    assert (per_token - 6 * 85_056_000) / per_token == pytest.approx(0.0999, abs=1e-3)
    # GPT-2 small on its 1.46M-token Shakespeare: C = 6ND (+ attention)
    assert gpt_flops_per_token(GPT2_SMALL, n_ctx=256) == training_flops_per_token(85_056_000, 12, 256, 768)


@pytest.mark.parametrize("bias,tie", [(True, True), (False, True), (True, False), (False, False)])
def test_counts_equal_the_modules(bias, tie):
    config = GPTConfig(vocab_size=67, block_size=24, n_layer=3, n_head=2, n_embd=16, bias=bias, tie_embeddings=tie)
    model = GPT(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight), id(model.lm_head.weight)}
    non_embedding = sum(p.numel() for p in model.parameters() if id(p) not in embedding)
    assert gpt_param_counts(config) == {"params": total, "params_non_embedding": non_embedding}
    assert gpt_param_counts(vars(config)) == gpt_param_counts(config)  # a checkpoint's dict works too


def test_flops_per_token_against_torch_flop_counter():
    """torch counts every matmul of a real forward/backward: 2 FLOPs per weight per token in the linear
    layers, 2·d·V in the output layer, 4·T·d per token per layer for QKᵀ and AV over the full T×T
    scores. Kaplan's forward 2N + 2·n_layer·n_ctx·d is that without the de-embedding, with the causal
    half of the scores (n_ctx/2 keys on average, ×2 products) and biases/LayerNorms counted as weights."""
    B, T, L, d, V = 2, 32, 2, 32, 50
    config = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=2, n_embd=d, attn_impl="eager")
    model = GPT(config)
    idx = torch.randint(0, V, (B, T))
    with FlopCounterMode(display=False) as forward:
        logits = model(idx)
    matmul_weights = 12 * L * d * d
    assert forward.get_total_flops() == B * T * (2 * matmul_weights + 2 * d * V) + B * L * 4 * T * T * d
    with FlopCounterMode(display=False) as training:
        model(idx, idx)[1].backward()
    # backward = 2 x forward for every matmul (input and weight gradients)
    assert training.get_total_flops() == pytest.approx(3 * forward.get_total_flops(), rel=0.02)
    n = gpt_param_counts(config)["params_non_embedding"]
    small_params = n - matmul_weights  # biases and LayerNorm gains: no matmul, counted in N by Kaplan
    kaplan_forward = (forward.get_total_flops() / (B * T) - 2 * d * V) - L * 2 * T * d + 2 * small_params
    assert 3 * kaplan_forward == gpt_flops_per_token(config)
    del logits
