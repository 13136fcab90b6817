"""Speculative decoding: a small draft model proposes, the target model verifies.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding"
(ICML; Algorithm 1, §3.1 "standardized sampling", §3.3-3.5 the expected number of tokens and the
wall-time speed-up) and Chen et al. 2023, "Accelerating Large Language Model Decoding with
Speculative Sampling" (Algorithm 2, the same rule). Notation of Leviathan: ``p`` = target, ``q`` =
draft, both after the *same* logits processing (:func:`llmlab.inference.sampling.warp_logits`).

One iteration, with the sequence so far ``prefix``:

1. the draft samples ``x_1 .. x_γ`` autoregressively, ``x_i ~ q_i``; the full ``q_i`` vectors are kept
   (recomputing them would cost a forward each and, with top-k on one side only, change them);
2. **one** target forward over ``prefix + x_1..x_γ`` (with its KV cache: only the new tokens are
   fed) gives ``p_1 .. p_{γ+1}``, where ``p_i`` is the target's distribution of the token at
   position ``|prefix| + i``, i.e. the logits at the position *before* it;
3. ``x_i`` is accepted when ``r_i < p_i(x_i) / q_i(x_i)``, ``r_i ~ U(0, 1)``; ``n`` = number of
   leading acceptances;
4. if ``n < γ`` the token after them is drawn from the residual ``norm(max(0, p_{n+1} - q_{n+1}))``,
   else a bonus token from ``p_{γ+1}``. The iteration emits ``x_1..x_n`` and that token (1 to γ+1
   tokens); both KV caches are rolled back (:meth:`KVCache.truncate`) to the accepted length.

Every emitted token is then distributed exactly as if sampled from the target alone (Leviathan
Theorem 3.5 / Appendix A.1). Greedy (``temperature == 0`` or ``greedy=True``): accept iff
``x_i == argmax p_i`` and emit ``argmax p_{n+1}``: the output equals the target's greedy decoding.

Theory (Leviathan §3.3-3.5): per-token acceptance ``β = Σ_x min(p(x), q(x)) = 1 − TV(p, q)``,
``α = E[β]``; expected tokens per iteration ``(1 − α^{γ+1}) / (1 − α)``; wall-time speed-up
``(1 − α^{γ+1}) / ((1 − α)(γc + 1))`` with ``c`` = cost(draft forward) / cost(target forward).

Cache bookkeeping (batch size 1): the target's cache always holds every token but the last one
(that one is fed with the next drafts). The draft's cache holds at most that much: after an
iteration that accepted all γ drafts it has not seen ``x_γ`` nor the bonus token, so the next
iteration feeds the draft every token it has not seen (two then, the whole prompt at first).
Positions come from the caches, so no window ever slides: ``prompt + max_new_tokens`` must fit the
smaller ``block_size`` (checked up front). The last iteration drafts fewer tokens so that
``max_new_tokens`` is never overshot.

Not copied from the seed (spec/seed000_part3.md §3.2): its swapped p/q names and off-by-one
``target_probs[:, pos]``, its non-causal models, its re-computed q without top-k, batch element 0
only, division by zero at temperature 0, overshooting ``max_length``, and ``effective_speedup =
drafted / target_calls`` (always γ): we report tokens per target call and measured time instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from llmlab.errors import UserError
from llmlab.inference.generate import eval_mode
from llmlab.inference.sampling import validate_sampling_args, warp_logits


# ----------------------------------------------------------------------------- theory (Leviathan §3.3-3.5)
def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha={alpha!r} must be an acceptance probability in [0, 1]")


def validate_gamma(gamma, name: str = "gamma") -> None:
    """γ = drafted tokens per iteration: an integer >= 1."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise UserError(f"{name}={gamma!r} must be an integer >= 1 (draft tokens proposed per target call)")


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens emitted per iteration (per target call): ``(1 − α^{γ+1}) / (1 − α)``."""
    _check_alpha(alpha)
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 0:
        raise UserError(f"gamma={gamma!r} must be an integer >= 0")
    if alpha == 1.0:  # the limit: every draft accepted, plus the bonus token
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speedup(alpha: float, gamma: int, c: float) -> float:
    """Expected wall-time speed-up over the target alone: ``E[tokens] / (γc + 1)``."""
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0 or math.isinf(c):
        raise UserError(f"c={c!r} must be a finite cost ratio >= 0 (draft forward time / target forward time)")
    return expected_tokens(alpha, gamma) / (gamma * c + 1.0)


def best_gamma(alpha: float, c: float, max_gamma: int = 64) -> int:
    """The γ in ``1..max_gamma`` with the largest :func:`speedup` (the smallest on a tie)."""
    return max(range(1, max_gamma + 1), key=lambda g: (speedup(alpha, g, c), -g))


def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """β = Σ_x min(p(x), q(x)) = 1 − TV(p, q) over the last dimension."""
    return torch.minimum(p, q).sum(-1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p − q))``: where a rejected draft's replacement comes from (rows of ``p``/``q``).

    A row with no residual mass (``p == q``) can never reject; it gets ``p`` so that it is still a
    distribution."""
    residual = (p - q).clamp_min(0.0)
    mass = residual.sum(-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(residual.dtype).tiny), p)


