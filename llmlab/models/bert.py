"""BERT: a bidirectional transformer encoder pretrained with masked-LM and next-sentence prediction
(Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", §3.1 and appendix A.1; architecture as released by Google and in Hugging Face's
``BertForPreTraining``).

Word + learned position + segment (token type) embeddings, summed, then LayerNorm and dropout,
feed ``num_hidden_layers`` **post-LN** encoder layers (bidirectional self-attention → add →
LayerNorm; GELU feed-forward → add → LayerNorm; the 2017 Transformer's order, unlike GPT-2's pre-LN).
Two heads sit on top:

* masked LM: dense → GELU → LayerNorm → a decoder whose weight *is* the word embedding matrix,
  plus a per-token output bias;
* next sentence: the pooler (dense + tanh on the ``[CLS]`` vector) → a 2-way linear classifier,
  class 0 = "B follows A" (IsNext), 1 = "B is a random segment" (NotNext), as in Hugging Face.

Not copied from the course seed (spec §4.4): its untied MLM decoder and its second tanh layer on
top of the pooler. :meth:`Bert.from_pretrained` loads a local Hugging Face directory by renaming
the state dict (tables in :mod:`llmlab.models.hf.bert`); :meth:`Bert.to_hf_state_dict` goes the other way.

Prompt-learning hooks (filled by :mod:`llmlab.peft.prompt`; ``None`` by default, skipped while
their ``disabled`` attribute is true):

* ``virtual_tokens``: ``virtual_tokens(batch_size) -> (B, P, hidden_size)`` word embeddings put
  before the tokens' (soft prompt). Like Hugging Face + ``peft`` on ``inputs_embeds = [prompt;
  tokens]`` they get positions ``0 .. P-1``, segment 0 and the embedding LayerNorm; the tokens
  get positions ``P .. P+T-1``.
* ``prefix_kv``: ``prefix_kv(batch_size) -> [(k, v)] * num_hidden_layers``, each ``(B, nh, P,
  head_dim)``, keys/values put before every layer's own (prefix tuning / P-tuning v2), attended
  by every token. As with Hugging Face's ``past_key_values`` of length P, the tokens then get
  positions ``P .. P+T-1``.

The padding mask is extended with P ones, ``num_virtual_tokens`` counts against
``max_position_embeddings``, and every output (hidden states, MLM logits) covers the real tokens
only; the pooler reads the real ``[CLS]`` (``peft`` with a soft prompt would pool the first
virtual token instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.nn.attention import IMPLS, attention, key_padding_mask
from llmlab.nn.losses import IGNORE_INDEX, cross_entropy

# hidden_act names of Hugging Face's ACT2FN that this file implements
ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf GELU: what BERT was trained with
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class BertConfig:
    """Field names and defaults of ``transformers.BertConfig`` (BERT-base, uncased vocabulary)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # feed-forward width (4 x hidden_size in every released BERT)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1  # embeddings, attention output and feed-forward output
    attention_probs_dropout_prob: float = 0.1  # on the attention weights
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # segments A and B
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0  # its word embedding starts at zero and gets no gradient from the input side
    attn_impl: str = "sdpa"  # "sdpa" | "eager" (llmlab.nn.attention); not a Hugging Face field

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name}={value!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads != 0:
            raise UserError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_attention_heads="
                f"{self.num_attention_heads}: pick hidden_size as a multiple of the number of heads"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"model.hidden_act={self.hidden_act!r} is unknown: use one of {', '.join(ACTIVATIONS)}")
        if self.attn_impl not in IMPLS:
            raise UserError(f"model.attn_impl={self.attn_impl!r} is unknown: use one of {', '.join(IMPLS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model.{name}={getattr(self, name)} must be in [0, 1)")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise UserError(f"model.pad_token_id={self.pad_token_id} is outside the vocabulary of {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> BertConfig:
        """A config from :data:`BERT_PRESETS` with some fields replaced (e.g. ``vocab_size``)."""
        if name not in BERT_PRESETS:
            raise UserError(f"unknown BERT preset {name!r}: use one of {', '.join(BERT_PRESETS)}")
        return cls(**{**BERT_PRESETS[name], **overrides})


BERT_PRESETS: dict[str, dict] = {
    # CPU-sized: the shape of Google's "BERT-Tiny" (Turc et al. 2019, L=2 H=128 A=2), 128 positions;
    # the vocabulary normally comes from the locally trained WordPiece tokenizer
    "bert_tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512,
                      max_position_embeddings=128),
    # the paper's BERT-base (110M parameters with the tied decoder) and BERT-large (340M)
    "bert_base": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512),
    "bert_large": dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, max_position_embeddings=512),
    # the course seed's model (spec §7): BERT-base's numbers; its untied decoder and double pooler
    # are bugs and are not reproduced, so only the training values (length 128, ...) differ from base
    "bert_seed": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512),
}


