"""Finding, reading and loading llmlab checkpoints — without running code from them.

An llmlab checkpoint is a Lightning ``.ckpt`` with an extra ``"llmlab"`` entry (written by
:meth:`llmlab.methods.base.LLMLabModule.on_save_checkpoint`)::

    format       2
    method       stable method name ("gpt", "bert" ...; format 1 stored an import path)
    model        the trained model's architecture dict ({"arch": "gpt", "n_layer": 4, ...})
    roles        frozen models the method read, by role: {"ref": {source, kind, sha256, config}}
                 (their weights are not in the file; their source is re-read and its hash checked)
    peft         the tuner wrapped around the trained model (the `peft` group), or None
    base         with a tuner and model.init_from: the base weights' {source, kind, sha256, config};
                 the state dict then holds only what trains (the file stays small)
    quant        the quantization scheme (the `quant` group), or None: loading applies it before the
                 weights load, so a quantized model's packed buffers come from the file (QLoRA with a
                 base record: base -> quant -> tuner, and only the tuner is stored)
    tokenizer    the tokenizer's state
    config       the resolved run config
    tokens_seen, flops_seen, initial_val_loss, wandb_id, rng

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only. A
checkpoint that needs anything else (a pickled class, a function) is refused with one line, and
nothing in it runs. This module imports neither Lightning nor Hydra.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

from llmlab.errors import UserError

CKPT_KEY = "llmlab"  # where llmlab's metadata lives inside a Lightning checkpoint
FORMAT = 2

# stable method name -> "module:Class"; checkpoints store the name, so classes may move
METHODS = {
    "gpt": "llmlab.methods.gpt:GPTLM",
    "word2vec": "llmlab.methods.word2vec:Word2VecModule",
    "glove": "llmlab.methods.glove:GloVeModule",
    "elmo": "llmlab.methods.elmo:ElmoLM",
    "bert": "llmlab.methods.bert:BertPretraining",
    "t5": "llmlab.methods.t5:T5SpanLM",
    "classify": "llmlab.methods.classify:SequenceClassifier",
    "sft": "llmlab.methods.sft:InstructionTuning",
    "reward": "llmlab.methods.reward:RewardModel",
    "dpo": "llmlab.methods.dpo:DPO",
    "ppo": "llmlab.methods.ppo:PPO",
    "distill": "llmlab.methods.distill:Distillation",
    "distill_bert": "llmlab.methods.distill:BertDistillation",
}
# format-1 checkpoints named the class by import path
LEGACY_METHODS = {path.replace(":", "."): name for name, path in METHODS.items()}


# ---------------------------------------------------------------------------- finding


def resolve_ckpt_path(spec: str | None, log_dir: str | Path, name: str | None = None) -> Path:
    """``last`` = the newest ``last.ckpt`` under ``log_dir/train`` (of run ``name`` if given);
    otherwise a ``.ckpt`` file, a run dir or its ``checkpoints/`` dir."""
    if spec is None or str(spec) in ("", "???"):
        raise UserError("ckpt_path is required: pass ckpt_path=PATH/TO/last.ckpt (or ckpt_path=last)")
    if str(spec) == "last":
        candidates = [
            p for p in Path(log_dir, "train").glob("**/checkpoints/last.ckpt")
            if name is None or _run_name(p) == name
        ]
        if not candidates:
            which = f" of a run named {name!r}" if name else ""
            raise UserError(
                f"ckpt_path=last: no last.ckpt{which} under {Path(log_dir, 'train')}: "
                "train first (llmlab train) or pass ckpt_path=PATH"
            )
        return max(candidates, key=lambda p: p.stat().st_mtime)
    return find_checkpoint_file(spec)


def find_checkpoint_file(spec: str | Path) -> Path:
    """A ``.ckpt`` file itself, ``<run>/checkpoints/last.ckpt`` for a run dir, ``last.ckpt`` of a
    ``checkpoints/`` dir; one line saying what exists otherwise."""
    path = Path(str(spec)).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        found = sorted(p.name for p in [*path.glob("*.ckpt"), *path.glob("checkpoints/*.ckpt")])
        if found:
            raise UserError(f"{path} has no last.ckpt but has {', '.join(found)}: pass one of them, "
                            f"e.g. ckpt_path={path / found[0]}")
        raise UserError(f"{path} is a directory without checkpoints (no last.ckpt, no checkpoints/): "
                        "pass a run dir of llmlab train or its .ckpt file")
    raise UserError(f"checkpoint {path} does not exist: pass the .ckpt of a run (…/checkpoints/last.ckpt), "
                    "its run dir, or ckpt_path=last")


def _run_name(ckpt: Path) -> str | None:
    """The `name` recorded in the run's .hydra/config.yaml, interpolations resolved (no checkpoint load)."""
    cfg = ckpt.parent.parent / ".hydra" / "config.yaml"
    try:
        from omegaconf import OmegaConf

        name = OmegaConf.select(OmegaConf.load(cfg), "name")  # e.g. ${method.name}_${data.corpus}
        return None if name is None else str(name)
    except Exception:  # missing/unreadable file, or a name that needs Hydra's runtime resolvers
        return None


