"""Reusable neural-network building blocks (plain PyTorch: no Lightning, no Hydra)."""

from llmlab.nn.attention import attention, causal_mask, key_padding_mask
from llmlab.nn.kv_cache import KVCache

__all__ = ["KVCache", "attention", "causal_mask", "key_padding_mask"]
