"""BitFit and top-k block fine-tuning (llmlab.peft.selective)."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmlab.errors import UserError
from llmlab.models.bert import Bert, BertConfig
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.t5 import T5, T5Config
from llmlab.peft import apply_peft, count_parameters

GPT_KW = dict(vocab_size=50, block_size=16, n_layer=3, n_head=2, n_embd=32)
BERT_KW = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=16)


def gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**GPT_KW, **kw}))


def bert() -> Bert:
    return Bert(BertConfig(**BERT_KW))


def t5() -> T5:
    return T5(T5Config(vocab_size=50, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0))


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ bitfit
@pytest.mark.parametrize(
    "build, hf",
    [
        (gpt, lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=50, n_positions=16, n_layer=3, n_head=2, n_embd=32))),
        (bert, lambda: transformers.BertForPreTraining(transformers.BertConfig(**BERT_KW))),
    ],
    ids=["gpt", "bert"],
)
def test_bitfit_trains_exactly_the_biases(build, hf):
    model = apply_peft(build(), {"name": "bitfit"})
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert trainable(model) == biases
    n_bias = sum(p.numel() for n, p in model.named_parameters() if n in biases)
    assert count_parameters(model)["trainable"] == n_bias
    # the same number of bias entries as the transformers twin has (tied parameters once)
    ref = {id(p): p for n, p in hf().named_parameters() if n.endswith(".bias")}
    assert n_bias == sum(p.numel() for p in ref.values())


def test_bitfit_training_moves_only_biases():
    model = apply_peft(gpt(), {"name": "bitfit"})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        model(x, targets=x)[1].backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != n.endswith(".bias"), n


@pytest.mark.parametrize("build, match", [(t5, "^T5 has no bias terms: BitFit cannot train anything; use peft=ia3 or "
                                                 "peft=lora$"),
                                          (lambda: gpt(bias=False), r"^GPT \(bias=False\) has no bias terms")])
def test_bitfit_without_biases_is_a_user_error(build, match):
    with pytest.raises(UserError, match=match):
        apply_peft(build(), {"name": "bitfit"})


def test_bitfit_takes_no_options():
    with pytest.raises(UserError, match="no key r: it takes none besides name"):
        apply_peft(gpt(), {"name": "bitfit", "r": 8})


# ------------------------------------------------------------------ freeze
def test_freeze_top_k_gpt_keeps_tied_embedding_frozen():
    model = apply_peft(gpt(), {"name": "freeze", "num_trainable_blocks": 2})
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("transformer.h.1.", "transformer.h.2.", "transformer.ln_f."))}
    assert trainable(model) == expected
    assert not model.lm_head.weight.requires_grad  # lm_head is wte: neither trains
    blocks = sum(p.numel() for b in model.transformer.h[1:] for p in b.parameters())
    assert count_parameters(model)["trainable"] == blocks + 2 * 32  # + ln_f weight and bias


def test_freeze_without_final_norm_and_defaults():
    model = apply_peft(gpt(), {"name": "freeze", "train_final_norm": False})  # default k = 2
    assert {n.split(".")[2] for n in trainable(model)} == {"1", "2"}


def test_freeze_t5_top_block_is_the_last_decoder_block():
    model = apply_peft(t5(), {"name": "freeze", "num_trainable_blocks": 1})
    assert trainable(model) == {n for n, _ in model.named_parameters()
                                if n.startswith(("decoder.blocks.1.", "decoder.final_norm.", "encoder.final_norm."))}


def test_freeze_bert_has_no_final_norm():
    model = apply_peft(bert(), {"name": "freeze", "num_trainable_blocks": 1})
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.startswith("layers.1.")}


@pytest.mark.parametrize("k", [0, 4, -1, "2", True, 1.5])
def test_freeze_bad_k_names_the_block_count(k):
    with pytest.raises(UserError, match=r"must be an integer in 1\.\.3: this GPT has 3 blocks"):
        apply_peft(gpt(), {"name": "freeze", "num_trainable_blocks": k})


def test_freeze_unknown_key():
    with pytest.raises(UserError, match="no key k: valid keys are num_trainable_blocks, train_final_norm"):
        apply_peft(gpt(), {"name": "freeze", "k": 2})


def test_none_trains_everything():
    model = apply_peft(gpt(), {"name": "none"})
    assert count_parameters(model)["frozen"] == 0