@dataclass
class BertOutput:
    """What :meth:`Bert.forward` returns (names of Hugging Face's ``BertForPreTrainingOutput``)."""

    prediction_logits: torch.Tensor  # (B, T, V); (N, V) for the N labelled positions with masked_only
    seq_relationship_logits: torch.Tensor  # (B, 2): 0 = IsNext, 1 = NotNext
    hidden_states: torch.Tensor  # (B, T, H), the last encoder layer
    pooled_output: torch.Tensor  # (B, H), tanh(dense(h_[CLS]))
    loss: torch.Tensor | None = None  # mlm_loss + nsp_loss (whichever labels were given)
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None


# ---------------------------------------------------------------------- modules
class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor,
        prompt: torch.Tensor | None = None,
        past: int = 0,
    ) -> torch.Tensor:
        """``prompt`` (B, P, H): soft-prompt word embeddings before the tokens (segment 0);
        ``past``: position of the first row (the length of a key/value prefix)."""
        x = self.word_embeddings(input_ids)  # (B, T, H)
        if prompt is not None:
            x = torch.cat([prompt.to(x.dtype), x], dim=1)  # (B, P + T, H)
            token_type_ids = F.pad(token_type_ids, (prompt.size(1), 0))  # the prompt is segment A
        pos = torch.arange(past, past + x.size(1), device=input_ids.device)  # (S,)
        x = x + self.position_embeddings(pos)  # (B, S, H) + (S, H)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))  # (B, S, H)


class BertSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention: every token sees every non-padding token."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.n_head = config.num_attention_heads
        self.attn_impl = config.attn_impl
        self.attn_dropout = config.attention_probs_dropout_prob
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(H, H)
        self.value = nn.Linear(H, H)
        self.proj = nn.Linear(H, H)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q = self.query(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.value(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if prefix is not None:  # prefix keys/values first, seen by every token
            k = torch.cat([prefix[0].to(k.dtype), k], dim=2)  # (B, nh, P + T, hs)
            v = torch.cat([prefix[1].to(v.dtype), v], dim=2)  # (B, nh, P + T, hs)
        y = attention(
            q, k, v,
            causal=False,  # the point of BERT: left and right context
            mask=mask,
            dropout_p=self.attn_dropout if self.training else 0.0,
            impl=self.attn_impl,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.dropout(self.proj(y))


class BertFeedForward(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class BertLayer(nn.Module):
    """Post-LN encoder layer: the sub-layer's output is added to its input, *then* normalised."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = BertSelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = BertFeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask, prefix))
        return self.ffn_norm(x + self.ffn(x))


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))  # (B, H): the [CLS] position only


class BertMLMHead(nn.Module):
    """dense → activation → LayerNorm → decoder (weight tied to the word embeddings, own bias)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)  # weight replaced by Bert (tied)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(h))))


class Bert(nn.Module):
    """BERT with both pretraining heads (``BertForPreTraining``); see the module docstring."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = BertPooler(config)
        self.mlm_head = BertMLMHead(config)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        self.mlm_head.decoder.weight = self.embeddings.word_embeddings.weight  # one Parameter, two uses
        # prompt-learning hooks (module docstring); tuners fill them after this init
        self.register_module("virtual_tokens", None)
        self.register_module("prefix_kv", None)
        self.apply(self._init_weights)
        if config.pad_token_id is not None:  # the tied decoder's init above overwrote the zero row
            with torch.no_grad():
                self.embeddings.word_embeddings.weight[config.pad_token_id].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        # Hugging Face's BertPreTrainedModel init (a truncated normal in Google's TF code)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ forward
    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states ``(B, T, H)`` (``BertModel``'s ``last_hidden_state``) of the real
        tokens (a soft prompt's positions are dropped)."""
        if input_ids.dim() != 2:
            raise UserError(f"BERT expects token ids of shape (batch, seq_len), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        prompt_hook = self.virtual_tokens if _active(self.virtual_tokens) else None
        prefix_hook = self.prefix_kv if _active(self.prefix_kv) else None
        n_prompt = prompt_hook.num_virtual_tokens if prompt_hook is not None else 0
        n_prefix = prefix_hook.num_virtual_tokens if prefix_hook is not None else 0
        if n_prompt + n_prefix + T > self.config.max_position_embeddings:
            virtual = f" + {n_prompt + n_prefix} virtual (prompt/prefix)" if n_prompt + n_prefix else ""
            raise UserError(
                f"sequence of {T}{virtual} tokens is longer than the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}: truncate the input (data.max_seq_len) or use a larger model"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # everything is segment A
        elif token_type_ids.shape != input_ids.shape:
            raise UserError(f"token_type_ids shape {tuple(token_type_ids.shape)} must equal input_ids shape {(B, T)}")
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise UserError(
                    f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {(B, T)}"
                )
            # the prefix and prompt slots are always keys: P ones in front
            attention_mask = F.pad(attention_mask, (n_prefix + n_prompt, 0), value=1)  # (B, P + T)
            mask = key_padding_mask(attention_mask)  # (B, 1, 1, P + T): padding is never a key
        prompt = prompt_hook(B) if prompt_hook is not None else None  # (B, P, H)
        prefix = prefix_hook(B) if prefix_hook is not None else None  # L x (k, v), each (B, nh, P, hs)
        x = self.embeddings(input_ids, token_type_ids, prompt, past=n_prefix)  # (B, P + T, H)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if prefix is None else prefix[i])
        return x[:, n_prompt:]  # (B, T, H)

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the active prompt-learning hooks take before the tokens (0 without them)."""
        return sum(m.num_virtual_tokens for m in (self.virtual_tokens, self.prefix_kv) if _active(m))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        *,
        masked_only: bool = False,
    ) -> BertOutput:
        """Both heads' logits and, given labels, their losses.

        Args:
            input_ids: ``(B, T)`` token ids, ``[CLS] A [SEP] B [SEP] [PAD]...``.
            attention_mask: ``(B, T)`` 1 = token, 0 = padding (padding keys are hidden).
            token_type_ids: ``(B, T)`` 0 = segment A, 1 = segment B (default all 0).
            labels: ``(B, T)`` original ids at the masked positions, -100 elsewhere. The MLM loss
                is their mean cross-entropy; with no labelled position at all it is 0 (not NaN).
            next_sentence_label: ``(B,)`` 0 = B follows A, 1 = B is random.
            masked_only: compute the vocabulary logits only at the labelled positions (needs
                ``labels``): ``prediction_logits`` is then ``(N, V)`` in row-major order of the
                labelled positions. Same losses, much less work when V is large.
        """
        h = self.encode(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        pooled = self.pooler(h)  # (B, H)
        nsp_logits = self.nsp_head(pooled)  # (B, 2)

        if labels is not None and labels.shape != input_ids.shape:
            raise UserError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        mlm_loss = nsp_loss = None
        if masked_only:
            if labels is None:
                raise UserError("forward(masked_only=True) needs labels: they say which positions to predict")
            selected = labels != IGNORE_INDEX  # (B, T)
            mlm_logits = self.mlm_head(h[selected])  # (N, V)
            mlm_targets = labels[selected]  # (N,)
        else:
            mlm_logits = self.mlm_head(h)  # (B, T, V)
            mlm_targets = labels
        if labels is not None:
            flat_targets = mlm_targets.reshape(-1)
            if bool((flat_targets != IGNORE_INDEX).any()):
                mlm_loss = cross_entropy(mlm_logits.reshape(-1, mlm_logits.size(-1)), flat_targets)
            else:  # nothing masked: a zero that keeps the graph (the seed's NaN, spec §4.4 bug 3)
                mlm_loss = mlm_logits.sum() * 0.0
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits, next_sentence_label.reshape(-1))
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        return BertOutput(
            prediction_logits=mlm_logits,
            seq_relationship_logits=nsp_logits,
            hidden_states=h,
            pooled_output=pooled,
            loss=sum(losses[1:], losses[0]) if losses else None,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
        )

    # ------------------------------------------------------------------ helpers
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied decoder weight counted once.

        ``non_embedding=True`` leaves out the word, position and token-type embeddings.
        """
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            e = self.embeddings
            for p in (e.word_embeddings.weight, e.position_embeddings.weight, e.token_type_embeddings.weight):
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    # ------------------------------------------------------------------ Hugging Face interop
    # (the conversion code lives in llmlab.models.hf.bert, imported on use)
    @classmethod
    def from_pretrained(cls, path: str | Path, *, allow_bin: bool = False, **overrides) -> Bert:
        """Load a local Hugging Face ``BertForPreTraining`` directory (``config.json`` +
        ``model.safetensors``), e.g. one written by ``save_pretrained``. Nothing is downloaded.

        ``overrides`` replace :class:`BertConfig` fields (dropouts, ``attn_impl`` ...). A
        ``max_position_embeddings`` smaller than the checkpoint's keeps the first position rows.
        ``allow_bin=True`` also reads a ``pytorch_model.bin`` (a pickle, loaded with
        ``torch.load(weights_only=True)``) when the directory has no safetensors file.
        """
        from llmlab.models.hf.bert import from_pretrained

        return from_pretrained(cls, path, overrides, allow_bin=allow_bin)

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with ``BertForPreTraining`` keys (the inverse of :meth:`from_pretrained`).

        The tied decoder appears as ``cls.predictions.decoder.weight`` sharing memory with the word
        embeddings (clone before saving with safetensors, which refuses shared tensors).
        """
        from llmlab.models.hf.bert import to_hf_state_dict

        return to_hf_state_dict(self)

    def to_hf_config(self) -> dict:
        """``config.json`` content for ``transformers.BertConfig`` describing this model."""
        from llmlab.models.hf.bert import to_hf_config

        return to_hf_config(self)


def _active(hook: nn.Module | None) -> bool:
    """A prompt-learning hook that is set and not switched off (``disabled``: the base model runs)."""
    return hook is not None and not getattr(hook, "disabled", False)
