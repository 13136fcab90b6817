"""Batched sampling from a causal-LM policy and the log-probabilities of what it sampled.

What SFT evaluation (exact match), preference-data generation and PPO rollouts share (InstructGPT,
Ouyang et al. 2022 §3.5; the seed's bugs of spec seed000_part2 §10.4 item 8 avoided): prompts of
different lengths are **left**-padded, so every response starts at the same column and no padding
sits between a prompt and its response; the model reads an ``attention_mask`` so a padded row
computes what it would alone (positions count real tokens only). Generation runs in eval mode with
the KV cache. A response ends at its first EOS, which belongs to the response (the model must learn
to stop); everything after it is padding, outside ``response_mask``.

Shapes: ``N`` rows = prompts x ``num_samples`` (the samples of one prompt adjacent), ``Tp`` padded
prompt length, ``Tr`` response length (the longest response of the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.data.tokenizers import pad_id
from llmlab.errors import UserError
from llmlab.inference.generate import eval_mode, generate


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``, both ``(B, T_max)``: each sequence right-aligned, ``pad_id`` / 0 on its left."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise UserError("left_pad needs at least one sequence and no empty one: every prompt must encode to a token")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.as_tensor(s, dtype=torch.long, device=device)
        mask[b, width - len(s):] = 1
    return ids, mask


@dataclass
class Completions:
    """Sampled responses (see the module docstring for shapes)."""

    prompt_ids: torch.Tensor  # (N, Tp) left-padded
    prompt_mask: torch.Tensor  # (N, Tp)
    response_ids: torch.Tensor  # (N, Tr) padded with the pad id after EOS
    response_mask: torch.Tensor  # (N, Tr) 1 up to and including the first EOS
    texts: list[str]  # the decoded responses, EOS and padding stripped
    prompt_index: list[int]  # row -> index of its prompt


def response_mask_of(response_ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``(N, Tr)`` 1 for every token up to and including the first ``eos_id`` of the row."""
    if eos_id is None:
        return torch.ones_like(response_ids)
    is_eos = (response_ids == eos_id).long()
    before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before each position
    return (before == 0).long()


@torch.no_grad()
def complete(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int, num_samples: int = 1,
             greedy: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, prompt_ids: list[list[int]] | None = None) -> Completions:
    """Sample ``num_samples`` responses to every prompt (already rendered by a template) in one batch.

    ``prompt_ids``: the prompts' token ids when the caller has them (else ``tokenizer.encode``)."""
    if num_samples < 1:
        raise UserError(f"num_samples={num_samples}: use 1 or more")
    model = getattr(model, "_orig_mod", model)
    device = next(model.parameters()).device
    encoded = prompt_ids if prompt_ids is not None else [tokenizer.encode(p) for p in prompts]
    rows = [ids for ids in encoded for _ in range(num_samples)]
    index = [i for i in range(len(encoded)) for _ in range(num_samples)]
    pad, eos = pad_id(tokenizer), getattr(tokenizer, "eos_id", None)
    ids, mask = left_pad(rows, pad, device=device)
    out = generate(model, ids, int(max_new_tokens), temperature=temperature, top_k=top_k, top_p=top_p,
                   greedy=greedy, eos_id=eos, generator=generator, attention_mask=mask)
    response = out[:, ids.size(1):]
    if response.size(1) == 0:
        response = torch.full((len(rows), 1), pad, dtype=torch.long, device=device)
        response_mask = torch.zeros_like(response)
    else:
        response_mask = response_mask_of(response, eos)
        response = response.masked_fill(response_mask == 0, pad)
    texts = [tokenizer.decode([t for t, keep in zip(r, m) if keep and t != eos])
             for r, m in zip(response.tolist(), response_mask.tolist())]
    return Completions(ids, mask, response, response_mask, texts, index)


@dataclass
class ResponseOutput:
    """The model's view of its responses: ``logits`` (N, Tr, V) predicting each response token,
    ``hidden`` (N, Tr, C) the final hidden states at those positions (what a value head reads),
    ``logp`` (N, Tr) the log-probability of each response token (0 outside ``response_mask``)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    logp: torch.Tensor


def forward_response(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     response_ids: torch.Tensor, response_mask: torch.Tensor) -> ResponseOutput:
    """One forward pass over ``[prompt; response]`` (with gradients if enabled): the logits, hidden
    states and token log-probs of the response positions. The state at position ``t`` predicts token
    ``t + 1``, so the response is read from the last prompt column to the second-to-last column."""
    gpt = getattr(model, "_orig_mod", model)
    ids = torch.cat([prompt_ids, response_ids], dim=1)  # (N, Tp + Tr)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    Tp, Tr = prompt_ids.size(1), response_ids.size(1)
    hidden = gpt.encode(ids, attention_mask=mask)[:, Tp - 1 : Tp + Tr - 1]  # (N, Tr, C)
    logits = gpt.lm_head(hidden).float()  # (N, Tr, V)
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, response_ids[..., None]).squeeze(-1)  # (N, Tr)
    return ResponseOutput(logits, hidden, logp * response_mask.to(logp.dtype))


@torch.no_grad()
def response_logprobs(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``(N, Tr)`` log-probabilities of the response tokens under ``model`` in eval mode (no dropout:
    a frozen reference and the rollout's old policy must not be noisy), 0 outside the mask."""
    with eval_mode(model):
        return forward_response(model, prompt_ids, prompt_mask, response_ids, response_mask).logp