# ----------------------------------------------------------------------------- one verification step
def speculative_step(
    p: torch.Tensor, q: torch.Tensor, x_draft: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept or replace drafted tokens: ``(accepted, token)``, shapes of ``x_draft``.

    ``p``/``q`` (..., V) are the target's and the draft's distributions at the drafted positions,
    ``x_draft`` (...) the tokens drawn from ``q``. Row by row, independently: accept with
    probability ``min(1, p(x)/q(x))``; a rejected row's ``token`` is drawn from
    :func:`residual_distribution`, an accepted row's is ``x``. Then ``token ~ p`` exactly.
    (The decoder keeps the leading accepted rows and the first replacement; later rows are unused.)
    """
    if p.shape != q.shape or p.shape[:-1] != x_draft.shape:
        raise UserError(f"speculative_step: p {tuple(p.shape)} and q {tuple(q.shape)} must have one shape, and "
                        f"x_draft {tuple(x_draft.shape)} its leading dimensions")
    x = x_draft.long().unsqueeze(-1)
    p_x = p.gather(-1, x).squeeze(-1)
    q_x = q.gather(-1, x).squeeze(-1)  # > 0: x was drawn from q
    r = torch.rand(p_x.shape, generator=generator, device=p.device, dtype=p.dtype)
    accepted = r * q_x < p_x  # r < p(x)/q(x) without dividing; always true where p(x) >= q(x)
    if x_draft.numel() == 0:
        return accepted, x_draft.clone()
    residual = residual_distribution(p, q).reshape(-1, p.size(-1))
    resampled = torch.multinomial(residual, 1, generator=generator).view(x_draft.shape)
    return accepted, torch.where(accepted, x_draft, resampled)


# ----------------------------------------------------------------------------- statistics
@dataclass
class SpecStats:
    """Counters of a speculative decoding run (add two with ``+``).

    ``acceptance_rate`` = accepted / drafted (drafts after a rejection count as drafted, never
    verified); ``alpha`` = accepted / verified, the per-token acceptance probability of the theory
    (α = E[β], estimated over the drafts that faced the test: the accepted ones and each round's
    first rejection); ``tokens_per_target_call`` = mean of n + 1 over iterations.
    """

    gamma: int
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of them accepted
    verified: int = 0  # of them that faced the acceptance test (accepted + first rejection of each round)
    target_calls: int = 0  # target forward passes (one per iteration)
    draft_calls: int = 0  # draft forward passes
    iterations: int = 0
    emitted: int = 0  # Σ (n + 1): tokens the iterations produced (an eos may cut the last one short)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def alpha(self) -> float:
        return self.accepted / self.verified if self.verified else math.nan

    @property
    def tokens_per_target_call(self) -> float:
        return self.emitted / self.iterations if self.iterations else math.nan

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.verified += accepted + (accepted < drafted)
        self.iterations += 1
        self.emitted += accepted + 1

    def __add__(self, other: SpecStats) -> SpecStats:
        counts = {k: getattr(self, k) + getattr(other, k) for k in asdict(self) if k != "gamma"}
        return SpecStats(gamma=self.gamma, **counts)

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "alpha": self.alpha,
                "tokens_per_target_call": self.tokens_per_target_call}

    def summary(self) -> str:
        return (f"speculative decoding (gamma={self.gamma}): {self.accepted}/{self.drafted} drafts accepted "
                f"(acceptance rate {self.acceptance_rate:.3f}, alpha {self.alpha:.3f}), "
                f"{self.tokens_per_target_call:.2f} tokens per target call, {self.target_calls} target calls, "
                f"{self.draft_calls} draft calls")


# ----------------------------------------------------------------------------- the decoder
def check_draft(target: torch.nn.Module, draft: torch.nn.Module) -> None:
    """Both must be cached causal LMs (``new_kv_cache``) over the same vocabulary."""
    for role, m in (("target", target), ("draft", draft)):
        if not hasattr(m, "new_kv_cache") or getattr(getattr(m, "config", None), "vocab_size", None) is None:
            raise UserError(f"the {role} model ({type(m).__name__}) is not a cached causal LM like llmlab's GPT "
                            "(needs config.vocab_size and new_kv_cache): speculative decoding needs two llmlab GPTs")
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise UserError(f"the draft model's vocabulary has {dv} ids but the target's has {tv}: speculative decoding "
                        "compares both distributions token by token, so train the draft with the target's tokenizer")


def _window(model: torch.nn.Module) -> int:
    """Token positions the model can take: block_size minus prompt/prefix-tuning positions."""
    return model.config.block_size - int(getattr(model, "num_virtual_tokens", 0) or 0)


@torch.no_grad()
def speculative_generate(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    gamma: int = 4,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Continue ``idx`` (1, T0) by up to ``max_new_tokens`` tokens sampled from ``target``, with
    ``draft`` proposing ``gamma`` tokens per target call; returns ``((1, T0 + n), SpecStats)``.

    Sampling options as :func:`llmlab.inference.sampling.sample_next`, applied to both models.
    Stops after ``eos_id`` (included). ``T0 + max_new_tokens`` must fit both models' context.
    """
    validate_sampling_args(temperature, top_k, top_p, min_p)
    validate_gamma(gamma)
    check_draft(target, draft)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(f"speculative decoding needs a prompt of shape (1, T0 >= 1), got {tuple(idx.shape)}")
    if idx.size(0) != 1:
        raise UserError(f"speculative decoding runs one sequence at a time, got a batch of {idx.size(0)} prompts: "
                        "pass them one by one")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    T0 = idx.size(1)
    total = T0 + max_new_tokens
    context = min(_window(target), _window(draft))
    if total > context:
        raise UserError(
            f"prompt of {T0} tokens + max_new_tokens={max_new_tokens} exceed the context of {context} tokens "
            f"(target block_size {target.config.block_size}, draft {draft.config.block_size}): speculative decoding "
            f"does not slide the window, generate at most {max(0, context - T0)} new tokens"
        )
    greedy = greedy or temperature == 0
    warp = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    stats = SpecStats(gamma=gamma)
    out = torch.empty(1, total, dtype=torch.long, device=idx.device)
    out[:, :T0] = idx
    target_cache = target.new_kv_cache(1, device=idx.device)
    draft_cache = draft.new_kv_cache(1, device=idx.device)
    # prompt/prefix tuning puts P virtual slots first in a cache: token i sits at slot P + i
    t_off = int(getattr(target, "num_virtual_tokens", 0) or 0)
    d_off = int(getattr(draft, "num_virtual_tokens", 0) or 0)
    q = torch.empty(gamma, target.config.vocab_size, device=idx.device)  # q_1..q_γ of the current round
    n = T0  # tokens in out so far
    # inference_mode: no autograd bookkeeping per op (out, q and the caches were made outside it)
    with eval_mode(target), eval_mode(draft), torch.inference_mode():
        # cached steps through GPT's lean decode path when it has one (same logits, less Python per call)
        lean = draft.lean_decode_step() if hasattr(draft, "lean_decode_step") else None
        lean_target = target.lean_decode_step() if hasattr(target, "lean_decode_step") else None
        while n < total:
            g = min(gamma, total - n - 1)  # the round emits at most g + 1 tokens: never overshoot
            # 1. the draft proposes out[n : n + g], keeping each q_i
            for i in range(g):
                unseen = out[:, max(0, draft_cache.length - d_off) : n + i]  # (1, >=1): last token(s), or the prompt
                if lean is not None:
                    logits = lean(unseen, draft_cache)  # (1, V)
                else:
                    logits = draft(unseen, kv_cache=draft_cache, last_only=True)[:, -1]  # (1, V)
                stats.draft_calls += 1
                if greedy:
                    out[0, n + i] = logits[0].argmax()
                else:
                    q[i] = torch.softmax(warp_logits(logits, **warp), dim=-1)[0]
                    out[0, n + i] = torch.multinomial(q[i], 1, generator=generator)[0]
            # 2. one target pass over the tokens it has not seen: the last g + 1 logits are p_1..p_{g+1}
            unseen = out[:, max(0, target_cache.length - t_off) : n + g]
            if lean_target is not None:
                logits = lean_target(unseen, target_cache, all_logits=True)[0, -(g + 1) :]  # (g + 1, V)
            else:
                logits = target(unseen, kv_cache=target_cache)[0, -(g + 1) :]  # (g + 1, V)
            stats.target_calls += 1
            drafts = out[0, n : n + g]
            # 3-4. leading accepted drafts, then a replacement (rejection) or a bonus token (all accepted)
            if greedy:
                best = logits.argmax(dim=-1)  # (g + 1,)
                n_acc = int((drafts == best[:g]).long().cumprod(0).sum())
                last = best[n_acc]
            else:
                p = torch.softmax(warp_logits(logits, **warp), dim=-1)  # (g + 1, V)
                accepted, tokens = speculative_step(p[:g], q[:g], drafts, generator)
                n_acc = int(accepted.long().cumprod(0).sum())
                last = tokens[n_acc] if n_acc < g else torch.multinomial(p[g], 1, generator=generator)[0]
            out[0, n + n_acc] = last
            stats.record(g, n_acc)
            new_n = n + n_acc + 1
            # roll back both caches: every token but the last one, at most what each has seen
            target_cache.truncate(t_off + new_n - 1)
            draft_cache.truncate(min(draft_cache.length, d_off + new_n - 1))
            if eos_id is not None:
                hits = (out[0, n:new_n] == eos_id).nonzero()
                if hits.numel():
                    n += int(hits[0, 0]) + 1
                    break
            n = new_n
    return out[:, :n], stats


# options of llmlab's generate() that mean nothing here when left at their neutral value
_NEUTRAL = {"use_kv_cache": (True,), "attention_mask": (None,), "repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0), "stop_strings": (None, [], ())}


def generate_with_draft(
    target: torch.nn.Module, draft: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, *, gamma: int = 4,
    **options,
) -> tuple[torch.Tensor, SpecStats]:
    """:func:`speculative_generate` called with ``generate()``'s keyword options (``GPT.generate(draft=...)``):
    the sampling ones are passed on, the others must keep their neutral value (one line otherwise)."""
    options.pop("tokenizer", None)  # only stop_strings would need it
    for key, neutral in _NEUTRAL.items():
        value = options.pop(key, neutral[0])
        if not any(value is v or (not isinstance(value, torch.Tensor) and value == v) for v in neutral):
            what = "the KV cache (both models run cached)" if key == "use_kv_cache" else f"{key}"
            raise UserError(f"speculative decoding (draft=...) does not support {what}: drop {key}={value!r} "
                            "or generate without a draft")
    known = ("temperature", "top_k", "top_p", "min_p", "greedy", "eos_id", "generator")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"unknown generate() option(s) {', '.join(unknown)} with a draft model: "
                        f"speculative decoding takes {', '.join(known)} and gamma")
    return speculative_generate(target, draft, idx, max_new_tokens, gamma=gamma, **options)


# ----------------------------------------------------------------------------- a draft checkpoint
def _vocabulary(tokenizer) -> dict:
    """What fixes a tokenizer's ids: its state without statistics that do not (word counts)."""
    state = dict(tokenizer.state_dict())
    for key in ("counts", "min_count"):
        state.pop(key, None)
    return state


def same_vocabulary(a, b) -> bool:
    """Do both tokenizers map text to the same ids (the same vocabulary, not just the same size)?"""
    return a.vocab_size == b.vocab_size and _vocabulary(a) == _vocabulary(b)


def load_draft(spec, tokenizer=None, *, key: str = "generation.draft") -> torch.nn.Module:
    """The GPT of a checkpoint (a ``.ckpt``, a run dir or its ``checkpoints/``) to draft with, after
    checking that its tokenizer equals ``tokenizer`` (the target's); one line otherwise."""
    from llmlab.checkpoint import find_checkpoint_file, load_method

    try:
        method, meta = load_method(find_checkpoint_file(spec))
    except UserError as e:
        raise UserError(f"{key}={spec}: {e}") from None
    model = getattr(method, "model", None)
    model = getattr(model, "_orig_mod", model)  # a compiled GPT -> the GPT
    if not hasattr(model, "new_kv_cache"):
        raise UserError(f"{key}={spec} is a {meta.get('method')} checkpoint, not a GPT: pass the checkpoint or "
                        "run dir of a (smaller) llmlab GPT trained with the target's tokenizer")
    draft_tok = getattr(method, "tokenizer", None)
    if tokenizer is not None and (draft_tok is None or not same_vocabulary(tokenizer, draft_tok)):
        def describe(t):
            return "none" if t is None else f"{t.name}, {t.vocab_size} ids"

        raise UserError(f"{key}={spec} has another tokenizer ({describe(draft_tok)}; the target's: "
                        f"{describe(tokenizer)}, a different vocabulary): train the draft with the target's tokenizer")
    return model.eval()
