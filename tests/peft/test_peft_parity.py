"""LoRA and (IA)^3 against Hugging Face ``peft`` on tiny random ``transformers`` models.

Each base is a random ``GPT2LMHeadModel`` / ``BertForPreTraining`` / ``T5ForConditionalGeneration``
saved with ``save_pretrained`` and loaded into llmlab with ``from_pretrained``, so both sides start
from the same weights. Direction A: ``peft.get_peft_model`` with a random adapter ->
``save_pretrained`` -> ``llmlab.peft.load_adapter`` -> equal logits. Direction B: llmlab's
``apply_peft`` with a random adapter -> ``save_adapter`` -> ``peft.PeftModel.from_pretrained`` ->
equal logits. Both tuners' defaults and ``all-linear`` select the layers ``peft`` selects.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llmlab.models.bert import Bert
from llmlab.models.gpt import GPT
from llmlab.models.t5 import T5
from llmlab.peft import apply_peft, load_adapter, peft_config, save_adapter
from llmlab.peft.arch import peft_arch
from llmlab.peft.ia3 import IA3Linear
from llmlab.peft.io import hf_module_path
from llmlab.peft.lora import LoraLinear
from llmlab.peft.targets import find_targets

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore")  # peft warns about Conv1D fan_in_fan_out and unmerge accuracy

V = 61


def _hf_gpt():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _hf_bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForPreTraining(cfg)


def _hf_t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg)


ARCHS = {"gpt": (_hf_gpt, GPT), "bert": (_hf_bert, Bert), "t5": (_hf_t5, T5)}
X = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(1))
DEC = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """arch -> (HF base model, its save_pretrained directory); each test copies the model."""
    out = {}
    for arch, (make, _) in ARCHS.items():
        torch.manual_seed(0)
        hf = make().eval()
        with torch.no_grad():  # non-trivial biases / norms so every name mapping matters
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
def hf_logits(model, arch):
    if arch == "t5":
        return model(input_ids=X, decoder_input_ids=DEC).logits
    out = model(input_ids=X)
    if arch == "bert":
        return torch.cat([out.prediction_logits.flatten(), out.seq_relationship_logits.flatten()])
    return out.logits


@torch.no_grad()
def our_logits(model, arch):
    if arch == "t5":
        return model(X, decoder_input_ids=DEC).logits
    if arch == "bert":
        out = model(X)
        return torch.cat([out.prediction_logits.flatten(), out.seq_relationship_logits.flatten()])
    return model(X)


def assert_parity(ours, theirs, base):
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, f"max |llmlab - peft| = {diff:.2e}"
    assert (theirs - base).abs().max().item() > 1e-3, "the adapter must change the output, or parity proves nothing"


def _hf_adapted(bases, arch, ours):
    """The HF twin's adapted module names (peft) and ours mapped to HF names."""
    theirs = {n.removeprefix("base_model.model.") for n, m in ours[0].named_modules()
              if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}
    mine = {hf_module_path(arch, p) for p, m in ours[1].named_modules() if isinstance(m, (LoraLinear, IA3Linear))}
    return theirs, mine


