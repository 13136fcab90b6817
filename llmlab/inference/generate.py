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

Per-token cost: at batch 1 on small models a decode step is dominated by Python, not arithmetic.
So the arguments are checked once per call (not per step), the output and the cache are allocated
once, and a model offering ``lean_decode_step()`` (GPT) runs its one-token steps through that
closure, which calls the same kernels as ``forward`` on the same tensors (bit-identical logits)
without the module-call and validation overhead.

Decoding options (the names of the ``generation`` config group and of Hugging Face ``generate``):
``repetition_penalty`` and ``no_repeat_ngram_size`` (:mod:`llmlab.inference.processors`, over the
whole context incl. the prompt), then ``temperature``, ``top_k``, ``top_p``, ``min_p``
(:mod:`llmlab.inference.sampling`), or ``greedy``; rows end at ``eos_id`` or at one of
``stop_strings`` (:mod:`llmlab.inference.stopping`, needs ``tokenizer``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from llmlab.errors import UserError
from llmlab.inference.processors import validate_processor_args
from llmlab.inference.sampling import pick_next, validate_sampling_args
from llmlab.inference.stopping import StopStrings, StopTracker


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    greedy: bool = False,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    tokenizer=None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    use_kv_cache: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` tokens to every row of ``idx`` (B, T0); returns (B, T0 + n).

    ``attention_mask`` (B, T0), 1 = token, 0 = padding: prompts of different lengths, **left**-padded
    (:func:`llmlab.alignment.rollout.left_pad`); each row then generates what it would alone (the
    processors ignore the padding). The prompt plus ``max_new_tokens`` must fit the context (no
    sliding window over padded rows).

    Sampling options are those of :func:`llmlab.inference.sampling.sample_next`. With ``eos_id``,
    a row that emitted it is finished and emits ``pad_id`` (default: ``eos_id``) from then on while
    the other rows go on. With ``stop_strings`` (and the ``tokenizer`` that decodes the ids) a row
    whose generated text contains one is finished too and is filled the same way (with 0 when
    there is neither ``pad_id`` nor ``eos_id``): cut its text with
    :meth:`llmlab.inference.stopping.StopStrings.cut`. When every row is finished the loop stops
    early, so ``n`` may be smaller than ``max_new_tokens``. The model runs in eval mode; each
    submodule's train/eval flag is restored afterwards.
    """
    validate_sampling_args(temperature, top_k, top_p, min_p)
    validate_processor_args(repetition_penalty, no_repeat_ngram_size)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(f"generate() needs a prompt of shape (batch, T0 >= 1), got {tuple(idx.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    stop = StopStrings(stop_strings, tokenizer)
    if stop and tokenizer is None:
        raise UserError("generate(stop_strings=...) needs the tokenizer that decodes the ids: pass tokenizer=")

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
    mask = None
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
            if cache is None:
                return model(out[:, max(0, n - window_size) : n], last_only=True)[:, -1]  # the last block_size - P
            if step == 0 or cache.length >= block_size:  # length counts the prefix's P slots
                cache.reset()  # first step, or the window slid: (re-)prefill the whole window (and prefix)
                return model(out[:, max(0, n - window_size) : n], kv_cache=cache, last_only=True)[:, -1]
            if lean is not None:
                return lean(out[:, n - 1 : n], cache)
            return model(out[:, n - 1 : n], kv_cache=cache, last_only=True)[:, -1]

    # inference_mode (not just no_grad) skips autograd's version counters and view tracking on every
    # op; out and the cache were made outside it, so out stays an ordinary tensor for the caller
    with eval_mode(model), torch.inference_mode():
        # built inside eval mode: the fast path exists only for a model without active dropout
        lean = model.lean_decode_step() if cache is not None and mask is None and hasattr(model, "lean_decode_step") \
            else None
        n = decode_loop(next_logits, out, T0, max_new_tokens, eos_id=eos_id, fill_id=pad_id, stop=stop,
                        context_mask=mask, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        greedy=greedy, generator=generator, repetition_penalty=repetition_penalty,
                        no_repeat_ngram_size=no_repeat_ngram_size)
    return out[:, :n]


def run_options(
    idx: torch.Tensor, attention_mask: torch.Tensor | None = None, *, num_samples: int = 1, seed: int | None = None,
    stop_at_eos: bool = True, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Generator | None, bool]:
    """The generation group's run-level keys as ``generate()`` arguments, so that ``model.generate(idx,
    max_new_tokens, **cfg.generation)`` takes the group as it is: ``num_samples`` repeats every
    prompt row (rows ``b * k .. b * k + k - 1`` continue prompt ``b``), ``seed`` seeds a generator
    (unless one is given), ``stop_at_eos=False`` drops the end-of-text stop. Returns ``(idx,
    attention_mask, generator, stop_at_eos)``."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserError(f"num_samples={num_samples!r} must be an integer >= 1")
    if num_samples > 1:
        idx = idx.repeat_interleave(num_samples, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    if seed is not None and generator is None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed={seed!r} must be an integer (or null)")
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    return idx, attention_mask, generator, bool(stop_at_eos)


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
    stop: StopStrings | None = None,
    context_mask: torch.Tensor | None = None,
    **sampling,
) -> int:
    """Write up to ``max_new_tokens`` tokens into ``out[:, n:]``; returns the new length.

    ``next_logits(step, n)`` gives the ``(B, V)`` logits for position ``n`` (``out[:, :n]`` is
    filled); the token is picked by :func:`~llmlab.inference.sampling.pick_next` with
    ``sampling`` (already validated by the caller), whose processors see the context
    ``out[:, :n]`` (``context_mask`` ``(B, >= n)``: 0 = padding). A row that emitted ``eos_id``, or
    whose generated text contains a ``stop`` string, is finished and emits ``fill_id`` (default
    ``eos_id``, else 0) from then on; the loop stops once every row is finished.
    """
    fill = fill_id if fill_id is not None else eos_id if eos_id is not None else 0
    with_context = bool(sampling.get("repetition_penalty") not in (None, 1.0) or sampling.get("no_repeat_ngram_size"))
    tracker = StopTracker(stop, out.size(0)) if stop else None
    track_finished = eos_id is not None or tracker is not None
    finished = torch.zeros(out.size(0), dtype=torch.bool, device=out.device)
    start = n
    for step in range(max_new_tokens):
        logits = next_logits(step, n)
        if with_context:
            sampling["context_ids"] = out[:, :n]
            sampling["context_mask"] = None if context_mask is None else context_mask[:, :n]
        nxt = pick_next(logits, **sampling)  # (B,)
        if track_finished:
            nxt = nxt.masked_fill(finished, fill)
            if eos_id is not None:
                finished |= nxt == eos_id
        out[:, n] = nxt
        n += 1
        if tracker is not None:
            done = tracker.update(out[:, start:n].tolist())
            finished |= torch.tensor(done, device=out.device)
        if track_finished and bool(finished.all()):
            break
    return n
