"""Selective fine-tuning: train a chosen subset of the base model's own parameters, add nothing.

* ``bitfit`` (Ben Zaken, Ravfogel & Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning
  for Transformer-based Masked Language-models", §2): every bias term trains — of the Linear
  layers and of the LayerNorms — and nothing else.
* ``freeze``: only the top ``num_trainable_blocks`` transformer blocks train (plus, with
  ``train_final_norm``, the norms after them), the classic "fine-tune the last layers" baseline.
  Blocks count bottom to top; for T5 the decoder's blocks are the top ones. Embeddings and output
  heads stay frozen (GPT's ``lm_head`` *is* the token embedding, so unfreezing one would train both).

``apply_peft`` has frozen the whole model already; these tuners only flip ``requires_grad`` back on.
"""

from __future__ import annotations

from torch import nn

from llmlab.errors import UserError
from llmlab.peft.arch import PeftArch
from llmlab.peft.targets import with_defaults

FREEZE_DEFAULTS = {
    "num_trainable_blocks": 2,  # k: the top k blocks train
    "train_final_norm": True,  # also the norm(s) after the last block (GPT ln_f, T5 final_norm)
}


def _bitfit(model: nn.Module, cfg: dict) -> None:
    extra = sorted(set(cfg) - {"name"})
    if extra:
        raise UserError(f"peft=bitfit has no key {', '.join(extra)}: it takes none besides name (remove it)")
    biases = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    if not biases:
        what = type(model).__name__ + (" (bias=False)" if type(model).__name__ == "GPT" else "")
        raise UserError(f"{what} has no bias terms: BitFit cannot train anything; use peft=ia3 or peft=lora")
    for p in biases:
        p.requires_grad_(True)


def _freeze(model: nn.Module, cfg: dict, arch: PeftArch) -> None:
    c = with_defaults(cfg, FREEZE_DEFAULTS, "freeze")
    blocks = arch.blocks(model)
    k = c["num_trainable_blocks"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(blocks):
        raise UserError(f"peft.num_trainable_blocks={k!r} must be an integer in 1..{len(blocks)}: this "
                        f"{type(model).__name__} has {len(blocks)} blocks")
    if not isinstance(c["train_final_norm"], bool):
        raise UserError(f"peft.train_final_norm={c['train_final_norm']!r} must be true or false")
    for block in blocks[-k:]:
        block.requires_grad_(True)
    if c["train_final_norm"]:
        for norm in arch.final_norms(model):
            norm.requires_grad_(True)


def apply(model: nn.Module, cfg: dict, arch: PeftArch, tokenizer=None) -> None:
    """Unfreeze what ``cfg['name']`` (``bitfit`` | ``freeze``) selects of the (frozen) ``model``."""
    if cfg.get("name") == "bitfit":
        _bitfit(model, cfg)
    elif cfg.get("name") == "freeze":
        _freeze(model, cfg, arch)
    else:
        raise UserError(f"peft={cfg.get('name')!r} is not a selective tuner: use peft=bitfit or peft=freeze")
