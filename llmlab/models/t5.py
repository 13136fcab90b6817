"""T5: an encoder-decoder transformer for text-to-text tasks (Raffel et al. 2020, "Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer", JMLR 21; §2.1 "Model" and
§3.1.2 for the span-corruption objective it is pretrained with, see
:mod:`llmlab.data.span_corruption`).

The encoder reads the whole input (bidirectional self-attention); the decoder writes the output
one token at a time (causal self-attention) and looks at the encoder through cross-attention.
Compared with the original Transformer (Vaswani et al. 2017), T5 changes four things:

* **no position embeddings**: a learned scalar per head and relative-position bucket is added to
  the attention scores (:class:`~llmlab.nn.positions.RelativePositionBias`). It is computed by the
  first layer of each stack and reused by the others; the encoder's buckets look both ways, the
  decoder's only into the past; cross-attention has none;
* **pre-norm with RMSNorm** (:class:`~llmlab.nn.norms.RMSNorm`: no mean, no bias) and **no biases
  in any linear layer**;
* **unscaled attention scores** (``scale=1``): the ``1/sqrt(d_kv)`` is folded into the query
  initialisation instead;
* **one embedding** shared by the encoder input, the decoder input and (``tie_word_embeddings``)
  the output layer, in which case the decoder output is multiplied by ``d_model ** -0.5`` first.

T5 v1.0 uses a ReLU feed-forward layer (``feed_forward_proj="relu"``); v1.1 / Flan-T5 use GeGLU
(``"gated-gelu"``: ``gelu_tanh(x W0) * (x W1)``) and an untied output layer.

Field names of :class:`T5Config` are those of Hugging Face's ``T5Config``, so
:meth:`T5.from_pretrained` can read a local ``T5ForConditionalGeneration`` directory; module names
are readable ones (``encoder.blocks.0.self_attn.q``) and :func:`llmlab.models.hf.t5.hf_to_llmlab_key`
maps HF's (``encoder.block.0.layer.0.SelfAttention.q``).

Prompt-learning hooks (filled by :mod:`llmlab.peft.prompt`; ``None`` by default, skipped while
their ``disabled`` attribute is true):

* ``virtual_tokens``: ``virtual_tokens(batch_size) -> (B, P, d_model)`` embeddings put before the
  encoder's input embeddings (soft prompt, Lester et al. 2021; ``peft``'s seq2seq layout). The
  encoder padding mask gets P ones in front; the decoder cross-attends to all ``P + S`` encoder
  states. :meth:`T5.encode` returns the real positions only (``keep_virtual=True``: all of them,
  which is what ``encoder_outputs=`` must be given); ``T5Output.encoder_last_hidden_state`` is
  the full ``(B, P + S, d_model)``, as in Hugging Face + ``peft``.
* ``prefix_kv``: ``prefix_kv(batch_size) -> [(k, v)] * (num_layers + num_decoder_layers)``, each
  ``(B, num_heads, P, d_kv)``: encoder blocks first, then decoder blocks. A key/value prefix in
  every **self**-attention of both stacks (Li & Liang 2021's encoder + decoder prefix; ``peft``
  prefixes only the decoder's self-attention, as it resets the cross-attention cache, so an
  llmlab T5 prefix has no ``peft`` twin). The prefix takes relative positions ``0 .. P-1`` and the
  tokens follow it, like a ``past_key_values`` of length P; in the decoder it is written into the
  cache on the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.inference.beam import check_max_new_tokens, check_sampling_options, run_beam_search, validate_beam_args
from llmlab.inference.generate import decode_loop, eval_mode
from llmlab.inference.processors import validate_processor_args
from llmlab.inference.sampling import validate_sampling_args
from llmlab.nn.attention import IMPLS, attention, key_padding_mask
from llmlab.nn.kv_cache import KVCache
from llmlab.nn.losses import IGNORE_INDEX, cross_entropy
from llmlab.nn.norms import RMSNorm
from llmlab.nn.positions import RelativePositionBias

FEED_FORWARD_PROJS = ("relu", "gated-gelu")
DEFAULT_CACHE_LEN = 512  # decoder positions of a cache that forward(use_cache=True) creates itself
_FROM_CONFIG = object()  # generate(eos_token_id=...) default: the config's eos_token_id


@dataclass
class T5Config:
    """Architecture of a T5 model; the defaults are T5-small (v1.0) as in Hugging Face."""

    vocab_size: int = 32128  # 32,000 SentencePiece pieces + 100 sentinels, padded to a multiple of 128
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # width of one attention head (need not be d_model // num_heads)
    d_ff: int = 2048  # hidden width of the feed-forward layer
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int | None = None  # decoder blocks; None = num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # offsets beyond this share the last bucket
    dropout_rate: float = 0.1  # embeddings, attention weights, sub-layer outputs, FFN hidden
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0  # multiplies every init std (Mesh TensorFlow's factor)
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) | "gated-gelu" (v1.1: GeGLU, tanh GELU)
    tie_word_embeddings: bool = True  # lm_head.weight is shared.weight (v1.0: True, v1.1: False)
    scale_decoder_outputs: bool | None = None  # x d_model**-0.5 before lm_head; None = tie_word_embeddings
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token
    attn_impl: str = "sdpa"  # "sdpa" | "eager" (see llmlab.nn.attention)

    def __post_init__(self) -> None:
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = bool(self.tie_word_embeddings)
        sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name}={value!r} must be a positive integer")
        nb, md = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if not isinstance(nb, int) or nb < 4:
            raise UserError(f"model.relative_attention_num_buckets={nb!r} must be an integer >= 4 (T5: 32)")
        if not isinstance(md, int) or md <= nb // 2:
            raise UserError(
                f"model.relative_attention_max_distance={md!r} must be an integer > num_buckets // 2 = "
                f"{nb // 2}: the log-spaced buckets cover distances from there up to max_distance (T5: 128)"
            )
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise UserError(
                f"model.feed_forward_proj={self.feed_forward_proj!r} is unknown: use one of "
                f"{', '.join(FEED_FORWARD_PROJS)} (relu = T5 v1.0, gated-gelu = T5 v1.1 / Flan-T5)"
            )
        if self.attn_impl not in IMPLS:
            raise UserError(f"model.attn_impl={self.attn_impl!r} is unknown: use one of {', '.join(IMPLS)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise UserError(f"model.dropout_rate={self.dropout_rate} must be in [0, 1)")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise UserError(
                    f"model.{name}={value!r} must be a token id in [0, vocab_size={self.vocab_size})"
                )

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads, ``num_heads * d_kv``."""
        return self.num_heads * self.d_kv

    @classmethod
    def preset(cls, name: str, **overrides) -> T5Config:
        """A named size from :data:`PRESETS` with some fields replaced (e.g. ``vocab_size``)."""
        if name not in PRESETS:
            raise UserError(f"unknown T5 preset {name!r}: use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # CPU-sized (about 0.9M parameters besides the embedding): span corruption on a small corpus
    # trains in minutes on 2 cores. Set vocab_size to the tokenizer's.
    "t5_tiny": dict(
        d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0
    ),
    # T5-small v1.0 (Raffel et al. 2020, Table 14 / released "t5-small"): 60,506,624 parameters.
    "t5_small": dict(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
        num_heads=8, dropout_rate=0.1, feed_forward_proj="relu", tie_word_embeddings=True,
    ),
    # The size the seed script actually trained (E512 / 6 layers / 8 heads / FFN 4E, dropout 0.1):
    # the T5-small shape. The seed's architecture bugs (no positions, inverted padding mask,
    # separate embeddings, LayerNorm + biases) are not reproduced; vocab_size comes from the
    # tokenizer (the seed's whitespace vocabulary of up to 32,000 words, plus 100 sentinels).
    "t5_seed": dict(
        d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
        dropout_rate=0.1, feed_forward_proj="relu", tie_word_embeddings=True,
    ),
}


