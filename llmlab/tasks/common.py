"""Pieces the train/eval tasks share: data + tokenizer, callbacks, loggers, metric output."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from torch import nn

from llmlab.checkpoint import resolve_ckpt_path
from llmlab.data.tokenizers import Tokenizer, build_tokenizer, tokenizer_from_state
from llmlab.errors import UserError
from llmlab.models.build import (LOADING_KEYS, RUNTIME_KEYS, Pretrained, arch_of, build_model, config_dict,
                                 load_pretrained, role_record)
from llmlab.utils import perplexity, write_json

log = logging.getLogger(__name__)


def build_data(
    data_cfg: DictConfig | dict,
    tokenizer_cfg: DictConfig | dict | None = None,
    tokenizer_state: dict | None = None,
    datamodule_cfg: DictConfig | dict | None = None,
    **overrides,
):
    """Instantiate the datamodule, then its tokenizer (char and word vocabularies need the corpus first).

    ``datamodule_cfg`` (a method's ``datamodule`` node) replaces the data config's LM datamodule
    for methods that batch a corpus their own way (word2vec pairs, GloVe co-occurrences); it gets
    the corpus keys (``corpus``, ``path``, ``seed``, ``cache_dir``) from the data config.
    """
    if datamodule_cfg is not None:
        corpus_keys = {k: data_cfg.get(k) for k in ("corpus", "path", "seed", "cache_dir", "num_workers") if k in data_cfg}
        datamodule = instantiate(datamodule_cfg, **{**corpus_keys, **overrides})
    else:
        datamodule = instantiate(data_cfg, **overrides)
    if tokenizer_state is not None:
        tokenizer: Tokenizer = tokenizer_from_state(tokenizer_state)
    else:
        options = dict(OmegaConf.to_container(tokenizer_cfg, resolve=True) if OmegaConf.is_config(tokenizer_cfg) else tokenizer_cfg or {})
        tokenizer = build_tokenizer(options.pop("name", None), datamodule.documents(), **options)
    datamodule.tokenizer = tokenizer
    return datamodule, tokenizer


def split_method_config(method_cfg: DictConfig) -> tuple[DictConfig, DictConfig | None]:
    """(the method's own keys, its ``datamodule`` node or None); ``roles`` go to the model builder."""
    own = OmegaConf.masked_copy(method_cfg, [k for k in method_cfg if k not in ("datamodule", "roles")])
    own._set_parent(method_cfg._get_parent())  # keep ${trainer...} etc. resolvable, as hydra's instantiate does
    return own, method_cfg.get("datamodule")


# ---------------------------------------------------------------------------- models by role


@dataclass
class Models:
    """The models of a run, by role, and what a checkpoint records about them."""

    models: dict[str, nn.Module]  # "model" (trained) + frozen roles
    config: dict  # the trained model's architecture dict
    records: dict[str, dict]  # frozen role -> source + hash
    init: Pretrained | None = None  # where the trained model's weights came from (model.init_from)

    def attach(self, method) -> None:
        method.model_config, method.role_records = self.config, self.records


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
    path = pretrained_source(cfg, source)
    if arch.name == "gpt" and model_cfg.get("block_size") and (path / "config.json").is_file():
        n_positions = _read_json(path / "config.json").get("n_positions")
        if isinstance(n_positions, int) and model_cfg["block_size"] < n_positions:
            overrides["block_size"] = model_cfg["block_size"]  # keep the first positions of a long HF context
    overrides = {k: v for k, v in overrides.items() if k in _config_fields(arch)}
    pretrained = load_pretrained(path, arch=arch.name, overrides=overrides, allow_bin=bool(model_cfg.get("allow_bin")))
    log.info("model: %s weights from %s", pretrained.config["arch"], pretrained.source)
    return pretrained


def build_models(cfg: DictConfig, tokenizer, *, init: Pretrained | None = None,
                 resumed: dict | None = None) -> Models:
    """The run's models by role: the trained one (fresh, ``init``'s weights, or the architecture a
    resumed checkpoint records) and the frozen roles of ``method.roles``."""
    model_cfg = _plain(cfg.get("model")) or {}
    if resumed:
        check_same_architecture(resumed, model_cfg)
        config = dict(resumed)
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
    if model_cfg.get("compile"):
        model = torch.compile(model)  # the state dict keys gain `_orig_mod.`; loading strips it
    models, records = {"model": model}, {}
    for role, source in (_plain(cfg.method.get("roles")) or {}).items():
        models[role], records[role] = frozen_role(cfg, role, source, init)
    return Models(models, config, records, init)


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


def check_same_architecture(recorded: dict, model_cfg: dict) -> None:
    """Resuming keeps the architecture; a model override that contradicts it is one line."""
    for key, value in model_cfg.items():
        if key in LOADING_KEYS or key in RUNTIME_KEYS or value is None or key not in recorded:
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


def _read_json(file: Path) -> dict:
    import json

    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the loader reports an unreadable config.json with the fix


def _config_fields(arch) -> set[str]:
    from dataclasses import fields

    return {f.name for f in fields(arch.classes()[0])}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def instantiate_list(group: DictConfig | None, kind: type) -> list:
    """Instantiate every entry with a ``_target_`` of a callbacks/logger group (null entries skipped)."""
    out = []
    for key, conf in (group or {}).items():
        if conf is None or not isinstance(conf, DictConfig) or "_target_" not in conf:
            continue
        obj = instantiate(conf)
        if not isinstance(obj, kind):
            raise UserError(f"{key}: {conf._target_} is not a Lightning {kind.__name__}")
        out.append(obj)
    return out


def instantiate_loggers(cfg: DictConfig, wandb_id: str | None = None) -> list[Logger]:
    logger_cfg = cfg.get("logger")
    if wandb_id and logger_cfg and logger_cfg.get("wandb") is not None:
        with open_dict(logger_cfg):
            logger_cfg.wandb.id = wandb_id  # resume: same dashboard run
    return instantiate_list(logger_cfg, Logger)


def instantiate_callbacks(cfg: DictConfig) -> list[Callback]:
    return instantiate_list(cfg.get("callbacks"), Callback)


def finish_loggers(loggers: list[Logger]) -> None:
    """Close every logger (wandb runs must be finished per job under -m)."""
    for logger in loggers:
        try:
            logger.finalize("success")
        except Exception:
            pass
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def scalar_metrics(metrics: dict[str, Any], perplexity_of_loss: bool = True) -> dict[str, float]:
    """Flat {"val/loss": float} from Lightning's tensors; adds */ppl next to */loss (language models)."""
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    for k in list(out) if perplexity_of_loss else ():
        if k.endswith("/loss") and k.replace("/loss", "/ppl") not in out:
            out[k.replace("/loss", "/ppl")] = perplexity(out[k])
    return dict(sorted(out.items()))


def save_metrics(out_dir: str | Path, metrics: dict[str, float]) -> Path:
    return write_json(Path(out_dir) / "metrics.json", metrics)


def print_metrics(metrics: dict[str, float], title: str = "metrics") -> None:
    """A small aligned table on stdout."""
    if not metrics:
        return
    width = max(len(k) for k in metrics)
    print(f"{title}:")
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:,.4f}" if abs(v) < 1e6 else f"  {k:<{width}}  {v:,.0f}")


def resolved(cfg: DictConfig) -> dict:
    """The run config as plain containers, with Hydra's runtime values resolved."""
    return OmegaConf.to_container(cfg, resolve=True)
