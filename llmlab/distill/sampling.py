"""MiniLLM's teacher-mixed sampling (Gu et al., ICLR 2024, §2.2 "Teacher-Mixed Sampling").

Responses are drawn token by token from ``p~ = a p + (1 - a) q_theta`` — the teacher ``p`` mixed into the
student ``q_theta`` with ``a = teacher_mixed_alpha`` (0.2 in the paper) — so early in training, when the
student's own samples are poor, the policy gradient still sees sequences the teacher finds likely (the
paper's fix for reward hacking); :func:`llmlab.distill.losses.importance_weights` corrects for sampling
from ``p~`` instead of ``q_theta``. Both models run with their own KV cache in eval mode, one token per
step after the prompt's prefill (:func:`llmlab.inference.generate.decode_loop`). ``a = 0`` samples the
student alone (pure on-policy), ``a = 1`` the teacher alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.distill.losses import mixed_log_probs
from llmlab.errors import UserError
from llmlab.inference.generate import decode_loop, eval_mode


@torch.no_grad()
def teacher_mixed_sample(student: nn.Module, teacher: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                         teacher_mixed_alpha: float = 0.2, eos_id: int | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, T0 + n)``: each row of ``prompt_ids`` (B, T0; unpadded) continued by up to ``max_new_tokens``
    tokens sampled from the mixture (a finished row repeats ``eos_id``, as in :func:`generate`)."""
    B, T0 = prompt_ids.shape
    for name, m in (("student", student), ("teacher", teacher)):
        if T0 + max_new_tokens > m.config.block_size:
            raise UserError(f"a prompt of {T0} tokens + {max_new_tokens} sampled tokens exceeds the {name}'s context of "
                            f"{m.config.block_size}: use a smaller method.prompt_length / method.response_length")
    out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    out[:, :T0] = prompt_ids
    caches = [m.new_kv_cache(B, device=prompt_ids.device) for m in (student, teacher)]

    def next_logits(step: int, n: int) -> torch.Tensor:
        new = out[:, :n] if step == 0 else out[:, n - 1 : n]  # prefill once, then one token per step
        logq, logp = (F.log_softmax(m(new, kv_cache=c, last_only=True)[:, -1].float(), dim=-1)
                      for m, c in zip((student, teacher), caches))
        return mixed_log_probs(logp, logq, teacher_mixed_alpha)  # log-probs: softmax at T=1 gives p~ itself

    with eval_mode(student), eval_mode(teacher):
        n = decode_loop(next_logits, out, T0, max_new_tokens, eos_id=eos_id, temperature=1.0, top_k=None,
                        top_p=None, greedy=False, generator=generator)
    return out[:, :n]
