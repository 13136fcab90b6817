"""Beam search with Hugging Face's rules (``transformers`` 5.x ``GenerationMixin._beam_search``).

Same model interface as :func:`llmlab.inference.generate.generate`. Every prompt keeps ``K =
num_beams`` running hypotheses scored by the sum of their tokens' log-softmax. Each step:

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
"""

from __future__ import annotations

import math

import torch

from llmlab.errors import UserError
from llmlab.inference.generate import eval_mode

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
) -> torch.Tensor:
    """Beam-search continuations of ``idx`` (B, T0): returns ``(B * num_return_sequences, T0 + n)``.

    Rows ``b * R .. b * R + R - 1`` are prompt ``b``'s best hypotheses, best first (HF's layout).
    ``n <= max_new_tokens``: the longest returned hypothesis. Prompts must have equal length (no
    ``attention_mask``). With a KV cache the prompt is prefilled once per beam and each step feeds
    one token per beam; when the sequence outgrows the context the window slides and the cache is
    re-prefilled, as in :func:`~llmlab.inference.generate.generate`.
    """
    validate_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(f"beam_search() needs a prompt of shape (batch, T0 >= 1), got {tuple(getattr(idx, 'shape', ()))}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    for name, tok in (("eos_id", eos_id), ("pad_id", pad_id)):
        if tok is not None and (isinstance(tok, bool) or not isinstance(tok, int) or tok < 0):
            raise UserError(f"{name}={tok!r} must be a token id (an integer >= 0) or None")
    B, T0 = idx.shape
    R = num_return_sequences
    if max_new_tokens == 0:
        return idx.repeat_interleave(R, dim=0)

    K = num_beams
    keep = 2 * K  # HF: max(2, 1 + number of eos ids) * num_beams, and we have at most one eos id
    max_len = T0 + max_new_tokens
    fill = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    dev = idx.device

    block_size = getattr(getattr(model, "config", None), "block_size", None) or max_len
    n_virtual = int(getattr(model, "num_virtual_tokens", 0) or 0)
    window_size = block_size - n_virtual
    if window_size < 1:
        raise UserError(f"the model's {n_virtual} virtual tokens (prompt/prefix) fill its whole block_size={block_size}: "
                        "use fewer num_virtual_tokens")
    cache = model.new_kv_cache(B * K, device=dev) if use_kv_cache and hasattr(model, "new_kv_cache") else None

    # running beams and the finished hypotheses, (B, K, max_len); all beams start as the prompt, but
    # only beam 0 is "live" (the others score -1e9) so the first step does not pick K copies
    running = torch.full((B, K, max_len), fill, dtype=torch.long, device=dev)
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

    def next_logits(step: int, n: int) -> torch.Tensor:  # (B*K, V) logits for position n
        flat = running.view(B * K, max_len)
        window = flat[:, max(0, n - window_size) : n]
        if cache is None:
            return model(window, last_only=True)[:, -1]
        if step == 0 or cache.length >= block_size:  # first step, or the window slid: (re-)prefill
            cache.reset()
            return model(window, kv_cache=cache, last_only=True)[:, -1]
        return model(flat[:, n - 1 : n], kv_cache=cache, last_only=True)[:, -1]

    cur = T0
    with eval_mode(model):
        for step in range(max_new_tokens):
            log_probs = torch.log_softmax(next_logits(step, cur).float(), dim=-1)
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

            if cache is not None:  # cache row i must hold the keys/values of running beam i
                cache.reorder((beam_parent + row_offset).view(-1))
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
