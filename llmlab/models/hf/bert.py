"""BERT <-> Hugging Face ``BertForPreTraining``: config.json and state-dict conversion.

Our module names are readable ones (``layers.0.attn.query``); :func:`_hf_name` maps each to
Hugging Face's (``bert.encoder.layer.0.attention.self.query``) with the tables below. Loading also
accepts the variants older checkpoints carry (TF-style ``LayerNorm.gamma/beta``, the
``position_ids`` buffer, a ``BertModel`` without the ``bert.`` prefix, the decoder weight and bias
saved explicitly).
"""

from __future__ import annotations

import re
from dataclasses import asdict, fields
from pathlib import Path

import torch

from llmlab.errors import UserError
from llmlab.models.bert import ACTIVATIONS, Bert, BertConfig
from llmlab.models.hf.io import apply_overrides, check_state_dict, checkpoint_dir, load_weights, read_json


def from_pretrained(cls: type[Bert], path: str | Path, overrides: dict, *, allow_bin: bool = False) -> Bert:
    """See :meth:`Bert.from_pretrained`."""
    path = checkpoint_dir(path, "BERT")
    config = _config_from_hf(read_json(path / "config.json", "BERT"), path / "config.json")
    config = apply_overrides(config, overrides, "BERT")
    weights_file, state = load_weights(path, "BertForPreTraining", allow_bin=allow_bin)
    model = cls(config)
    model.load_state_dict(_from_hf_state_dict(state, model, weights_file))
    return model


def to_hf_state_dict(model: Bert) -> dict[str, torch.Tensor]:
    """See :meth:`Bert.to_hf_state_dict`."""
    out = {_hf_name(k): t for k, t in model.state_dict().items()}
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]  # HF ties these two as well
    return out


def to_hf_config(model: Bert) -> dict:
    """See :meth:`Bert.to_hf_config`."""
    c = asdict(model.config)
    c.pop("attn_impl")
    return {"model_type": "bert", "architectures": ["BertForPreTraining"], **c,
            "position_embedding_type": "absolute", "tie_word_embeddings": True}


# ---------------------------------------------------------------------- names
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


# ---------------------------------------------------------------------- loading
def _config_from_hf(hf: dict, file: Path) -> BertConfig:
    """BertConfig from a ``transformers.BertConfig`` dict; refuses variants llmlab's BERT cannot run."""
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
    if kwargs["hidden_act"] not in ACTIVATIONS:
        raise UserError(
            f"{file}: hidden_act={kwargs['hidden_act']!r} is not supported: use one of {', '.join(ACTIVATIONS)}"
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
