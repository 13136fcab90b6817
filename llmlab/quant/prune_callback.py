"""Pruning inside ``llmlab train`` (the ``prune`` group): a Lightning callback.

* ``schedule: one_shot`` — prune once at fit start, on the weights the run starts from
  (``model.init_from=<trained run>``), then fine-tune with the masks held fixed ("prune, then
  retrain", Han et al. 2015).
* ``schedule: iterative`` — gradual pruning during training (Zhu & Gupta 2017, §3): every
  ``every_n_steps`` optimizer steps from ``begin_step`` to ``end_step`` the masks are recomputed on
  the current weights at the sparsity of the cubic (or linear) ramp
  (:func:`llmlab.quant.prune.scheduled_amount`), so the network recovers between pruning steps.

Wanda and head pruning score on ``calibration_batches`` batches of the run's training data, taken
once at fit start. After every optimizer step the masks are written into the weights again, so the
checkpoints hold the zeros (plain GPT weights); a resumed run rebuilds its masks from them.
Logged: ``train/sparsity`` (fraction of zeros in the targeted weights); metrics.json also gets
``prune/sparsity`` (and ``prune/heads_pruned`` for heads).
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device

from llmlab.errors import UserError
from llmlab.quant.prune import (
    is_pruning_step,
    keep_masks_after_steps,
    masks_from_zeros,
    prune_config,
    prune_model,
    pruned_layers,
    scheduled_amount,
    sparsity,
)

log = logging.getLogger(__name__)
CALIBRATED = ("wanda", "heads", "curve")  # methods that read activations or gradients


def calibration_batches(datamodule, n: int, device: torch.device | str = "cpu", setup: bool = False) -> list[Any]:
    """The first ``n`` batches of the training loader (Wanda / heads score on these; the paper's
    calibration set: 128 sequences of C4, here whatever the run trains on). ``setup``: the
    datamodule is not set up yet (``llmlab eval``; in training the Trainer has done it)."""
    if datamodule is None:
        raise UserError("prune needs calibration batches from a datamodule, and this run has none")
    if setup:
        datamodule.setup("fit")
    batches = [move_data_to_device(b, device) for b in islice(iter(datamodule.train_dataloader()), int(n))]
    if not batches:
        raise UserError("prune: the training split gives no batch to calibrate on: use a larger corpus")
    return batches


class Pruning(L.Callback):
    """Prune the trained model (``pl_module.model``) as ``cfg`` (:func:`prune_config`) says."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.batches: list[Any] = []
        self.layers: list = []
        self.sparsity = 0.0
        self.metrics: dict[str, float] = {}
        self._handles: list = []
        self._last_step = -1

    def _loss(self, pl_module):
        return lambda batch: pl_module.model_step(batch).loss

    def _prune(self, trainer, pl_module, amount: float | None = None) -> None:
        self.metrics = prune_model(pl_module.model, self.cfg, self.batches, self._loss(pl_module), amount)
        self.sparsity = sparsity(self.layers)
        self.metrics["prune/sparsity"] = self.sparsity

    def _total_steps(self, trainer) -> int:
        return int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        self.layers = pruned_layers(model, self.cfg)
        if self.cfg["name"] in CALIBRATED:
            self.batches = calibration_batches(trainer.datamodule, self.cfg["calibration_batches"], pl_module.device)
        if trainer.ckpt_path:  # resuming: the checkpoint holds the zeros; keep them (and the schedule goes on)
            masks_from_zeros(self.layers)
            self.sparsity = sparsity(self.layers)
            self.metrics = {"prune/sparsity": self.sparsity}
            log.info("prune=%s: resumed with %.2f%% zeros in the targeted weights", self.cfg["name"], 100 * self.sparsity)
        elif self.cfg["schedule"] == "one_shot":
            self._prune(trainer, pl_module)
            log.info("prune=%s amount=%s: %.2f%% zeros in the targeted weights", self.cfg["name"], self.cfg["amount"],
                     100 * self.sparsity)
        else:
            self._step(trainer, pl_module)
        self._handles = keep_masks_after_steps(model, trainer.optimizers)

    def _step(self, trainer, pl_module) -> None:
        """Iterative schedule: recompute the masks if this optimizer step is a pruning step."""
        step = int(trainer.global_step)
        if step == self._last_step:  # gradient accumulation: several batches end on one step
            return
        self._last_step = step
        total = self._total_steps(trainer)
        if is_pruning_step(step, self.cfg, total):
            amount = scheduled_amount(step, self.cfg, total)
            self._prune(trainer, pl_module, amount)
            log.info("prune=%s step %d: amount %.3f, %.2f%% zeros", self.cfg["name"], step, amount, 100 * self.sparsity)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cfg["schedule"] == "iterative":
            self._step(trainer, pl_module)
        pl_module.log("train/sparsity", self.sparsity, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def prune_callbacks(cfg) -> list[Pruning]:
    """``llmlab train``'s pruning callback for the ``prune`` group ([] for none); combinations
    that cannot work are one line."""
    pcfg = prune_config(cfg.get("prune"))
    if pcfg is None:
        return []
    if pcfg["name"] == "curve":
        raise UserError("prune=curve is llmlab eval's perplexity-vs-sparsity sweep: in training pick one method, "
                        "e.g. prune=wanda prune.amount=0.5")
    peft = cfg.get("peft")
    if peft and str(peft.get("name") or "none") != "none":
        raise UserError(f"prune={pcfg['name']} with peft={peft.get('name')}: the tuned run stores only its tuner, so "
                        "the pruned base would be lost; prune with peft=none, then tune from that run")
    quant = cfg.get("quant")
    if quant and str(quant.get("name") or "none") != "none":
        raise UserError(f"prune={pcfg['name']} with quant={quant.get('name')}: prune first (quant=none), then quantize "
                        "the pruned run (llmlab quantize ckpt_path=<pruned run>)")
    return [Pruning(pcfg)]


def prune_metrics(callbacks) -> dict[str, float]:
    """What the pruning callback of a finished run reports for metrics.json."""
    return {k: float(v) for cb in callbacks if isinstance(cb, Pruning) for k, v in cb.metrics.items()}
