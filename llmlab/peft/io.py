"""Adapters in Hugging Face ``peft``'s directory format: ``adapter_config.json`` (the ``PeftConfig``
fields) + ``adapter_model.safetensors`` (the adapter tensors).

A directory :func:`save_adapter` writes loads with ``peft.PeftModel.from_pretrained(hf_model, dir)``
on the ``transformers`` twin of the base (``GPT2LMHeadModel``, ``BertForPreTraining``,
``T5ForConditionalGeneration``), and :func:`load_adapter` reads what ``peft``'s ``save_pretrained``
wrote. Tensor keys are ``base_model.model.<Hugging Face module path>.<tuner parameter>``
(``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight``; ``peft`` strips its adapter name
``default``), or plain names for prompt learning (``prompt_embeddings``).

This module only maps names and dispatches: each tuner module implements
``to_peft(model, arch) -> (adapter_config, tensors)`` and
``from_peft(model, adapter_config, tensors, arch, tokenizer)`` (which applies the tuner with
``apply_peft`` and loads the tensors). The helpers below serve the tuners that wrap Linear layers
(LoRA, IA3): :func:`module_weights`, :func:`targets_in_state`, :func:`load_weights_into`.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.peft import TUNERS, TunerLayer, peft_config, tuner_name
from llmlab.peft.arch import PeftArch, peft_arch
from llmlab.peft.targets import linear_layers, matches
from llmlab.utils import atomic_write_bytes, write_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel (base_model) -> the transformers model (model)
PEFT_FORMAT = ("lora", "ia3", "prefix", "ptuning_v2", "prompt")  # tuners peft has a twin of
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}
TASK_TYPES = {"gpt": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": None}  # None: plain PeftModel (BertForPreTraining)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- save / load
def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model``'s adapter to ``out_dir`` in ``peft``'s format; returns the directory."""
    inner = getattr(model, "_orig_mod", model)
    cfg = peft_config(inner)
    name = tuner_name(cfg)
    if name not in PEFT_FORMAT:
        raise UserError(f"peft={name} has no peft-format adapter: only {', '.join(PEFT_FORMAT)} do "
                        "(save the llmlab checkpoint instead, or merge the tuner into the weights)")
    arch = peft_arch(inner)
    config, state = importlib.import_module(TUNERS[name]).to_peft(inner, arch)
    config = {"base_model_name_or_path": getattr(inner, "name_or_path", None), "task_type": TASK_TYPES[arch.name],
              "inference_mode": True, "revision": None, **config}

    from safetensors.torch import save

    # safetensors refuses shared or strided storage: every tensor gets its own contiguous copy
    tensors = {k: t.detach().to("cpu").clone().contiguous() for k, t in state.items()}
    out = Path(out_dir)
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    write_json(out / CONFIG_FILE, config)
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path, tokenizer: Any = None) -> nn.Module:
    """Apply the adapter in ``adapter_dir`` (written by ``peft``'s ``save_pretrained`` or by
    :func:`save_adapter`) to the llmlab base ``model``; returns ``model``."""
    path = Path(adapter_dir)
    config, state = read_adapter(path)
    inner = getattr(model, "_orig_mod", model)
    if tuner_name(peft_config(inner)) != "none":
        raise UserError(f"{path}: the model already has peft={peft_config(inner)['name']} applied; "
                        "load the adapter into the base model")
    peft_type = config.get("peft_type")
    name = PEFT_TYPES.get(peft_type)
    if name is None:
        raise UserError(f"{path}: peft_type={peft_type!r} has no llmlab tuner: llmlab reads "
                        f"{', '.join(PEFT_TYPES)} adapters")
    if name == "prefix" and not config.get("prefix_projection", False):
        name = "ptuning_v2"  # deep prompts without the MLP reparameterisation
    arch = peft_arch(inner)
    heads = _task_heads(arch, config, state)
    try:
        importlib.import_module(TUNERS[name]).from_peft(inner, config, state, arch, tokenizer)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if heads:
        inner.peft_modules_to_save = heads
        log.warning("%s: the adapter's task head (%s) has no place in llmlab's %s and was not loaded; "
                    "it is kept as model.peft_modules_to_save", path, ", ".join(heads), arch.name)
    return model


