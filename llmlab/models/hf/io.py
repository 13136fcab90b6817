"""Reading local Hugging Face model directories (config.json + weights), shared by every
``from_pretrained`` in llmlab (GPT-2, BERT, T5). Nothing is downloaded; every failure is a
:class:`~llmlab.errors.UserError` naming the file and the fix."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from llmlab.errors import UserError


def read_json(file: Path, family: str = "Hugging Face") -> dict:
    """A checkpoint's ``config.json`` (or a shard index) as a dict."""
    if not file.is_file():
        raise UserError(
            f"{file} is missing: a Hugging Face {family} directory needs config.json next to the weights "
            "(save_pretrained() writes both)"
        )
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {file} ({e}): re-export the checkpoint with save_pretrained()") from e


def load_weights(path: Path, hf_class: str, *, allow_bin: bool = False) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, state dict) from model.safetensors, its sharded index, or pytorch_model.bin.

    A ``pytorch_model.bin`` is a pickle: it is read (with ``torch.load(weights_only=True)``) only
    when ``allow_bin`` is set and no safetensors file is there.
    """
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    legacy = path / "pytorch_model.bin"
    try:
        if single.is_file():
            from safetensors.torch import load_file

            return single, load_file(str(single))
        if index.is_file():
            from safetensors.torch import load_file

            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
                if not (path / shard).is_file():
                    raise UserError(f"{path / shard} (listed in {index}) is missing: copy all shards")
                state.update(load_file(str(path / shard)))
            return index, state
        if legacy.is_file():
            if not allow_bin:
                raise UserError(
                    f"{path} has only pytorch_model.bin (a pickle): pass allow_bin=True / model.allow_bin=true "
                    "to read it with torch.load(weights_only=True), or convert it to model.safetensors"
                )
            return legacy, torch.load(legacy, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # corrupt / truncated files surface as many different exception types
        raise UserError(f"cannot read the weights in {path} ({type(e).__name__}: {e}): re-export them") from e
    raise UserError(
        f"no weights in {path}: expected model.safetensors or pytorch_model.bin "
        f"(write them with {hf_class}.save_pretrained)"
    )


def checkpoint_dir(path: str | Path, family: str) -> Path:
    """``path`` as an existing directory, or a :class:`UserError` saying what to pass."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(
            f"{family} checkpoint directory {path} does not exist: pass a local Hugging Face {family} "
            "directory with config.json and model.safetensors (nothing is downloaded)"
        )
    return path


def apply_overrides(config: Any, overrides: dict, family: str) -> Any:
    """``config`` (a dataclass) with ``overrides`` replacing its fields; unknown names are refused."""
    known = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(
            f"unknown {family} config override(s) {unknown}: use fields of {type(config).__name__} {sorted(known)}"
        )
    return replace(config, **overrides)


def check_state_dict(
    out: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    file: Path,
    hf_class: str,
    *,
    unexpected: Sequence[str] = (),
    display: Callable[[str], str] = str,
) -> dict[str, torch.Tensor]:
    """Refuse a converted state dict ``out`` unless it has exactly ``expected``'s keys and shapes.

    ``unexpected`` adds checkpoint keys the converter could not place; ``display`` turns one of
    our keys into the name the user sees (the checkpoint's).
    """
    missing = [display(k) for k in expected if out.get(k) is None]
    unexpected = list(unexpected) + [k for k in out if k not in expected]
    if missing or unexpected:
        raise UserError(
            f"{file} does not match a {hf_class} with this config.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; pass a {hf_class} checkpoint"
        )
    for key, t in out.items():
        if t.shape != expected[key].shape:
            raise UserError(
                f"{file}: {display(key)} has shape {tuple(t.shape)} but config.json implies "
                f"{tuple(expected[key].shape)}: the weights and config.json disagree, re-export them together"
            )
    return out
