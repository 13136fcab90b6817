"""Plumbing shared by every llmlab method (LightningModule).

Every method looks the same (lightning-hydra-template's ``MNISTLitModule``): one ``model_step``
shared by train/val/test, slash-named metrics (``train/loss``, ``val/ppl``), hyperparameters saved,
optimizer and schedule built from the ``optim`` config. This base class adds what every llmlab
checkpoint needs to be self-contained: the tokenizer, the resolved run config and the training
position (tokens seen, RNG state) so that ``ckpt_path=...`` resumes exactly.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from llmlab.errors import UserError
from llmlab.optim import build_scheduler, param_groups

CKPT_KEY = "llmlab"  # where llmlab's metadata lives inside a Lightning checkpoint


class LLMLabModule(L.LightningModule):
    """Base class: optimizer/scheduler from config, token accounting, checkpoint metadata."""

    loss_is_token_nll = True  # train/loss is a mean token NLL, so train/ppl = exp(loss) is reported

    def __init__(self, optim: dict | None = None) -> None:
        super().__init__()
        self.optim_cfg = _plain(optim) or {}
        self.tokenizer = None  # set by the task (needed for samples, saved into checkpoints)
        self.run_config: dict | None = None  # the resolved Hydra config of the training run
        self.tokens_seen = 0  # training tokens consumed so far (survives resume)
        self.initial_val_loss: float | None = None
        self._tput_t0: float | None = None
        self._tput_tokens = 0

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict:
        opt_cfg = dict(self.optim_cfg.get("optimizer") or {"_target_": "torch.optim.AdamW"})
        opt_cfg["_partial_"] = True
        weight_decay = float(opt_cfg.pop("weight_decay", 0.0))
        optimizer = instantiate(opt_cfg)(param_groups(self, weight_decay))
        scheduler = build_scheduler(optimizer, **(self.optim_cfg.get("scheduler") or {}))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ----------------------------------------------------------------- accounting
    def count_tokens(self, n: int) -> None:
        """Call from training_step with the number of target tokens in the batch."""
        self.tokens_seen += n
        self._tput_tokens += n
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0:  # log() is not free
            self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # tokens/s over the last logging window (wall clock, includes data and optimizer time)
        now = time.perf_counter()
        if self._tput_t0 is None:
            self._tput_t0, self._tput_tokens = now, 0  # first step includes warm-up: skip it
            return
        if (self.global_step % max(1, self.trainer.log_every_n_steps) == 0) and now > self._tput_t0:
            self.log("train/tokens_per_sec", self._tput_tokens / (now - self._tput_t0))
            self._tput_t0, self._tput_tokens = now, 0

    # ----------------------------------------------------------------- evaluation
    def epoch_metrics(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """``(loss, {name: value})`` accumulated over a val/test epoch (accumulators reset), or
        None when the method logs its evaluation itself. Logged as ``{split}/loss``,
        ``{split}/ppl = exp(loss)`` and ``{split}/{name}``."""
        return None

    def pop_metrics(self, split: str) -> dict[str, torch.Tensor]:
        """Compute and reset every ``self.metrics["{split}_{name}"]``; returns ``{name: value}``."""
        prefix, out = f"{split}_", {}
        for key, metric in self.metrics.items():
            if key.startswith(prefix):
                out[key[len(prefix):]] = metric.compute()
                metric.reset()
        return out

    def _end_of_split(self, split: str) -> float | None:
        result = self.epoch_metrics(split)
        if result is None:
            return None
        loss, extra = result
        self.log(f"{split}/loss", loss, prog_bar=True)
        self.log_dict({f"{split}/ppl": torch.exp(loss), **{f"{split}/{k}": v for k, v in extra.items()}})
        return float(loss)

    def on_validation_epoch_end(self) -> None:
        loss = self._end_of_split("val")
        if loss is not None and self.trainer.sanity_checking and self.global_step == 0:
            self.initial_val_loss = loss  # the untrained value, for the learning curve

    def on_test_epoch_end(self) -> None:
        self._end_of_split("test")

    def attach_tokenizer(self, tokenizer) -> None:
        """Give the method its tokenizer (methods whose model depends on the vocabulary build it here)."""
        self.tokenizer = tokenizer

    # ----------------------------------------------------------------- after training
    def save_artifacts(self, run_dir: str) -> None:
        """Write what other tools read (HF weights, word vectors, plots) into the run dir."""

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {
            "format": 1,
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
            "tokenizer": self.tokenizer.state_dict() if self.tokenizer is not None else None,
            "config": self.run_config,
            "tokens_seen": self.tokens_seen,
            "initial_val_loss": self.initial_val_loss,
            "wandb_id": _wandb_id(self),
            "rng": {"torch": torch.get_rng_state()},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CKPT_KEY) or {}
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.initial_val_loss = meta.get("initial_val_loss")
        self.run_config = meta.get("config")
        if meta.get("rng"):  # dropout continues with the same random stream after resume
            torch.set_rng_state(meta["rng"]["torch"])


def _plain(cfg: Any) -> Any:
    """DictConfig -> plain containers (so hparams and checkpoints hold no OmegaConf objects)."""
    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _wandb_id(module: L.LightningModule) -> str | None:
    trainer = module._trainer
    for logger in (trainer.loggers if trainer is not None else []):
        if type(logger).__name__ == "WandbLogger":
            return logger.version
    return None


def model_config(config_cls: type, model: dict, vocab_size: int | None, *,
                 preset_keys: tuple[str, ...] = ("name",), presets: str = "") -> Any:
    """``config_cls`` built from the `model` config group: the keys that only name a preset are
    dropped and a null ``vocab_size`` takes the tokenizer's (which must fit in a set one)."""
    cfg = {k: v for k, v in (model or {}).items() if k not in preset_keys}
    if cfg.get("vocab_size") is None:
        if vocab_size is None:
            raise UserError("model.vocab_size is null and no tokenizer was given: set model.vocab_size")
        cfg["vocab_size"] = int(vocab_size)
    elif vocab_size is not None and cfg["vocab_size"] < vocab_size:
        raise UserError(
            f"model.vocab_size={cfg['vocab_size']} is smaller than the tokenizer's {vocab_size} tokens: "
            "set model.vocab_size=null to take the tokenizer's size"
        )
    try:
        return config_cls(**cfg)
    except TypeError as e:  # a key of another architecture's preset
        raise UserError(f"the model group does not describe a {config_cls.__name__} ({e}): "
                        f"use model={presets or '<a preset of this method>'}") from None