def _task_heads(arch: PeftArch, config: dict, state: dict) -> dict[str, torch.Tensor]:
    """Take the ``modules_to_save`` tensors llmlab's model has no module for (a sequence-
    classification adapter's ``classifier``) out of ``state``; the others load as base weights."""
    names = config.get("modules_to_save") or []
    heads = {}
    for key in list(state):
        hf = key.removeprefix(PEFT_PREFIX)
        if not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", hf) for m in names):  # peft's rule
            continue
        try:
            llmlab_key(arch.name, hf)
        except KeyError:
            heads[hf] = state.pop(key)
    return heads


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the tensors of a ``peft`` adapter directory."""
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path} is not a peft adapter directory (no {CONFIG_FILE}): give the directory "
                        "save_pretrained / llmlab export wrote")
    if not (path / WEIGHTS_FILE).is_file():
        extra = " (it has adapter_model.bin: re-save it with safe_serialization=True)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise UserError(f"{path} has no {WEIGHTS_FILE}{extra}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
        from safetensors.torch import load_file

        state = load_file(path / WEIGHTS_FILE)
    except Exception as e:  # corrupt JSON / safetensors: say which file
        raise UserError(f"{path}: cannot read the adapter ({type(e).__name__}: {e}); re-save it") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / CONFIG_FILE} is not a JSON object: re-save the adapter")
    return config, state


# ---------------------------------------------------------------------- names llmlab <-> Hugging Face
def hf_key(arch_name: str, key: str) -> str:
    """llmlab state-dict key -> the key of the same tensor in the ``transformers`` twin."""
    if arch_name == "gpt":
        return key  # llmlab's GPT is named like GPT2LMHeadModel
    if arch_name == "bert":
        from llmlab.models.hf.bert import _hf_name

        return _hf_name(key)
    from llmlab.models.hf.t5 import llmlab_to_hf_key

    return llmlab_to_hf_key(key)


def llmlab_key(arch_name: str, key: str) -> str:
    """Inverse of :func:`hf_key`; also accepts ``GPT2Model`` / ``BertModel`` keys (no head prefix)."""
    if arch_name == "gpt":
        return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
    if arch_name == "bert":
        return _bert_llmlab_key(key)
    from llmlab.models.hf.t5 import hf_to_llmlab_key

    ours = hf_to_llmlab_key(key)
    if ours is None:
        raise KeyError(key)  # an alias of shared.weight: adapters never carry it
    return ours


def hf_module_path(arch_name: str, llmlab_path: str) -> str:
    """``layers.0.attn.query`` -> ``bert.encoder.layer.0.attention.self.query`` (and so on)."""
    return hf_key(arch_name, llmlab_path + ".weight").removesuffix(".weight")


def llmlab_module_path(arch_name: str, hf_path: str) -> str:
    """Inverse of :func:`hf_module_path`."""
    return llmlab_key(arch_name, hf_path + ".weight").removesuffix(".weight")


def _bert_llmlab_key(key: str) -> str:
    from llmlab.models.hf.bert import _LAYER_RENAMES, _RENAMES, _normalise_hf_key

    key = _normalise_hf_key(key) or key  # BertModel keys gain "bert."
    if key == "cls.predictions.decoder.bias":
        key = "cls.predictions.bias"  # the same (tied) tensor
    if key.startswith("bert.encoder.layer."):
        index, _, rest = key.removeprefix("bert.encoder.layer.").partition(".")
        for ours, hf in _LAYER_RENAMES:
            if rest.startswith(hf):
                return f"layers.{index}.{ours}{rest[len(hf):]}"
    for ours, hf in _RENAMES:
        if key.startswith(hf):
            return ours + key[len(hf):]
    raise KeyError(key)


def hf_target_names(model: nn.Module, arch: PeftArch, paths: list[str], among: list[str] | None = None,
                    rule: Callable[[str, str], bool] = matches) -> list[str]:
    """``target_modules`` for ``adapter_config.json``: the shortest module-name suffixes (``c_attn``,
    ``mlp.c_proj``) that select exactly ``paths`` among the Linear layers (or ``among``) under
    ``peft``'s matching ``rule``, in Hugging Face names; full paths when no suffix does."""
    chosen = [hf_module_path(arch.name, p) for p in paths]
    pool = [hf_module_path(arch.name, p) for p in (among if among is not None else
                                                    [p for p, _ in linear_layers(model)])]
    if not chosen:
        return []
    for depth in range(1, max(c.count(".") for c in chosen) + 2):
        names = sorted({".".join(c.split(".")[-depth:]) for c in chosen})
        if {h for h in pool if any(rule(h, n) for n in names)} == set(chosen):
            return names
    return sorted(chosen)