# ---------------------------------------------------------------------- layers
class T5Attention(nn.Module):
    """Multi-head attention without biases and without score scaling; self- or cross-attention."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.attn_impl = config.attn_impl
        self.attn_dropout = config.dropout_rate
        inner = config.inner_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.d_kv).transpose(1, 2)  # (B, nh, T, d_kv)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, nh, S, d_kv)`` of ``source`` (B, S, d_model)."""
        return self._heads(self.k(source)), self._heads(self.v(source))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        causal: bool = False,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend from ``x`` (B, T, d_model) to itself, or to precomputed ``kv`` (cross-attention).

        ``kv_cache`` (self-attention only) appends this step's keys/values to the cached ones;
        without a cache, ``prefix`` (k, v) each ``(B, nh, P, d_kv)`` goes before this step's.
        """
        B, T, _ = x.shape
        q = self._heads(self.q(x))  # (B, nh, T, d_kv)
        if kv is None:
            k, v = self.project_kv(x)  # (B, nh, T, d_kv)
            if kv_cache is not None:
                k, v = kv_cache.update(layer_idx, k, v)  # (B, nh, cached + T, d_kv)
            elif prefix is not None:
                k = torch.cat([prefix[0].to(k.dtype), k], dim=2)  # (B, nh, P + T, d_kv)
                v = torch.cat([prefix[1].to(v.dtype), v], dim=2)  # (B, nh, P + T, d_kv)
        else:
            k, v = kv  # (B, nh, S, d_kv)
        y = attention(
            q,
            k,
            v,
            causal=causal,
            mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            impl=self.attn_impl,
            q_offset=k.size(2) - T,  # new queries come after the cached keys
            scale=1.0,  # T5 does not divide by sqrt(d_kv): the query init is scaled instead
        )  # (B, nh, T, d_kv)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.d_kv)  # heads side by side
        return self.o(y)


class T5FeedForward(nn.Module):
    """``wo(relu(wi x))`` (v1.0) or GeGLU ``wo(gelu_tanh(wi_0 x) * wi_1 x)`` (v1.1), no biases."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated = config.feed_forward_proj.startswith("gated-")
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)  # through the GELU
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)  # the linear gate
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            # tanh-approximate GELU: what T5 v1.1 was trained with (HF "gelu_new")
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class T5EncoderBlock(nn.Module):
    """Pre-norm: ``x + SelfAttn(norm(x))``, then ``x + FFN(norm(x))``."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.self_attn = T5Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.ffn = T5FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), mask, prefix=prefix))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class T5DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the encoder, feed-forward."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.self_attn_norm = RMSNorm(config.d_model, eps=eps)
        self.self_attn = T5Attention(config)
        self.cross_attn_norm = RMSNorm(config.d_model, eps=eps)
        self.cross_attn = T5Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, eps=eps)
        self.ffn = T5FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self,
        x: torch.Tensor,
        self_mask: torch.Tensor,
        cross_mask: torch.Tensor | None,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        h = self.self_attn(
            self.self_attn_norm(x), self_mask, kv_cache=kv_cache, layer_idx=layer_idx, causal=True, prefix=prefix
        )
        x = x + self.dropout(h)
        x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), cross_mask, kv=cross_kv))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


# ---------------------------------------------------------------------- stacks
class _T5Stack(nn.Module):
    """What both stacks hold: the relative position bias (computed once per forward and shared by
    every layer), the blocks, the final RMSNorm and dropout."""

    def __init__(self, config: T5Config, block: type[nn.Module], num_layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.position_bias = RelativePositionBias(
            config.num_heads,
            config.relative_attention_num_buckets,
            config.relative_attention_max_distance,
            bidirectional=bidirectional,
        )
        self.blocks = nn.ModuleList([block(config) for _ in range(num_layers)])
        self.final_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)


class T5Encoder(_T5Stack):
    """Embedded tokens (B, S, d_model) -> contextual states (B, S, d_model)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__(config, T5EncoderBlock, config.num_layers, bidirectional=True)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """``prefix``: per block (k, v) ``(B, nh, P, d_kv)``, at relative positions ``0 .. P-1``
        before the ``S`` inputs (which then sit at ``P .. P+S-1``)."""
        S = x.size(1)
        P = prefix[0][0].size(2) if prefix else 0
        # one (1, nh, S, P+S) bias for every layer; padding keys get the most negative finite value
        mask = self.position_bias(S, P + S, q_offset=P, device=x.device).to(x.dtype)
        if attention_mask is not None:
            attention_mask = F.pad(attention_mask, (P, 0), value=1)  # the prefix is always a key
            hidden = ~key_padding_mask(attention_mask)  # (B, 1, 1, P+S), True = padding
            mask = mask.masked_fill(hidden, torch.finfo(x.dtype).min)  # (B, nh, S, P+S)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if prefix is None else prefix[i])
        return self.dropout(self.final_norm(x))


