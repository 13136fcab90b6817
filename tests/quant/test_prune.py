"""Pruning (llmlab/quant/prune*.py) against torch.nn.utils.prune and against hand computations:
magnitude masks == l1_unstructured / global_unstructured (spec T17), Wanda's per-row |W|·‖X‖₂ ranking
and how it differs from magnitude (T18), head pruning == the heads cut out by hand, Michel & Neubig's
importance == a finite difference of the loss, masks that survive optimizer steps and a Lightning fit,
and Zhu & Gupta's cubic schedule ending at the target."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from llmlab.errors import UserError
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.quant.prune import (
    apply_masks,
    is_pruning_step,
    keep_masks_after_steps,
    magnitude,
    magnitude_global,
    prune_config,
    prune_model,
    remove_masks,
    scheduled_amount,
    sparsity,
    target_layers,
)
from llmlab.quant.prune_heads import head_importance, least_important, prune_heads
from llmlab.quant.prune_wanda import blocks_of, input_norms, row_mask, wanda, wanda_scores


def distinct_linear(out_f: int, in_f: int, seed: int = 0, scale: float = 1.0) -> nn.Linear:
    """A Linear layer whose |weights| are all different (no ties for the k-th smallest)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f)
    values = (torch.randperm(out_f * in_f, generator=g).double() + 1) / (out_f * in_f) * scale
    signs = torch.where(torch.rand(out_f * in_f, generator=g) < 0.5, -1.0, 1.0).double()
    with torch.no_grad():
        layer.weight.copy_((values * signs).view(out_f, in_f).float())
    return layer


def tiny_gpt(seed: int = 0, n_layer: int = 2, n_head: int = 4, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=23, block_size=16, n_layer=n_layer, n_head=n_head, n_embd=32)).to(dtype)


def lm_batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 23, (4, 13), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def gpt_loss(model):
    return lambda batch: model(*batch)[1]


# ---------------------------------------------------------------------------- magnitude (T17)


def test_t17_half_of_a_10x10_layer_and_the_untouched_output_layer():
    model = nn.Sequential(distinct_linear(10, 10, seed=1), nn.ReLU(), distinct_linear(10, 10, seed=2))
    reference = copy.deepcopy(model[0])
    magnitude([("0", model[0])], 0.5)
    assert int((model[0].weight == 0).sum()) == 50  # sparsity 50.00 %
    assert int((model[2].weight == 0).sum()) == 0  # output.weight 0.00 %
    torch_prune.l1_unstructured(reference, name="weight", amount=0.5)
    assert torch.equal(model[0].weight_mask, reference.weight_mask)
    assert torch.equal(model[0].weight, reference.weight)  # weight_orig * weight_mask
    # the pruned layer stays a plain Linear: no weight_orig, the mask is not in the state dict (prune.remove)
    assert set(model[0].state_dict()) == {"weight", "bias"}
    torch_prune.remove(reference, "weight")
    assert not hasattr(reference, "weight_orig")


@pytest.mark.parametrize("amount", [0.0, 0.13, 0.33, 0.5, 0.9])
def test_magnitude_mask_equals_l1_unstructured_at_any_amount(amount):
    layer = distinct_linear(7, 9, seed=3)
    reference = copy.deepcopy(layer)
    magnitude([("l", layer)], amount)
    torch_prune.l1_unstructured(reference, name="weight", amount=amount)
    assert torch.equal(layer.weight_mask, reference.weight_mask)


def test_global_magnitude_equals_global_unstructured():
    layers = [distinct_linear(6, 8, seed=4, scale=0.1), distinct_linear(8, 6, seed=5, scale=1.0),
              distinct_linear(5, 5, seed=6, scale=3.0)]
    references = copy.deepcopy(layers)
    magnitude_global([(str(i), m) for i, m in enumerate(layers)], 0.6)
    torch_prune.global_unstructured([(m, "weight") for m in references], pruning_method=torch_prune.L1Unstructured,
                                    amount=0.6)
    for ours, theirs in zip(layers, references):
        assert torch.equal(ours.weight_mask, theirs.weight_mask)
    total = sum(m.weight.numel() for m in layers)
    assert sparsity([(str(i), m) for i, m in enumerate(layers)]) == round(0.6 * total) / total
    # the small-weight layer loses (much) more than 60 %, the large one less: a global ranking
    assert float((layers[0].weight == 0).float().mean()) > 0.9 > 0.3 > float((layers[2].weight == 0).float().mean())


