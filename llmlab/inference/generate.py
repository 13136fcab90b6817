"""Autoregressive generation for any causal LM with GPT's interface.

The model must provide ``forward(idx, kv_cache=..., last_only=True) -> (B, 1, V) logits`` and
``config.block_size``; for the KV-cache path also ``new_kv_cache(batch_size)`` (see
:class:`llmlab.models.gpt.GPT`). Models without ``new_kv_cache`` are run without a cache.

Context handling: the model never sees more than its last ``block_size`` tokens. Without a cache
every step re-runs the model on that window. With a cache the prompt window is "prefilled" once
and each step then feeds one token. Once the sequence outgrows ``block_size`` the window slides,
every position shifts and the cache is stale, so from then on each step resets the cache and
re-prefills the last ``block_size`` tokens: slower, but token-for-token what the uncached path
computes.
"""

from __future__ import annotations

import torch

from llmlab.errors import UserError
from llmlab.inference.sampling import sample_next, validate_sampling_args


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    use_kv_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to every row of ``idx`` (B, T0); returns (B, T0 + n).

    Sampling options are those of :func:`llmlab.inference.sampling.sample_next`. With ``eos_id``,
    a row that emitted it is finished and keeps emitting ``eos_id`` while the other rows go on; when
    every row is finished the loop stops early, so ``n`` may be smaller than ``max_new_tokens``
    (always ``n == max_new_tokens`` without ``eos_id``). The model runs in eval mode; each
    submodule's train/eval flag is restored afterwards.
    """
    validate_sampling_args(temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(f"generate() needs a prompt of shape (batch, T0 >= 1), got {tuple(idx.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")

    B, T0 = idx.shape
    block_size = getattr(getattr(model, "config", None), "block_size", None) or T0 + max_new_tokens
    use_kv_cache = use_kv_cache and hasattr(model, "new_kv_cache")
    out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T0] = idx
    n = T0  # tokens in `out` so far
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)

    modes = {m: m.training for m in model.modules()}  # restore exactly, even mixed modes
    model.eval()
    try:
        cache = model.new_kv_cache(B, device=idx.device) if use_kv_cache else None
        for step in range(max_new_tokens):
            window = out[:, max(0, n - block_size) : n]  # the last block_size tokens
            if cache is None:
                logits = model(window, last_only=True)
            elif step == 0 or cache.length >= block_size:
                cache.reset()  # first step, or the window slid: (re-)prefill the whole window
                logits = model(window, kv_cache=cache, last_only=True)
            else:
                logits = model(out[:, n - 1 : n], kv_cache=cache, last_only=True)
            nxt = sample_next(
                logits[:, -1, :],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                greedy=greedy,
                generator=generator,
            )  # (B,)
            if eos_id is not None:
                nxt = nxt.masked_fill(finished, eos_id)
                finished |= nxt == eos_id
            out[:, n] = nxt
            n += 1
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        for m, training in modes.items():
            m.training = training
    return out[:, :n]
