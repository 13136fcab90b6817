"""Pieces the train/eval tasks share: data + tokenizer, callbacks, loggers, metric output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from llmlab.data.tokenizers import Tokenizer, build_tokenizer, tokenizer_from_state
from llmlab.errors import UserError
from llmlab.utils import perplexity, plain, write_json


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
        if data_cfg.get("genres") is not None:  # a genre filter on Shakespeare (CorpusDataModule reads it)
            datamodule.genres = list(data_cfg.get("genres"))
    else:
        datamodule = instantiate(data_cfg, **overrides)
    if tokenizer_state is not None:
        tokenizer: Tokenizer = tokenizer_from_state(tokenizer_state)
    else:
        options = dict(plain(tokenizer_cfg) or {})
        tokenizer = build_tokenizer(options.pop("name", None), datamodule.documents(), **options)
    datamodule.tokenizer = tokenizer
    return datamodule, tokenizer


def split_method_config(method_cfg: DictConfig) -> tuple[DictConfig, DictConfig | None]:
    """(the method's own keys, its ``datamodule`` node or None); ``roles`` go to the model builder."""
    own = OmegaConf.masked_copy(method_cfg, [k for k in method_cfg if k not in ("datamodule", "roles")])
    own._set_parent(method_cfg._get_parent())  # keep ${trainer...} etc. resolvable, as hydra's instantiate does
    return own, method_cfg.get("datamodule")


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
    loggers = instantiate_list(logger_cfg, Logger)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":  # the whole resolved run config, filterable (model.n_layer ...)
            logger.experiment.config.update(resolved(cfg), allow_val_change=True)
    return loggers


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
