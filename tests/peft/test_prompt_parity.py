"""Prompt tuning, prefix tuning and P-tuning v2 against Hugging Face ``peft`` on tiny random models.

The bases are random ``GPT2LMHeadModel`` / ``BertForPreTraining`` / ``T5ForConditionalGeneration``
saved with ``save_pretrained`` and loaded into llmlab with ``from_pretrained``. ``peft`` runs the
prompt through ``inputs_embeds`` and the prefix through ``past_key_values``; llmlab through its
``virtual_tokens`` / ``prefix_kv`` hooks. Equal logits / last hidden states on the real positions
(``peft`` also returns the P prompt positions, which llmlab strips) prove the same positions,
masks and prefix layout. Direction A: ``peft.get_peft_model`` with random prompt weights ->
``save_pretrained`` -> ``llmlab.peft.load_adapter``. Direction B: llmlab with random prompt weights
-> ``save_adapter`` -> ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llmlab.errors import UserError
from llmlab.models.bert import Bert
from llmlab.models.gpt import GPT
from llmlab.models.t5 import T5
from llmlab.peft import apply_peft, load_adapter, peft_config, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore")

V, P = 61, 4
X = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])  # BERT / T5: the second row is padded
DEC = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(2))


def _hf_gpt():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=24, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _hf_bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=24, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForPreTraining(cfg)


def _hf_t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg)


ARCHS = {"gpt": (_hf_gpt, GPT), "bert": (_hf_bert, Bert), "t5": (_hf_t5, T5)}
# llmlab tuner config -> the peft config of the same tuner
KINDS = {
    "prompt": ({"name": "prompt", "num_virtual_tokens": P},
               lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)),
    "ptuning_v2": ({"name": "ptuning_v2", "num_virtual_tokens": P},
                   lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P)),
    "prefix": ({"name": "prefix", "num_virtual_tokens": P, "encoder_hidden_size": 16},
               lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P, prefix_projection=True,
                                                    encoder_hidden_size=16)),
}
TASKS = {"gpt": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "t5": "SEQ_2_SEQ_LM"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """arch -> (HF base model, its save_pretrained directory); each test copies the model."""
    out = {}
    for arch, (make, _) in ARCHS.items():
        torch.manual_seed(0)
        hf = make().eval()
        with torch.no_grad():  # non-trivial biases / norms
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        path = tmp_path_factory.mktemp(f"hf_{arch}")
        hf.save_pretrained(path)
        out[arch] = (hf, path)
    return out


def pair(bases, arch):
    hf, path = bases[arch]
    return copy.deepcopy(hf).eval(), ARCHS[arch][1].from_pretrained(path).eval()


@torch.no_grad()
def hf_out(model, arch):
    """Real-position outputs: GPT logits, BERT last hidden states, T5 decoder logits."""
    if arch == "gpt":
        return model(input_ids=X).logits[:, -X.size(1):]
    if arch == "bert":
        out = model(input_ids=X, attention_mask=MASK, output_hidden_states=True)
        return out.hidden_states[-1][:, -X.size(1):]
    return model(input_ids=X, attention_mask=MASK, decoder_input_ids=DEC).logits


@torch.no_grad()
def our_out(model, arch):
    if arch == "gpt":
        return model(X)
    if arch == "bert":
        return model.encode(X, MASK)
    return model(X, MASK, decoder_input_ids=DEC).logits


def assert_parity(ours, theirs, base):
    assert ours.shape == theirs.shape == base.shape
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, f"max |llmlab - peft| = {diff:.2e}"
    assert (theirs - base).abs().max().item() > 1e-3, "the prompt must change the output, or parity proves nothing"


def randomize(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


CASES = [(a, k) for a in ("gpt", "bert") for k in KINDS] + [("t5", "prompt")]


@pytest.mark.parametrize("arch,kind", CASES)
def test_peft_adapter_loads_into_llmlab(bases, arch, kind, tmp_path):
    """Direction A: peft's save_pretrained -> llmlab.peft.load_adapter -> equal outputs."""
    hf, ours = pair(bases, arch)
    base = hf_out(hf, arch)
    pm = peft.get_peft_model(hf, KINDS[kind][1](TASKS[arch])).eval()
    randomize(pm.prompt_encoder.parameters(), seed=3)
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    assert_parity(our_out(ours, arch), hf_out(pm, arch), base)
    assert peft_config(ours)["name"] == kind
    # peft keeps the computed prefix, never the MLP: llmlab loads it materialised
    L, d = 2, 32
    expected = P * d if kind == "prompt" else P * L * 2 * d
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("arch,kind", CASES)
def test_llmlab_adapter_loads_into_peft(bases, arch, kind, tmp_path):
    """Direction B: llmlab's save_adapter -> peft.PeftModel.from_pretrained -> equal outputs."""
    hf, ours = pair(bases, arch)
    base = hf_out(hf, arch)
    torch.manual_seed(4)
    apply_peft(ours, KINDS[kind][0])
    randomize([p for p in ours.parameters() if p.requires_grad], seed=5)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PROMPT_TUNING" if kind == "prompt" else "PREFIX_TUNING")
    assert config["task_type"] == TASKS[arch] and config["num_virtual_tokens"] == P
    if kind == "prefix":  # the MLP stays behind: peft reads the computed prefix in inference mode
        assert config["prefix_projection"] is True and config["encoder_hidden_size"] == 16
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert_parity(our_out(ours, arch), hf_out(pm, arch), base)


def test_bert_adapter_loads_into_bert_for_pretraining_mlm_logits(bases, tmp_path):
    """The same adapter on HF's BertForPreTraining: equal MLM logits on the real positions."""
    hf, ours = pair(bases, "bert")
    apply_peft(ours, KINDS["ptuning_v2"][0])
    randomize([p for p in ours.parameters() if p.requires_grad], seed=6)
    save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    with torch.no_grad():
        theirs = pm(input_ids=X, attention_mask=MASK).prediction_logits
        mine = ours(X, MASK).prediction_logits
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_t5_prefix_has_no_peft_twin(bases, tmp_path):
    """peft prefixes only T5's decoder; llmlab's T5 prefix (encoder + decoder) refuses to export."""
    _, ours = pair(bases, "t5")
    apply_peft(ours, KINDS["ptuning_v2"][0])
    with pytest.raises(UserError, match="no peft twin"):
        save_adapter(ours, tmp_path)
