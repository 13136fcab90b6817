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
are readable ones (``encoder.blocks.0.self_attn.q``) and :func:`hf_to_llmlab_key` maps HF's
(``encoder.block.0.layer.0.SelfAttention.q``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.models.hf_io import apply_overrides, check_state_dict, checkpoint_dir, load_weights, read_json
from llmlab.inference.generate import decode_loop, eval_mode
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
    ) -> torch.Tensor:
        """Attend from ``x`` (B, T, d_model) to itself, or to precomputed ``kv`` (cross-attention).

        ``kv_cache`` (self-attention only) appends this step's keys/values to the cached ones.
        """
        B, T, _ = x.shape
        q = self._heads(self.q(x))  # (B, nh, T, d_kv)
        if kv is None:
            k, v = self.project_kv(x)  # (B, nh, T, d_kv)
            if kv_cache is not None:
                k, v = kv_cache.update(layer_idx, k, v)  # (B, nh, cached + T, d_kv)
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), mask))
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
    ) -> torch.Tensor:
        h = self.self_attn(
            self.self_attn_norm(x), self_mask, kv_cache=kv_cache, layer_idx=layer_idx, causal=True
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

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        S = x.size(1)
        # one (1, nh, S, S) bias for every layer; padding keys get the most negative finite value
        mask = self.position_bias(S, S, device=x.device).to(x.dtype)
        if attention_mask is not None:
            hidden = ~key_padding_mask(attention_mask)  # (B, 1, 1, S), True = padding
            mask = mask.masked_fill(hidden, torch.finfo(x.dtype).min)  # (B, nh, S, S)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, mask)
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
    ) -> torch.Tensor:
        T = x.size(1)
        past = cache.length if cache is not None else 0
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
            x = block(x, self_mask, cross_mask, cross_kv[i], kv_cache, i)
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
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output ``(B, S, d_model)``; ``attention_mask`` (B, S): 1 = real token, 0 = padding."""
        _check_ids(input_ids, "input_ids")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise UserError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)} (1 = real token, 0 = padding)"
            )
        return self.encoder(self.shared(input_ids), attention_mask)

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
        h = self.decoder(self.shared(decoder_input_ids), encoder_hidden_states, attention_mask, cache)
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
        * ``encoder_outputs`` (B, S, d_model) skips the encoder (``input_ids`` is then not needed);
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
            encoder_outputs = self.encode(input_ids, attention_mask)
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
        """An empty decoder cache for ``batch_size`` sequences of up to ``max_len`` decoder tokens."""
        ref = self.shared.weight
        c = self.config
        kv = KVCache(
            c.num_decoder_layers,
            batch_size,
            c.num_heads,
            c.d_kv,
            max_len,
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
        eos_token_id: int | None = _FROM_CONFIG,  # type: ignore[assignment]
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode up to ``max_new_tokens`` tokens for each input; returns ``(B, 1 + n)`` ids.

        Like Hugging Face's ``generate``: every row starts with ``decoder_start_token_id``; a row
        that produced ``eos_token_id`` (default: the config's; ``None`` = never stop) is finished
        and is padded with ``pad_token_id``; the loop stops once every row is finished. The
        encoder runs once. With ``use_cache`` each step feeds only the newest token, reusing the
        cached self-attention keys/values and the cross-attention keys/values of the encoder
        output. Greedy by default; ``greedy=False`` samples (see
        :func:`llmlab.inference.sampling.sample_next`).
        """
        validate_sampling_args(temperature, top_k, top_p)
        _check_ids(input_ids, "input_ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise UserError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        c = self.config
        eos = c.eos_token_id if eos_token_id is _FROM_CONFIG else eos_token_id
        B = input_ids.size(0)
        out = torch.full((B, 1 + max_new_tokens), c.pad_token_id, dtype=torch.long, device=input_ids.device)
        out[:, 0] = c.decoder_start_token_id
        with eval_mode(self):
            enc = self.encode(input_ids, attention_mask)  # once for the whole generation
            cache = self.new_cache(B, max(max_new_tokens, 1), device=input_ids.device) if use_cache else None

            def next_logits(step: int, n: int) -> torch.Tensor:
                if cache is not None:  # feed the last token only
                    return self.decode(out[:, n - 1 : n], enc, attention_mask, cache, last_only=True)[:, -1]
                return self.decode(out[:, :n], enc, attention_mask, last_only=True)[:, -1]

            n = decode_loop(next_logits, out, 1, max_new_tokens, eos_id=eos, fill_id=c.pad_token_id,
                            temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator)
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
    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> T5:
        """Load a local Hugging Face ``T5ForConditionalGeneration`` directory (``config.json`` +
        ``model.safetensors`` / its sharded index / ``pytorch_model.bin``); nothing is downloaded.

        ``overrides`` replace :class:`T5Config` fields (``dropout_rate``, ``attn_impl`` ...). The
        output layer is tied to the embedding unless the checkpoint has its own, different
        ``lm_head.weight`` (T5 v1.1, mT5); the decoder output is scaled as the checkpoint says
        (``scale_decoder_outputs``, written by transformers >= 5, else ``tie_word_embeddings``).
        """
        path = checkpoint_dir(path, "T5")
        hf = read_json(path / "config.json", "T5")
        weights_file, state = load_weights(path, "T5ForConditionalGeneration")
        head, shared = state.get("lm_head.weight"), state.get("shared.weight")
        untied = head is not None and shared is not None and not torch.equal(head, shared)
        config = _config_from_hf(hf, path / "config.json", tie=not untied)
        tie = overrides.get("tie_word_embeddings", config.tie_word_embeddings)
        if tie != config.tie_word_embeddings:
            raise UserError(
                f"tie_word_embeddings={tie} contradicts the checkpoint's weights "
                f"(tied: {config.tie_word_embeddings}); leave it out"
            )
        config = apply_overrides(config, overrides, "T5")
        model = cls(config)
        model.load_state_dict(_from_hf_state_dict(state, model, weights_file))
        return model

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with ``T5ForConditionalGeneration`` names (the inverse of loading).

        A tied ``lm_head`` is left out, as Hugging Face saves it. Tensors share memory with the model.
        """
        out = {}
        for key, t in self.state_dict().items():
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            out[llmlab_to_hf_key(key)] = t
        return out

    def to_hf_config(self) -> dict:
        """``config.json`` content for ``transformers.T5Config`` describing this model."""
        c = self.config
        if c.scale_decoder_outputs != c.tie_word_embeddings:
            raise UserError(
                "transformers < 5 derives the output scaling from tie_word_embeddings: a model with "
                f"tie_word_embeddings={c.tie_word_embeddings} and "
                f"scale_decoder_outputs={c.scale_decoder_outputs} cannot be exported portably"
            )
        return {
            "model_type": "t5",
            "architectures": ["T5ForConditionalGeneration"],
            "vocab_size": c.vocab_size,
            "d_model": c.d_model,
            "d_kv": c.d_kv,
            "d_ff": c.d_ff,
            "num_layers": c.num_layers,
            "num_decoder_layers": c.num_decoder_layers,
            "num_heads": c.num_heads,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "dropout_rate": c.dropout_rate,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "initializer_factor": c.initializer_factor,
            "feed_forward_proj": c.feed_forward_proj,
            "tie_word_embeddings": c.tie_word_embeddings,
            "scale_decoder_outputs": c.scale_decoder_outputs,
            "is_encoder_decoder": True,
            "pad_token_id": c.pad_token_id,
            "eos_token_id": c.eos_token_id,
            "decoder_start_token_id": c.decoder_start_token_id,
        }


def _check_ids(ids: torch.Tensor, name: str) -> None:
    if ids.dim() != 2 or ids.size(1) == 0:
        raise UserError(f"T5 expects {name} of shape (batch, seq_len >= 1), got {tuple(ids.shape)}")


# ---------------------------------------------------------------------- HF names
# HF numbers the sub-layers of a block: encoder 0 = self-attention, 1 = FFN; decoder 0 = self-
# attention, 1 = cross-attention (EncDecAttention), 2 = FFN. Each sub-layer has its own layer_norm.
_HF_SUBLAYERS = {
    "encoder": {"0": ("SelfAttention", "self_attn"), "1": ("DenseReluDense", "ffn")},
    "decoder": {
        "0": ("SelfAttention", "self_attn"),
        "1": ("EncDecAttention", "cross_attn"),
        "2": ("DenseReluDense", "ffn"),
    },
}
_HF_BLOCK = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d)\.(.+)$")
_OURS_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(self_attn|cross_attn|ffn)(_norm)?\.(.+)$")


def hf_to_llmlab_key(key: str) -> str | None:
    """``T5ForConditionalGeneration`` state-dict key -> this module's key (None = not a weight we keep).

    ``encoder.block.3.layer.1.DenseReluDense.wo.weight`` -> ``encoder.blocks.3.ffn.wo.weight``;
    ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`` ->
    ``encoder.position_bias.embedding.weight``; ``...layer.0.layer_norm.weight`` ->
    ``...self_attn_norm.weight``; ``encoder.final_layer_norm`` -> ``encoder.final_norm``.
    """
    if key in ("shared.weight", "lm_head.weight"):
        return key
    if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        return None  # aliases of shared.weight
    if key.endswith(".final_layer_norm.weight"):
        return key.replace("final_layer_norm", "final_norm")
    m = _HF_BLOCK.match(key)
    if m is None:
        raise KeyError(key)
    stack, block, sub, rest = m.groups()
    if sub not in _HF_SUBLAYERS[stack]:
        raise KeyError(key)
    hf_name, ours = _HF_SUBLAYERS[stack][sub]
    if rest == "layer_norm.weight":
        return f"{stack}.blocks.{block}.{ours}_norm.weight"
    if not rest.startswith(hf_name + "."):
        raise KeyError(key)
    rest = rest[len(hf_name) + 1 :]
    if rest == "relative_attention_bias.weight":
        if ours == "cross_attn":
            return None  # some old checkpoints carry an unused cross-attention bias
        if block != "0":
            raise KeyError(key)  # T5 v1.0/1.1 compute the bias in the first layer only
        return f"{stack}.position_bias.embedding.weight"
    return f"{stack}.blocks.{block}.{ours}.{rest}"


def llmlab_to_hf_key(key: str) -> str:
    """Inverse of :func:`hf_to_llmlab_key`."""
    if key in ("shared.weight", "lm_head.weight"):
        return key
    if key.endswith(".final_norm.weight"):
        return key.replace("final_norm", "final_layer_norm")
    if key.endswith(".position_bias.embedding.weight"):
        stack = key.split(".")[0]
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    m = _OURS_BLOCK.match(key)
    if m is None:
        raise KeyError(key)
    stack, block, ours, norm, rest = m.groups()
    sub, hf_name = next((s, h) for s, (h, o) in _HF_SUBLAYERS[stack].items() if o == ours)
    if norm:
        return f"{stack}.block.{block}.layer.{sub}.layer_norm.{rest}"
    return f"{stack}.block.{block}.layer.{sub}.{hf_name}.{rest}"


# ---------------------------------------------------------------------- loading helpers


def _config_from_hf(hf: dict, file: Path, *, tie: bool) -> T5Config:
    """T5Config from a HF T5Config dict; refuses variants this architecture cannot represent."""
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        raise UserError(f"{file}: model_type={model_type!r}, but only T5 (and mT5) checkpoints can be loaded")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in FEED_FORWARD_PROJS:
        raise UserError(
            f"{file}: feed_forward_proj={proj!r} is not supported: use {' or '.join(FEED_FORWARD_PROJS)}"
        )
    # transformers >= 5 writes scale_decoder_outputs; before, the scaling followed tie_word_embeddings
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, list):
        eos = eos[0]
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    num_layers = hf.get("num_layers", 6)
    return T5Config(
        vocab_size=hf.get("vocab_size", 32128),
        d_model=hf.get("d_model", 512),
        d_kv=hf.get("d_kv", 64),
        d_ff=hf.get("d_ff", 2048),
        num_layers=num_layers,
        num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
        num_heads=hf.get("num_heads", 8),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        initializer_factor=float(hf.get("initializer_factor", 1.0)),
        feed_forward_proj=proj,
        tie_word_embeddings=tie,
        scale_decoder_outputs=bool(scale),
        pad_token_id=0 if pad is None else pad,
        eos_token_id=1 if eos is None else eos,
        decoder_start_token_id=(0 if pad is None else pad) if start is None else start,
    )




def _from_hf_state_dict(state: dict[str, torch.Tensor], model: T5, file: Path) -> dict[str, torch.Tensor]:
    """Rename HF T5 tensors into ``model``'s state dict, checking every key and shape."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in state.items():
        try:
            name = hf_to_llmlab_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if name is not None:
            out[name] = t
    if model.config.tie_word_embeddings:
        out["lm_head.weight"] = out.get("shared.weight")
    return check_state_dict(out, model.state_dict(), file, "T5ForConditionalGeneration", unexpected=unknown)
