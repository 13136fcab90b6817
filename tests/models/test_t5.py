"""T5 model: parity with Hugging Face transformers (logits, loss, greedy generation, weight export),
KV cache == no cache, encoder runs once, attention directions, padding, positions, config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmlab.errors import UserError
from llmlab.models.hf.t5 import hf_to_llmlab_key, llmlab_to_hf_key
from llmlab.models.t5 import T5, T5Config
from llmlab.nn.norms import RMSNorm

transformers = pytest.importorskip("transformers")
from transformers import T5Config as HFConfig  # noqa: E402
from transformers import T5ForConditionalGeneration  # noqa: E402

V = 99
TINY = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)
# tied_unscaled: what transformers 5 builds for tie_word_embeddings=False without a separate lm_head
HEADS = ["tied", "untied", "tied_unscaled"]


def tiny(seed: int = 0, **kw) -> T5:
    torch.manual_seed(seed)
    return T5(T5Config(**{**TINY, **kw})).eval()


def ids(B: int, T: int, seed: int = 1, low: int = 2) -> torch.Tensor:
    return torch.randint(low, V, (B, T), generator=torch.Generator().manual_seed(seed))


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 30) encoder ids with right padding: full, 20 real tokens, 5 real tokens."""
    x = ids(3, 30, seed)
    mask = torch.ones_like(x)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    return x.masked_fill(mask == 0, 0), mask


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from HF's init, which at this size makes greedy decoding repeat one token."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm gains
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name or name == "shared.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 3 / math.sqrt(p.shape[1]))


def hf_pair(
    tmp_path, proj: str, head: str, seed: int = 0, randomize: bool = False, **kw
) -> tuple[T5ForConditionalGeneration, T5]:
    """A random HF T5ForConditionalGeneration, saved with save_pretrained and loaded by T5.from_pretrained.

    HF's own init by default; ``randomize`` = larger weights, for decoding tests (see _randomize).
    """
    torch.manual_seed(seed)
    cfg = HFConfig(**{**TINY, **kw}, feed_forward_proj=proj, tie_word_embeddings=head == "tied",
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = T5ForConditionalGeneration(cfg).eval()
    if head == "untied":  # a separate output matrix, as in T5 v1.1 checkpoints
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model**-0.5)
    if randomize:
        _randomize(hf, seed + 100)
    assert (hf.lm_head.weight is hf.shared.weight) == (head != "untied")
    path = tmp_path / f"hf_{proj}_{head}_{seed}"
    hf.save_pretrained(path)
    return hf, T5.from_pretrained(path).eval()


# ---------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_logits_and_loss_match_transformers(tmp_path, proj, head):
    # initializer_factor 0.5 keeps the logits O(1-10) even untied-unscaled, where 1e-5 is float32 noise
    hf, ours = hf_pair(tmp_path, proj, head, num_decoder_layers=3, initializer_factor=0.5)
    assert ours.config.feed_forward_proj == proj and ours.config.num_decoder_layers == 3
    assert ours.config.tie_word_embeddings == (head != "untied")
    assert ours.config.scale_decoder_outputs == (head == "tied")
    assert (ours.lm_head.weight is ours.shared.weight) == (head != "untied")
    x, mask = padded_batch()
    labels = ids(3, 17, seed=2)
    labels[0, 12:] = -100
    labels[2, 3:] = -100
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, labels=labels)
        out = ours(x, mask, labels=labels)
    assert out.logits.shape == (3, 17, V)
    diff = (out.logits - ref.logits).abs().max().item()
    print(f"T5 parity {proj}/{head}: max |logits - HF| = {diff:.2e}")
    assert diff < 1e-5, f"max |logits - HF| = {diff}"
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        out.encoder_last_hidden_state, ref.encoder_last_hidden_state, atol=1e-5, rtol=0
    )
    # explicit decoder inputs instead of labels
    dec = ids(3, 9, seed=3, low=0)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, mask, dec).logits, hf(input_ids=x, attention_mask=mask, decoder_input_ids=dec).logits,
            atol=1e-5, rtol=0,
        )