@dataclass
class T5Cache:
    """Decoder state kept between generation steps.

    ``self_attn`` holds every decoder layer's self-attention keys/values of the tokens decoded so
    far; ``cross_attn`` holds each layer's keys/values of the encoder output, which never change
    during decoding, so they are projected once (on the first step) instead of at every step.
    """

    self_attn: KVCache
    cross_attn: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def length(self) -> int:
        """Decoder tokens cached so far."""
        return self.self_attn.length

    def reorder(self, index: torch.Tensor) -> None:
        """Row ``i`` continues old row ``index[i]`` (beam search), in both caches, as Hugging Face's
        ``EncoderDecoderCache.reorder_cache`` does: the cross-attention rows of one prompt's beams
        are equal copies, but reordering them too keeps every row consistent whatever ``index`` is."""
        self.self_attn.reorder(index)
        if self.cross_attn is not None:
            index = index.to(self.cross_attn[0][0].device)
            self.cross_attn = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_attn]


class T5Decoder(_T5Stack):
    """Embedded decoder tokens + encoder states -> decoder states (B, T, d_model)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__(config, T5DecoderBlock, config.num_decoder_layers, bidirectional=False)

    def forward(
        self,
        x: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: T5Cache | None = None,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """``prefix``: per block self-attention (k, v) ``(B, nh, P, d_kv)`` before the first decoder
        token; with a cache it is written into it (give it on the first step only)."""
        T = x.size(1)
        past = cache.length if cache is not None else 0
        if prefix is not None:
            if cache is not None:  # the prefix becomes the first P cached positions
                for i, (k, v) in enumerate(prefix):
                    cache.self_attn.update(i, k.to(cache.self_attn.k.dtype), v.to(cache.self_attn.v.dtype))
                cache.self_attn.advance(prefix[0][0].size(2))
                past, prefix = cache.length, None
            else:
                past = prefix[0][0].size(2)
        # queries at positions past .. past+T-1, keys at 0 .. past+T-1; attention() adds the causal mask
        self_mask = self.position_bias(T, past + T, q_offset=past, device=x.device)  # (1, nh, T, past+T)
        self_mask = self_mask.to(x.dtype)
        cross_mask = None if encoder_attention_mask is None else key_padding_mask(encoder_attention_mask)
        if cache is not None and cache.cross_attn is not None:
            cross_kv = cache.cross_attn
        else:
            if encoder_hidden_states is None:
                raise UserError(
                    "the T5 decoder needs encoder_hidden_states (or a cache that holds their keys/values)"
                )
            cross_kv = [block.cross_attn.project_kv(encoder_hidden_states) for block in self.blocks]
            if cache is not None:
                cache.cross_attn = cross_kv
        kv_cache = cache.self_attn if cache is not None else None
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            x = block(x, self_mask, cross_mask, cross_kv[i], kv_cache, i, None if prefix is None else prefix[i])
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.dropout(self.final_norm(x))


# ---------------------------------------------------------------------- model
@dataclass
class T5Output:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # mean cross-entropy over labels != -100
    encoder_last_hidden_state: torch.Tensor | None = None  # (B, S, d_model); None if not run
    past_key_values: T5Cache | None = None  # with use_cache


class T5(nn.Module):
    """T5 encoder-decoder with a language-model head; see the module docstring."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # encoder, decoder (and head)
        self.encoder = T5Encoder(config)
        self.decoder = T5Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight  # one Parameter, three uses
        # prompt-learning hooks (module docstring); tuners fill them after this init
        self.register_module("virtual_tokens", None)
        self.register_module("prefix_kv", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mesh TensorFlow's initialisation, as used for the released T5 checkpoints.

        Every matrix gets std ``factor / sqrt(fan_in)``, except the queries, whose std is also
        divided by ``sqrt(d_kv)``: this stands in for the ``1/sqrt(d_kv)`` score scaling that T5
        leaves out. The shared embedding has std ``factor``: with a tied head the decoder output is
        scaled by ``d_model ** -0.5``, so the initial logits have unit variance either way.
        """
        c = self.config
        f = c.initializer_factor
        nn.init.normal_(self.shared.weight, std=f * 1.0)
        if not c.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=f * c.d_model**-0.5)
        for module in self.modules():
            if isinstance(module, T5Attention):
                nn.init.normal_(module.q.weight, std=f * (c.d_model * c.d_kv) ** -0.5)
                nn.init.normal_(module.k.weight, std=f * c.d_model**-0.5)
                nn.init.normal_(module.v.weight, std=f * c.d_model**-0.5)
                nn.init.normal_(module.o.weight, std=f * c.inner_dim**-0.5)
            elif isinstance(module, T5FeedForward):
                for name in ("wi", "wi_0", "wi_1"):
                    if hasattr(module, name):
                        nn.init.normal_(getattr(module, name).weight, std=f * c.d_model**-0.5)
                nn.init.normal_(module.wo.weight, std=f * c.d_ff**-0.5)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.embedding.weight, std=f * c.d_model**-0.5)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    # ------------------------------------------------------------------ forward
    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, keep_virtual: bool = False
    ) -> torch.Tensor:
        """Encoder output ``(B, S, d_model)``; ``attention_mask`` (B, S): 1 = real token, 0 = padding.

        With a soft prompt the output covers the real tokens only, unless ``keep_virtual`` (then
        ``(B, P + S, d_model)``: what the decoder cross-attends to).
        """
        _check_ids(input_ids, "input_ids")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise UserError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)} (1 = real token, 0 = padding)"
            )
        B = input_ids.size(0)
        x = self.shared(input_ids)  # (B, S, d_model)
        n_prompt = self._n_prompt()
        if n_prompt:
            x = torch.cat([self.virtual_tokens(B).to(x.dtype), x], dim=1)  # (B, P + S, d_model)
        prefix = self._prefix(B, "encoder")
        h = self.encoder(x, self._cross_mask(attention_mask), prefix)  # (B, P + S, d_model)
        return h if keep_virtual else h[:, n_prompt:]

    def _n_prompt(self) -> int:
        return self.virtual_tokens.num_virtual_tokens if _active(self.virtual_tokens) else 0

    def _cross_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The (B, S) padding mask of the real tokens, with ones in front for a soft prompt."""
        if attention_mask is None or not self._n_prompt():
            return attention_mask
        return F.pad(attention_mask, (self._n_prompt(), 0), value=1)  # (B, P + S)

    def _prefix(self, batch_size: int, stack: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The ``prefix_kv`` hook's (k, v) for the blocks of ``stack`` (encoder | decoder), or None."""
        if not _active(self.prefix_kv):
            return None
        kv = self.prefix_kv(batch_size)  # encoder blocks, then decoder blocks
        n_enc = self.config.num_layers
        return kv[:n_enc] if stack == "encoder" else kv[n_enc:]

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the active prompt-learning hooks take before the tokens (0 without them)."""
        return sum(m.num_virtual_tokens for m in (self.virtual_tokens, self.prefix_kv) if _active(m))

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        cache: T5Cache | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` after each decoder input (``(B, 1, V)`` with ``last_only``)."""
        _check_ids(decoder_input_ids, "decoder_input_ids")
        # the prefix enters on the first step only (with a cache it then stays in it)
        prefix = self._prefix(decoder_input_ids.size(0), "decoder") if cache is None or cache.length == 0 else None
        h = self.decoder(
            self.shared(decoder_input_ids), encoder_hidden_states, self._cross_mask(attention_mask), cache, prefix
        )
        if last_only:
            h = h[:, -1:, :]  # (B, 1, d_model): skip the head for every other position
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model**-0.5  # keeps tied-embedding logits at unit scale
        return self.lm_head(h)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs: ``[decoder_start, labels[:-1]]`` with -100 -> pad."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        encoder_outputs: torch.Tensor | tuple | None = None,
        past_key_values: T5Cache | None = None,
        use_cache: bool = False,
        max_cache_len: int | None = None,
    ) -> T5Output:
        """Run encoder and decoder; ``loss`` is the mean cross-entropy over ``labels != -100``.

        * ``decoder_input_ids`` default to ``labels`` shifted right (:meth:`shift_right`);
        * ``encoder_outputs`` (B, S, d_model) skips the encoder (``input_ids`` is then not needed;
          with a soft prompt they must include its positions: ``encode(..., keep_virtual=True)``);
        * ``use_cache`` / ``past_key_values``: the decoder tokens continue after those in the cache
          (its self-attention keys/values and the encoder's cross-attention keys/values, which
          make ``encoder_outputs`` unnecessary after the first step). ``use_cache=True`` without a
          cache creates one for ``max_cache_len`` decoder tokens (default
          ``max(T, DEFAULT_CACHE_LEN)``), returned in ``past_key_values``.
        """
        if isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = encoder_outputs[0]  # HF-style (last_hidden_state, ...)
        if decoder_input_ids is None:
            if labels is None:
                raise UserError(
                    "T5.forward needs decoder_input_ids or labels (decoder inputs = labels shifted right)"
                )
            decoder_input_ids = self.shift_right(labels)
        have_cross = past_key_values is not None and past_key_values.cross_attn is not None
        if encoder_outputs is None and not have_cross:
            if input_ids is None:
                raise UserError("T5.forward needs input_ids or encoder_outputs for the encoder side")
            encoder_outputs = self.encode(input_ids, attention_mask, keep_virtual=True)
        cache = past_key_values
        if use_cache and cache is None:
            B, T = decoder_input_ids.shape
            cache = self.new_cache(B, max_cache_len or max(T, DEFAULT_CACHE_LEN))
        logits = self.decode(decoder_input_ids, encoder_outputs, attention_mask, cache)
        loss = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise UserError(
                    f"labels shape {tuple(labels.shape)} must equal decoder_input_ids shape "
                    f"{tuple(decoder_input_ids.shape)}"
                )
            loss = cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))  # (B*T, V)
        return T5Output(
            logits=logits, loss=loss, encoder_last_hidden_state=encoder_outputs, past_key_values=cache
        )

    # ------------------------------------------------------------------ decoding
    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> T5Cache:
        """An empty decoder cache for ``batch_size`` sequences of up to ``max_len`` decoder tokens
        (plus the P slots of an active decoder prefix)."""
        ref = self.shared.weight
        c = self.config
        n_prefix = self.prefix_kv.num_virtual_tokens if _active(self.prefix_kv) else 0
        kv = KVCache(
            c.num_decoder_layers,
            batch_size,
            c.num_heads,
            c.d_kv,
            max_len + n_prefix,  # the decoder prefix takes the first cache slots
            device=device or ref.device,
            dtype=dtype or ref.dtype,
        )
        return T5Cache(self_attn=kv)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        *,
        use_cache: bool = True,
        use_kv_cache: bool | None = None,
        eos_token_id: int | None = _FROM_CONFIG,  # type: ignore[assignment]
        pad_token_id: int | None = None,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        generator: torch.Generator | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> torch.Tensor:
        """Decode up to ``max_new_tokens`` tokens for each input; returns ``(B * num_return_sequences, 1 + n)``.

        Like Hugging Face's ``generate``: every row starts with ``decoder_start_token_id``; a row
        that produced ``eos_token_id`` (default: the config's; ``None`` = never stop) is finished
        and is padded with ``pad_token_id`` (default: the config's); the loop stops once every row
        is finished. The encoder runs once. With ``use_cache`` (the generation group's name:
        ``use_kv_cache``) each step feeds only the newest token, reusing the cached self-attention
        keys/values and the cross-attention keys/values of the encoder output. Greedy by default;
        ``greedy=False`` samples (see :func:`llmlab.inference.sampling.sample_next`, ``min_p`` too);
        ``repetition_penalty`` / ``no_repeat_ngram_size`` (:mod:`llmlab.inference.processors`) see
        the decoder sequence, the start token included, as in HF.

        ``num_beams > 1``: beam search with Hugging Face's rules (``length_penalty``,
        ``early_stopping``, ``num_return_sequences``; see :mod:`llmlab.inference.beam`): the
        encoder output is repeated for the ``num_beams`` beams of each input and the caches follow
        the beams; rows ``b * R .. b * R + R - 1`` are input ``b``'s best hypotheses, best first.
        The processors act on each beam's log-probabilities, as in HF. (HF pads T5's beams with the
        eos id, since its ``pad_token_id`` 0 is falsy; we pad with ``pad_token_id`` as its greedy
        search does.)
        """
        validate_beam_args(num_beams, length_penalty, early_stopping, num_return_sequences)
        validate_sampling_args(temperature, top_k, top_p, min_p)
        validate_processor_args(repetition_penalty, no_repeat_ngram_size)
        check_max_new_tokens(max_new_tokens)
        c = self.config
        eos = c.eos_token_id if eos_token_id is _FROM_CONFIG else eos_token_id
        pad = c.pad_token_id if pad_token_id is None else pad_token_id
        steps = T5Steps(self, input_ids, attention_mask, max_new_tokens,
                        use_cache=use_cache if use_kv_cache is None else use_kv_cache)
        if num_beams > 1:
            check_sampling_options({"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                                    "generator": generator})
            return run_beam_search(steps, max_new_tokens, num_beams, length_penalty, early_stopping,
                                   num_return_sequences, eos_id=eos, fill_id=pad,
                                   repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size)
        out = torch.full((input_ids.size(0), 1 + max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        out[:, 0] = c.decoder_start_token_id
        with eval_mode(self):
            steps.start(1)
            n = decode_loop(lambda step, n: steps.next_logits(out[:, :n], step), out, 1, max_new_tokens,
                            eos_id=eos, fill_id=pad, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            greedy=greedy, generator=generator, repetition_penalty=repetition_penalty,
                            no_repeat_ngram_size=no_repeat_ngram_size)
        return out[:, :n]

    # ------------------------------------------------------------------ helpers
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied weight counted once; ``non_embedding`` leaves out the
        vocabulary-sized matrices (shared embedding and an untied ``lm_head``)."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            for p in (self.shared.weight, self.lm_head.weight):
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    # ------------------------------------------------------------------ Hugging Face interop
    # (the conversion code lives in llmlab.models.hf.t5, imported on use)
    @classmethod
    def from_pretrained(cls, path: str | Path, *, allow_bin: bool = False, **overrides) -> T5:
        """Load a local Hugging Face ``T5ForConditionalGeneration`` directory (``config.json`` +
        ``model.safetensors`` or its sharded index); nothing is downloaded.

        ``overrides`` replace :class:`T5Config` fields (``dropout_rate``, ``attn_impl`` ...). The
        output layer is tied to the embedding unless the checkpoint has its own, different
        ``lm_head.weight`` (T5 v1.1, mT5); the decoder output is scaled as the checkpoint says
        (``scale_decoder_outputs``, written by transformers >= 5, else ``tie_word_embeddings``).
        ``allow_bin=True`` also reads a ``pytorch_model.bin`` (a pickle, loaded with
        ``torch.load(weights_only=True)``) when the directory has no safetensors file.
        """
        from llmlab.models.hf.t5 import from_pretrained

        return from_pretrained(cls, path, overrides, allow_bin=allow_bin)

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with ``T5ForConditionalGeneration`` names (the inverse of loading).

        A tied ``lm_head`` is left out, as Hugging Face saves it. Tensors share memory with the model.
        """
        from llmlab.models.hf.t5 import to_hf_state_dict

        return to_hf_state_dict(self)

    def to_hf_config(self) -> dict:
        """``config.json`` content for ``transformers.T5Config`` describing this model."""
        from llmlab.models.hf.t5 import to_hf_config

        return to_hf_config(self)


class T5Steps:
    """T5's step function for :func:`llmlab.inference.beam.run_beam_search` and greedy/sampled decoding.

    The decoder sequence starts from ``decoder_start_token_id``; :meth:`start` runs the encoder
    once on the ``B`` inputs and repeats its output (and padding mask) for the beams of each input
    (HF's ``_expand_inputs_for_generation``); with a cache each step feeds only the newest decoder
    token and :meth:`reorder` makes the cache rows follow the beams.
    """

    def __init__(self, model: T5, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int, *, use_cache: bool = True) -> None:
        _check_ids(input_ids, "input_ids")
        self.model, self.input_ids, self.attention_mask = model, input_ids, attention_mask
        self.max_new_tokens, self.use_cache = max_new_tokens, use_cache
        self.start_ids = torch.full((input_ids.size(0), 1), model.config.decoder_start_token_id,
                                    dtype=torch.long, device=input_ids.device)
        self.enc = self.mask = self.cache = None

    def start(self, rows_per_prompt: int) -> None:
        enc = self.model.encode(self.input_ids, self.attention_mask, keep_virtual=True)  # once per generation
        self.enc = enc.repeat_interleave(rows_per_prompt, dim=0)  # (B * K, P + S, d_model)
        if self.attention_mask is not None:
            self.mask = self.attention_mask.repeat_interleave(rows_per_prompt, dim=0)  # (B * K, S)
        if self.use_cache:
            rows = self.enc.size(0)
            self.cache = self.model.new_cache(rows, max(self.max_new_tokens, 1), device=self.input_ids.device)

    def next_logits(self, seqs: torch.Tensor, step: int) -> torch.Tensor:
        if self.cache is not None:  # feed the newest token only
            return self.model.decode(seqs[:, -1:], self.enc, self.mask, self.cache, last_only=True)[:, -1]
        return self.model.decode(seqs, self.enc, self.mask, last_only=True)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)

    def context_mask(self, n: int) -> None:
        return None  # decoder sequences have no padding (HF: no decoder_attention_mask)


def _check_ids(ids: torch.Tensor, name: str) -> None:
    if ids.dim() != 2 or ids.size(1) == 0:
        raise UserError(f"T5 expects {name} of shape (batch, seq_len >= 1), got {tuple(ids.shape)}")


def _active(hook: nn.Module | None) -> bool:
    """A prompt-learning hook that is set and not switched off (``disabled``: the base model runs)."""
    return hook is not None and not getattr(hook, "disabled", False)
