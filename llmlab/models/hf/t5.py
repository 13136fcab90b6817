"""T5 <-> Hugging Face ``T5ForConditionalGeneration``: config.json and state-dict conversion.

HF numbers the sub-layers of a block (``encoder.block.0.layer.1.DenseReluDense.wo``); llmlab's
modules have readable names (``encoder.blocks.0.ffn.wo``): :func:`hf_to_llmlab_key` and
:func:`llmlab_to_hf_key` map one to the other.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llmlab.errors import UserError
from llmlab.models.hf.io import apply_overrides, check_state_dict, checkpoint_dir, load_weights, read_json
from llmlab.models.t5 import FEED_FORWARD_PROJS, T5, T5Config


def from_pretrained(cls: type[T5], path: str | Path, overrides: dict, *, allow_bin: bool = False) -> T5:
    """See :meth:`T5.from_pretrained`."""
    path = checkpoint_dir(path, "T5")
    hf = read_json(path / "config.json", "T5")
    weights_file, state = load_weights(path, "T5ForConditionalGeneration", allow_bin=allow_bin)
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


def to_hf_state_dict(model: T5) -> dict[str, torch.Tensor]:
    """See :meth:`T5.to_hf_state_dict`."""
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[llmlab_to_hf_key(key)] = t
    return out


def to_hf_config(model: T5) -> dict:
    """See :meth:`T5.to_hf_config`."""
    c = model.config
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


# ---------------------------------------------------------------------- names
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
    """``T5ForConditionalGeneration`` state-dict key -> llmlab's T5 key (None = not a weight we keep).

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


# ---------------------------------------------------------------------- loading
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