# ---------------------------------------------------------------------------- target selection
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", ["lora", "lora-all-linear", "ia3"])
def test_defaults_and_all_linear_select_the_layers_peft_selects(bases, arch, kind):
    hf, ours = pair(bases, arch)
    if kind == "ia3":
        pm = peft.get_peft_model(hf, peft.IA3Config())
        apply_peft(ours, {"name": "ia3"})
    else:
        targets = "all-linear" if kind == "lora-all-linear" else None
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=targets))
        apply_peft(ours, {"name": "lora", "r": 2, "target_modules": targets})
    theirs, mine = _hf_adapted(bases, arch, (pm, ours))
    assert mine == theirs and mine
    if kind == "ia3":  # and the same layers scale their input
        ff_theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                     if isinstance(m, peft.tuners.ia3.IA3Layer) and m.is_feedforward}
        ff_mine = {hf_module_path(arch, p) for p, m in ours.named_modules()
                   if isinstance(m, IA3Linear) and m.is_feedforward}
        assert ff_mine == ff_theirs and ff_mine
    from llmlab.peft import count_parameters

    assert count_parameters(ours)["trainable"] == sum(p.numel() for p in pm.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- LoRA
LORA_CASES = {  # arch -> LoraConfig kwargs beyond r=4, lora_alpha=8
    "gpt": dict(target_modules=["c_attn", "mlp.c_proj"]),
    "bert": dict(target_modules=["query", "value", "output.dense"], use_rslora=True),
    "t5": dict(target_modules="all-linear"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_peft_adapter_loads_into_llmlab(bases, arch, tmp_path):
    hf, ours = pair(bases, arch)
    base = hf_logits(hf, arch)
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **LORA_CASES[arch]))
    pm.eval().save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    assert_parity(our_logits(ours, arch), hf_logits(pm, arch), base)
    assert peft_config(ours)["r"] == 4 and peft_config(ours)["use_rslora"] == (arch == "bert")
    theirs, mine = _hf_adapted(bases, arch, (pm, ours))
    assert mine == theirs


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llmlab_lora_adapter_loads_into_peft(bases, arch, tmp_path):
    hf, ours = pair(bases, arch)
    base = hf_logits(hf, arch)
    cfg = {"name": "lora", "r": 4, "lora_alpha": 16, "target_modules": "all-linear" if arch == "bert" else None}
    if arch == "gpt":
        cfg["bias"] = "lora_only"  # trained biases travel in the adapter file, as in peft
    apply_peft(ours, cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
                if arch == "gpt":
                    m.bias.add_(torch.randn(m.bias.shape, generator=g) * 0.2)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == {"gpt": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}.get(arch)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert_parity(our_logits(ours, arch), hf_logits(pm, arch), base)
    theirs, mine = _hf_adapted(bases, arch, (pm, ours))
    assert mine == theirs


def test_lora_adapter_saved_on_bert_model_without_heads_loads(bases, tmp_path):
    """A BertModel adapter (keys without "bert.") lands on the encoder of llmlab's BertForPreTraining."""
    hf, ours = pair(bases, "bert")
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(hf.bert), peft.LoraConfig(r=2, init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(X), pm(input_ids=X).last_hidden_state, atol=1e-5, rtol=0)


def test_sequence_classification_adapter_loads_the_encoder_and_keeps_the_head(bases, tmp_path):
    """peft's SEQ_CLS adapters also save the new classifier (modules_to_save): llmlab's BERT has no
    such module, so the encoder adapter loads and the head is kept aside, not silently lost."""
    hf, ours = pair(bases, "bert")
    cls = transformers.BertForSequenceClassification(hf.config)
    cls.bert.load_state_dict(hf.bert.state_dict())
    torch.manual_seed(9)
    pm = peft.get_peft_model(cls, peft.LoraConfig(r=2, task_type="SEQ_CLS", init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        want = pm.base_model.model.bert(input_ids=X).last_hidden_state
        torch.testing.assert_close(ours.encode(X), want, atol=1e-5, rtol=0)
        assert (want - hf.bert(input_ids=X).last_hidden_state).abs().max() > 1e-3
    assert sorted(ours.peft_modules_to_save) == ["classifier.bias", "classifier.weight"]


# ---------------------------------------------------------------------------- (IA)^3
@pytest.mark.parametrize("arch", list(ARCHS))
def test_ia3_peft_adapter_loads_into_llmlab(bases, arch, tmp_path):
    hf, ours = pair(bases, arch)
    base = hf_logits(hf, arch)
    torch.manual_seed(6)
    pm = peft.get_peft_model(hf, peft.IA3Config(init_ia3_weights=False)).eval()  # ia3_l ~ randn
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    assert_parity(our_logits(ours, arch), hf_logits(pm, arch), base)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_llmlab_ia3_adapter_loads_into_peft(bases, arch, tmp_path):
    hf, ours = pair(bases, arch)
    base = hf_logits(hf, arch)
    apply_peft(ours, {"name": "ia3"})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, IA3Linear):
                m.ia3_l.copy_(1 + 0.5 * torch.randn(m.ia3_l.shape, generator=g))
    save_adapter(ours, tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    assert_parity(our_logits(ours, arch), hf_logits(pm, arch), base)
    ff = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
          if isinstance(m, peft.tuners.ia3.IA3Layer) and m.is_feedforward}
    assert ff == {hf_module_path(arch, p) for p, m in ours.named_modules() if isinstance(m, IA3Linear)
                  and m.is_feedforward}


def test_merged_llmlab_lora_equals_peft_merge_and_unload(bases, tmp_path):
    """Folding the adapter into the weights gives the same base weights as peft's merge_and_unload."""
    hf, ours = pair(bases, "gpt")
    torch.manual_seed(8)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path)
    load_adapter(ours, tmp_path)
    from llmlab.peft import merge

    merge(ours)
    merged_hf = pm.merge_and_unload()
    theirs = merged_hf.state_dict()["transformer.h.1.attn.c_attn.weight"]  # Conv1D: (in, out)
    torch.testing.assert_close(ours.transformer.h[1].attn.c_attn.weight, theirs.t(), atol=1e-6, rtol=0)
    assert find_targets(ours, ["c_attn"], peft_arch(ours))  # merged layers are still Linear layers