# ---------------------------------------------------------------------- tensors of Linear-wrapping tuners
def module_weights(model: nn.Module, arch: PeftArch, layer_type: type, names: Iterable[str]) -> dict:
    """``base_model.model.<hf path>.<name>`` -> tensor, for every ``layer_type`` module's ``names``."""
    return {f"{PEFT_PREFIX}{hf_module_path(arch.name, path)}.{n}": m.get_parameter(n)
            for path, m in model.named_modules() if isinstance(m, layer_type) for n in names}


def trainable_base_weights(model: nn.Module, arch: PeftArch) -> dict:
    """Base parameters that train (LoRA's ``bias: all | lora_only``), under their peft keys: a
    wrapped layer's own weight and bias sit under ``<path>.base_layer.`` in ``peft``'s model."""
    wrapped = {}  # id(parameter) -> peft key, for the base parameters of tuner-wrapped layers
    own = set()  # the tuners' parameters
    for path, m in model.named_modules():
        if isinstance(m, TunerLayer):
            for n, p in m.named_parameters():
                if n in ("weight", "bias"):
                    wrapped[id(p)] = f"{hf_module_path(arch.name, path)}.base_layer.{n}"
                else:
                    own.add(id(p))
    return {PEFT_PREFIX + wrapped.get(id(p), hf_key(arch.name, n)): p for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in own}


def hf_paths_in_state(state: dict, names: Iterable[str]) -> list[str]:
    """Hugging Face paths of the modules that have a ``<path>.<name>`` tensor, in file order."""
    suffixes = tuple("." + n for n in names)
    paths = (k.removeprefix(PEFT_PREFIX) for k in state if k.endswith(suffixes))
    return list(dict.fromkeys(next(p.removesuffix(s) for s in suffixes if p.endswith(s)) for p in paths))


def targets_in_state(arch: PeftArch, state: dict, names: Iterable[str]) -> list[str]:
    """llmlab paths of the modules the file has tuner tensors for (exact ``target_modules``)."""
    paths = []
    for hf in hf_paths_in_state(state, names):
        try:
            paths.append(llmlab_module_path(arch.name, hf))
        except KeyError:
            raise UserError(f"the adapter adapts {hf}, which the llmlab {arch.name} model has no counterpart "
                            "of: use an adapter trained on the same architecture") from None
    if not paths:
        raise UserError(f"the adapter file has no {', '.join(names)} tensors: it is empty or not this tuner's")
    return paths


@torch.no_grad()
def load_weights_into(model: nn.Module, arch: PeftArch, state: dict, names: Iterable[str]) -> None:
    """Copy every tensor of a ``peft`` file into ``model`` (the tuner is applied already); a key
    with no parameter of that shape, or a tuner parameter the file lacks, is a UserError."""
    names = tuple(names)
    params = dict(model.named_parameters(remove_duplicate=False))
    landed = set()
    for key, tensor in state.items():
        hf = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")  # peft's place of a wrapped layer's own
        name = next((n for n in names if hf.endswith("." + n)), None)
        try:
            ours = (f"{llmlab_module_path(arch.name, hf[: -len(name) - 1])}.{name}" if name
                    else llmlab_key(arch.name, hf))
        except KeyError:
            ours = None
        p = params.get(ours)
        if p is None or p.shape != tensor.shape:
            want = "no such parameter" if p is None else f"llmlab's {ours} is {tuple(p.shape)}"
            raise UserError(f"adapter tensor {key} {tuple(tensor.shape)} does not fit the {arch.name} model "
                            f"({want}): the adapter was trained on another architecture or size")
        p.copy_(tensor.to(p.dtype))
        landed.add(ours)
    missing = [n for n in params if n.endswith(tuple("." + x for x in names)) and n not in landed]
    if missing:
        raise UserError(f"the adapter file has no tensor for {missing[0]} ({len(missing)} missing): it is truncated "
                        "or was saved with other target_modules")
