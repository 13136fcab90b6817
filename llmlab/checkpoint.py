"""Finding, validating and loading llmlab checkpoints.

A llmlab checkpoint is a Lightning ``.ckpt`` with an extra ``"llmlab"`` entry (see
:mod:`llmlab.methods.base`): the method class, the tokenizer state and the resolved run config, so
``llmlab eval|infer ckpt_path=X`` needs nothing else.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from llmlab.errors import UserError
from llmlab.methods.base import CKPT_KEY


def resolve_ckpt_path(spec: str | None, log_dir: str | Path, name: str | None = None) -> Path:
    """``last`` = the newest ``last.ckpt`` under ``log_dir/train`` (of run ``name`` if given)."""
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
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").exists():
        return path / "checkpoints" / "last.ckpt"  # a run dir works too
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: pass the .ckpt of a run (…/checkpoints/last.ckpt)")
    return path


def _run_name(ckpt: Path) -> str | None:
    """The `name` recorded in the run's .hydra/config.yaml, interpolations resolved (no checkpoint load)."""
    cfg = ckpt.parent.parent / ".hydra" / "config.yaml"
    try:
        from omegaconf import OmegaConf

        name = OmegaConf.select(OmegaConf.load(cfg), "name")  # e.g. ${method.name}_${data.corpus}
        return None if name is None else str(name)
    except Exception:  # missing/unreadable file, or a name that needs Hydra's runtime resolvers
        return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load a llmlab checkpoint, turning every way it can be broken into a UserError."""
    path = Path(path)
    try:
        # our own checkpoints hold plain Python containers next to tensors: full unpickling needed
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, random bytes, wrong format ...
        raise UserError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(e).__name__}): "
            "pass a complete .ckpt written by llmlab train"
        ) from None
    if not isinstance(ckpt, dict) or CKPT_KEY not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is not an llmlab checkpoint: pass a .ckpt written by llmlab train")
    return ckpt


def load_method(path: str | Path):
    """Rebuild the trained LightningModule (weights, tokenizer, run config) from a checkpoint."""
    from llmlab.data.tokenizers import tokenizer_from_state

    ckpt = load_checkpoint(path)
    meta = ckpt[CKPT_KEY]
    module_name, _, cls_name = meta["method"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):
        raise UserError(f"{path} was written by method {meta['method']}, which this llmlab does not have") from None
    module = cls(**ckpt.get("hyper_parameters", {}))
    if meta.get("tokenizer"):  # before the weights: some models are shaped by the vocabulary
        module.attach_tokenizer(tokenizer_from_state(meta["tokenizer"]))
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    module.on_load_checkpoint(ckpt)
    module.eval()
    return module, meta
