"""Models by role for a run: the `model` group and ``method.roles`` -> ready modules.

The glue between the config and :mod:`llmlab.models.build` (which builds and loads; this module
only decides *what* from the config): the trained model starts fresh, from ``model.init_from``, or
with the architecture a resumed checkpoint records; each ``method.roles.<role>`` is a frozen model
from a source (null = a frozen copy of the starting weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from llmlab.checkpoint import resolve_ckpt_path
from llmlab.errors import UserError
from llmlab.models.build import (LOADING_KEYS, RUNTIME_KEYS, Pretrained, arch_of, build_model, config_dict,
                                 load_pretrained, load_role, role_record)
from llmlab.peft import apply_peft, tuner_name
from llmlab.utils import plain

log = logging.getLogger(__name__)
# tuners that add modules beside untouched base weights: switching them off gives the base back
# (BitFit and freeze train base weights in place, so a frozen copy is still needed under them)
ADDITIVE_TUNERS = ("lora", "ia3", "adapter", "prefix", "ptuning_v2", "prompt")


@dataclass
class Models:
    """The models of a run, by role, and what a checkpoint records about them."""

    models: dict[str, nn.Module]  # "model" (trained) + frozen roles
    config: dict  # the trained model's architecture dict
    records: dict[str, dict]  # frozen role -> source + hash
    init: Pretrained | None = None  # where the trained model's weights came from (model.init_from)
    peft: dict | None = None  # the tuner wrapped around the trained model (the `peft` group), None = full fine-tuning
    base: dict | None = None  # with a tuner: source + hash of the frozen base weights (not stored in checkpoints)

    def attach(self, method) -> None:
        method.model_config, method.role_records = self.config, self.records
        method.peft, method.base_record = self.peft, self.base


def pretrained_source(cfg: DictConfig, spec: Any) -> Path:
    """A model source as typed (`last`, a run dir, a .ckpt, an HF dir) -> an existing path."""
    if str(spec) == "last":
        return resolve_ckpt_path("last", cfg.paths.log_dir)
    path = Path(str(spec)).expanduser()
    if not path.exists():
        raise UserError(f"model source {path} does not exist: pass a local Hugging Face directory, an llmlab "
                        "run dir or .ckpt, or `last`")
    return path


def load_init(cfg: DictConfig, model_cfg: dict) -> Pretrained | None:
    """``model.init_from`` loaded (weights + architecture + the tokenizer that came with them)."""
    source = model_cfg.get("init_from")
    if not source:
        return None
    arch = arch_of(model_cfg)
    overrides = {k: model_cfg[k] for k in RUNTIME_KEYS if model_cfg.get(k) is not None}
    pretrained = load_pretrained(pretrained_source(cfg, source), arch=arch.name, overrides=overrides,
                                 allow_bin=bool(model_cfg.get("allow_bin")), context=model_cfg.get("block_size"))
    log.info("model: %s weights from %s", pretrained.config["arch"], pretrained.source)
    return pretrained


def build_models(cfg: DictConfig, tokenizer, *, init: Pretrained | None = None,
                 resumed: dict | None = None) -> Models:
    """The run's models by role: the trained one (fresh, ``init``'s weights, or the architecture a
    resumed checkpoint records), wrapped by the ``peft`` tuner if one is chosen, and the frozen
    roles of ``method.roles``.

    ``resumed``: the checkpoint's llmlab metadata (its model config, tuner and base record, and
    ``asked``: the `model` group its run was composed with).
    """
    model_cfg = plain(cfg.get("model")) or {}
    peft_cfg = _peft_config(cfg, resumed)
    base = None
    if resumed:
        check_same_architecture(resumed["model"], model_cfg, resumed.get("asked"))
        config = dict(resumed["model"])
        if resumed.get("base"):  # a tuned run stores its tuner only: the base comes from its source
            model, base = load_role("base", resumed["base"]), resumed["base"]
        else:
            model = build_model(config, tokenizer)
    elif init is not None:
        config, model = init.config, init.model
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise UserError(
                f"model.init_from={init.source} has a {vocab:,}-token vocabulary but tokenizer={tokenizer.name} "
                f"has {tokenizer.vocab_size:,} tokens: pick the tokenizer the weights were trained with"
                + (" (tokenizer=gpt2 for GPT-2 weights)" if vocab == 50257 else "")
            )
    else:
        model = build_model(model_cfg, tokenizer)
        config = config_dict(model, arch_of(model_cfg).name)
    if tuner_name(peft_cfg) != "none":
        if init is not None and base is None:
            base = role_record(init)  # hashed before the tuner adds its weights
        apply_peft(model, peft_cfg, tokenizer)
    if model_cfg.get("compile"):
        model = torch.compile(model)  # the state dict keys gain `_orig_mod.`; loading strips it
    models, records = {"model": model}, {}
    for role, source in (plain(cfg.method.get("roles")) or {}).items():
        if source is None and tuner_name(peft_cfg) in ADDITIVE_TUNERS:
            # a frozen copy of the starting weights is already in memory: the base under the tuner
            # (the method runs it with llmlab.peft.disable_adapters, as TRL does for PEFT models)
            log.info("role %s: the base model under the %s tuner (adapters disabled), no copy", role, tuner_name(peft_cfg))
            continue
        models[role], records[role] = frozen_role(cfg, role, source, init)
    return Models(models, config, records, init, peft_cfg if tuner_name(peft_cfg) != "none" else None, base)


def _peft_config(cfg: DictConfig, resumed: dict | None) -> dict | None:
    """The tuner of this run: the `peft` group, or on resume the one the checkpoint was trained with."""
    asked = plain(cfg.get("peft")) or None
    if resumed is None:
        return asked
    recorded = resumed.get("peft")
    if tuner_name(asked) != "none" and tuner_name(asked) != tuner_name(recorded):
        raise UserError(f"the checkpoint was trained with peft={tuner_name(recorded)}; this run asks for "
                        f"peft={tuner_name(asked)}: a resumed run keeps its tuner (drop peft=..., or start a new run "
                        "from its weights with model.init_from=...)")
    return recorded


def frozen_role(cfg: DictConfig, role: str, source: Any, init: Pretrained | None) -> tuple[nn.Module, dict]:
    """A frozen model: from ``source``, or (null) a copy of the trained model's initial weights."""
    if source is None:
        if init is None:
            raise UserError(f"method.roles.{role} is null (= a frozen copy of the starting weights) but the model "
                            f"starts from scratch: set model.init_from=... or method.roles.{role}=PATH")
        pretrained = load_pretrained(init.source)  # a fresh copy, recorded by the same source
    else:
        pretrained = load_pretrained(pretrained_source(cfg, source))
    log.info("role %s: %s weights from %s (frozen)", role, pretrained.config["arch"], pretrained.source)
    return pretrained.model, role_record(pretrained)


def check_same_architecture(recorded: dict, model_cfg: dict, asked: dict | None = None) -> None:
    """Resuming keeps the architecture; a model override that contradicts it is one line.

    ``asked``: the `model` group the checkpoint's run was composed with. A key this run leaves as
    that run had it is not a request: a run that started from ``model.init_from`` trained the
    loaded architecture, not its preset's (gpt_nano's block_size=128 under a 32-token base)."""
    for key, value in model_cfg.items():
        if key in LOADING_KEYS or key in RUNTIME_KEYS or value is None or key not in recorded:
            continue
        if asked is not None and key in asked and asked[key] == value:
            continue
        old = recorded[key]
        if isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
            same = [list(x) if isinstance(x, (list, tuple)) else x for x in old] == \
                   [list(x) if isinstance(x, (list, tuple)) else x for x in value]
        else:
            same = old == value
        if not same:
            raise UserError(f"the checkpoint was trained with model.{key}={old!r}; this run asks for {value!r}: "
                            f"a resumed run keeps its architecture (drop model.{key}=..., or start a new run "
                            "from its weights with model.init_from=...)")
