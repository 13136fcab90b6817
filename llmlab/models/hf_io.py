"""Reading local Hugging Face model directories (config.json + weights), shared by every
``from_pretrained`` in llmlab (GPT-2, BERT, T5). Nothing is downloaded; every failure is a
:class:`~llmlab.errors.UserError` naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

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


def load_weights(path: Path, hf_class: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, state dict) from model.safetensors, its sharded index, or pytorch_model.bin."""
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
            return legacy, torch.load(legacy, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # corrupt / truncated files surface as many different exception types
        raise UserError(f"cannot read the weights in {path} ({type(e).__name__}: {e}): re-export them") from e
    raise UserError(
        f"no weights in {path}: expected model.safetensors or pytorch_model.bin "
        f"(write them with {hf_class}.save_pretrained)"
    )
