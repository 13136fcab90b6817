"""Beam search with Hugging Face's rules (``transformers`` 5.x ``GenerationMixin._beam_search``).

Every prompt keeps ``K = num_beams`` running hypotheses scored by the sum of their tokens'
log-softmax. Each step:

1. all ``K * V`` one-token continuations are scored and the best ``2K`` kept (so that, even if the
   best ``K`` all end, ``K`` unfinished ones remain);
2. a continuation that ends (emits ``eos_id``, or reaches ``max_new_tokens``) is a finished
   hypothesis **only if it is among the best K** of the ``2K``; its score is
   ``sum_logprob / generated_len ** length_penalty`` (generated tokens incl. the eos, prompt
   excluded); the ``K`` best finished hypotheses are kept;
3. the best ``K`` continuations that did not end become the running beams (the KV cache rows are
   reordered to follow them).

Stopping (per prompt, then for the whole batch), as HF:

* ``early_stopping=True``: a prompt is done once it has ``K`` finished hypotheses;
* ``early_stopping=False`` (default): a prompt is done once it has ``K`` finished hypotheses and
  the best running beam, scored as if it ended now (``score / cur_gen_len ** length_penalty``),
  cannot beat the worst finished one (a heuristic: with ``length_penalty > 0`` it may be wrong);
* ``early_stopping="never"``: as False, but with ``length_penalty > 0`` the best running beam is
  scored at the longest length it could reach (``max_new_tokens``): the exact test.

A done prompt's finished set no longer changes. The loop ends when every prompt is done or all
continuations ended; the output holds, for each prompt, its ``num_return_sequences`` best finished
hypotheses (best first), padded after their end with ``pad_id`` (default ``eos_id``) to the longest.
(One HF quirk is not copied: HF fills with ``eos_id`` when ``pad_token_id`` is 0, a falsy tensor.)

The search itself (:func:`run_beam_search`) knows nothing about the architecture: it drives a
*step function* object (:class:`BeamSteps`) that turns the running sequences into next-token
logits and keeps its caches in step with the beams. :class:`CausalLMSteps` serves decoder-only
models (GPT: the context is prompt + generated, optionally left-padded);
:class:`llmlab.models.t5.T5Steps` serves T5 (the encoder runs once, the decoder starts from
``decoder_start_token_id``).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from llmlab.errors import UserError
from llmlab.inference.generate import eval_mode
from llmlab.inference.processors import apply_processors, processors_active, validate_processor_args

_NEG = -1.0e9  # HF's "impossible" score: added, not -inf, so the arithmetic matches theirs bit for bit


def validate_beam_args(
    num_beams: int, length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1
) -> None:
    """Raise a one-line :class:`UserError` for a bad beam-search setting."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise UserError(f"num_beams={num_beams!r} must be an integer >= 1 (1 = no beam search)")
    if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise UserError(f"num_return_sequences={num_return_sequences!r} must be an integer >= 1")
    if num_return_sequences > num_beams:
        raise UserError(f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}: "
                        "beam search returns at most its num_beams best hypotheses")
    if (isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float))
            or not math.isfinite(length_penalty)):
        raise UserError(f"length_penalty={length_penalty!r} must be a finite number (>0 favours longer sequences)")
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise UserError(f"early_stopping={early_stopping!r} must be true, false or never")


def check_max_new_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")


SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": None, "top_p": None, "min_p": None, "generator": None}


def check_sampling_options(options: dict) -> None:
    """Beam search is deterministic and, like Hugging Face's ``generate(num_beams>1, do_sample=False)``,
    ignores the sampling options (so ``model.generate(idx, **cfg.generation)`` works with the group's
    sampling values in place); they must still be valid, and an unknown name is a one-line error."""
    from llmlab.inference.sampling import validate_sampling_args

    unknown = sorted(k for k in options if k not in SAMPLING_DEFAULTS)
    if unknown:
        raise UserError(f"unknown generate() option(s) {', '.join(unknown)} for beam search")
    validate_sampling_args(*(options.get(k, SAMPLING_DEFAULTS[k]) for k in ("temperature", "top_k", "top_p", "min_p")))


