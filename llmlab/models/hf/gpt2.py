"""GPT-2 <-> Hugging Face ``GPT2LMHeadModel``: config.json and state-dict conversion.

llmlab's module names mirror Hugging Face's (``transformer.h.0.attn.c_attn`` ...), so converting
weights is a key rename plus a transpose of HF's ``Conv1D`` weights (stored ``(in, out)``, whereas
``nn.Linear`` stores ``(out, in)``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmlab.errors import UserError
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.hf.io import apply_overrides, check_state_dict, checkpoint_dir, load_weights, read_json

# HF stores these as Conv1D weights of shape (in, out); nn.Linear wants (out, in)
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def from_pretrained(cls: type[GPT], path: str | Path, overrides: dict, *, allow_bin: bool = False) -> GPT:
    """See :meth:`GPT.from_pretrained`."""
    path = checkpoint_dir(path, "GPT-2")
    config = _config_from_hf(read_json(path / "config.json", "GPT-2"), path / "config.json")
    longest = config.block_size
    config = apply_overrides(config, overrides, "GPT")
    if config.block_size > longest:
        raise UserError(f"block_size={config.block_size} is longer than the {longest} positions {path} was trained "
                        f"with: use at most {longest} (its position table cannot grow)")

    weights_file, state = load_weights(path, "GPT2LMHeadModel", allow_bin=allow_bin)
    model = cls(config)
    model.load_state_dict(_from_hf_state_dict(state, model, weights_file))
    return model


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """See :meth:`GPT.to_hf_state_dict`."""
    out = {}
    for key, t in model.state_dict().items():
        out[key] = t.t().contiguous() if key.endswith(_CONV1D_WEIGHTS) else t
    return out


def to_hf_config(model: GPT) -> dict:
    """See :meth:`GPT.to_hf_config`."""
    c = model.config
    if not c.bias:
        raise UserError("GPT-2 in Hugging Face always has biases: a bias=False model cannot be exported")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "initializer_range": c.init_std,
        "tie_word_embeddings": c.tie_embeddings,
    }


def _config_from_hf(hf: dict, file: Path) -> GPTConfig:
    """GPTConfig from a GPT2Config dict; refuses variants this architecture cannot represent."""
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"{file}: model_type={model_type!r}, but only GPT-2 checkpoints can be loaded")
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise UserError(
            f"{file}: n_inner={n_inner} but llmlab's GPT has a 4*n_embd={4 * n_embd} MLP: "
            "use a checkpoint with n_inner null"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh approximation of GELU
        raise UserError(f"{file}: activation_function={act!r} is not supported: GPT-2 uses 'gelu_new'")
    unsupported = {
        "scale_attn_weights": (True, hf.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": (False, hf.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": (False, hf.get("add_cross_attention", False)),
    }
    for key, (want, got) in unsupported.items():
        if got != want:
            raise UserError(f"{file}: {key}={got} is not supported by llmlab's GPT (needs {want})")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.1)),
        bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _from_hf_state_dict(state: dict[str, torch.Tensor], model: GPT, file: Path) -> dict[str, torch.Tensor]:
    """Rename/transpose HF GPT-2 tensors into ``model``'s state dict, checking every key and shape."""
    out: dict[str, torch.Tensor] = {}
    lm_head = None
    for key, t in state.items():
        name = key.removeprefix("transformer.")  # GPT2Model checkpoints have no prefix
        if name.split(".")[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
            continue  # old HF versions saved the causal-mask buffers; we build masks on the fly
        if name == "lm_head.weight":
            lm_head = t
            continue
        out["transformer." + name] = t.t() if name.endswith(_CONV1D_WEIGHTS) else t
    if model.config.tie_embeddings:
        out["lm_head.weight"] = out.get("transformer.wte.weight")
    elif lm_head is None:
        raise UserError(
            f"{file} has no lm_head.weight but config.json says tie_word_embeddings=false: "
            "re-export the model, or set tie_word_embeddings=true if the head is the token embedding"
        )
    else:
        out["lm_head.weight"] = lm_head

    wpe = out.get("transformer.wpe.weight")
    if wpe is not None and wpe.size(0) > model.config.block_size:
        out["transformer.wpe.weight"] = wpe[: model.config.block_size]  # block_size override
    return check_state_dict(out, model.state_dict(), file, "GPT2LMHeadModel/GPT2Model")