def test_targets_are_the_block_linears_not_embeddings_or_the_tied_head():
    model = tiny_gpt()
    paths = [p for p, _ in target_layers(model)]
    assert paths == [f"transformer.h.{i}.{leaf}" for i in range(2)
                     for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert [p for p, _ in target_layers(model, ["c_fc"])] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    with pytest.raises(UserError, match=r"prune\.target_modules.*'q_proj'"):
        target_layers(model, ["q_proj"])
    prune_model(model, prune_config({"name": "magnitude", "amount": 0.5}))
    assert model.transformer.wte.weight.eq(0).sum() == 0 and model.transformer.wpe.weight.eq(0).sum() == 0
    assert sparsity(target_layers(model)) == 0.5


def test_bad_configs_are_one_line():
    with pytest.raises(UserError, match=r"prune.amount=1.0 is not a fraction in \[0, 1\)"):
        prune_config({"name": "magnitude", "amount": 1.0})
    with pytest.raises(UserError, match="has no key amout"):
        prune_config({"name": "wanda", "amout": 0.5})
    with pytest.raises(UserError, match="not a pruning method"):
        prune_config({"name": "sparsegpt"})
    assert prune_config({"name": "none"}) is None and prune_config(None) is None


# ---------------------------------------------------------------------------- Wanda (T18)


def test_t18_wanda_ranks_each_row_by_weight_times_input_norm():
    torch.manual_seed(0)
    layer = distinct_linear(6, 8, seed=7)
    x = torch.randn(3, 5, 8) * torch.tensor([0.1, 5.0, 1.0, 0.3, 8.0, 0.05, 2.0, 1.0])  # very different feature norms
    norms = input_norms(layer, [("l", layer)], [x], lambda b: layer(b).sum())["l"]
    by_hand = x.reshape(-1, 8).norm(dim=0)  # ‖X_j‖₂ over all 15 tokens
    torch.testing.assert_close(norms, by_hand)
    scores = layer.weight.detach().abs() * by_hand[None, :]
    torch.testing.assert_close(wanda_scores(layer.weight, norms), scores)
    magnitude_mask = (layer.weight.abs() > layer.weight.abs().reshape(-1).kthvalue(24).values).float()
    wanda(layer, [("l", layer)], 0.5, [x], lambda b: layer(b).sum())
    for i in range(6):  # per output row: exactly the 4 lowest |W_ij|·‖X_j‖ are gone
        kept = set(torch.nonzero(layer.weight_mask[i]).flatten().tolist())
        assert kept == set(torch.argsort(scores[i], descending=True)[:4].tolist())
    assert torch.equal(layer.weight_mask.sum(1), torch.full((6,), 4.0))
    assert not torch.equal(layer.weight_mask, magnitude_mask)  # not what magnitude pruning keeps


def test_wanda_keeps_the_small_weights_of_a_large_norm_input():
    layer = distinct_linear(5, 6, seed=8)
    with torch.no_grad():
        layer.weight[:, 0] *= 1e-3  # column 0 holds the smallest weights of every row ...
    x = torch.randn(64, 6)
    x[:, 0] *= 1e4  # ... but its input is huge (an outlier feature)
    by_magnitude = copy.deepcopy(layer)
    magnitude([("l", by_magnitude)], 0.5)
    wanda(layer, [("l", layer)], 0.5, [x], lambda b: layer(b).sum())
    assert torch.all(layer.weight[:, 0] != 0)  # Wanda keeps the whole column
    assert torch.all(by_magnitude.weight[:, 0] == 0)  # magnitude pruning removes it
    assert row_mask(torch.tensor([[3.0, 1.0, 2.0, 0.5]]), 0.5).tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_wanda_on_gpt_is_sequential_block_by_block_and_exact_per_row():
    model, batches = tiny_gpt(), lm_batches()
    layers = target_layers(model)
    assert [[p for p, _ in g] for g in blocks_of(layers)] == [[p for p, _ in layers[:4]], [p for p, _ in layers[4:]]]
    sequential, one_pass = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(sequential, prune_config({"name": "wanda", "amount": 0.5}), batches, gpt_loss(sequential))
    prune_model(one_pass, prune_config({"name": "wanda", "amount": 0.5, "sequential": False}), batches, gpt_loss(one_pass))
    for (_, a), (_, b) in zip(target_layers(sequential), target_layers(one_pass)):
        assert torch.equal(a.weight.eq(0).sum(1), torch.full((a.out_features,), a.in_features // 2))
    first, second = target_layers(sequential), target_layers(one_pass)
    assert all(torch.equal(a.weight_mask, b.weight_mask) for (_, a), (_, b) in zip(first[:4], second[:4]))  # block 0: same inputs
    assert not all(torch.equal(a.weight_mask, b.weight_mask) for (_, a), (_, b) in zip(first[4:], second[4:]))  # block 1 saw pruned inputs


# ---------------------------------------------------------------------------- attention heads


def attention_by_hand(attn, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """Causal self-attention that uses only ``heads`` (the others cut out), from the weights."""
    B, T, C = x.shape
    hs = C // attn.n_head
    W, b = attn.c_attn.weight, attn.c_attn.bias
    out = attn.c_proj.bias.expand(B, T, C).clone()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for h in heads:
        rows = [slice(i * C + h * hs, i * C + (h + 1) * hs) for i in range(3)]
        q, k, v = (x @ W[r].T + b[r] for r in rows)  # (B, T, hs)
        scores = (q @ k.transpose(1, 2) / math.sqrt(hs)).masked_fill(~causal, float("-inf"))
        y = scores.softmax(-1) @ v  # (B, T, hs)
        out = out + y @ attn.c_proj.weight[:, h * hs:(h + 1) * hs].T
    return out


def test_pruned_heads_contribute_exactly_nothing():
    model = tiny_gpt(n_layer=2, n_head=4)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(model.transformer.h[0].attn(x), attention_by_hand(dense.transformer.h[0].attn, x, [0, 1, 2, 3]))
    prune_heads(model, {0: [1, 3], 1: [0]})
    torch.testing.assert_close(model.transformer.h[0].attn(x), attention_by_hand(dense.transformer.h[0].attn, x, [0, 2]))
    torch.testing.assert_close(model.transformer.h[1].attn(x), attention_by_hand(dense.transformer.h[1].attn, x, [1, 2, 3]))
    attn = model.transformer.h[0].attn
    assert attn.c_proj.weight[:, 8:16].eq(0).all() and attn.c_proj.weight[:, 24:32].eq(0).all()
    assert attn.c_attn.weight[32 + 8:32 + 16].eq(0).all() and attn.c_attn.bias[64 + 24:64 + 32].eq(0).all()  # k of 1, v of 3
    assert attn.c_attn.weight[:8].ne(0).all()
    ids = torch.randint(0, 23, (2, 9))
    assert not torch.allclose(model(ids), dense(ids))


def test_head_importance_is_the_gradient_of_the_loss_wrt_a_head_gate():
    model = tiny_gpt(n_layer=2, n_head=4, dtype=torch.float64)
    (batch,) = lm_batches(1)
    importance = head_importance(model, [batch], gpt_loss(model), normalize_by_layer=False)

    def loss_with_gate(layer: int, head: int, xi: float) -> float:
        m = copy.deepcopy(model)
        with torch.no_grad():  # scaling the head's c_proj columns == a gate on its output
            m.transformer.h[layer].attn.c_proj.weight[:, head * 8:(head + 1) * 8] *= xi
        return float(m(*batch)[1].detach())

    eps = 1e-5
    for layer in range(2):
        for head in range(4):
            fd = (loss_with_gate(layer, head, 1 + eps) - loss_with_gate(layer, head, 1 - eps)) / (2 * eps)
            assert importance[layer, head].item() == pytest.approx(abs(fd), rel=1e-5, abs=1e-9)
    normalized = head_importance(model, [batch], gpt_loss(model))
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(2, dtype=normalized.dtype))
    assert not any(p.grad is not None for p in model.parameters())  # only the gates got gradients


def test_head_pruning_removes_the_least_important_fraction_of_all_heads():
    imp = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.05, 0.7]])
    assert least_important(imp, 0.25) == {0: [1], 1: [2]}
    assert least_important(imp, 0.5) == {0: [1, 3], 1: [0, 2]}
    model, batches = tiny_gpt(), lm_batches()
    stats = prune_model(model, prune_config({"name": "heads", "amount": 0.5}), batches, gpt_loss(model))
    assert stats["prune/heads_pruned"] == 4.0 and stats["prune/sparsity"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------- masks survive training


def test_sparsity_survives_adamw_steps_even_after_dense_training():
    model, batches = tiny_gpt(), lm_batches(6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for batch in batches[:3]:  # dense steps first: Adam's moments of soon-pruned weights are nonzero
        opt.zero_grad()
        model(*batch)[1].backward()
        opt.step()
    prune_model(model, prune_config({"name": "magnitude", "amount": 0.5}))
    keep_masks_after_steps(model, [opt])
    zeros = {p: layer.weight.eq(0).clone() for p, layer in target_layers(model)}
    before = {p: layer.weight.detach().clone() for p, layer in target_layers(model)}
    for batch in batches[3:]:
        opt.zero_grad()
        model(*batch)[1].backward()
        opt.step()
    for path, layer in target_layers(model):
        assert torch.equal(layer.weight.eq(0), zeros[path]), path  # exactly the pruned weights are zero
        assert not torch.equal(layer.weight, before[path])  # the others trained
        assert layer.weight.grad[zeros[path]].eq(0).all()  # pruned weights get no gradient
    remove_masks(model)
    assert not hasattr(model.transformer.h[0].attn.c_attn, "weight_mask")
    apply_masks(model)  # nothing left to apply


def test_cubic_schedule_reaches_the_target_at_the_end():
    cfg = prune_config({"name": "magnitude", "amount": 0.8, "schedule": "iterative", "begin_step": 10,
                        "end_step": 50, "every_n_steps": 10})
    assert scheduled_amount(5, cfg, 100) == 0.0
    assert scheduled_amount(10, cfg, 100) == 0.0
    assert scheduled_amount(30, cfg, 100) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)  # Zhu & Gupta eq. 1
    assert scheduled_amount(50, cfg, 100) == scheduled_amount(90, cfg, 100) == 0.8
    assert [s for s in range(101) if is_pruning_step(s, cfg, 100)] == [10, 20, 30, 40, 50]
    linear = {**cfg, "ramp": "linear", "end_step": None, "initial_amount": 0.2}
    assert scheduled_amount(55, linear, 100) == pytest.approx(0.2 + 0.6 * 0.5)
    assert is_pruning_step(100, {**linear, "every_n_steps": 7}, 100)  # the ramp's last step always prunes


class _LM(L.LightningModule):
    """The smallest module the Pruning callback needs: ``.model`` and ``model_step(batch).loss``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def model_step(self, batch):
        from llmlab.methods.base import Step

        return Step(self.model(*batch)[1], 1)

    def training_step(self, batch, batch_idx):
        return self.model_step(batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class _Data(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


@pytest.mark.parametrize("method", ["wanda", "heads"])
def test_iterative_pruning_in_a_lightning_fit_ends_at_the_target(method, tmp_path):
    from llmlab.quant.prune_callback import Pruning

    batches = lm_batches(12)
    module = _LM(tiny_gpt())
    cfg = prune_config({"name": method, "amount": 0.5, "schedule": "iterative", "every_n_steps": 4,
                        "calibration_batches": 2})
    seen = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(round(sparsity(callback.layers), 4))

    callback = Pruning(cfg)
    trainer = L.Trainer(max_steps=12, callbacks=[callback, Watch()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_Data(batches))
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(0.5)  # 0 at the start, the target at the last step
    assert seen == sorted(seen) and len(set(seen)) >= 3  # a ramp, not one jump
    assert callback.metrics["prune/sparsity"] == pytest.approx(0.5)
    assert trainer.callback_metrics["train/sparsity"] == pytest.approx(0.5)
