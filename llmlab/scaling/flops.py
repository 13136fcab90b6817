"""Parameters and training FLOPs of a GPT, counted the way Kaplan et al. (2020) do (§2.1, Table 1).

N is the **non-embedding** parameter count: everything but the token and position embeddings (and
an untied output layer, the "de-embedding"). For a GPT-2 block that is ``12·d²`` per layer plus
biases and LayerNorm gains, ``2·n_layer·d_model·(2·d_attn + d_ff)`` in the paper's notation.

A forward pass costs ``C_forward ≈ 2N + 2·n_layer·n_ctx·d_attn`` FLOPs per token: a multiply-add per
weight, plus the attention scores (``n_ctx`` keys per query: half of the full ``QKᵀ`` and ``AV``
products, which a causal model needs). The backward pass costs twice the forward, so training costs
``C = 6N + 6·n_layer·n_ctx·d_model`` FLOPs per token — the ``C ≈ 6·N·D`` of both papers plus the
attention term, which matters for small models with long contexts (for GPT-2 small it is 10 %).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any


def _fields(config: Any) -> Any:
    return SimpleNamespace(**config) if isinstance(config, Mapping) else config


def gpt_param_counts(config: Any) -> dict[str, int]:
    """Exact parameter counts of :class:`llmlab.models.gpt.GPT` built from ``config`` (a GPTConfig,
    or a dict of its fields): ``params`` (total, a tied output layer counted once) and
    ``params_non_embedding`` (Kaplan's N)."""
    config = _fields(config)
    d, n_layer, bias = int(config.n_embd), int(config.n_layer), bool(getattr(config, "bias", True))
    ln = 2 * d if bias else d  # a LayerNorm: gain (+ bias)
    linear_bias = (3 * d + d + 4 * d + d) if bias else 0  # c_attn, attn c_proj, c_fc, mlp c_proj
    block = 12 * d * d + linear_bias + 2 * ln
    non_embedding = n_layer * block + ln  # + the final LayerNorm
    embedding = (int(config.vocab_size) + int(config.block_size)) * d
    head = 0 if getattr(config, "tie_embeddings", True) else int(config.vocab_size) * d
    return {"params": non_embedding + embedding + head, "params_non_embedding": non_embedding}


def training_flops_per_token(n_params_non_embedding: float, n_layer: int, n_ctx: int, d_model: int) -> float:
    """Kaplan's ``6N + 6·n_layer·n_ctx·d_model``: FLOPs of one training token (forward + backward)."""
    return 6.0 * float(n_params_non_embedding) + 6.0 * n_layer * n_ctx * d_model


def gpt_flops_per_token(config: Any, n_ctx: int | None = None) -> float:
    """Training FLOPs per token of a GPT with sequences of ``n_ctx`` tokens (default: its context)."""
    n, config = gpt_param_counts(config)["params_non_embedding"], _fields(config)
    return training_flops_per_token(n, int(config.n_layer), int(n_ctx or config.block_size), int(config.n_embd))
