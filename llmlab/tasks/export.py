"""`llmlab export ckpt_path=X [what=auto|merged|adapter|both] [out=DIR]`: a trained model for other tools.

* ``merged/``: a Hugging Face directory (``config.json`` + ``model.safetensors`` + llmlab's tokenizer)
  of the trained model with its tuner folded into the weights (LoRA, IA3; a fully fine-tuned or
  BitFit / freeze model as it is). Loads with ``transformers``' ``from_pretrained`` and as
  ``model.init_from=<dir>``. Adapters, prefixes and soft prompts change the computation, not the
  weights: they cannot be merged, which ``what=merged`` says in one line.
* ``adapter/``: the tuner as a Hugging Face ``peft`` directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) for LoRA, IA3, prefix / P-tuning v2 and prompt tuning, loadable
  with ``peft.PeftModel.from_pretrained(hf_model, dir)`` or :func:`llmlab.peft.load_adapter`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from omegaconf import DictConfig

from llmlab.checkpoint import load_method, resolve_ckpt_path
from llmlab.errors import UserError
from llmlab.models.build import build_model
from llmlab.peft import base_keys, merge, peft_config, tuner_layers

log = logging.getLogger(__name__)

ADAPTER_FORMATS = ("lora", "ia3", "prefix", "ptuning_v2", "prompt")  # tuners with a `peft` directory format
WHATS = ("auto", "merged", "adapter", "both")


def export(cfg: DictConfig) -> dict[str, str]:
    what = str(cfg.get("what") or "auto")
    if what not in WHATS:
        raise UserError(f"what={what!r}: use one of {', '.join(WHATS)}")
    path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.get("name"))
    method, meta = load_method(path)
    if not hasattr(getattr(method.model, "_orig_mod", method.model), "to_hf_state_dict"):
        raise UserError(f"{path} holds a {meta.get('method')} model, which has no Hugging Face format: "
                        "export works for GPT, BERT and T5 checkpoints")
    out = Path(cfg.get("out") or Path(path).resolve().parent.parent / "export").expanduser()
    written = write_exports(method, out, what)
    for kind, where in written.items():
        print(f"{kind}: {where}")
    return written


def write_exports(method, out: Path, what: str = "auto", merged_dir: str = "merged") -> dict[str, str]:
    """Write ``out/<merged_dir>`` (HF model, tuner folded in) and/or ``out/adapter`` (peft format) as
    ``what`` asks; ``auto`` = whatever the tuner allows. One line when it allows nothing asked."""
    model = getattr(method.model, "_orig_mod", method.model)
    tuner = (peft_config(model) or {}).get("name", "none")
    mergeable = all(m.mergeable for m in tuner_layers(model))
    has_adapter = tuner in ADAPTER_FORMATS
    if what in ("merged", "both") and not mergeable:
        raise UserError(f"peft={tuner} cannot be merged into the base weights (it changes the computation, not "
                        f"the weights): use what=adapter for its peft directory")
    if what in ("adapter", "both") and not has_adapter:
        raise UserError(f"peft={tuner} has no Hugging Face peft format (it exists for {', '.join(ADAPTER_FORMATS)}): "
                        "use what=merged" + ("" if mergeable else " — or keep the llmlab checkpoint"))
    if what == "auto" and not mergeable and not has_adapter:
        raise UserError(f"peft={tuner} can neither be merged into the weights nor written in Hugging Face's peft "
                        "format: its llmlab checkpoint is the export (llmlab eval/infer ckpt_path=...)")
    written = {}
    if what in ("merged", "both") or (what == "auto" and mergeable):
        written["merged"] = str(write_merged(method, model, out / merged_dir))
    if what in ("adapter", "both") or (what == "auto" and has_adapter):
        from llmlab.peft import save_adapter

        written["adapter"] = str(save_adapter(model, out / "adapter"))
    if what == "auto" and not mergeable:
        print(f"merged: skipped (peft={tuner} cannot be folded into the weights)")
    return written


def write_merged(method, model, out_dir: Path) -> Path:
    """The tuned model with its tuner folded in, as a plain model of the base architecture."""
    merged = merge(copy.deepcopy(model))
    keys = base_keys(merged)
    plain = build_model(method.model_config, method.tokenizer)
    state = {k: v for k, v in merged.state_dict().items() if k in keys}
    plain.load_state_dict(state)
    return method.write_hf_dir(out_dir, plain.to_hf_state_dict(), plain.to_hf_config())
