"""GloVe model: weighting function, loss by hand, gradients, convergence on an exact low-rank target."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from llmlab.models.glove import GloVe, GloVeConfig, glove_weight


def set_params(model: GloVe, W, Wt, b, bt) -> None:
    with torch.no_grad():
        model.w.weight.copy_(torch.tensor(W, dtype=torch.float64))
        model.w_tilde.weight.copy_(torch.tensor(Wt, dtype=torch.float64))
        model.b.weight.copy_(torch.tensor(b, dtype=torch.float64)[:, None])
        model.b_tilde.weight.copy_(torch.tensor(bt, dtype=torch.float64)[:, None])


W = [[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6]]
WT = [[0.7, 0.0], [-0.1, 0.2], [0.25, -0.3]]
B = [0.05, -0.1, 0.2]
BT = [0.0, 0.3, -0.15]
# the non-zero entries of a 3x3 co-occurrence matrix
I, J, X = [0, 0, 1, 1, 2, 2, 0], [0, 1, 0, 2, 1, 2, 2], [3.0, 1.0, 150.0, 0.5, 42.0, 100.0, 7.25]


def hand_loss(log_offset=0.0, x_max=100.0, alpha=0.75):
    total = 0.0
    for i, j, x in zip(I, J, X):
        pred = sum(W[i][k] * WT[j][k] for k in range(2)) + B[i] + BT[j]
        weight = min(1.0, (x / x_max) ** alpha)
        total += 0.5 * weight * (pred - math.log(x + log_offset)) ** 2
    return total


def tiny(sparse=True, dtype=torch.float64):
    model = GloVe(GloVeConfig(3, 2), sparse=sparse).to(dtype)
    set_params(model, W, WT, B, BT)
    return model


def test_weighting_function():
    x = torch.tensor([0.0, 1.0, 50.0, 100.0, 200.0, 1e6])
    f = glove_weight(x)
    assert f[0] == 0
    assert f[1] == pytest.approx(0.01**0.75) and f[1] == pytest.approx(0.0316, abs=1e-4)
    assert f[2] == pytest.approx(0.5946, abs=1e-4)
    assert f[3] == 1 and f[4] == 1 and f[5] == 1
    grid = torch.linspace(0, 300, 1001)
    fg = glove_weight(grid)
    assert (fg.diff() >= 0).all() and fg.max() == 1
    assert glove_weight(torch.tensor([10.0]), x_max=10.0, alpha=0.5) == 1
    assert glove_weight(torch.tensor([2.5]), x_max=10.0, alpha=0.5) == pytest.approx(0.5)


def test_loss_matches_hand_computation():
    model = tiny()
    i, j, x = torch.tensor(I), torch.tensor(J), torch.tensor(X, dtype=torch.float64)
    assert model.loss(i, j, x).item() == pytest.approx(hand_loss(), rel=1e-12)
    # log_offset=1: the seed's log(X + 1) target
    assert model.loss(i, j, x, log_offset=1.0).item() == pytest.approx(hand_loss(log_offset=1.0), rel=1e-12)
    assert hand_loss(log_offset=1.0) != pytest.approx(hand_loss())
    assert model.loss(i, j, x, x_max=10.0, alpha=0.5).item() == pytest.approx(hand_loss(x_max=10.0, alpha=0.5), rel=1e-12)
    # it is a sum over entries: the loss of the batch is the sum of the losses of single entries
    parts = sum(model.loss(i[k : k + 1], j[k : k + 1], x[k : k + 1]).item() for k in range(len(I)))
    assert parts == pytest.approx(hand_loss(), rel=1e-12)


def test_predict_and_batch_of_one():
    model = tiny()
    p = model.predict(torch.tensor([1]), torch.tensor([2]))
    assert p.shape == (1,)
    assert p.item() == pytest.approx(0.3 * 0.25 + 0.4 * -0.3 - 0.1 - 0.15)
    assert model.predict(torch.tensor(1), torch.tensor(2)).shape == ()
    assert model.predict(torch.tensor([[0, 1]]), torch.tensor([[2, 2]])).shape == (1, 2)
    loss = model.loss(torch.tensor([1]), torch.tensor([2]), torch.tensor([0.5], dtype=torch.float64))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()  # a single entry trains


@pytest.mark.parametrize("sparse", [True, False])
def test_gradient_of_one_entry(sparse):
    model = tiny(sparse=sparse)
    i, j, x = 2, 1, 42.0
    model.loss(torch.tensor([i]), torch.tensor([j]), torch.tensor([x], dtype=torch.float64)).backward()
    pred = sum(W[i][k] * WT[j][k] for k in range(2)) + B[i] + BT[j]
    fdiff = min(1.0, (x / 100.0) ** 0.75) * (pred - math.log(x))  # d/dpred of ½·f·diff²

    def dense(p):
        assert p.grad.is_sparse == sparse
        return p.grad.to_dense() if sparse else p.grad

    gw, gwt, gb, gbt = (dense(t.weight) for t in (model.w, model.w_tilde, model.b, model.b_tilde))
    expected_w = torch.zeros(3, 2, dtype=torch.float64)
    expected_w[i] = fdiff * torch.tensor(WT[j], dtype=torch.float64)
    expected_wt = torch.zeros(3, 2, dtype=torch.float64)
    expected_wt[j] = fdiff * torch.tensor(W[i], dtype=torch.float64)
    assert torch.allclose(gw, expected_w, atol=1e-14)
    assert torch.allclose(gwt, expected_wt, atol=1e-14)
    assert torch.allclose(gb[:, 0], torch.eye(3, dtype=torch.float64)[i] * fdiff, atol=1e-14)
    assert torch.allclose(gbt[:, 0], torch.eye(3, dtype=torch.float64)[j] * fdiff, atol=1e-14)


def test_vectors_and_init():
    model = tiny()
    Wt, Wtt = torch.tensor(W, dtype=torch.float64), torch.tensor(WT, dtype=torch.float64)
    assert torch.allclose(model.vectors(), Wt + Wtt)
    assert torch.allclose(model.vectors("sum"), Wt + Wtt)
    assert torch.allclose(model.vectors("mean"), (Wt + Wtt) / 2)
    assert torch.allclose(model.vectors("w"), Wt)
    with pytest.raises(ValueError):
        model.vectors("concat")
    with pytest.raises(ValueError):
        GloVeConfig(10, init="xavier")

    torch.manual_seed(0)
    d = 50
    paper = GloVe(GloVeConfig(200, d))
    seed = GloVe(GloVeConfig(200, d, init="seed"), sparse=False)
    for table in ("w", "w_tilde", "b", "b_tilde"):
        a = getattr(paper, table).weight
        assert a.abs().max() <= 0.5 / d and a.abs().max() > 0.4 / d
        s = getattr(seed, table).weight
        assert s.abs().max() <= 0.5 and s.abs().max() > 0.4
        assert getattr(paper, table).sparse and not getattr(seed, table).sparse
    assert paper.num_params() == 2 * 200 * d + 2 * 200


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch.optim.Adagrad, sparse path
def test_converges_on_exact_low_rank_log_cooccurrence():
    torch.manual_seed(0)
    V, d = 30, 4
    A, Bm = torch.randn(V, d) * 0.5, torch.randn(V, d) * 0.5
    bias_i, bias_j = torch.rand(V) + 2.0, torch.rand(V) + 2.0
    logX = A @ Bm.T + bias_i[:, None] + bias_j[None, :]  # exact rank <= d plus biases
    i, j = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
    i, j, x = i.reshape(-1), j.reshape(-1), logX.exp().reshape(-1)
    assert x.min() > 0 and (x < 100).any() and (x > 100).any()  # both branches of f are used

    def train(model, opt, steps):
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = model.loss(i, j, x)
            loss.backward()
            opt.step()
            losses.append(loss.item() / len(x))
        with torch.no_grad():
            return losses[0], model.loss(i, j, x).item() / len(x)

    # dense parameters + Adam (the seed's optimiser) reach the exact solution
    model = GloVe(GloVeConfig(V, d), sparse=False)
    first, final = train(model, torch.optim.Adam(model.parameters(), lr=0.1), 800)
    assert first > 0.5
    assert final < 1e-3, final
    # sparse gradients + AdaGrad with glove.c's accumulators starting at 1 (the paper's recipe) train too
    torch.manual_seed(1)
    model = GloVe(GloVeConfig(V, d), sparse=True)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.5, initial_accumulator_value=1.0)
    first, final = train(model, opt, 150)
    assert first > 0.5 and final < 0.05, (first, final)


def glove_c_update(model, i, j, x, eta, x_max=100.0, alpha=0.75):
    """glove.c's inner loop for one entry, transcribed scalar by scalar (the reference for adagrad_step)."""
    W, Wt, b, bt = model.w.weight, model.w_tilde.weight, model.b.weight, model.b_tilde.weight
    d = W.shape[1]
    diff = sum(W[i, k] * Wt[j, k] for k in range(d)) + b[i, 0] + bt[j, 0] - math.log(x)
    fdiff = (1.0 if x > x_max else (x / x_max) ** alpha) * diff
    cost = 0.5 * fdiff * diff
    fdiff *= eta
    for k in range(d):
        temp1, temp2 = fdiff * Wt[j, k], fdiff * W[i, k]
        W[i, k] -= temp1 / math.sqrt(model.gradsq_w[i, k])
        Wt[j, k] -= temp2 / math.sqrt(model.gradsq_w_tilde[j, k])
        model.gradsq_w[i, k] += temp1 * temp1
        model.gradsq_w_tilde[j, k] += temp2 * temp2
    b[i, 0] -= fdiff / math.sqrt(model.gradsq_b[i, 0])
    bt[j, 0] -= fdiff / math.sqrt(model.gradsq_b_tilde[j, 0])
    model.gradsq_b[i, 0] += fdiff * fdiff
    model.gradsq_b_tilde[j, 0] += fdiff * fdiff
    return float(cost)


