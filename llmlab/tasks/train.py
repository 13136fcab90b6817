"""`llmlab train`: instantiate data, tokenizer, method, callbacks, loggers and Trainer; fit; test.

Writes into the run dir: the resolved config (.hydra/), checkpoints/ (last.ckpt, best.ckpt),
metrics.json (final train/val/test metrics), metrics.csv + loss.png (learning curves), samples.md.
"""

from __future__ import annotations

import logging

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning.fabric.utilities.exceptions import MisconfigurationException

from llmlab.checkpoint import load_checkpoint, resolve_ckpt_path
from llmlab.errors import UserError
from llmlab.methods.base import CKPT_KEY
from llmlab.tasks.common import (
    build_data,
    finish_loggers,
    instantiate_callbacks,
    instantiate_loggers,
    print_metrics,
    resolved,
    save_metrics,
    scalar_metrics,
    split_method_config,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    ckpt_path, meta = None, {}
    if cfg.get("ckpt_path"):
        ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, cfg.get("name"))
        meta = load_checkpoint(ckpt_path)[CKPT_KEY]
        log.info("resuming from %s", ckpt_path)

    method_cfg, datamodule_cfg = split_method_config(cfg.method)
    datamodule, tokenizer = build_data(
        cfg.data, cfg.tokenizer, tokenizer_state=meta.get("tokenizer"), datamodule_cfg=datamodule_cfg
    )
    method = instantiate(
        method_cfg, model=cfg.get("model"), optim=cfg.get("optim"), vocab_size=tokenizer.vocab_size, _recursive_=False
    )
    method.attach_tokenizer(tokenizer)
    method.run_config = resolved(cfg)

    callbacks = instantiate_callbacks(cfg)
    loggers = instantiate_loggers(cfg, wandb_id=meta.get("wandb_id"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    try:
        try:
            trainer.fit(method, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None)
        except MisconfigurationException as e:  # e.g. gradient clipping asked of a manually optimised method
            raise UserError(f"the trainer settings do not fit method={cfg.method.name}: {e} (try an experiment=..., see llmlab ls experiment)") from None
        metrics = {k: v for k, v in trainer.callback_metrics.items()
                   if k.startswith("train/") and not k.endswith(("_step", "_epoch"))}
        metrics.update(trainer.validate(method, datamodule=datamodule, verbose=False)[0])  # val = intrinsic eval for word vectors
        if cfg.get("test"):
            metrics.update(trainer.test(method, datamodule=datamodule, verbose=False)[0])
        metrics = scalar_metrics(metrics, perplexity_of_loss=method.loss_is_token_nll)
        metrics["train/tokens_seen"] = float(method.tokens_seen)
        if method.initial_val_loss is not None:
            metrics["val/loss_untrained"] = float(method.initial_val_loss)
        save_metrics(cfg.paths.output_dir, metrics)
        if trainer.global_rank == 0:
            method.save_artifacts(cfg.paths.output_dir)  # plain weights / vectors / plots for other tools
        print_metrics(metrics, f"final metrics ({cfg.paths.output_dir}/metrics.json)")
        if hasattr(method, "sample") and trainer.global_rank == 0:
            gen = dict(cfg.generation)
            text = method.sample("", **{**gen, "num_samples": 1})[0]
            print(f"sample:\n{text}")
    finally:
        finish_loggers(loggers)
    return metrics
