"""GPT-2: a decoder-only transformer language model (Radford et al. 2019, "Language Models are
Unsupervised Multitask Learners"; architecture as released by OpenAI and in Hugging Face's GPT-2).

Token and learned absolute position embeddings feed ``n_layer`` pre-LayerNorm blocks (causal
multi-head self-attention, then a 4x-wide GELU MLP, each wrapped in a residual connection), a
final LayerNorm and a linear head over the vocabulary whose weight is, by default, the token
embedding itself. Module names mirror Hugging Face's ``GPT2LMHeadModel`` (``transformer.h.0.attn.
c_attn`` ...), so :mod:`llmlab.models.hf.gpt2` converts weights with a key rename and a transpose
(behind :meth:`GPT.from_pretrained` and :meth:`GPT.to_hf_state_dict`). ``forward`` takes
*pre-shifted* targets (``targets[t]`` is the token after ``idx[t]``; -100 = ignore) and an optional
:class:`~llmlab.nn.KVCache` for fast decoding.

Prompt-learning hooks (filled by :mod:`llmlab.peft.prompt`; ``None`` by default, and a hook whose
``disabled`` attribute is true is skipped, which gives the base model back):

* ``virtual_tokens``: ``virtual_tokens(batch_size) -> (B, P, n_embd)`` embeddings put before the
  token embeddings (soft prompt, Lester et al. 2021). They take positions ``0 .. P-1`` and the
  tokens ``P .. P+T-1``, as Hugging Face does for ``inputs_embeds = [prompt; tokens]``.
* ``prefix_kv``: ``prefix_kv(batch_size) -> [(k, v)] * n_layer``, each ``(B, n_head, P, head_dim)``,
  keys/values put before every layer's own (prefix tuning, Li & Liang 2021; P-tuning v2). The
  prefix sits in the first ``P`` positions like a ``past_key_values`` of length ``P``: the tokens
  get positions ``P .. P+T-1`` and every token attends to all ``P`` slots (causal only among tokens).

Both enter on the first forward pass only (no cache, or an empty one, into which the prefix is
written); ``num_virtual_tokens`` says how many positions they take, which counts against
``block_size``. Logits and :meth:`GPT.encode` cover the real tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.inference.beam import beam_search, check_sampling_options, validate_beam_args
from llmlab.inference.generate import generate as _generate
from llmlab.inference.generate import run_options
from llmlab.nn.attention import IMPLS, attention, causal_mask
from llmlab.nn.kv_cache import KVCache
from llmlab.nn.losses import cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # max context (GPT-2 n_positions)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding, attention-weights and residual dropout
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True)
    tie_embeddings: bool = True  # lm_head.weight is transformer.wte.weight
    attn_impl: str = "sdpa"  # "sdpa" (F.scaled_dot_product_attention) | "eager" (explicit softmax)
    layer_norm_epsilon: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise UserError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "pick n_embd as a multiple of n_head (each head gets n_embd // n_head dimensions)"
            )
        if self.attn_impl not in IMPLS:
            raise UserError(f"model.attn_impl={self.attn_impl!r} is unknown: use one of {', '.join(IMPLS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_impl = config.attn_impl
        self.attn_dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)  # (B, nh, cached + T, hs)
        elif prefix is not None:  # no cache to hold it: put the prefix keys/values in front
            k = torch.cat([prefix[0].to(k.dtype), k], dim=2)  # (B, nh, P + T, hs)
            v = torch.cat([prefix[1].to(v.dtype), v], dim=2)  # (B, nh, P + T, hs)
        y = attention(
            q,
            k,
            v,
            causal=True,
            mask=mask,  # padding / packing: boolean (B, 1, T, Tk), combined with the causal mask
            dropout_p=self.attn_dropout if self.training else 0.0,
            impl=self.attn_impl,
            q_offset=k.size(2) - T,  # the new tokens come after the cached ones (and any prefix)
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # tanh-approximate GELU is what GPT-2 was trained with (HF "gelu_new")
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: normalise, transform, add back to the residual stream."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer_idx, prefix, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 language model; see the module docstring."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one Parameter, two uses
        # prompt-learning hooks (module docstring); tuners fill them after this init
        self.register_module("virtual_tokens", None)
        self.register_module("prefix_kv", None)
        self.apply(self._init_weights)
        # GPT-2: scale the init of layers that write into the residual stream by 1/sqrt(#residual
        # adds), so the stream's variance does not grow with depth
        resid_std = config.init_std / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, T, V)`` (``(B, 1, V)`` with ``last_only``), or ``(logits, loss)`` with targets.

        ``targets`` are pre-shifted next tokens, ``(B, T)``, -100 = ignore; the loss is the mean
        cross-entropy over the other positions. With ``kv_cache`` the ``T`` tokens of ``idx``
        continue after the ``kv_cache.length`` cached ones (positions, causal mask), and their
        keys/values are appended to the cache.

        ``attention_mask``: ``(B, past + T)`` 1 = token, 0 = padding, over every real token so far
        (cached ones included), as in Hugging Face: padding is never attended to and positions
        count real tokens only, so a left-padded row computes what it would alone.
        ``segment_ids``: ``(B, T)`` packed examples (1, 2, ... per example, 0 = padding; no cache):
        a token attends only to earlier tokens of its own segment and positions restart at 0 in each.
        """
        if targets is not None and last_only:
            raise UserError("forward(targets=..., last_only=True): the loss needs every position's logits")
        x = self._hidden(idx, kv_cache, attention_mask, segment_ids)  # (B, T, C)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): the head is the most expensive matmul; skip T-1 rows
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise UserError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))  # (B*T, V) view
        return logits, loss

    def encode(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
               segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``(B, T, n_embd)`` after ``ln_f`` (what the head reads), real tokens only
        (``attention_mask`` / ``segment_ids`` as in :meth:`forward`)."""
        return self.transformer.ln_f(self._hidden(idx, None, attention_mask, segment_ids))

    def _hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Residual stream after the last block ``(B, T, C)`` for the tokens of ``idx`` (no ``ln_f``)."""
        if idx.dim() != 2:
            raise UserError(f"GPT expects token ids of shape (batch, seq_len), got {tuple(idx.shape)}")
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        # the hooks enter once: without a cache on every call, with one on the prefill (then it holds them)
        prompt = self.virtual_tokens if past == 0 and _active(self.virtual_tokens) else None
        prefix_hook = self.prefix_kv if past == 0 and _active(self.prefix_kv) else None
        n_virtual = sum(m.num_virtual_tokens for m in (prompt, prefix_hook) if m is not None)
        if past + n_virtual + T > self.config.block_size:
            cached = f" + {past} cached" if past else ""
            virtual = f" + {n_virtual} virtual (prompt/prefix)" if n_virtual else ""
            raise UserError(
                f"sequence of {T}{cached}{virtual} tokens is longer than the model's block_size="
                f"{self.config.block_size}: crop the input to the last {self.config.block_size - n_virtual - past} "
                "tokens (generate() does this) or use a model with a larger block_size"
            )
        prefix = None
        if prefix_hook is not None:
            prefix = prefix_hook(B)  # n_layer x (k, v), each (B, nh, P, hs)
            if kv_cache is not None:  # the prefix becomes the first P cached positions
                for i, (k, v) in enumerate(prefix):
                    kv_cache.update(i, k.to(kv_cache.k.dtype), v.to(kv_cache.v.dtype))
                kv_cache.advance(prefix_hook.num_virtual_tokens)
                prefix = None
            past = prefix_hook.num_virtual_tokens  # tokens come after the prefix (HF: past_key_values length)

        x = self.transformer.wte(idx)  # (B, T, C)
        if prompt is not None:
            x = torch.cat([prompt(B).to(x.dtype), x], dim=1)  # (B, P + T, C)
        S = x.size(1)
        pos = torch.arange(past, past + S, device=idx.device)  # (S,)
        mask = None
        if attention_mask is not None or segment_ids is not None:
            pos, mask = self._masked_positions(idx, pos, past, attention_mask, segment_ids)
        x = self.transformer.drop(x + self.transformer.wpe(pos))  # (B, S, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i, None if prefix is None else prefix[i], mask)
        if kv_cache is not None:
            kv_cache.advance(S)
        return x[:, S - T :]  # (B, T, C): the soft prompt's positions are not the caller's

    def _masked_positions(self, idx: torch.Tensor, pos: torch.Tensor, past: int, attention_mask: torch.Tensor | None,
                          segment_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(B, S)`` and a boolean attention mask ``(B, 1, S, keys)`` for padded or packed rows.

        The ``S`` queries are ``P`` virtual tokens (a soft prompt on the first pass) and the ``T``
        tokens; the keys are every virtual slot (always visible), the cached tokens and the new ones.
        A padding query may see only itself (SDPA returns NaN for a row that sees nothing)."""
        B, T = idx.shape
        S = pos.numel()
        n_virtual = self.num_virtual_tokens
        if segment_ids is not None:
            if past or n_virtual or attention_mask is not None:
                raise UserError("segment_ids (packed examples) work without a KV cache, prompt/prefix tuner or "
                                "attention_mask: pad instead of packing for those")
            if segment_ids.shape != idx.shape:
                raise UserError(f"segment_ids shape {tuple(segment_ids.shape)} must equal idx shape {tuple(idx.shape)}")
            t = torch.arange(T, device=idx.device)
            starts = torch.ones_like(segment_ids, dtype=torch.bool)
            starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # first token of each segment
            first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # (B, T)
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            return t - first, same[:, None]  # causality is added by attention()
        real_past = past - n_virtual if past else 0  # cached slots = virtual tokens + real tokens
        if attention_mask.shape != (B, real_past + T):
            raise UserError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new "
                            f"tokens) = ({B}, {real_past + T})")
        keep = attention_mask.bool()
        tok_pos = n_virtual + attention_mask.long().cumsum(1)[:, -T:] - 1  # (B, T): real tokens so far
        tok_pos = tok_pos.clamp(min=n_virtual)  # left padding: pads sit at the first position, unseen
        pos = torch.cat([pos[: S - T].expand(B, -1), tok_pos], dim=1)  # (B, S)
        keys = torch.cat([keep.new_ones(B, n_virtual), keep], dim=1)  # (B, Tk)
        q_abs = keys.size(1) - S + torch.arange(S, device=idx.device)  # absolute key index of each query
        own = torch.arange(keys.size(1), device=idx.device)[None, :] == q_abs[:, None]  # (S, Tk)
        return pos, (keys[:, None, :] | own[None])[:, None]  # (B, 1, S, Tk)

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the active prompt-learning hooks take before the tokens (0 without them)."""
        return sum(m.num_virtual_tokens for m in (self.virtual_tokens, self.prefix_kv) if _active(m))

    # ------------------------------------------------------------------ helpers
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied weight counted once.

        ``non_embedding=True`` leaves out everything that scales with the vocabulary or the
        context (token and position embeddings, and an untied ``lm_head``), as in Kaplan et al.
        """
        params = {id(p): p for p in self.parameters()}  # parameters() already dedups; be explicit
        if non_embedding:
            for p in (self.transformer.wte.weight, self.transformer.wpe.weight, self.lm_head.weight):
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    def new_kv_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens (default: block_size
        positions); the prompt/prefix positions come on top of an explicit ``max_len``."""
        ref = self.transformer.wte.weight
        c = self.config
        # the prefix occupies cache slots too (block_size already counts it)
        max_len = max_len + self.num_virtual_tokens if max_len else c.block_size
        return KVCache(
            c.n_layer,
            batch_size,
            c.n_head,
            c.head_dim,
            max_len,
            device=device or ref.device,
            dtype=dtype or ref.dtype,
        )

    def lean_decode_step(self):
        """A fast one-token decode step for :func:`llmlab.inference.generate.generate`, or None.

        Returns ``step(tok, kv_cache, all_logits=False) -> (B, V)`` logits of the last token (``(B, T,
        V)`` with ``all_logits``: speculative decoding's verification) for ``tok`` ``(B, T)``
        continuing a non-empty :class:`KVCache` (no padding mask), equal bit for bit to ``forward(tok,
        kv_cache=kv_cache, last_only=not all_logits)``: the same kernels on the same tensors in the same
        order, minus what costs Python time per token at batch 1 (module calls, hooks, shape checks,
        no-op dropouts, position ``arange``). None when that equality is not guaranteed: training
        mode, wrapped or hooked layers (LoRA, quantised Linear, forward hooks), a subclassed block.
        """
        if self.training:
            return None
        plain = {nn.Linear, nn.LayerNorm, nn.Embedding, nn.Dropout, nn.ModuleList, nn.ModuleDict, Block,
                 CausalSelfAttention, MLP}
        hooks = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
        if type(self) is not GPT or any(hooks):
            return None
        for name, m in self.named_modules():
            if name in ("", "virtual_tokens", "prefix_kv") or name.startswith(("virtual_tokens.", "prefix_kv.")):
                continue  # the prompt hooks only enter on the prefill
            if type(m) not in plain or m._forward_hooks or m._forward_pre_hooks or m.training:
                return None  # (a submodule left in training mode would apply dropout)
        c = self.config
        C, nh, hs = c.n_embd, c.n_head, c.head_dim
        t = self.transformer
        layers = [(b.ln_1.weight, b.ln_1.bias, b.ln_1.eps, b.attn.c_attn.weight, b.attn.c_attn.bias,
                   b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.ln_2.eps,
                   b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias) for b in t.h]
        wte, wpe = t.wte.weight, t.wpe.weight
        lnf_w, lnf_b, lnf_eps, head = t.ln_f.weight, t.ln_f.bias, t.ln_f.eps, self.lm_head.weight
        impl, shape = c.attn_impl, (C,)
        layer_norm, linear, sdpa, gelu = F.layer_norm, F.linear, F.scaled_dot_product_attention, F.gelu

        def step(tok: torch.Tensor, kv_cache: KVCache, all_logits: bool = False) -> torch.Tensor:
            L = kv_cache.length
            B, T = tok.shape if tok.dim() == 2 else (0, 0)
            if type(kv_cache) is not KVCache or T < 1 or not 0 < L <= min(c.block_size, kv_cache.max_len) - T:
                logits = self(tok, kv_cache=kv_cache, last_only=not all_logits)  # not the case this path covers
                return logits if all_logits else logits[:, -1]
            x = F.embedding(tok, wte) + wpe[L : L + T]  # (B, T, C): positions L .. L+T-1, as forward's arange
            # T == 1: one query sees every key, attention() passes no mask; else its bottom-right causal mask
            mask = None if T == 1 else causal_mask(T, L + T, tok.device, q_offset=L)
            K, V = kv_cache.k, kv_cache.v  # read each step: reorder() replaces them
            for i, (w1, b1, e1, wa, ba, wp, bp, w2, b2, e2, wf, bf, wm, bm) in enumerate(layers):
                q, k, v = linear(layer_norm(x, shape, w1, b1, e1), wa, ba).split(C, dim=2)  # 3 x (B, T, C)
                K[i, :, :, L : L + T] = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs) into the cache
                V[i, :, :, L : L + T] = v.view(B, T, nh, hs).transpose(1, 2)
                q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
                k, v = K[i, :, :, : L + T], V[i, :, :, : L + T]  # (B, nh, L + T, hs)
                if impl == "sdpa":  # what attention() calls: no mask for one query, else the causal one
                    y = sdpa(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=None)
                else:
                    y = attention(q, k, v, causal=True, impl=impl, q_offset=L)
                x = x + linear(y.transpose(1, 2).contiguous().view(B, T, C), wp, bp)
                x = x + linear(gelu(linear(layer_norm(x, shape, w2, b2, e2), wf, bf), approximate="tanh"), wm, bm)
            kv_cache.advance(T)
            if not all_logits:
                x = x[:, -1:]
            logits = linear(layer_norm(x, shape, lnf_w, lnf_b, lnf_eps), head)  # (B, T or 1, V)
            return logits if all_logits else logits[:, -1]

        return step

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        pad_id: int | None = None,
        draft: nn.Module | str | Path | None = None,
        gamma: int = 4,
        num_samples: int = 1,
        seed: int | None = None,
        stop_at_eos: bool = True,
        **sampling_kwargs,
    ) -> torch.Tensor:
        """Continue ``idx`` (B, T0). ``draft``: a smaller GPT over the same vocabulary proposes ``gamma``
        tokens per forward of this model (speculative decoding, batch 1, the same distribution; see
        :func:`llmlab.inference.speculative.speculative_generate`). ``num_beams == 1``: sampling/greedy, see
        :func:`llmlab.inference.generate.generate` for the options. ``num_beams > 1``: beam search
        (:func:`llmlab.inference.beam.beam_search`, Hugging Face's rules), which returns
        ``(B * num_return_sequences, T0 + n)``; of the sampling options it takes ``eos_id``,
        ``use_kv_cache``, ``attention_mask`` (left-padded prompts) and ``greedy`` (beam search is
        deterministic anyway).

        Every key of the ``generation`` config group is an option here (``model.generate(idx,
        **cfg.generation)``): ``num_samples`` continues each prompt row that many times, ``seed``
        seeds the sampler, ``stop_at_eos=False`` ignores ``eos_id``, ``draft`` may also be a
        checkpoint path (its vocabulary is checked against ``tokenizer=`` when given)."""
        validate_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences)
        idx, mask, generator, stop_at_eos = run_options(
            idx, sampling_kwargs.pop("attention_mask", None), num_samples=num_samples, seed=seed,
            stop_at_eos=stop_at_eos, generator=sampling_kwargs.pop("generator", None))
        sampling_kwargs.update(attention_mask=mask, generator=generator)
        if not stop_at_eos:
            sampling_kwargs.pop("eos_id", None)
        if isinstance(draft, (str, Path)):
            from llmlab.inference.speculative import load_draft

            draft = load_draft(draft, sampling_kwargs.get("tokenizer"))
        if draft is not None:
            from llmlab.inference.speculative import generate_with_draft

            if num_beams != 1:
                raise UserError(f"speculative decoding (draft=...) samples one sequence: drop num_beams={num_beams}")
            return generate_with_draft(self, draft, idx, max_new_tokens, gamma=gamma, **sampling_kwargs)[0]
        if num_beams == 1:  # num_return_sequences is 1 here (validated above)
            return _generate(self, idx, max_new_tokens, pad_id=pad_id, **sampling_kwargs)
        if sampling_kwargs.pop("stop_strings", None):
            raise UserError(f"stop_strings work when sampling: drop them or num_beams={num_beams}")
        sampling_kwargs.pop("tokenizer", None)
        beam_keys = ("eos_id", "use_kv_cache", "attention_mask", "repetition_penalty", "no_repeat_ngram_size")
        check_sampling_options({k: v for k, v in sampling_kwargs.items() if k not in beam_keys and k != "greedy"})
        return beam_search(self, idx, max_new_tokens, num_beams, length_penalty, early_stopping, num_return_sequences,
                           pad_id=pad_id, **{k: v for k, v in sampling_kwargs.items() if k in beam_keys})

    # ------------------------------------------------------------------ Hugging Face interop
    # (the conversion code lives in llmlab.models.hf.gpt2, imported on use)
    @classmethod
    def from_pretrained(cls, path: str | Path, *, allow_bin: bool = False, **overrides) -> GPT:
        """Load a local Hugging Face GPT-2 directory (``config.json`` + ``model.safetensors``), e.g.
        one written by ``GPT2LMHeadModel.save_pretrained``; nothing is downloaded.

        ``overrides`` replace :class:`GPTConfig` fields (``dropout``, ``attn_impl`` ...). The
        dropout defaults to the checkpoint's ``resid_pdrop``. A ``block_size`` smaller than the
        checkpoint's ``n_positions`` keeps only the first ``block_size`` position embeddings.
        ``allow_bin=True`` also reads a ``pytorch_model.bin`` (a pickle, loaded with
        ``torch.load(weights_only=True)``) when the directory has no safetensors file.
        """
        from llmlab.models.hf.gpt2 import from_pretrained

        return from_pretrained(cls, path, overrides, allow_bin=allow_bin)

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with ``GPT2LMHeadModel`` keys and Conv1D layout (the inverse of loading).

        Tensors share memory with this model where no transpose was needed (clone before saving
        with safetensors, which refuses shared tensors).
        """
        from llmlab.models.hf.gpt2 import to_hf_state_dict

        return to_hf_state_dict(self)

    def to_hf_config(self) -> dict:
        """``config.json`` content for ``transformers.GPT2Config`` describing this model."""
        from llmlab.models.hf.gpt2 import to_hf_config

        return to_hf_config(self)


def _active(hook: nn.Module | None) -> bool:
    """A prompt-learning hook that is set and not switched off (``disabled``: the base model runs)."""
    return hook is not None and not getattr(hook, "disabled", False)
