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

A model with a soft prompt or a prefix (``num_virtual_tokens`` = P > 0, see :mod:`llmlab.peft.prompt`)
spends P of its ``block_size`` positions on them, so the token window is ``block_size - P``; the
prefix sits in the first P cache slots, so ``cache.length`` counts it and the slide test is unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

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
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to every row of ``idx`` (B, T0); returns (B, T0 + n).

    ``attention_mask`` (B, T0), 1 = token, 0 = padding: prompts of different lengths, **left**-padded
    (:func:`llmlab.alignment.rollout.left_pad`); each row then generates what it would alone. The
    prompt plus ``max_new_tokens`` must fit the context (no sliding window over padded rows).

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
    n_virtual = int(getattr(model, "num_virtual_tokens", 0) or 0)  # prompt/prefix positions before the tokens
    window_size = block_size - n_virtual
    if window_size < 1:
        raise UserError(
            f"the model's {n_virtual} virtual tokens (prompt/prefix) fill its whole block_size={block_size}: "
            "use fewer num_virtual_tokens"
        )
    use_kv_cache = use_kv_cache and hasattr(model, "new_kv_cache")
    out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T0] = idx
    cache = model.new_kv_cache(B, device=idx.device) if use_kv_cache else None
    if attention_mask is not None:
        if attention_mask.shape != idx.shape:
            raise UserError(f"attention_mask shape {tuple(attention_mask.shape)} must equal the prompt's {tuple(idx.shape)}")
        if T0 + max_new_tokens > window_size:
            raise UserError(f"padded prompts of {T0} tokens + max_new_tokens={max_new_tokens} exceed the model's context "
                            f"of {window_size} tokens: shorten the prompts or generate fewer tokens")
        mask = torch.ones(B, T0 + max_new_tokens, dtype=torch.long, device=idx.device)
        mask[:, :T0] = attention_mask

        def next_logits(step: int, n: int) -> torch.Tensor:  # the window never slides (checked above)
            if cache is None:
                return model(out[:, :n], last_only=True, attention_mask=mask[:, :n])[:, -1]
            new = out[:, :n] if step == 0 else out[:, n - 1 : n]
            return model(new, kv_cache=cache, last_only=True, attention_mask=mask[:, :n])[:, -1]
    else:
        def next_logits(step: int, n: int) -> torch.Tensor:
            window = out[:, max(0, n - window_size) : n]  # the last block_size - P tokens
            if cache is None:
                return model(window, last_only=True)[:, -1]
            if step == 0 or cache.length >= block_size:  # length counts the prefix's P slots
                cache.reset()  # first step, or the window slid: (re-)prefill the whole window (and prefix)
                return model(window, kv_cache=cache, last_only=True)[:, -1]
            return model(out[:, n - 1 : n], kv_cache=cache, last_only=True)[:, -1]

    with eval_mode(model):
        n = decode_loop(next_logits, out, T0, max_new_tokens, eos_id=eos_id, temperature=temperature,
                        top_k=top_k, top_p=top_p, greedy=greedy, generator=generator)
    return out[:, :n]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` in eval mode, then restore every submodule's own train/eval flag."""
    modes = {m: m.training for m in model.modules()}  # restore exactly, even mixed modes
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def decode_loop(
    next_logits: Callable[[int, int], torch.Tensor],
    out: torch.Tensor,
    n: int,
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    fill_id: int | None = None,
    **sampling,
) -> int:
    """Write up to ``max_new_tokens`` tokens into ``out[:, n:]``; returns the new length.

    ``next_logits(step, n)`` gives the ``(B, V)`` logits for position ``n`` (``out[:, :n]`` is
    filled); the token is picked by :func:`~llmlab.inference.sampling.sample_next` with
    ``sampling``. A row that emitted ``eos_id`` is finished and emits ``fill_id`` (default
    ``eos_id``) from then on; the loop stops once every row is finished.
    """
    fill = eos_id if fill_id is None else fill_id
    finished = torch.zeros(out.size(0), dtype=torch.bool, device=out.device)
    for step in range(max_new_tokens):
        nxt = sample_next(next_logits(step, n), **sampling)  # (B,)
        if eos_id is not None:
            nxt = nxt.masked_fill(finished, fill)
            finished |= nxt == eos_id
        out[:, n] = nxt
        n += 1
        if eos_id is not None and bool(finished.all()):
            break
    return n