# ---------------------------------------------------------------------------- reading


def safe_load(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers; refuses anything that would
    run code (a pickled class or function) with one line, and never runs it."""
    import torch  # here: `llmlab eval ckpt_path=typo` must fail before torch is imported

    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            culprit = _unsupported_global(text)
            raise UserError(
                f"{what} {path} needs code to load ({culprit or 'it pickles objects, not just tensors'}); "
                "llmlab reads only weights and plain data, so it was not loaded: re-save it with llmlab "
                "(or export its state_dict to safetensors)"
            ) from None
        raise UserError(f"{what} {path} is corrupt or not a PyTorch file (UnpicklingError): "
                        "pass a complete .ckpt written by llmlab train") from None
    except Exception as e:  # truncated zip, random bytes, wrong format ...
        raise UserError(
            f"{what} {path} is corrupt or not a PyTorch file ({type(e).__name__}): "
            "pass a complete .ckpt written by llmlab train"
        ) from None


def _unsupported_global(text: str) -> str | None:
    import re

    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    return f"it pickles {m.group(1)}" if m else None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """An llmlab checkpoint as plain data (see :func:`safe_load`)."""
    path = Path(path)
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or CKPT_KEY not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is not an llmlab checkpoint: pass a .ckpt written by llmlab train")
    return ckpt


def method_name(stored: str) -> str:
    """Stable method name from a checkpoint (format 1 stored ``module.Class``)."""
    if stored in METHODS:
        return stored
    if stored in LEGACY_METHODS:
        return LEGACY_METHODS[stored]
    raise UserError(f"the checkpoint was written by method {stored!r}, which this llmlab does not have: "
                    f"it knows {', '.join(METHODS)}")


def method_class(name: str) -> type:
    module, cls = METHODS[method_name(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def trained_config(ckpt: dict) -> dict:
    """The trained model's architecture dict (``arch`` + config fields)."""
    meta = ckpt[CKPT_KEY]
    if meta.get("model"):
        return dict(meta["model"])
    # format 1: the architecture lived in the method's hyperparameters; each method trained the
    # architecture of its own name
    name = method_name(meta.get("method", ""))
    hp = dict(ckpt.get("hyper_parameters") or {})
    if name in ("word2vec", "glove"):
        from llmlab.models.build import ARCHS

        config_cls, _ = ARCHS[name].classes()
        from dataclasses import fields

        cfg = {f.name: hp[f.name] for f in fields(config_cls) if f.name in hp and f.name != "vocab_size"}
    else:
        cfg = dict(hp.get("model") or {})
        if cfg.get("vocab_size") is None and hp.get("vocab_size") is not None:
            cfg["vocab_size"] = hp["vocab_size"]
    for key in ("name", "init_from", "compile"):
        cfg.pop(key, None)
    return {"arch": name, **cfg}


def role_state_dict(ckpt: dict, role: str = "model") -> dict:
    """The weights of one model inside a method's state dict (``model.*``), unwrapped."""
    prefix = f"{role}."
    out = {}
    for key, t in ckpt["state_dict"].items():
        if key.startswith(prefix):
            out[key[len(prefix):].replace("_orig_mod.", "")] = t
    return out


def method_hparams(ckpt: dict) -> dict:
    """The method's constructor arguments (the models come by role, not from here)."""
    hp = dict(ckpt.get("hyper_parameters") or {})
    for key in ("model", "vocab_size", "models"):
        hp.pop(key, None)
    return hp


# ---------------------------------------------------------------------------- loading


def load_method(path: str | Path):
    """Rebuild the trained LightningModule (models by role, tokenizer, weights, run config)."""
    from llmlab.data.tokenizers import tokenizer_from_state
    from llmlab.models.build import build_model, load_role

    path = find_checkpoint_file(path)  # a .ckpt, a run dir or its checkpoints/ dir
    ckpt = read_checkpoint(path)
    meta = ckpt[CKPT_KEY]
    cls = method_class(meta.get("method", "?"))
    tokenizer = tokenizer_from_state(meta["tokenizer"]) if meta.get("tokenizer") else None
    if meta.get("base"):  # a tuned model: its base weights are re-read from their source (hash checked)
        model = load_role("base", meta["base"])
    else:
        model = build_model(trained_config(ckpt), tokenizer)
    if meta.get("quant"):  # the same layers as when saved (packed buffers), before a tuner wraps them
        from llmlab.quant import apply_quant

        apply_quant(model, meta["quant"])
    if meta.get("peft"):
        from llmlab.peft import apply_peft

        apply_peft(model, meta["peft"], tokenizer)
    models = {"model": model}
    for role, record in (meta.get("roles") or {}).items():
        models[role] = load_role(role, record)
    module = cls(models=models, **method_hparams(ckpt))
    module.peft, module.base_record = meta.get("peft"), meta.get("base")
    module.quant = meta.get("quant")
    if tokenizer is not None:
        module.attach_tokenizer(tokenizer)
    state = {k.replace("._orig_mod.", "."): v for k, v in ckpt["state_dict"].items()}  # trained compiled, loaded plain
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    module.on_load_checkpoint(ckpt)
    module.eval()
    return module, meta
