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
from omegaconf import DictConfig, OmegaConf
from torch import nn

from llmlab.checkpoint import resolve_ckpt_path
from llmlab.errors import UserError
from llmlab.models.build import (LOADING_KEYS, RUNTIME_KEYS, Pretrained, arch_of, build_model, config_dict,
                                 load_pretrained, load_role, role_record)
from llmlab.peft import apply_peft, tuner_name
from llmlab.quant import apply_quant, is_real, quant_config, quant_name
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
    quant: dict | None = None  # the quantization scheme of the trained model (the `quant` group), None = float

    def attach(self, method) -> None:
        method.model_config, method.role_records = self.config, self.records
        method.peft, method.base_record = self.peft, self.base
        method.quant = self.quant


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


def tokenizer_roles(cfg: DictConfig) -> dict[str, Pretrained]:
    """``method.tokenizer_from: <role>``: the frozen model whose tokenizer the run reads (a distilled student
    must read its teacher's ids), loaded once here and handed to :func:`build_models` (``preloaded``)."""
    role = OmegaConf.select(cfg, "method.tokenizer_from")
    if not role:
        return {}
    source = OmegaConf.select(cfg, f"method.roles.{role}")
    if source in (None, "", "???"):
        raise UserError(f"method={OmegaConf.select(cfg, 'method.name')} needs a trained {role}: pass method.{role}=RUN_DIR "
                        "(an llmlab run dir or .ckpt, `last`, or a local Hugging Face directory)")
    return {str(role): load_pretrained(pretrained_source(cfg, source))}


def check_role_tokenizers(preloaded: dict[str, Pretrained], tokenizer) -> None:
    """The run's tokenizer must be the one each ``preloaded`` role was trained with: one line naming both."""
    from llmlab.data.tokenizers import tokenizer_from_state

    for role, pretrained in preloaded.items():
        vocab = getattr(pretrained.model.config, "vocab_size", None)
        theirs = tokenizer_from_state(pretrained.tokenizer_state) if pretrained.tokenizer_state else None
        if theirs is not None and theirs.state_dict() != tokenizer.state_dict():
            raise UserError(f"the {role} {pretrained.source} reads tokenizer={theirs.name} ({theirs.vocab_size:,} tokens) but "
                            f"this run's data and student read tokenizer={tokenizer.name} ({tokenizer.vocab_size:,} tokens): "
                            f"the student must use the {role}'s tokenizer (drop model.init_from / tokenizer=..., "
                            f"or pick a {role} trained with tokenizer={tokenizer.name})")
        if vocab is not None and tokenizer.vocab_size > vocab:
            raise UserError(f"the {role} {pretrained.source} has a {vocab:,}-token vocabulary but this run's "
                            f"tokenizer={tokenizer.name} has {tokenizer.vocab_size:,} tokens: pass the tokenizer the "
                            f"{role} was trained with (tokenizer=...), or a {role} of this vocabulary")


def build_models(cfg: DictConfig, tokenizer, *, init: Pretrained | None = None,
                 resumed: dict | None = None, preloaded: dict[str, Pretrained] | None = None) -> Models:
    """The run's models by role: the trained one (fresh, ``init``'s weights, or the architecture a
    resumed checkpoint records), wrapped by the ``peft`` tuner if one is chosen, and the frozen
    roles of ``method.roles``.

    ``resumed``: the checkpoint's llmlab metadata (its model config, tuner and base record, and
    ``asked``: the `model` group its run was composed with). ``preloaded``: frozen roles already loaded
    (:func:`tokenizer_roles`), not read again.
    """
    model_cfg = plain(cfg.get("model")) or {}
    peft_cfg = _peft_config(cfg, resumed)
    quant_cfg = _quant_config(cfg, resumed)
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
    if tuner_name(peft_cfg) != "none" and init is not None and base is None:
        base = role_record(init)  # hashed before quantization and the tuner change it (loading redoes both)
    apply_quant(model, quant_cfg)  # before the tuner: quant=nf4 peft=lora is QLoRA (LoRA around quantized layers)
    quant_cfg = quant_config(model)  # also a scheme that came with model.init_from (a quantized checkpoint)
    if is_real(quant_cfg) and tuner_name(peft_cfg) == "none":
        raise UserError(f"quant={quant_name(quant_cfg)} stores frozen quantized weights, so nothing would train: add "
                        "peft=lora (QLoRA) or use quant=qat_int8 / qat_int4 (quantization-aware training)")
    if tuner_name(peft_cfg) != "none":
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
        models[role], records[role] = frozen_role(cfg, role, source, init, (preloaded or {}).get(role))
    return Models(models, config, records, init, peft_cfg if tuner_name(peft_cfg) != "none" else None, base, quant_cfg)


def _peft_config(cfg: DictConfig, resumed: dict | None) -> dict | None:
    """The tuner of this run: the `peft` group, or on resume the one the checkpoint was trained with."""
    return _kept_on_resume(cfg, resumed, "peft", tuner_name, "tuner")


def _quant_config(cfg: DictConfig, resumed: dict | None) -> dict | None:
    """The quantization scheme of this run: the `quant` group, or on resume the checkpoint's."""
    return _kept_on_resume(cfg, resumed, "quant", quant_name, "quantization")


def _kept_on_resume(cfg: DictConfig, resumed: dict | None, group: str, name_of, what: str) -> dict | None:
    """The ``group`` config of this run; a resumed run keeps the checkpoint's, and asking for another is one line."""
    asked = plain(cfg.get(group)) or None
    if resumed is None:
        return asked
    recorded = resumed.get(group)
    if name_of(asked) != "none" and name_of(asked) != name_of(recorded):
        raise UserError(f"the checkpoint was trained with {group}={name_of(recorded)}; this run asks for "
                        f"{group}={name_of(asked)}: a resumed run keeps its {what} (drop {group}=..., or start a new run "
                        "from its weights with model.init_from=...)")
    return recorded


def frozen_role(cfg: DictConfig, role: str, source: Any, init: Pretrained | None,
                pretrained: Pretrained | None = None) -> tuple[nn.Module, dict]:
    """A frozen model: from ``source``, or (null) a copy of the trained model's initial weights
    (``pretrained``: already loaded from ``source``)."""
    if pretrained is None and source is None:
        if init is None:
            raise UserError(f"method.roles.{role} is null (= a frozen copy of the starting weights) but the model "
                            f"starts from scratch: set model.init_from=... or method.roles.{role}=PATH")
        pretrained = load_pretrained(init.source)  # a fresh copy, recorded by the same source
    elif pretrained is None:
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
