"""QLoRA (Dettmers et al. 2023): the #6 LoRA (llmlab.peft.lora) around NF4 layers of a tiny GPT —
at init it is exactly the quantized base; gradients reach LoRA and the input, never the base;
merging is refused; and `llmlab train quant=nf4 peft=lora optim=adamw8bit` runs end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from llmlab.errors import UserError
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.peft import apply_peft, merge
from llmlab.peft.lora import LoraLinear
from llmlab.quant import apply_quant
from llmlab.quant.base import QuantLinear
from llmlab.quant.nf4 import NF4Linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY  # noqa: E402

V = 41
NF4 = {"name": "nf4", "backend": "llmlab", "blocksize": 64, "bnb_4bit_use_double_quant": True,
       "bnb_4bit_compute_dtype": "float32", "llm_int8_skip_modules": ["lm_head"]}
LORA = {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
X = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=64)).eval()


def qlora(backend="llmlab"):
    model = apply_quant(tiny_gpt(), {**NF4, "backend": backend})
    base_out = model(X).detach().clone()
    apply_peft(model, LORA)
    return model, base_out


@pytest.mark.parametrize("backend", ["llmlab", "bnb"])
def test_at_init_equals_the_quantized_base(backend):
    model, base_out = qlora(backend)
    loras = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(loras) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks (lm_head is tied to wte)
    assert all(isinstance(m.base_layer, QuantLinear) for m in loras)
    assert torch.equal(model(X), base_out)  # B = 0: exactly the quantized model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_gradients_reach_lora_and_the_input_not_the_base():
    model, _ = qlora()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X).logsumexp(-1).mean().backward()
    loras = [m for m in model.modules() if isinstance(m, LoraLinear)]
    # every layer's B gets a gradient, the first block's too: it flows back through the NF4 layers above it
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in loras)
    assert all(m.lora_A.weight.grad.abs().sum() == 0 for m in loras)  # B = 0 at step 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    before = {n: b.clone() for n, b in model.named_buffers()}
    opt.step()
    opt.zero_grad()
    model(X).logsumexp(-1).mean().backward()
    assert all(m.lora_A.weight.grad.abs().sum() > 0 for m in loras)  # after one step B != 0
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())  # the packed base never changes


def test_layer_gradient_to_input_goes_through_the_dequantized_weight():
    base = NF4Linear(torch.randn(24, 64) * 0.02, None)
    lora = LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)  # random B: a non-trivial adapter
    x = torch.randn(3, 64, requires_grad=True)
    lora(x).sum().backward()
    w = base.dequantize() + lora.delta_weight()
    assert torch.allclose(x.grad, torch.ones(3, 24) @ w, atol=1e-5)


def test_merge_is_refused():
    model, _ = qlora()
    with pytest.raises(UserError, match="quantized layer .*nf4.*cannot be merged"):
        merge(model)


def test_state_dict_round_trip():
    model, _ = qlora()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0, 0.1)
    state = model.state_dict()
    assert any(k.endswith("attn.c_attn.base_layer.weight_packed") for k in state)
    again, _ = qlora()
    again.load_state_dict(state)
    assert torch.equal(again(X), model(X))


def test_train_cli_qlora_with_adamw8bit(run_cli):
    """`llmlab train quant=nf4 peft=lora optim=adamw8bit` (fast dev run: one train/val/test batch)."""
    proc = run_cli("train", "tokenizer=char", *TINY, "quant=nf4", "peft=lora", "optim=adamw8bit",
                   "trainer.fast_dev_run=true")
    assert "quant=nf4: " in proc.stdout + proc.stderr and "peft=lora: " in proc.stdout + proc.stderr
    assert "test/loss" in proc.stdout


def test_quantized_base_alone_does_not_train(run_cli):
    proc = run_cli("train", "tokenizer=char", *TINY, "quant=nf4", "trainer.fast_dev_run=true", check=False)
    assert proc.returncode == 2 and "peft=lora" in proc.stderr and "Traceback" not in proc.stderr