@pytest.mark.parametrize("head", ["tied", "untied"])
@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_greedy_generate_matches_transformers(tmp_path, proj, head):
    hf, ours = hf_pair(tmp_path, proj, head, seed=1, randomize=True)
    x, mask = padded_batch(seed=4)
    with torch.no_grad():
        ref = hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=16, do_sample=False)
    got = ours.generate(x, mask, max_new_tokens=16)
    assert torch.equal(got, ref), f"\nours {got}\nHF   {ref}"
    assert got[:, 1:].unique().numel() > 3  # a real test: the rows are not one repeated token

    # make EOS the token row 0 emits at step 5: that row must stop there and be padded like HF's
    eos = int(got[0, 5])
    with torch.no_grad():
        ref = hf.generate(
            input_ids=x, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos
        )
    got = ours.generate(x, mask, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(got, ref), f"\nours {got}\nHF   {ref}"
    first = int((got[0] == eos).nonzero()[0])
    assert first <= 5 and (got[0, first + 1 :] == 0).all()


@pytest.mark.parametrize("tie", [True, False])
def test_export_to_transformers_round_trip(tmp_path, tie):
    from safetensors.torch import save_file

    ours = tiny(seed=3, tie_word_embeddings=tie, feed_forward_proj="gated-gelu")
    (tmp_path / "config.json").write_text(json.dumps(ours.to_hf_config()))
    save_file({k: v.clone().contiguous() for k, v in ours.to_hf_state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    x, mask = padded_batch()
    dec = ids(3, 8, seed=6, low=0)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=x, attention_mask=mask, decoder_input_ids=dec).logits, ours(x, mask, dec).logits,
            atol=1e-5, rtol=0,
        )
    # and back: loading the export gives the same model
    again = T5.from_pretrained(tmp_path).eval()
    assert again.config == ours.config
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_key_mapping_names():
    expected = {
        "encoder.block.3.layer.1.DenseReluDense.wo.weight": "encoder.blocks.3.ffn.wo.weight",
        "decoder.block.1.layer.1.EncDecAttention.k.weight": "decoder.blocks.1.cross_attn.k.weight",
        "decoder.block.1.layer.1.layer_norm.weight": "decoder.blocks.1.cross_attn_norm.weight",
        "decoder.block.0.layer.2.layer_norm.weight": "decoder.blocks.0.ffn_norm.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder.position_bias.embedding.weight",
        "decoder.final_layer_norm.weight": "decoder.final_norm.weight",
    }
    for hf_key, ours in expected.items():
        assert hf_to_llmlab_key(hf_key) == ours
    assert hf_to_llmlab_key("encoder.embed_tokens.weight") is None
    with pytest.raises(KeyError):
        hf_to_llmlab_key("encoder.block.0.layer.2.DenseReluDense.wo.weight")  # encoders have 2 sub-layers
    model = tiny(feed_forward_proj="gated-gelu")
    for key in model.state_dict():
        assert hf_to_llmlab_key(llmlab_to_hf_key(key)) == key


def test_sdpa_and_eager_agree():
    a = tiny(seed=2)
    b = tiny(seed=2, attn_impl="eager")
    b.load_state_dict(a.state_dict())
    x, mask = padded_batch()
    dec = ids(3, 10, seed=7, low=0)
    torch.testing.assert_close(a(x, mask, dec).logits, b(x, mask, dec).logits, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- KV cache / generate
@pytest.mark.parametrize("proj", ["relu", "gated-gelu"])
def test_kv_cache_decoding_equals_no_cache(proj):
    model = tiny(seed=4, feed_forward_proj=proj, num_layers=1, num_decoder_layers=3)  # cache sized by the decoder
    x, mask = padded_batch(seed=9)
    # step by step through forward(past_key_values=...) == one full forward pass (unit-scale logits)
    dec = torch.cat([torch.zeros(3, 1, dtype=torch.long), ids(3, 11, seed=10)], dim=1)  # (3, 12)
    full = model(x, mask, dec).logits
    enc = model.encode(x, mask)
    cache = None
    steps = []
    for t in range(dec.size(1)):
        out = model(attention_mask=mask, decoder_input_ids=dec[:, t : t + 1], encoder_outputs=enc,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    # prefill a chunk, then continue one token at a time
    cache = model.new_cache(3, 12)
    a = model(x, mask, dec[:, :7], past_key_values=cache).logits
    # no encoder_outputs: the cross-attention keys/values come from the cache
    b = model(attention_mask=mask, decoder_input_ids=dec[:, 7:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=0)

    # greedy decoding with and without the cache, token for token (large weights: varied tokens)
    _randomize(model, 8)
    with_cache = model.generate(x, mask, max_new_tokens=20, eos_token_id=None)
    without = model.generate(x, mask, max_new_tokens=20, eos_token_id=None, use_cache=False)
    assert with_cache.shape == (3, 21) and with_cache[:, 1:].unique().numel() > 3
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_runs_the_encoder_once(use_cache):
    model = tiny(seed=5)
    calls = {"encoder": 0, "cross_k": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    model.encoder.register_forward_hook(count("encoder"))
    model.decoder.blocks[0].cross_attn.k.register_forward_hook(count("cross_k"))
    x, mask = padded_batch()
    out = model.generate(x, mask, max_new_tokens=10, eos_token_id=None, use_cache=use_cache)
    assert out.shape == (3, 11)
    assert calls["encoder"] == 1
    # with the cache the cross-attention keys of the encoder output are projected once, not per step
    assert calls["cross_k"] == (1 if use_cache else 10)


def test_generate_stops_at_eos_and_restores_train_mode():
    model = tiny(seed=6)
    _randomize(model, 9)
    x, mask = padded_batch()
    free = model.generate(x, mask, max_new_tokens=12, eos_token_id=None)
    eos = int(free[1, 3])  # row 1 emits this at step 3
    model.train()
    out = model.generate(x, mask, max_new_tokens=12, eos_token_id=eos)
    assert model.training and all(m.training for m in model.modules())
    assert (out[:, 0] == 0).all()  # decoder_start_token_id
    stop = int((out[1] == eos).nonzero()[0])
    assert stop <= 3 and (out[1, stop + 1 :] == 0).all()
    for row in range(3):  # before its EOS every row equals the free-running decode
        hits = (out[row, 1:] == eos).nonzero()
        end = int(hits[0]) + 2 if hits.numel() else out.size(1)
        assert torch.equal(out[row, :end], free[row, :end])
    if out.size(1) < 13:  # stopped early: every row finished
        assert all((out[r, 1:] == eos).any() for r in range(3))
    # sampling: top_k=1 is greedy; a seeded generator reproduces the draw
    top1 = model.generate(x, mask, 8, greedy=False, top_k=1, eos_token_id=None)
    assert torch.equal(top1, free[:, :9])
    s1 = model.generate(x, mask, 8, greedy=False, generator=torch.Generator().manual_seed(0))
    s2 = model.generate(x, mask, 8, greedy=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s1, s2)


# ---------------------------------------------------------------------------- attention structure
def test_encoder_is_bidirectional():
    model = tiny(seed=7)
    x = ids(2, 12, seed=11)
    y = x.clone()
    y[:, 9] = (y[:, 9] + 5) % V
    a, b = model.encode(x), model.encode(y)
    assert not torch.allclose(a[:, 2], b[:, 2], atol=1e-4)  # position 2 sees the later token 9


def test_decoder_is_causal_and_depends_on_the_encoder():
    model = tiny(seed=8)
    x, mask = padded_batch()
    dec = ids(3, 10, seed=12, low=0)
    changed = dec.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % V
    a, b = model(x, mask, dec).logits, model(x, mask, changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-4)
    # the seed's inverted padding mask made the decoder ignore the encoder; here every row reacts
    other = x.clone()
    other[:, 0] = (other[:, 0] + 1) % V
    c = model(other, mask, dec).logits
    for row in range(3):
        assert not torch.allclose(a[row], c[row], atol=1e-4)


def test_padding_invariance_and_mask_polarity():
    model = tiny(seed=9)
    x = ids(2, 8, seed=13)
    dec = ids(2, 5, seed=14, low=0)
    base_enc = model.encode(x)
    base_logits = model(x, None, dec).logits
    padded = torch.cat([x, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 8), torch.zeros(2, 6)], dim=1).long()
    torch.testing.assert_close(model.encode(padded, mask)[:, :8], base_enc, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(padded, mask, dec).logits, base_logits, atol=1e-5, rtol=0)
    # garbage in the padded slots is invisible too
    junk = padded.clone()
    junk[:, 8:] = ids(2, 6, seed=15)
    torch.testing.assert_close(model(junk, mask, dec).logits, base_logits, atol=1e-5, rtol=0)
    # without the mask the pads do count (so the test above is not vacuous)
    assert not torch.allclose(model(padded, None, dec).logits, base_logits, atol=1e-4)
    # an all-ones mask (no padding: NaN in the seed) is the same as no mask
    out = model(x, torch.ones_like(x), labels=ids(2, 5, seed=16))
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.encoder_last_hidden_state, base_enc, atol=1e-6, rtol=0)


def test_encoder_uses_positions():
    model = tiny(seed=10)
    x = ids(1, 10, seed=17)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    out, out_perm = model.encode(x), model.encode(x[:, perm])
    # with relative position bias, permuting the input does not just permute the output
    assert not torch.allclose(out[:, perm], out_perm, atol=1e-3)
    # ... and with the bias zeroed the encoder would be permutation-equivariant (the seed's bug)
    with torch.no_grad():
        model.encoder.position_bias.embedding.weight.zero_()
    torch.testing.assert_close(model.encode(x)[:, perm], model.encode(x[:, perm]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- loss and structure
def test_labels_are_shifted_right_and_minus_100_ignored():
    model = tiny(seed=11)
    x, mask = padded_batch()
    labels = ids(3, 6, seed=18)
    labels[1, 4:] = -100
    shifted = model.shift_right(labels)
    assert (shifted[:, 0] == 0).all() and torch.equal(shifted[0, 1:], labels[0, :-1])
    assert (shifted[1, 5:] == 0).all()  # the -100 became pad
    out = model(x, mask, labels=labels)
    torch.testing.assert_close(out.logits, model(x, mask, shifted).logits)
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, manual, atol=1e-6, rtol=1e-6)


def test_no_biases_shared_embedding_and_output_scaling():
    model = tiny(seed=12)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.bias is None
        assert not isinstance(m, torch.nn.LayerNorm)
    assert sum(isinstance(m, RMSNorm) for m in model.modules()) == 2 * 2 + 3 * 2 + 2
    assert model.lm_head.weight is model.shared.weight
    # the tied head sees the decoder output times d_model**-0.5
    dec = ids(2, 4, seed=19, low=0)
    x = ids(2, 6, seed=20)
    h = model.decoder(model.shared(dec), model.encode(x))
    expected = h @ model.shared.weight.T / math.sqrt(32)
    torch.testing.assert_close(model(x, None, dec).logits, expected, atol=1e-5, rtol=0)
    # only the first layer of each stack owns a position bias: one module per stack
    names = [n for n, _ in model.named_parameters() if "position_bias" in n]
    assert names == ["encoder.position_bias.embedding.weight", "decoder.position_bias.embedding.weight"]
    assert model.encoder.position_bias.bidirectional and not model.decoder.position_bias.bidirectional


def test_presets_and_initial_loss():
    small = T5(T5Config.preset("t5_small"))
    assert small.num_params() == 60_506_624  # released t5-small
    assert T5Config.preset("t5_seed", vocab_size=1000).d_model == 512
    model = T5(T5Config.preset("t5_tiny", vocab_size=1000)).eval()
    x = torch.randint(2, 1000, (8, 40), generator=torch.Generator().manual_seed(0))
    y = torch.randint(2, 1000, (8, 12), generator=torch.Generator().manual_seed(1))
    loss = model(x, labels=y).loss.item()
    assert abs(loss - math.log(1000)) < 1.5  # unit-scale initial logits: about ln V


def test_span_reconstruction_is_learnable():
    """A few Adam steps fit one span-corruption batch: the encoder information reaches the loss."""
    from llmlab.data.span_corruption import SpanCorruptionCollator

    torch.manual_seed(0)
    vocab = 60 + 100
    model = T5(T5Config.preset("t5_tiny", vocab_size=vocab, d_model=64, d_kv=16, d_ff=128))
    seqs = [torch.randint(2, 60, (30,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    batch = SpanCorruptionCollator(vocab_size=vocab, seed=0)(seqs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first


# ---------------------------------------------------------------------------- errors
def test_config_and_loading_errors(tmp_path):
    with pytest.raises(UserError, match="feed_forward_proj"):
        T5Config(**{**TINY, "feed_forward_proj": "swiglu"})
    with pytest.raises(UserError, match="d_model"):
        T5Config(**{**TINY, "d_model": 0})
    with pytest.raises(UserError, match="max_distance"):
        T5Config(**{**TINY, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 16})
    with pytest.raises(UserError, match="unknown T5 preset"):
        T5Config.preset("t5_huge")
    with pytest.raises(UserError, match="does not exist"):
        T5.from_pretrained(tmp_path / "nope")
    model = tiny()
    with pytest.raises(UserError, match="decoder_input_ids or labels"):
        model(ids(1, 4))
    with pytest.raises(UserError, match="attention_mask shape"):
        model.encode(ids(1, 4), torch.ones(1, 5))

    hf, _ = hf_pair(tmp_path, "relu", "tied")
    path = tmp_path / "hf_relu_tied_0"
    cfg = json.loads((path / "config.json").read_text())
    cfg["d_model"] = 48  # weights and config disagree
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="shape"):
        T5.from_pretrained(path)
    cfg["model_type"] = "bart"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model_type"):
        T5.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg["model_type"], cfg["d_model"] = "t5", 32
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="cannot read the weights"):
        T5.from_pretrained(path)


def test_pytorch_model_bin_needs_allow_bin(tmp_path):
    hf, ours = hf_pair(tmp_path, "gated-gelu", "untied")
    path = tmp_path / "hf_gated-gelu_untied_0"
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")  # a pre-safetensors directory
    with pytest.raises(UserError, match="only pytorch_model.bin \\(a pickle\\): pass allow_bin=True"):
        T5.from_pretrained(path)
    again = T5.from_pretrained(path, allow_bin=True).eval()
    x, mask = padded_batch()
    dec = ids(3, 9, seed=3, low=0)
    with torch.no_grad():
        torch.testing.assert_close(again(x, mask, dec).logits, ours(x, mask, dec).logits, atol=0, rtol=0)
