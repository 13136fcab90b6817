"""BERT model: Hugging Face parity, bidirectionality, padding, losses at init, init, parameter counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmlab.errors import UserError
from llmlab.models.bert import BERT_PRESETS, Bert, BertConfig

TINY = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny(seed: int = 0, **kw) -> Bert:
    torch.manual_seed(seed)
    return Bert(BertConfig(**{**TINY, **kw})).eval()


def ids(B: int, T: int, vocab: int = 101, seed: int = 1, low: int = 5) -> torch.Tensor:
    return torch.randint(low, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def pair_inputs(B: int, T: int, vocab: int, seed: int = 1, n_types: int = 2):
    """Token ids, segment ids (A then B, a third type if the config has one) and a padding mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T), generator=g)
    types = (torch.arange(T) >= T // 2).long().expand(B, T).clone()
    if n_types > 2:
        types[:, -2:] = 2
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 5:] = 0  # padded rows of different lengths
    mask[2, 4:] = 0
    labels = torch.full((B, T), -100)
    pick = torch.rand(B, T, generator=g) < 0.3
    labels[pick] = torch.randint(0, vocab, (int(pick.sum()),), generator=g)
    labels[:, 1] = x[:, 1]  # every row has a label
    nsp = torch.arange(B) % 2
    return x, types, mask, labels, nsp


# ---------------------------------------------------------------------------- Hugging Face parity
transformers = pytest.importorskip("transformers")

HF_CONFIGS = [
    dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
         max_position_embeddings=24),
    dict(vocab_size=57, hidden_size=24, num_hidden_layers=1, num_attention_heads=3, intermediate_size=40,
         max_position_embeddings=16, type_vocab_size=3, layer_norm_eps=1e-5, pad_token_id=1),
    dict(vocab_size=80, hidden_size=16, num_hidden_layers=3, num_attention_heads=1, intermediate_size=48,
         max_position_embeddings=20, hidden_act="gelu_new", initializer_range=0.05),
]


