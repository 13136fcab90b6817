"""ELMo biLM: character ids, parameter counts, causality per direction, padding, highway, LSTMP
clipping, scalar mix, OOV words, initial loss, target alignment and overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.models.elmo import (
    BOS_CHAR,
    BOW_CHAR,
    EOS_CHAR,
    EOW_CHAR,
    PAD_CHAR,
    PRESETS,
    CharCNN,
    ElmoBiLM,
    ElmoConfig,
    Highway,
    LSTMPLayer,
    ScalarMix,
    batch_to_char_ids,
    contextual_vectors,
    word_to_char_ids,
)

# a smaller-than-tiny model for the invariance tests: same architecture, faster
MINI = dict(vocab_size=50, filters=((1, 8), (2, 8), (3, 16)), projection_dim=16, lstm_dim=32, dropout=0.0)

SENTENCES = [
    "the cat sat on the mat".split(),
    "a dog ran in a park".split(),
    "my bird sang all day long".split(),
    "one fish swam very fast".split(),
]


def mini(seed: int = 0, **kw) -> ElmoBiLM:
    torch.manual_seed(seed)
    model = ElmoBiLM(ElmoConfig.from_preset("elmo_tiny", **{**MINI, **kw})).eval()
    with torch.no_grad():
        # random LSTM biases: with the init's zero biases a zero (padded) input leaves the state at
        # exactly 0, which would hide padding leaks from the tests
        for layer in (*model.forward_layers, *model.backward_layers):
            layer.lstm.bias_ih_l0.normal_()
            layer.lstm.bias_hh_l0.normal_()
    return model


def words(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(L),), generator=g))
            for L in torch.randint(1, 9, (n,), generator=g)]


def expected_params(c: ElmoConfig) -> dict[str, int]:
    """Hand count of every block of the architecture."""
    F_, P, H, V = c.n_filters, c.projection_dim, c.lstm_dim, c.vocab_size
    char_cnn = (
        c.n_characters * c.char_embed_dim
        + sum(c.char_embed_dim * w * n + n for w, n in c.filters)  # conv weights + biases
        + c.n_highway * 2 * (F_ * F_ + F_)  # transform + gate Linear per highway layer
        + F_ * P + P  # projection
    )
    # nn.LSTM(P, H, proj_size=P): W_ih (4H, P), W_hh (4H, P), two biases (4H), W_hr (P, H)
    lstm_layer = 4 * H * P + 4 * H * P + 2 * 4 * H + P * H
    softmax = P * V + V
    return dict(char_cnn=char_cnn, lstm_layer=lstm_layer, softmax=softmax,
                total=char_cnn + 2 * c.n_layers * lstm_layer + softmax)


# ---------------------------------------------------------------------------- character ids
def test_word_to_char_ids_has_bow_eow_and_padding():
    ids = word_to_char_ids("cat")
    assert len(ids) == 50
    assert ids[:5] == [BOW_CHAR, ord("c") + 1, ord("a") + 1, ord("t") + 1, EOW_CHAR]
    assert ids[5:] == [PAD_CHAR] * 45
    assert (BOW_CHAR, EOW_CHAR, PAD_CHAR, BOS_CHAR, EOS_CHAR) == (259, 260, 261, 257, 258)
    assert 0 not in ids  # 0 is reserved for absent tokens


def test_word_to_char_ids_utf8_bytes_and_sentence_markers():
    assert word_to_char_ids("é")[:4] == [BOW_CHAR, 0xC3 + 1, 0xA9 + 1, EOW_CHAR]
    assert word_to_char_ids("<S>")[:4] == [BOW_CHAR, BOS_CHAR, EOW_CHAR, PAD_CHAR]
    assert word_to_char_ids("</S>")[:4] == [BOW_CHAR, EOS_CHAR, EOW_CHAR, PAD_CHAR]
    assert max(max(word_to_char_ids(w)) for w in ["\xff", "€", "<S>", "</S>"]) < 262


def test_long_words_are_truncated_keeping_both_markers():
    fits = word_to_char_ids("y" * 48)
    assert fits == [BOW_CHAR] + [ord("y") + 1] * 48 + [EOW_CHAR]
    for n in (49, 60, 500):
        ids = word_to_char_ids("ab" * n)
        assert len(ids) == 50 and ids[0] == BOW_CHAR and ids[49] == EOW_CHAR
        assert ids[1:49] == [ord(ch) + 1 for ch in ("ab" * n)[:48]]
    assert len(word_to_char_ids("abcdefgh", max_chars=5)) == 5
    assert word_to_char_ids("abcdefgh", max_chars=5) == [BOW_CHAR, 98, 99, 100, EOW_CHAR]


def test_batch_to_char_ids_pads_with_zero_tokens():
    batch = batch_to_char_ids([["a", "bb", "c"], ["d"]])
    assert batch.shape == (2, 3, 50) and batch.dtype == torch.long
    assert batch[1, 1:].eq(0).all() and batch[1, 0].ne(0).all()
    assert batch[0, 1].tolist() == word_to_char_ids("bb")
    wrapped = batch_to_char_ids([["a", "bb"], ["d"]], add_sentence_boundaries=True, pad_to=6)
    assert wrapped.shape == (2, 6, 50)
    assert wrapped[1, 0].tolist() == word_to_char_ids("<S>")
    assert wrapped[1, 2].tolist() == word_to_char_ids("</S>")
    assert wrapped[0, 3].tolist() == word_to_char_ids("</S>")
    assert wrapped[1, 3:].eq(0).all()


# ---------------------------------------------------------------------------- shapes and counts
def test_tiny_preset_shapes_and_exact_parameter_count():
    torch.manual_seed(0)
    config = ElmoConfig.from_preset("elmo_tiny")
    model = ElmoBiLM(config).eval()
    counts = expected_params(config)
    assert counts["total"] == 1_631_856  # 4,192 + 8,896 + 148,224 + 24,704 + 4 x 296,960 + 258,000
    assert model.num_params() == counts["total"]
    assert model.num_params(exclude_softmax=True) == counts["total"] - counts["softmax"]
    assert sum(p.numel() for p in model.char_cnn.parameters()) == counts["char_cnn"]
    assert sum(p.numel() for p in model.forward_layers[0].parameters()) == counts["lstm_layer"]

    char_ids = batch_to_char_ids([["hello", "world", "!"], ["hi"]])
    out = model(char_ids)
    assert len(out.hidden_states) == model.num_layers == 3
    for h in out.hidden_states:
        assert h.shape == (2, 3, 2 * config.projection_dim) == (2, 3, model.output_dim)
    x = out.hidden_states[0]
    assert torch.equal(x[..., :128], x[..., 128:])  # layer 0 = [x; x]
    for h in out.hidden_states:
        assert h[1, 1:].eq(0).all()  # padded positions are zero
    assert out.mask.tolist() == [[True, True, True], [True, False, False]]
    assert out.forward_loss is None and out.backward_loss is None
    assert model.char_cnn(char_ids).shape == (2, 3, 128)


@pytest.mark.parametrize("preset", ["elmo_paper", "elmo_seed"])
def test_full_size_presets_parameter_counts_on_meta_device(preset):
    config = ElmoConfig.from_preset(preset)
    with torch.device("meta"):  # no memory, no init cost
        model = ElmoBiLM(config)
    counts = expected_params(config)
    assert config.n_filters == 2048 and config.projection_dim == 512 and config.lstm_dim == 4096
    assert counts["char_cnn"] == 18_037_856  # the seed's char-CNN, measured in spec §3.1
    assert sum(p.numel() for p in model.char_cnn.parameters()) == 18_037_856
    assert counts["lstm_layer"] == 18_907_136
    assert model.num_params(exclude_softmax=True) == 93_666_400  # bilm-tf's 93.6M + the 2nd LSTM bias
    assert model.num_params() == counts["total"]
    assert model.num_params() == {"elmo_paper": 500_717_023, "elmo_seed": 109_056_400}[preset]
    # the token representation before the projection has 2048 features
    assert model.char_cnn.projection.in_features == 2048 and len(model.char_cnn.highways) == 2


def test_presets_and_config_validation():
    assert set(PRESETS) == {"elmo_tiny", "elmo_seed", "elmo_paper"}
    paper = ElmoConfig.from_preset("elmo_paper")
    assert (paper.cell_clip, paper.proj_clip, paper.dropout, paper.activation) == (3.0, 3.0, 0.1, "relu")
    assert ElmoConfig.from_preset("elmo_seed").dropout == 0.3
    hydra_style = ElmoConfig(vocab_size=10, filters=[[1, 4], [2, 4]], projection_dim=8, lstm_dim=16)
    assert hydra_style.filters == ((1, 4), (2, 4)) and hydra_style.n_filters == 8
    with pytest.raises(UserError, match="unknown ELMo preset"):
        ElmoConfig.from_preset("elmo_huge")
    with pytest.raises(UserError, match="unknown ElmoConfig field"):
        ElmoConfig.from_preset("elmo_tiny", hidden=3)
    with pytest.raises(UserError, match="projection_dim"):
        ElmoConfig(vocab_size=10, projection_dim=64, lstm_dim=64)
    with pytest.raises(UserError, match="width 51"):
        ElmoConfig(vocab_size=10, filters=[[51, 4]])
    with pytest.raises(UserError, match="vocab_size"):
        ElmoConfig(vocab_size=0)
    with pytest.raises(UserError, match="activation"):
        ElmoConfig(vocab_size=10, activation="gelu")


# ---------------------------------------------------------------------------- causality
def directions(out, P: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = out.hidden_states[1:]
    return [h[..., :P] for h in layers], [h[..., P:] for h in layers]


def test_each_direction_sees_only_its_side():
    model = mini()
    P = model.config.projection_dim
    T, k = 7, 3
    base = [words(T, 1), words(5, 2)]  # second row padded
    after = [base[0][: k + 1] + words(T - k - 1, 3), base[1][: k + 1] + words(5 - k - 1, 4)]
    before = [words(k, 5) + base[0][k:], words(k, 6) + base[1][k:]]
    with torch.no_grad():
        fb, bb = directions(model(batch_to_char_ids(base)), P)
        fa, ba = directions(model(batch_to_char_ids(after)), P)
        fp, bp = directions(model(batch_to_char_ids(before)), P)
    for j in range(model.config.n_layers):
        # forward: positions <= k ignore later tokens; backward: positions >= k ignore earlier ones
        torch.testing.assert_close(fa[j][:, : k + 1], fb[j][:, : k + 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(bp[j][:, k:], bb[j][:, k:], rtol=0, atol=1e-6)
        # ... but each does see its own side (else the check above is vacuous)
        assert (fa[j][:, k + 1] - fb[j][:, k + 1]).abs().amax() > 1e-3
        assert (ba[j][:, k] - bb[j][:, k]).abs().amax() > 1e-3
        assert (fp[j][:, k] - fb[j][:, k]).abs().amax() > 1e-3
        assert (bp[j][:, k - 1] - bb[j][:, k - 1]).abs().amax() > 1e-3


def test_layers_are_lstmp_stacks_with_a_residual_and_a_reversed_backward_pass():
    model = mini(n_layers=3)
    P = model.config.projection_dim
    char_ids = batch_to_char_ids([words(6, 31)])
    with torch.no_grad():
        out = model(char_ids)
        x = model.char_cnn(char_ids)  # (1, T, P), shared by both directions
        f1 = model.forward_layers[0](x)
        f2 = model.forward_layers[1](f1) + f1  # residual into every layer above the first
        f3 = model.forward_layers[2](f2) + f2
        xr = x.flip(1)  # one unpadded row: plain time reversal
        b1 = model.backward_layers[0](xr)
        b2 = model.backward_layers[1](b1) + b1
        b3 = model.backward_layers[2](b2) + b2
    expected = [torch.cat([x, x], -1)] + [torch.cat([f, b.flip(1)], -1) for f, b in ((f1, b1), (f2, b2), (f3, b3))]
    assert len(out.hidden_states) == 4
    for got, want in zip(out.hidden_states, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the two directions have their own LSTMs
    assert model.forward_layers[0].lstm.weight_ih_l0 is not model.backward_layers[0].lstm.weight_ih_l0
    assert not torch.equal(model.forward_layers[0].lstm.weight_ih_l0, model.backward_layers[0].lstm.weight_ih_l0)
    no_skip = mini(n_layers=3, use_skip_connections=False)
    with torch.no_grad():
        h = no_skip(char_ids).hidden_states
        x = no_skip.char_cnn(char_ids)
        f2 = no_skip.forward_layers[1](no_skip.forward_layers[0](x))
    torch.testing.assert_close(h[2][..., :P], f2, rtol=1e-5, atol=1e-6)


def test_padding_never_reaches_real_positions():
    model = mini()
    short, long = words(4, 7), words(9, 8)
    with torch.no_grad():
        alone = model(batch_to_char_ids([short]))
        batched = model(batch_to_char_ids([long, short]))
        padded = model(batch_to_char_ids([short], pad_to=12))
        # garbage characters in the padded slots, masked out explicitly
        junk = batch_to_char_ids([short], pad_to=12)
        junk[0, 4:] = batch_to_char_ids([words(8, 9)])[0]
        mask = torch.zeros(1, 12, dtype=torch.long)
        mask[0, :4] = 1
        masked = model(junk, attention_mask=mask)
    for a, b, c, d in zip(alone.hidden_states, batched.hidden_states, padded.hidden_states, masked.hidden_states):
        torch.testing.assert_close(b[1, :4], a[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(c[0, :4], a[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(d[0, :4], a[0], rtol=0, atol=1e-5)
        assert d[0, 4:].eq(0).all()

    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_alone = model.lm_loss(batch_to_char_ids([short]), ids[:, :4])
        loss_padded = model.lm_loss(junk, ids, attention_mask=mask)
    for a, b in zip(loss_alone, loss_padded):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_left_padded_mask_is_refused():
    model = mini()
    char_ids = batch_to_char_ids([["a", "b", "c"]])
    with pytest.raises(ValueError, match="right-padded"):
        model(char_ids, attention_mask=torch.tensor([[0, 1, 1]]))


# ---------------------------------------------------------------------------- highway and LSTMP
def test_highway_is_identity_with_a_closed_gate_and_carries_at_init():
    torch.manual_seed(0)
    layer = Highway(24)
    x = torch.randn(5, 24) * 3
    assert torch.all(layer.gate.bias == -2.0)  # transform gate biased towards carrying
    assert (layer(x) - x).abs().amax() > 1e-3  # not the identity yet ...
    gate = torch.sigmoid(layer.gate(x))
    assert 0.0 < gate.mean() < 0.5  # ... but mostly carrying
    with torch.no_grad():
        layer.gate.bias.fill_(-1e4)  # σ(-1e4) == 0 in float32: closed gate
    assert torch.equal(layer(x), x)


def test_cnn_uses_activation_then_highway_then_projection():
    torch.manual_seed(0)
    config = ElmoConfig(vocab_size=5, filters=((1, 4), (2, 6)), projection_dim=3, lstm_dim=8,
                        n_highway=1, activation="tanh")
    cnn = CharCNN(config)
    char_ids = batch_to_char_ids([["ab", "c"]])[0]  # (T, 50)
    e = cnn.char_embedding(char_ids).transpose(1, 2)  # (T, 16, 50)
    feats = []
    for conv, (w, n) in zip(cnn.convolutions, config.filters):
        windows = e.unfold(2, w, 1)  # (T, 16, 50 - w + 1, w)
        y = torch.einsum("tcpw,ncw->tnp", windows, conv.weight) + conv.bias[:, None]
        feats.append(torch.tanh(y.max(dim=-1).values))
    x = torch.cat(feats, dim=-1)
    hw = cnn.highways[0]
    g = torch.sigmoid(x @ hw.gate.weight.T + hw.gate.bias)
    x = g * torch.relu(x @ hw.transform.weight.T + hw.transform.bias) + (1 - g) * x
    expected = x @ cnn.projection.weight.T + cnn.projection.bias
    torch.testing.assert_close(cnn(char_ids), expected, rtol=1e-5, atol=1e-6)
    assert cnn.char_embedding.weight[0].eq(0).all()


def test_lstmp_step_loop_equals_fused_kernel_and_clips():
    torch.manual_seed(0)
    fused = LSTMPLayer(6, 12, 4)
    loop = LSTMPLayer(6, 12, 4, cell_clip=math.inf, proj_clip=math.inf)
    loop.load_state_dict(fused.state_dict())
    x = torch.randn(3, 7, 6)
    torch.testing.assert_close(loop(x), fused(x), rtol=1e-5, atol=1e-6)
    assert fused.lstm.bias_ih_l0[12:24].eq(1).all() and fused.lstm.bias_ih_l0[:12].eq(0).all()

    clipped = LSTMPLayer(6, 12, 4, cell_clip=3.0, proj_clip=0.5)
    big = LSTMPLayer(6, 12, 4)
    with torch.no_grad():
        for p in big.parameters():
            p.mul_(8.0)
    clipped.load_state_dict(big.state_dict())
    y_big, y_clip = big(x * 4), clipped(x * 4)
    assert y_big.abs().amax() > 0.5  # unclipped it would exceed the bound
    assert y_clip.abs().amax() <= 0.5
    y_clip.sum().backward()
    assert all(p.grad is not None for p in clipped.parameters())

    cell_only = LSTMPLayer(6, 12, 4, cell_clip=0.1)
    cell_only.load_state_dict(big.state_dict())
    # |h_i| = |Σ_j W_hr[i, j] o_j tanh(c_j)| <= Σ_j |W_hr[i, j]| · tanh(0.1) once |c| <= 0.1
    bound = big.lstm.weight_hr_l0.abs().sum(dim=1) * math.tanh(0.1)  # (4,)
    assert (y_big.abs() > bound).any()
    assert (cell_only(x * 4).abs() <= bound + 1e-6).all()


def test_clipped_model_runs_and_is_causal():
    model = mini(cell_clip=3.0, proj_clip=3.0)
    P = model.config.projection_dim
    a, b = words(5, 11), words(5, 12)
    with torch.no_grad():
        fa, _ = directions(model(batch_to_char_ids([a])), P)
        fb, _ = directions(model(batch_to_char_ids([a[:2] + b[2:]])), P)
    torch.testing.assert_close(fb[-1][:, :2], fa[-1][:, :2], rtol=0, atol=1e-6)
    assert (fb[-1][:, 2] - fa[-1][:, 2]).abs().amax() > 1e-3


# ---------------------------------------------------------------------------- scalar mix
def test_scalar_mix_matches_hand_computation():
    torch.manual_seed(0)
    layers = [torch.randn(2, 5, 8) for _ in range(3)]
    mix = ScalarMix(3)
    torch.testing.assert_close(mix.weights, torch.full((3,), 1 / 3))
    torch.testing.assert_close(mix(layers), (layers[0] + layers[1] + layers[2]) / 3)

    with torch.no_grad():
        mix.scalar_parameters.copy_(torch.tensor([0.5, -1.0, 2.0]))
        mix.gamma.fill_(1.7)
    e = [math.exp(0.5), math.exp(-1.0), math.exp(2.0)]
    s = [v / sum(e) for v in e]
    expected = 1.7 * (s[0] * layers[0] + s[1] * layers[1] + s[2] * layers[2])
    torch.testing.assert_close(mix(layers), expected)
    assert math.isclose(mix.weights.sum().item(), 1.0, rel_tol=1e-6)

    mix(layers).sum().backward()
    assert mix.scalar_parameters.grad.abs().sum() > 0 and mix.gamma.grad.abs().sum() > 0

    normed = ScalarMix(3, layer_norm=True)
    ln = [(h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
          for h in layers]
    torch.testing.assert_close(normed(layers), sum(ln) / 3, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects 3 layers"):
        mix(layers[:2])


def test_contextual_vectors_default_mean_and_sentence_boundaries():
    model = mini()
    sents = [["hello", "there", "world"], ["hi"]]
    with torch.no_grad():
        vecs, mask = contextual_vectors(model, sents)
        out = model(batch_to_char_ids(sents))
        assert vecs.shape == (2, 3, 32) and mask.tolist() == [[True] * 3, [True, False, False]]
        torch.testing.assert_close(vecs, sum(out.hidden_states) / 3)

        mix = ScalarMix(3)
        mix.scalar_parameters.data = torch.tensor([5.0, -5.0, 0.0])
        weighted, _ = contextual_vectors(model, sents, mix)
        assert (weighted - vecs).abs().amax() > 1e-3

        wrapped, wmask = contextual_vectors(model, sents, add_sentence_boundaries=True)
        full = model(batch_to_char_ids(sents, add_sentence_boundaries=True))
        mean = sum(full.hidden_states) / 3
    assert wrapped.shape == (2, 3, 32) and torch.equal(wmask, mask)
    torch.testing.assert_close(wrapped[0], mean[0, 1:4])  # <S> hello there world </S>
    torch.testing.assert_close(wrapped[1, 0], mean[1, 1])  # <S> hi </S>
    assert wrapped[1, 1:].eq(0).all()


# ---------------------------------------------------------------------------- OOV words
def test_unseen_words_get_distinct_nondegenerate_vectors():
    model = mini()
    oov = ["zyzzyva", "qwertyuiopasdf", "zyzzyvb", "Zyzzyva", "ñandú"]  # no word vocabulary on the input side
    with torch.no_grad():
        x = model.char_cnn(batch_to_char_ids([oov])[0])  # (5, P)
        vecs, _ = contextual_vectors(model, [oov])
    assert torch.isfinite(x).all() and torch.isfinite(vecs).all()
    assert (x.norm(dim=-1) > 1e-2).all() and (vecs[0].norm(dim=-1) > 1e-2).all()
    dist = torch.cdist(x, x) + torch.eye(len(oov)) * 1e9
    assert dist.min() > 1e-3  # one changed or re-cased character is a different vector


# ---------------------------------------------------------------------------- losses
def test_initial_loss_is_about_log_vocab_in_each_direction():
    torch.manual_seed(0)
    model = ElmoBiLM(ElmoConfig.from_preset("elmo_tiny")).eval()  # 2000 words
    sents = [words(12, s) for s in range(8)]
    ids = torch.randint(0, 2000, (8, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fwd, bwd = model.lm_loss(batch_to_char_ids(sents), ids)
    assert abs(fwd.item() - math.log(2000)) < 0.1
    assert abs(bwd.item() - math.log(2000)) < 0.1


def test_targets_are_next_token_forward_and_previous_token_backward():
    model = mini()
    P = model.config.projection_dim
    sents = [words(6, 21), words(3, 22)]
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    ids[1, 1] = -100  # never a target
    with torch.no_grad():
        out = model(batch_to_char_ids(sents), input_ids=ids)
        top = out.hidden_states[-1]
        fwd_terms, bwd_terms = [], []
        for b, n in enumerate([6, 3]):
            for k in range(n):
                logp_f = F.log_softmax(model.softmax(top[b, k, :P]), dim=-1)
                logp_b = F.log_softmax(model.softmax(top[b, k, P:]), dim=-1)
                if k + 1 < n and ids[b, k + 1] >= 0:
                    fwd_terms.append(-logp_f[ids[b, k + 1]])
                if k >= 1 and ids[b, k - 1] >= 0:
                    bwd_terms.append(-logp_b[ids[b, k - 1]])
    assert len(fwd_terms) == 5 + 1 and len(bwd_terms) == 5 + 1
    torch.testing.assert_close(out.forward_loss, torch.stack(fwd_terms).mean())
    torch.testing.assert_close(out.backward_loss, torch.stack(bwd_terms).mean())
    with pytest.raises(ValueError, match="vocab_size"):
        model(batch_to_char_ids(sents), input_ids=ids.clamp(min=0) + 50)


def test_overfits_four_sentences_in_both_directions():
    torch.manual_seed(0)
    vocab = sorted({w for s in SENTENCES for w in s})
    w2i = {w: i for i, w in enumerate(vocab)}
    char_ids = batch_to_char_ids(SENTENCES)
    ids = torch.tensor([[w2i[w] for w in s] + [0] * (char_ids.size(1) - len(s)) for s in SENTENCES])
    model = ElmoBiLM(ElmoConfig.from_preset("elmo_tiny", vocab_size=len(vocab), dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        fwd, bwd = model.lm_loss(char_ids, ids)
        opt.zero_grad()
        (fwd + bwd).backward()
        opt.step()
        if max(fwd.item(), bwd.item()) < math.log(1.2):
            break
    model.eval()
    with torch.no_grad():
        fwd, bwd = model.lm_loss(char_ids, ids)
    assert math.exp(fwd.item()) < 1.5 and math.exp(bwd.item()) < 1.5