class BeamSteps(Protocol):
    """What :func:`run_beam_search` needs from an architecture (rows are ``b * K + k``: prompt b, beam k)."""

    model: torch.nn.Module
    start_ids: torch.Tensor  # (B, T0) long: the sequence every beam of a prompt starts from

    def start(self, rows_per_prompt: int) -> None:
        """Set up for ``B * rows_per_prompt`` rows (run an encoder, allocate caches); called once,
        inside eval mode, before the first :meth:`next_logits`."""

    def next_logits(self, seqs: torch.Tensor, step: int) -> torch.Tensor:
        """``(rows, V)`` logits of the token after ``seqs`` (rows, n): all tokens so far, of which
        step ``step`` (0-based) is the newest generation step."""

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` continues old row ``index[i]`` (caches follow the beams)."""

    def context_mask(self, n: int) -> torch.Tensor | None:
        """``(rows, n)`` 1 = token, 0 = padding of the sequences (for the logits processors), or None."""


class CausalLMSteps:
    """A decoder-only LM with GPT's interface (``forward(idx, kv_cache=, last_only=, attention_mask=)``,
    ``config.block_size``, optionally ``new_kv_cache(batch_size)`` and ``num_virtual_tokens``).

    The context is prompt + generated tokens. Without ``attention_mask`` the model sees at most its
    last ``block_size - P`` tokens: with a cache the window is prefilled once and each step feeds
    one token; once the sequence outgrows the window it slides and the cache is re-prefilled every
    step (what the uncached path computes). With ``attention_mask`` (B, T0), 1 = token, 0 = left
    padding, every row is scored as if alone; prompt + ``max_new_tokens`` must fit the context.
    """

    def __init__(self, model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None, use_kv_cache: bool = True) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0:
            shape = tuple(getattr(idx, "shape", ()))
            raise UserError(f"generation needs a prompt of shape (batch, T0 >= 1), got {shape}")
        B, T0 = idx.shape
        self.model, self.start_ids = model, idx
        self.block_size = getattr(getattr(model, "config", None), "block_size", None) or T0 + max_new_tokens
        n_virtual = int(getattr(model, "num_virtual_tokens", 0) or 0)  # prompt/prefix positions before the tokens
        self.window = self.block_size - n_virtual
        if self.window < 1:
            raise UserError(f"the model's {n_virtual} virtual tokens (prompt/prefix) fill its whole "
                            f"block_size={self.block_size}: use fewer num_virtual_tokens")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T0):
                raise UserError(f"attention_mask shape {tuple(attention_mask.shape)} must equal the prompt's {(B, T0)}")
            if T0 + max_new_tokens > self.window:
                raise UserError(f"padded prompts of {T0} tokens + max_new_tokens={max_new_tokens} exceed the model's "
                                f"context of {self.window} tokens: shorten the prompts or generate fewer tokens")
        self.prompt_mask = attention_mask
        self.max_len = T0 + max_new_tokens
        self.use_kv_cache = use_kv_cache and hasattr(model, "new_kv_cache")
        self.cache = self.mask = None

    def start(self, rows_per_prompt: int) -> None:
        B, T0 = self.start_ids.shape
        rows = B * rows_per_prompt
        dev = self.start_ids.device
        self.cache = self.model.new_kv_cache(rows, device=dev) if self.use_kv_cache else None
        if self.prompt_mask is not None:  # the prompt's padding, then ones for every generated token
            self.mask = torch.ones(rows, self.max_len, dtype=torch.long, device=dev)
            self.mask[:, :T0] = self.prompt_mask.repeat_interleave(rows_per_prompt, dim=0)

    def next_logits(self, seqs: torch.Tensor, step: int) -> torch.Tensor:
        n = seqs.size(1)
        model, cache = self.model, self.cache
        if self.mask is not None:  # padded rows: the window never slides (checked in __init__)
            mask = self.mask[:, :n]
            if cache is None:
                return model(seqs, last_only=True, attention_mask=mask)[:, -1]
            new = seqs if step == 0 else seqs[:, -1:]
            return model(new, kv_cache=cache, last_only=True, attention_mask=mask)[:, -1]
        window = seqs[:, max(0, n - self.window):]  # the last block_size - P tokens
        if cache is None:
            return model(window, last_only=True)[:, -1]
        if step == 0 or cache.length >= self.block_size:  # length counts the prefix's P slots
            cache.reset()  # first step, or the window slid: (re-)prefill the whole window (and prefix)
            return model(window, kv_cache=cache, last_only=True)[:, -1]
        return model(seqs[:, -1:], kv_cache=cache, last_only=True)[:, -1]

    def context_mask(self, n: int) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[:, :n]

    def reorder(self, index: torch.Tensor) -> None:
        # the mask needs no reordering: a beam's parent is a beam of the same prompt (same padding)
        if self.cache is not None:
            self.cache.reorder(index)


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_id: int | None = None,
    pad_id: int | None = None,
    *,
    use_kv_cache: bool = True,
    attention_mask: torch.Tensor | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
) -> torch.Tensor:
    """Beam-search continuations of ``idx`` (B, T0) by a decoder-only LM: ``(B * num_return_sequences, T0 + n)``.

    Rows ``b * R .. b * R + R - 1`` are prompt ``b``'s best hypotheses, best first (HF's layout).
    ``n <= max_new_tokens``: the longest returned hypothesis. ``attention_mask`` (B, T0): prompts
    of different lengths, left-padded (HF's ``generate(attention_mask=...)``); see
    :class:`CausalLMSteps` for the context window and the KV cache.
    """
    validate_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences)
    check_max_new_tokens(max_new_tokens)
    steps = CausalLMSteps(model, idx, max_new_tokens, attention_mask=attention_mask, use_kv_cache=use_kv_cache)
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    return run_beam_search(steps, max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences,
                           eos_id=eos_id, fill_id=fill, repetition_penalty=repetition_penalty,
                           no_repeat_ngram_size=no_repeat_ngram_size)


@torch.no_grad()
def run_beam_search(
    steps: BeamSteps,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    *,
    eos_id: int | None = None,
    fill_id: int = 0,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
) -> torch.Tensor:
    """The beam loop over any architecture's ``steps``: ``(B * num_return_sequences, T0 + n)``, where
    ``steps.start_ids`` is (B, T0); hypotheses are padded after their eos with ``fill_id``."""
    validate_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences)
    check_max_new_tokens(max_new_tokens)
    for name, tok in (("eos_id", eos_id), ("pad_id", fill_id)):
        if tok is not None and (isinstance(tok, bool) or not isinstance(tok, int) or tok < 0):
            raise UserError(f"{name}={tok!r} must be a token id (an integer >= 0) or None")
    validate_processor_args(repetition_penalty, no_repeat_ngram_size)
    process = processors_active(repetition_penalty, no_repeat_ngram_size)
    idx = steps.start_ids
    B, T0 = idx.shape
    R = num_return_sequences
    if max_new_tokens == 0:
        return idx.repeat_interleave(R, dim=0)

    K = num_beams
    keep = 2 * K  # HF: max(2, 1 + number of eos ids) * num_beams, and we have at most one eos id
    max_len = T0 + max_new_tokens
    dev = idx.device

    # running beams and the finished hypotheses, (B, K, max_len); all beams start as the prompt, but
    # only beam 0 is "live" (the others score -1e9) so the first step does not pick K copies
    running = torch.full((B, K, max_len), fill_id, dtype=torch.long, device=dev)
    running[:, :, :T0] = idx[:, None, :]
    finished = running.clone()
    running_scores = torch.zeros(B, K, dtype=torch.float, device=dev)
    running_scores[:, 1:] = _NEG
    finished_scores = torch.full((B, K), _NEG, dtype=torch.float, device=dev)
    finished_len = torch.zeros(B, K, dtype=torch.long, device=dev)  # generated tokens of each hypothesis
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=dev)  # slot holds a real finished hypothesis
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)  # prompt not done yet (see the module doc)
    top_k_mask = torch.cat([torch.ones(K, dtype=torch.bool), torch.zeros(keep - K, dtype=torch.bool)]).to(dev)
    row_offset = torch.arange(B, device=dev)[:, None] * K

    cur = T0
    with eval_mode(steps.model):
        steps.start(K)
        for step in range(max_new_tokens):
            seqs = running.view(B * K, max_len)[:, :cur]
            log_probs = torch.log_softmax(steps.next_logits(seqs, step).float(), dim=-1)
            if process:  # HF: processors act on each beam's log-softmax, before the beam score is added
                log_probs = apply_processors(log_probs, seqs, repetition_penalty=repetition_penalty,
                                             no_repeat_ngram_size=no_repeat_ngram_size,
                                             context_mask=steps.context_mask(cur))
            V = log_probs.size(-1)
            if eos_id is not None and eos_id >= V:
                raise UserError(f"eos_id={eos_id} is not in the model's vocabulary of {V} tokens")
            scores = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)

            # 1. the best 2K continuations over all beams
            top_scores, top_idx = torch.topk(scores, keep)
            parent = top_idx // V  # (B, 2K) which running beam each continues
            tokens = top_idx % V
            cand = torch.take_along_dim(running, parent[:, :, None], dim=1)  # (B, 2K, max_len)
            cand[:, :, cur] = tokens
            ended = torch.full_like(tokens, cur + 1 >= max_len, dtype=torch.bool)
            if eos_id is not None:
                ended |= tokens == eos_id

            # 3. the best K that go on become the running beams
            go_on = top_scores + ended.to(torch.float32) * _NEG
            pick = torch.topk(go_on, K)[1]
            running = torch.take_along_dim(cand, pick[:, :, None], dim=1)
            running_scores = torch.take_along_dim(go_on, pick, dim=1)
            beam_parent = torch.take_along_dim(parent, pick, dim=1)

            # 2. new finished hypotheses (ended and among the best K), merged with the kept ones
            gen_len = cur + 1 - T0
            new = ended & top_k_mask[None, :]
            fin = top_scores / (gen_len**length_penalty)
            fin += (is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)).to(torch.float32) * _NEG
            fin += (~improvable).to(torch.float32) * _NEG
            fin += (~new) * _NEG
            merged_scores = torch.cat([finished_scores, fin], dim=1)
            best = torch.topk(merged_scores, K)[1]
            finished = torch.take_along_dim(torch.cat([finished, cand], dim=1), best[:, :, None], dim=1)
            finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
            finished_len = torch.take_along_dim(
                torch.cat([finished_len, torch.full_like(tokens, gen_len)], dim=1), best, dim=1)
            is_finished = torch.take_along_dim(torch.cat([is_finished, new], dim=1), best, dim=1)

            steps.reorder((beam_parent + row_offset).view(-1))  # row i must hold running beam i's state
            cur += 1

            # can a running beam still beat the worst finished hypothesis?
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = max_len - T0
            else:
                best_len = cur - T0
            best_running = running_scores[:, :1] / (best_len**length_penalty)
            worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], _NEG)
            improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
            all_full = bool(is_finished.all()) and early_stopping is True
            if not bool(improvable.any()) or all_full or bool(ended.all()):
                break

    out = finished[:, :R].reshape(B * R, max_len)
    return out[:, : T0 + int(finished_len[:, :R].max())]