def _hf_model(kw: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.BertForPreTraining(transformers.BertConfig(**kw))
    with torch.no_grad():  # non-trivial biases and LayerNorm params so every mapping is exercised
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _check_parity(ours: Bert, hf, kw: dict) -> None:
    T = kw["max_position_embeddings"]
    x, types, mask, labels, nsp = pair_inputs(3, T, kw["vocab_size"], n_types=kw.get("type_vocab_size", 2))
    with torch.no_grad():
        for attention_mask in (None, mask):
            ref = hf(input_ids=x, attention_mask=attention_mask, token_type_ids=types, labels=labels,
                     next_sentence_label=nsp)
            out = ours(x, attention_mask=attention_mask, token_type_ids=types, labels=labels,
                       next_sentence_label=nsp)
            torch.testing.assert_close(out.prediction_logits, ref.prediction_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.seq_relationship_logits, ref.seq_relationship_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
        base = hf.bert(input_ids=x, attention_mask=mask, token_type_ids=types)
        torch.testing.assert_close(out.hidden_states, base.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.pooled_output, base.pooler_output, atol=1e-5, rtol=0)
        # and without token types (all segment A)
        torch.testing.assert_close(ours(x).prediction_logits, hf(input_ids=x).prediction_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", HF_CONFIGS, ids=["4heads", "3types-pad1", "gelu_new-1head"])
def test_from_pretrained_matches_hf(tmp_path, kw):
    hf = _hf_model(kw)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = Bert.from_pretrained(tmp_path).eval()
    assert ours.config.hidden_act == kw.get("hidden_act", "gelu")
    assert ours.mlm_head.decoder.weight is ours.embeddings.word_embeddings.weight
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    _check_parity(ours, hf, kw)


def test_eager_attention_matches_hf(tmp_path):
    kw = HF_CONFIGS[0]
    hf = _hf_model(kw, seed=2)
    hf.save_pretrained(tmp_path)
    ours = Bert.from_pretrained(tmp_path, attn_impl="eager").eval()
    assert ours.config.attn_impl == "eager"
    _check_parity(ours, hf, kw)


def test_legacy_pytorch_model_bin(tmp_path):
    """Old checkpoints: pytorch_model.bin, TF-style LayerNorm gamma/beta, the decoder weight and
    decoder bias stored explicitly, and the position_ids buffer."""
    kw = HF_CONFIGS[0]
    hf = _hf_model(kw, seed=3)
    hf.config.save_pretrained(tmp_path)
    state = {}
    for k, v in hf.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[k] = v.clone()
    state["bert.embeddings.position_ids"] = torch.arange(kw["max_position_embeddings"])[None]
    assert "cls.predictions.decoder.weight" in state and "cls.predictions.decoder.bias" in state
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="only pytorch_model.bin .*allow_bin=True"):
        Bert.from_pretrained(tmp_path)
    _check_parity(Bert.from_pretrained(tmp_path, allow_bin=True).eval(), hf, kw)


def test_to_hf_state_dict_round_trip():
    ours = tiny(seed=4)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = ours.to_hf_config()
    hf = transformers.BertForPreTraining(transformers.BertConfig(**cfg)).eval()
    hf.load_state_dict(ours.to_hf_state_dict(), strict=True)
    _check_parity(ours, hf, cfg)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Bert.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="config.json"):
        Bert.from_pretrained(tmp_path)
    hf = _hf_model(HF_CONFIGS[0])
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model.safetensors"):
        Bert.from_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unknown BERT config override"):
        Bert.from_pretrained(tmp_path, n_layer=3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for bad, match in [({"vocab_size": 98}, "shape"), ({"num_hidden_layers": 3}, "missing"),
                       ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
                       ({"model_type": "roberta"}, "model_type"), ({"hidden_act": "silu"}, "hidden_act")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(UserError, match=match):
            Bert.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="weights"):
        Bert.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- behaviour
def test_shapes_and_output_fields():
    model = tiny()
    x, types, mask, labels, nsp = pair_inputs(3, 12, 101)
    out = model(x, mask, types)
    assert out.prediction_logits.shape == (3, 12, 101) and out.seq_relationship_logits.shape == (3, 2)
    assert out.hidden_states.shape == (3, 12, 32) and out.pooled_output.shape == (3, 32)
    assert out.loss is None and out.mlm_loss is None and out.nsp_loss is None
    out = model(x, mask, types, labels=labels)
    assert out.nsp_loss is None and torch.equal(out.loss, out.mlm_loss)
    out = model(x, mask, types, next_sentence_label=nsp)
    assert out.mlm_loss is None and torch.equal(out.loss, out.nsp_loss)
    out = model(x, mask, types, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)


def test_losses_match_manual_cross_entropy():
    model = tiny()
    x, types, mask, labels, nsp = pair_inputs(3, 12, 101)
    out = model(x, mask, types, labels=labels, next_sentence_label=nsp)
    keep = labels != -100
    logp = torch.log_softmax(out.prediction_logits[keep], -1)
    torch.testing.assert_close(out.mlm_loss, -logp.gather(1, labels[keep][:, None]).mean())
    logq = torch.log_softmax(out.seq_relationship_logits, -1)
    torch.testing.assert_close(out.nsp_loss, -logq.gather(1, nsp[:, None]).mean())


def test_bidirectional_right_context_changes_masked_logits():
    model = tiny()
    x = ids(2, 16)
    t = 5
    x[:, t] = 4  # say, [MASK]
    y = x.clone()
    y[:, t + 1:] = (y[:, t + 1:] + 1 + torch.arange(16 - t - 1)) % 96 + 5  # only the right context changes
    a, b = model(x).prediction_logits, model(y).prediction_logits
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3
    z = x.clone()
    z[:, :t] = (z[:, :t] + 1) % 96 + 5  # ... and the left context matters too
    assert (a[:, t] - model(z).prediction_logits[:, t]).abs().max() > 1e-3


def test_padding_is_invisible_to_real_tokens():
    model = tiny()
    x = ids(2, 10)
    types = torch.zeros_like(x)
    short = model(x, torch.ones_like(x), types)
    padded_x = torch.cat([x, torch.full((2, 6), 0)], 1)  # six [PAD] tokens, masked out
    mask = torch.cat([torch.ones_like(x), torch.zeros(2, 6, dtype=torch.long)], 1)
    long = model(padded_x, mask, torch.zeros_like(padded_x))
    torch.testing.assert_close(long.prediction_logits[:, :10], short.prediction_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(long.seq_relationship_logits, short.seq_relationship_logits, atol=1e-5, rtol=0)
    unmasked = model(padded_x, None, torch.zeros_like(padded_x))  # without the mask the padding leaks in
    assert (unmasked.prediction_logits[:, :10] - short.prediction_logits).abs().max() > 1e-3


def test_token_type_changes_output():
    model = tiny()
    x = ids(2, 10)
    a = model(x, token_type_ids=torch.zeros_like(x)).prediction_logits
    b = model(x, token_type_ids=torch.ones_like(x)).prediction_logits
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(model(x).prediction_logits, a)  # default = all segment A


def test_sdpa_and_eager_agree_with_padding_and_dropout_off():
    sdpa = tiny()
    eager = tiny(attn_impl="eager")
    eager.load_state_dict(sdpa.state_dict())
    x, types, mask, _, _ = pair_inputs(3, 16, 101)
    torch.testing.assert_close(sdpa(x, mask, types).prediction_logits, eager(x, mask, types).prediction_logits,
                               atol=1e-5, rtol=0)


def test_masked_only_gives_same_logits_and_losses():
    model = tiny()
    x, types, mask, labels, nsp = pair_inputs(3, 12, 101)
    full = model(x, mask, types, labels=labels, next_sentence_label=nsp)
    part = model(x, mask, types, labels=labels, next_sentence_label=nsp, masked_only=True)
    keep = labels != -100
    assert part.prediction_logits.shape == (int(keep.sum()), 101)
    torch.testing.assert_close(part.prediction_logits, full.prediction_logits[keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(part.loss, full.loss, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="labels"):
        model(x, masked_only=True)


def test_no_masked_position_gives_zero_loss_not_nan():
    model = tiny().train()
    x = ids(2, 8)
    out = model(x, labels=torch.full_like(x, -100), next_sentence_label=torch.tensor([0, 1]))
    assert out.mlm_loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()  # still a graph: the NSP gradient flows
    assert model.nsp_head.weight.grad.abs().sum() > 0


def test_initial_losses_are_uniform_guesses():
    """At init every word and both NSP classes are about equally likely: MLM ≈ ln V, NSP ≈ ln 2."""
    V = 1000
    model = Bert(BertConfig.from_preset("bert_tiny", vocab_size=V, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)).eval()
    x, types, mask, _, _ = pair_inputs(16, 64, V, seed=7)
    labels = torch.where(torch.rand(16, 64, generator=torch.Generator().manual_seed(8)) < 0.15, x, -100)
    nsp = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = model(x, mask, types, labels=labels, next_sentence_label=nsp)
    assert abs(out.mlm_loss.item() - math.log(V)) < 0.1, out.mlm_loss
    assert abs(out.nsp_loss.item() - math.log(2)) < 0.05, out.nsp_loss


def test_init_like_hugging_face():
    torch.manual_seed(0)
    model = Bert(BertConfig.from_preset("bert_tiny", vocab_size=2000))
    std = model.config.initializer_range
    w = model.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.weight is w  # tied
    assert torch.count_nonzero(w[model.config.pad_token_id]) == 0  # [PAD] row starts at zero
    assert abs(w[1:].std().item() - std) < 0.001
    assert abs(model.layers[0].ffn.fc.weight.std().item() - std) < 0.001
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "norm" in name:
            assert torch.all(p == 1), name


def test_dropout_only_in_training():
    model = tiny(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    x = ids(2, 12)
    torch.testing.assert_close(model(x).prediction_logits, model(x).prediction_logits)
    model.train()
    assert (model(x).prediction_logits - model(x).prediction_logits).abs().max() > 1e-3


def test_parameter_counts():
    with torch.device("meta"):  # no memory, no init cost
        base = Bert(BertConfig.from_preset("bert_base"))
        large = Bert(BertConfig.from_preset("bert_large"))
    assert base.num_params() == 110_106_428  # BertForPreTraining, bert-base-uncased
    assert 330e6 < large.num_params() < 340e6  # "BERT-large ... 340M" (paper, §3)
    H, V = 768, 30522
    assert base.num_params() - base.num_params(non_embedding=True) == (V + 512 + 2) * H
    tiny_cfg = BertConfig.from_preset("bert_tiny", vocab_size=8192)
    assert (tiny_cfg.num_hidden_layers, tiny_cfg.hidden_size, tiny_cfg.num_attention_heads,
            tiny_cfg.intermediate_size, tiny_cfg.max_position_embeddings) == (2, 128, 2, 512, 128)
    model = Bert(tiny_cfg)
    per_layer = 4 * (128 * 128 + 128) + 2 * 128 * 512 + 512 + 128 + 4 * 128
    embeddings = (8192 + 128 + 2) * 128 + 2 * 128
    heads = (128 * 128 + 128) * 2 + 2 * 128 + 8192 + 2 * 128 + 2
    assert model.num_params() == embeddings + 2 * per_layer + heads
    assert set(BERT_PRESETS) >= {"bert_tiny", "bert_base", "bert_seed"}


def test_tiny_model_overfits_a_batch():
    """The MLM head can memorise a handful of masked positions (masked-token accuracy -> 1)."""
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0))
    x = ids(4, 16, vocab=50, seed=3)
    labels = torch.full_like(x, -100)
    labels[:, [3, 9]] = x[:, [3, 9]]
    inp = x.clone()
    inp[:, [3, 9]] = 4
    nsp = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        out = model(inp, labels=labels, next_sentence_label=nsp)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    out = model(inp, labels=labels, next_sentence_label=nsp)
    acc = (out.prediction_logits.argmax(-1) == labels)[labels != -100].float().mean()
    assert acc == 1.0 and (out.seq_relationship_logits.argmax(-1) == nsp).all()
    assert out.loss < 0.1


def test_config_and_input_errors():
    with pytest.raises(UserError, match="divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(UserError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(UserError, match="attn_impl"):
        BertConfig(attn_impl="flash")
    with pytest.raises(UserError, match="unknown BERT preset"):
        BertConfig.from_preset("bert_huge")
    model = tiny()
    with pytest.raises(UserError, match="max_position_embeddings"):
        model(ids(1, 25))
    with pytest.raises(UserError, match="batch, seq_len"):
        model(ids(1, 5)[0])
    with pytest.raises(UserError, match="attention_mask"):
        model(ids(2, 5), attention_mask=torch.ones(2, 4))
