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
the state dict (table in :func:`_hf_name`); :meth:`Bert.to_hf_state_dict` goes the other way.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.models.hf_io import apply_overrides, check_state_dict, checkpoint_dir, load_weights, read_json
from llmlab.nn.attention import IMPLS, attention, key_padding_mask
from llmlab.nn.losses import IGNORE_INDEX, cross_entropy

# hidden_act names of Hugging Face's ACT2FN that this file implements
_ACTIVATIONS = {
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
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(f"model.hidden_act={self.hidden_act!r} is unknown: use one of {', '.join(_ACTIVATIONS)}")
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

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)  # (B, T, H) + (T, H)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))  # (B, T, H)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q = self.query(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.value(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
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
        self.act = _ACTIVATIONS[config.hidden_act]
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask))
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
        self.act = _ACTIVATIONS[config.hidden_act]
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
        """Last-layer hidden states ``(B, T, H)`` (``BertModel``'s ``last_hidden_state``)."""
        if input_ids.dim() != 2:
            raise UserError(f"BERT expects token ids of shape (batch, seq_len), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise UserError(
                f"sequence of {T} tokens is longer than the model's max_position_embeddings="
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
            mask = key_padding_mask(attention_mask)  # (B, 1, 1, T): padding is never a key
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, mask)
        return x

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
    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> Bert:
        """Load a local Hugging Face ``BertForPreTraining`` directory (``config.json`` +
        ``model.safetensors`` or ``pytorch_model.bin``), e.g. one written by ``save_pretrained``.

        ``overrides`` replace :class:`BertConfig` fields (dropouts, ``attn_impl`` ...). A
        ``max_position_embeddings`` smaller than the checkpoint's keeps the first position rows.
        Nothing is downloaded.
        """
        path = checkpoint_dir(path, "BERT")
        config = _config_from_hf(read_json(path / "config.json", "BERT"), path / "config.json")
        config = apply_overrides(config, overrides, "BERT")
        weights_file, state = load_weights(path, "BertForPreTraining")
        model = cls(config)
        model.load_state_dict(_from_hf_state_dict(state, model, weights_file))
        return model

    def to_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with ``BertForPreTraining`` keys (the inverse of :meth:`from_pretrained`).

        The tied decoder appears as ``cls.predictions.decoder.weight`` sharing memory with the word
        embeddings (clone before saving with safetensors, which refuses shared tensors).
        """
        out = {_hf_name(k): t for k, t in self.state_dict().items()}
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]  # HF ties these two as well
        return out

    def to_hf_config(self) -> dict:
        """``config.json`` content for ``transformers.BertConfig`` describing this model."""
        c = asdict(self.config)
        c.pop("attn_impl")
        return {"model_type": "bert", "architectures": ["BertForPreTraining"], **c,
                "position_embedding_type": "absolute", "tie_word_embeddings": True}


# ---------------------------------------------------------------------- Hugging Face names
# ours -> Hugging Face, applied in order to the part after the layer index
_LAYER_RENAMES = (
    ("attn.query.", "attention.self.query."),
    ("attn.key.", "attention.self.key."),
    ("attn.value.", "attention.self.value."),
    ("attn.proj.", "attention.output.dense."),
    ("attn_norm.", "attention.output.LayerNorm."),
    ("ffn.fc.", "intermediate.dense."),
    ("ffn.proj.", "output.dense."),
    ("ffn_norm.", "output.LayerNorm."),
)
_RENAMES = (
    ("embeddings.norm.", "bert.embeddings.LayerNorm."),
    ("embeddings.", "bert.embeddings."),
    ("pooler.dense.", "bert.pooler.dense."),
    ("mlm_head.dense.", "cls.predictions.transform.dense."),
    ("mlm_head.norm.", "cls.predictions.transform.LayerNorm."),
    ("mlm_head.decoder.bias", "cls.predictions.bias"),
    ("mlm_head.decoder.weight", "cls.predictions.decoder.weight"),
    ("nsp_head.", "cls.seq_relationship."),
)
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.*)")


def _hf_name(key: str) -> str:
    """Our state-dict key -> the ``BertForPreTraining`` key of the same tensor."""
    m = _LAYER_KEY.fullmatch(key)
    if m:
        rest = m.group(2)
        for ours, hf in _LAYER_RENAMES:
            if rest.startswith(ours):
                return f"bert.encoder.layer.{m.group(1)}.{hf}{rest[len(ours):]}"
    for ours, hf in _RENAMES:
        if key.startswith(ours):
            return hf + key[len(ours):]
    raise KeyError(key)  # a new module without a Hugging Face name: extend the tables above


def _normalise_hf_key(key: str) -> str | None:
    """Hugging Face key variants -> the current ``BertForPreTraining`` key (None: not a weight)."""
    if key.endswith("embeddings.position_ids"):
        return None  # a buffer older transformers versions saved
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)  # checkpoints converted from TF
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    if not key.startswith(("bert.", "cls.")):
        key = "bert." + key  # a BertModel checkpoint: no prefix (and no heads)
    return key




def _config_from_hf(hf: dict, file: Path) -> BertConfig:
    """BertConfig from a ``transformers.BertConfig`` dict; refuses variants this file cannot run."""
    model_type = hf.get("model_type", "bert")
    if model_type != "bert":
        raise UserError(f"{file}: model_type={model_type!r}, but only BERT checkpoints can be loaded")
    unsupported = {
        "position_embedding_type": ("absolute", hf.get("position_embedding_type", "absolute")),
        "is_decoder": (False, hf.get("is_decoder", False)),
        "add_cross_attention": (False, hf.get("add_cross_attention", False)),
        "tie_word_embeddings": (True, hf.get("tie_word_embeddings", True)),
    }
    for key, (want, got) in unsupported.items():
        if got != want:
            raise UserError(f"{file}: {key}={got!r} is not supported by llmlab's BERT (needs {want!r})")
    defaults = BertConfig()
    kwargs = {}
    for f in fields(BertConfig):
        if f.name != "attn_impl":
            kwargs[f.name] = hf.get(f.name, getattr(defaults, f.name))
    if kwargs["hidden_act"] not in _ACTIVATIONS:
        raise UserError(
            f"{file}: hidden_act={kwargs['hidden_act']!r} is not supported: use one of {', '.join(_ACTIVATIONS)}"
        )
    return BertConfig(**kwargs)




def _from_hf_state_dict(state: dict[str, torch.Tensor], model: Bert, file: Path) -> dict[str, torch.Tensor]:
    """Rename Hugging Face BERT tensors into ``model``'s state dict, checking every key and shape."""
    expected = model.state_dict()
    to_ours = {_hf_name(k): k for k in expected}
    hf: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = _normalise_hf_key(key)
        if name is not None:
            hf[name] = t
    # the output bias is saved as cls.predictions.bias, cls.predictions.decoder.bias, or both (tied)
    decoder_bias = hf.pop("cls.predictions.decoder.bias", None)
    hf.setdefault("cls.predictions.bias", decoder_bias)
    # the decoder weight is the word embedding: newer files omit it, older ones repeat it
    decoder = hf.pop("cls.predictions.decoder.weight", None)
    words = hf.get("bert.embeddings.word_embeddings.weight")
    if decoder is not None and words is not None and not torch.equal(decoder, words):
        raise UserError(
            f"{file}: cls.predictions.decoder.weight differs from the word embeddings, but BERT ties "
            "them: this checkpoint is not an original-BERT BertForPreTraining"
        )
    hf["cls.predictions.decoder.weight"] = words

    out = {to_ours[k]: t for k, t in hf.items() if k in to_ours and t is not None}
    pos = "embeddings.position_embeddings.weight"
    if out.get(pos) is not None and out[pos].size(0) > model.config.max_position_embeddings:
        out[pos] = out[pos][: model.config.max_position_embeddings]  # max_position_embeddings override
    return check_state_dict(out, expected, file, "BertForPreTraining (both heads)",
                            unexpected=sorted(k for k in hf if k not in to_ours), display=_hf_name)
