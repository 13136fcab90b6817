"""What every llmlab method (LightningModule) shares: the step contract, models by role, logging,
optimisation and self-contained checkpoints.

Every method looks the same (lightning-hydra-template's ``MNISTLitModule``). It receives its
models ready-built, by role (DESIGN.md, "Models by role"): ``models["model"]`` is the one it
trains; any other role (``ref``, ``teacher``, ``reward``, ``draft`` ...) is frozen — eval mode,
no gradients, outside the optimizer and outside checkpoints (a checkpoint records where a frozen
model came from and the hash of its weights instead). A method implements one ``model_step(batch)
-> Step`` shared by train/val/test; this class logs ``train/loss``, ``train/<metric>``,
``train/tokens_seen`` (target tokens, for every method), and token-weighted ``val/*`` and
``test/*`` means, with ``{split}/ppl = exp({split}/loss)`` for token-NLL losses.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Mapping

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from llmlab.checkpoint import CKPT_KEY, FORMAT
from llmlab.errors import UserError
from llmlab.models.build import TOKENIZER_FILE
from llmlab.optim import build_scheduler, param_groups
from llmlab.utils import atomic_write_bytes, plain, write_json

TRAINED = "model"  # the role a method trains
Metric = torch.Tensor | float | tuple[torch.Tensor | float, int | float]


@dataclass
class Step:
    """What ``model_step`` returns.

    ``loss``: what training minimises (and what val/test average, token-weighted, unless the
    method names another ``eval_loss`` metric). ``n_tokens``: target tokens in the batch (the
    weight of this batch in val/test means; ``train/tokens_seen`` adds them up). ``metrics``: named
    values logged as ``{split}/{name}``; a ``(value, weight)`` pair carries its own weight (e.g. a
    per-pair accuracy next to a per-token loss), a bare value is weighted by ``n_tokens``.
    """

    loss: torch.Tensor
    n_tokens: int
    metrics: dict[str, Metric] = field(default_factory=dict)
    objective: torch.Tensor | None = None  # what training minimises, when it is not ``loss`` (ELMo: fwd + bwd)


class LLMLabModule(L.LightningModule):
    """Base class: models by role, the step contract, logging, optimizer/scheduler, checkpoint metadata."""

    name = "?"  # the stable method name checkpoints record (see llmlab.checkpoint.METHODS)
    loss_is_token_nll = True  # train/loss is a mean token NLL: train/ppl is reported
    eval_loss: str | None = None  # a metric to report as {split}/loss instead of the training loss (BERT: mlm_loss)
    eval_ppl = True  # report {split}/ppl = exp({split}/loss)

    def __init__(self, models: Mapping[str, nn.Module] | None = None, optim: dict | None = None) -> None:
        super().__init__()
        models = dict(models or {})
        self.optim_cfg = plain(optim) or {}
        self.model: nn.Module | None = models.pop(TRAINED, None)
        self.roles = nn.ModuleDict({k: _freeze(v) for k, v in models.items()})  # frozen models by role
        self.role_records: dict[str, dict] = {}  # source + hash of each frozen role (set by the builder)
        self.model_config: dict | None = None  # the trained model's architecture dict (set by the builder)
        self.peft: dict | None = None  # the tuner wrapped around the trained model (set by the builder)
        self.base_record: dict | None = None  # with a tuner: where the frozen base weights come from (not stored)
        self.quant: dict | None = None  # the quantization scheme of the trained model (set by the builder / llmlab quantize)
        self.tokenizer = None  # set by the task (needed for samples, saved into checkpoints)
        self.run_config: dict | None = None  # the resolved Hydra config of the training run
        self.tokens_seen = 0  # target tokens trained on so far (survives resume)
        self.flops_seen = 0.0  # training FLOPs so far, for methods that count them (batch_flops; survives resume)
        self.initial_val_loss: float | None = None
        self._acc: dict[str, list[torch.Tensor]] = {}  # {split/name: [weighted sum, weight]}
        self._tput_t0: float | None = None
        self._tput_tokens = 0
        self.peak_rss = 0  # bytes: the largest resident set seen at a training batch end (this run only)

    # ----------------------------------------------------------------- roles
    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.roles.values():  # frozen roles stay in eval mode (dropout off) while training
            m.eval()
        return self

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in [k for k in state if k.startswith(f"{prefix}roles.")]:
            del state[key]  # frozen roles are recorded by source + hash, not stored
        for key in self._base_keys():
            state.pop(f"{prefix}{key}", None)  # a tuned model's frozen base: recorded by source + hash
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        own = {f"roles.{k}": v for k, v in self.roles.state_dict().items()}
        if self._base_keys():  # a tuned model's checkpoint holds the tuner; the base is already loaded
            current = super().state_dict(keep_vars=True)
            own.update({k: current[k] for k in self._base_keys()})
        return super().load_state_dict({**own, **state_dict}, strict=strict, assign=assign)

    def _base_keys(self) -> list[str]:
        """State-dict keys of the frozen base under a tuner whose weights come from a recorded
        source (``base_record``): the base model's own keys whose tensors do not train."""
        if not self.base_record or self.model is None:
            return []
        from llmlab.peft import base_keys

        base = base_keys(self.model)
        trained = {id(p) for p in self.model.parameters() if p.requires_grad}
        # QLoRA: LoRA keeps a quantized base layer whole, so its buffers gain `.base_layer.` (peft's name)
        return [f"model.{k}" for k, v in self.model.state_dict(keep_vars=True).items()
                if k.replace("_orig_mod.", "").replace(".base_layer.", ".") in base and id(v) not in trained]

    def setup(self, stage: str) -> None:
        # data-parallel ranks each build their tokenizer from the corpus: they must read the same ids
        if self._trainer is not None and self.trainer.world_size > 1 and self.tokenizer is not None:
            from llmlab.distributed import check_same_on_all_ranks

            check_same_on_all_ranks(self.trainer, self.tokenizer.fingerprint, "tokenizer")

    # ----------------------------------------------------------------- the step contract
    def model_step(self, batch: Any) -> Step:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.model_step(batch)
        self.count_tokens(step.n_tokens)
        self.flops_seen += self.summed_over_ranks(self.batch_flops(batch))
        self.log("train/loss", step.loss.detach(), prog_bar=True)
        if step.metrics:
            self.log_dict({f"train/{k}": _value(v) for k, v in step.metrics.items()})
        return step.loss if step.objective is None else step.objective

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._accumulate("val", self.model_step(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._accumulate("test", self.model_step(batch))

    def _accumulate(self, split: str, step: Step) -> None:
        items = {"loss": (step.loss, step.n_tokens)}
        items.update({k: v if isinstance(v, tuple) else (v, step.n_tokens) for k, v in step.metrics.items()})
        for name, (value, weight) in items.items():
            if not weight:
                continue
            value = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach()
            acc = self._acc.setdefault(f"{split}/{name}", [torch.zeros((), dtype=torch.float64, device=self.device)] * 2)
            self._acc[f"{split}/{name}"] = [acc[0] + value * float(weight), acc[1] + float(weight)]

    def epoch_metrics(self, split: str) -> dict[str, torch.Tensor]:
        """Token-weighted means of the split's losses and metrics (accumulators reset)."""
        out = {}
        for key in [k for k in self._acc if k.startswith(f"{split}/")]:
            total, weight = self._acc.pop(key)
            if self.trainer is not None and self.trainer.world_size > 1:
                total = self.trainer.strategy.reduce(total, reduce_op="sum")
                weight = self.trainer.strategy.reduce(weight, reduce_op="sum")
            out[key.split("/", 1)[1]] = (total / weight).float()
        if self.eval_loss and self.eval_loss in out:
            out["loss"] = out[self.eval_loss]
        return out

    def _end_of_split(self, split: str) -> float | None:
        values = self.epoch_metrics(split)
        if "loss" not in values:
            return None
        loss = values.pop("loss")
        self.log(f"{split}/loss", loss, prog_bar=True)
        if self.eval_ppl:
            values["ppl"] = torch.exp(loss)
        self.log_dict({f"{split}/{k}": v for k, v in values.items()})
        return float(loss)

    def on_validation_epoch_end(self) -> None:
        loss = self._end_of_split("val")
        if loss is not None and self.trainer.sanity_checking and self.global_step == 0:
            self.initial_val_loss = loss  # the untrained value, for the learning curve

    def on_test_epoch_end(self) -> None:
        self._end_of_split("test")

    # ----------------------------------------------------------------- accounting
    def count_tokens(self, n: int) -> None:
        """Add the batch's target tokens, of every data-parallel rank, to ``tokens_seen`` (call once per
        training batch, on every rank)."""
        n = int(self.summed_over_ranks(n))
        self.tokens_seen += n
        self._tput_tokens += n

    def summed_over_ranks(self, value: float) -> float:
        """``value`` added up over the data-parallel ranks (itself in one process): every rank's
        batch counts in ``train/tokens_seen`` and ``train/flops``, exactly (float64 holds integers
        up to 2**53)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return value
        total = trainer.strategy.reduce(torch.tensor(float(value), dtype=torch.float64, device=self.device),
                                        reduce_op="sum")
        return float(total)

    def batch_flops(self, batch: Any) -> float:
        """Training FLOPs (forward + backward) of one batch; 0 = this method does not count them."""
        return 0.0

    def cost_report(self) -> dict[str, float]:
        """Model-size numbers for metrics.json beyond the parameter counts every run has (e.g. GPT's
        non-embedding parameters and FLOPs per token, the inputs of a scaling-law fit)."""
        return {}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # logged every batch (Lightning writes it every log_every_n_steps), so the loggers' last
        # value is the count after that batch: the same number as metrics.json and metrics.csv
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        if self.flops_seen:
            self.log("train/flops", float(self.flops_seen), on_step=True, on_epoch=False)
        self.peak_rss = max(self.peak_rss, _rss())
        # tokens/s over the last logging window (wall clock, includes data and optimizer time)
        now = time.perf_counter()
        if self._tput_t0 is None:
            self._tput_t0, self._tput_tokens = now, 0  # first step includes warm-up: skip it
            return
        if (self.global_step % max(1, self.trainer.log_every_n_steps) == 0) and now > self._tput_t0:
            self.log("train/tokens_per_sec", self._tput_tokens / (now - self._tput_t0))
            self._tput_t0, self._tput_tokens = now, 0

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict:
        opt_cfg = dict(self.optim_cfg.get("optimizer") or {"_target_": "torch.optim.AdamW"})
        opt_cfg["_partial_"] = True
        weight_decay = float(opt_cfg.pop("weight_decay", 0.0))
        optimizer = instantiate(opt_cfg)(param_groups(self, weight_decay))  # trainable parameters only
        scheduler = build_scheduler(optimizer, **(self.optim_cfg.get("scheduler") or {}))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ----------------------------------------------------------------- what a method may add
    def attach_tokenizer(self, tokenizer) -> None:
        """Give the method its tokenizer (methods check here that it is the kind they read)."""
        self.tokenizer = tokenizer

    def sample_text(self, prompt: str, generation: dict) -> str | None:
        """One generated continuation for the samples logged at validation (None = no generation)."""
        return None

    def evaluate(self, cfg) -> dict[str, float] | None:
        """``llmlab eval`` with the method's own benchmarks; None = the Lightning test loop on ``data``."""
        return None

    def infer(self, cfg) -> Any:
        """``llmlab infer``: what the trained method does at inference time."""
        raise UserError(f"method {self.name} has no inference mode: use llmlab eval ckpt_path=...")

    def save_artifacts(self, run_dir: str) -> None:
        """Write what other tools read (HF weights, word vectors, plots) into the run dir."""

    def write_eval_artifacts(self, out_dir, split: str) -> None:
        """After a test/val pass (train's test, ``llmlab eval``): plots of that split (confusion matrix ...)."""

    def write_hf_dir(self, out_dir, state: dict[str, torch.Tensor], config: dict) -> Path:
        """A Hugging Face directory: ``model.safetensors`` + ``config.json`` (+ the llmlab tokenizer as
        ``llmlab_tokenizer.json``, so ``model.init_from=<dir>`` brings the tokenizer along)."""
        from safetensors.torch import save

        out = Path(out_dir)
        state = {k: v.detach().clone().contiguous() for k, v in state.items()}
        atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
        write_json(out / "config.json", config)
        if self.tokenizer is not None:
            write_json(out / TOKENIZER_FILE, self.tokenizer.state_dict())
        return out

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CKPT_KEY] = {
            "format": FORMAT,
            "method": self.name,
            "model": self.model_config,
            "roles": self.role_records,
            "peft": self.peft,
            "base": self.base_record,
            "quant": self.quant,
            "tokenizer": self.tokenizer.state_dict() if self.tokenizer is not None else None,
            "config": self.run_config,
            "tokens_seen": self.tokens_seen,
            "flops_seen": self.flops_seen,
            "initial_val_loss": self.initial_val_loss,
            "wandb_id": _wandb_id(self),
            "rng": {"torch": torch.get_rng_state()},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get(CKPT_KEY) or {}
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.flops_seen = float(meta.get("flops_seen", 0.0))
        self.initial_val_loss = meta.get("initial_val_loss")
        self.run_config = meta.get("config")
        self.model_config = meta.get("model") or self.model_config
        self.role_records = meta.get("roles") or self.role_records
        self.peft = meta.get("peft", self.peft)
        self.base_record = meta.get("base", self.base_record)
        self.quant = meta.get("quant", self.quant)
        if meta.get("rng"):  # dropout continues with the same random stream after resume
            torch.set_rng_state(meta["rng"]["torch"])


def _rss() -> int:
    """Resident memory of this process in bytes (0 where psutil is missing)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with the dev extras
        return 0
    return psutil.Process().memory_info().rss


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _value(v: Metric) -> torch.Tensor | float:
    v = v[0] if isinstance(v, tuple) else v
    return v.detach() if isinstance(v, torch.Tensor) else v



def _wandb_id(module: L.LightningModule) -> str | None:
    trainer = module._trainer
    for logger in (trainer.loggers if trainer is not None else []):
        if type(logger).__name__ == "WandbLogger":
            return logger.version
    return None