def test_fused_adagrad_step_equals_glove_c():
    torch.manual_seed(0)
    fused = GloVe(GloVeConfig(12, 4), sparse=False).double()
    fused.init_adagrad_state()
    ref = copy.deepcopy(fused)
    # distinct rows per side within a batch (glove.c visits entries one by one), several steps
    for step in range(3):
        i, j = torch.randperm(12)[:5], torch.randperm(12)[:5]
        x = torch.tensor([0.5, 3.0, 40.0, 150.0, 1.0], dtype=torch.float64) * (step + 1)
        cost = fused.adagrad_step(i, j, x, eta=0.05)
        with torch.no_grad():
            expected = sum(glove_c_update(ref, int(a), int(c), float(v), 0.05) for a, c, v in zip(i, j, x))
        assert cost == pytest.approx(expected, rel=1e-12)
    for (name, p), q in zip(fused.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12), name
    assert (fused.gradsq_w > 1).any() and "gradsq_w" in fused.state_dict()  # checkpointed with the weights


def test_learns_planted_clusters():
    """Sentences each drawn from one of 4 clusters of 8 words: after glove.c's AdaGrad on their
    co-occurrences, every word's nearest neighbour (W + W̃) is in its own cluster."""
    import numpy as np
    import torch.nn.functional as F

    from llmlab.data.words import cooccurrence

    n_clusters, size, n_sent, length = 4, 8, 400, 8
    g = torch.Generator().manual_seed(0)
    sentences = torch.randint(0, n_clusters, (n_sent, 1), generator=g) * size + torch.randint(0, size, (n_sent, length), generator=g)
    ids = sentences.reshape(-1).numpy()
    sent = np.repeat(np.arange(n_sent), length)
    i, j, x = cooccurrence(ids, sent, n_clusters * size, window=3)
    torch.manual_seed(0)
    model = GloVe(GloVeConfig(n_clusters * size, 16), sparse=False).double()
    model.init_adagrad_state()
    costs = []
    for epoch in range(50):
        perm = torch.randperm(len(x), generator=g)
        costs.append(sum(model.adagrad_step(i[p], j[p], x[p], eta=0.05, x_max=10.0) for p in perm.split(64)))
    assert costs[-1] < 0.2 * costs[0]
    vec = F.normalize(model.vectors("sum").detach(), dim=-1)
    sim = vec @ vec.T
    sim.fill_diagonal_(-2)
    words = torch.arange(n_clusters * size)
    assert (sim.argmax(-1) // size == words // size).float().mean() >= 0.95
