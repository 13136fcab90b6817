"""Lightning callbacks and logger factories shared by every method.

- :func:`progress_bar`: Rich bar in a terminal, one plain line every N steps otherwise (CI, nohup, files).
- :class:`LearningCurves`: ``metrics.csv`` and ``loss.png`` (train/val loss against tokens seen) in the
  run dir, whatever logger is configured; its history is kept in checkpoints so resumed runs plot whole.
- :class:`TextSamples`: a generated sample at each validation, printed, appended to ``samples.md``
  and sent to wandb/TensorBoard.
- :func:`wandb_logger`: WandbLogger, offline unless wandb has credentials, resumable by run id.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from llmlab.utils import atomic_write_bytes, atomic_write_text, perplexity, png_bytes

# ---------------------------------------------------------------------------- progress


def progress_bar(kind: str = "auto", every_n_steps: int = 50) -> ProgressBar:
    """``auto``: Rich when stdout is a terminal, plain log lines otherwise."""
    if kind not in ("auto", "rich", "plain"):
        from llmlab.errors import UserError

        raise UserError(f"callbacks.progress.kind={kind!r}: use auto, rich or plain")
    if kind == "rich" or (kind == "auto" and sys.stdout.isatty()):
        return RichProgressBar()
    return PlainProgressBar(every_n_steps)


class PlainProgressBar(ProgressBar):
    """One line every ``every_n_steps`` optimizer steps and one per validation: friendly to log files."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self._enabled = True
        self._t0 = time.perf_counter()
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._start_step = trainer.global_step

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        m = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps if trainer.max_steps > 0 else '?'}"]
        if "train/loss" in m:
            parts.append(f"loss {float(m['train/loss']):.4f}")
        if "train/tokens_per_sec" in m:
            parts.append(f"{float(m['train/tokens_per_sec']):,.0f} tok/s")
        elapsed = time.perf_counter() - self._t0
        parts.append(f"{_hms(elapsed)} elapsed")
        done = step - self._start_step
        if trainer.max_steps > 0 and done > 0:
            parts.append(f"eta {_hms(elapsed / done * (trainer.max_steps - step))}")
        print(" | ".join(parts), flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.state.fn != "fit":  # the task prints the metrics of later validate/test runs
            return
        m = trainer.callback_metrics
        if "val/loss" in m:
            tag = "untrained " if trainer.sanity_checking else ""
            loss = float(m["val/loss"])
            ppl = f" | val/ppl {perplexity(loss):,.2f}" if getattr(pl_module, "eval_ppl", True) else ""
            print(f"{tag}val/loss {loss:.4f}{ppl} | step {trainer.global_step}", flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------- curves


class LearningCurves(Callback):
    """Keeps (step, tokens, metric) rows; writes ``metrics.csv`` and ``loss.png`` into the run dir."""

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = every_n_steps  # None = trainer.log_every_n_steps
        self.rows: list[dict[str, float]] = []

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state.get("rows", []))

    def _record(self, trainer, pl_module, keys) -> None:
        m = trainer.callback_metrics
        row = {"step": trainer.global_step, "tokens": getattr(pl_module, "tokens_seen", 0)}
        row.update({k: float(m[k]) for k in keys if k in m})
        if len(row) > 2:
            self.rows.append(row)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % max(1, every) == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._record(trainer, pl_module, [k for k in trainer.callback_metrics if k.startswith("train/")])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            if trainer.global_step == 0 and getattr(pl_module, "initial_val_loss", None) is not None:
                if not any(r.get("tokens") == 0 and "val/loss" in r for r in self.rows):
                    self.rows.append({"step": 0, "tokens": 0, "val/loss": pl_module.initial_val_loss})
            return
        if trainer.state.fn != "fit":
            return
        self._record(trainer, pl_module, [k for k in trainer.callback_metrics if k.startswith("val/")])
        self.write(trainer.default_root_dir)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer.default_root_dir)

    @rank_zero_only
    def write(self, out_dir: str | os.PathLike) -> None:
        if not self.rows or not out_dir:
            return
        out = Path(out_dir)
        keys = ["step", "tokens"] + sorted({k for r in self.rows for k in r} - {"step", "tokens"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(out / "metrics.csv", buf.getvalue())
        atomic_write_bytes(out / "loss.png", plot_loss(self.rows))


def plot_loss(rows: list[dict[str, float]]) -> bytes:
    """PNG of the learning curves against tokens seen.

    Left: train and val loss, with a method's loss components as thin lines (BERT's MLM and NSP
    losses, ELMo's forward and backward LM). Right, when the method logs accuracies (BERT's
    masked-token and NSP accuracy, T5's span accuracy): the validation accuracies.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r})
    components = [k for k in keys if k.endswith("_loss") or k.startswith(("train/loss_", "val/loss_"))]
    accuracies = [k for k in keys if k.startswith("val/") and k.rsplit("/", 1)[1].endswith(("acc", "acc_text"))]
    fig, axes = plt.subplots(1, 2 if accuracies else 1, figsize=(12 if accuracies else 7, 4.2), dpi=120,
                             squeeze=False)

    def curve(ax, key: str, **style) -> None:
        pts = [(r["tokens"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, **style)

    ax = axes[0][0]
    curve(ax, "train/loss", lw=1, alpha=0.7)
    curve(ax, "val/loss", marker="o", lw=2)
    for key in components:
        curve(ax, key, lw=0.8, alpha=0.6, marker="." if key.startswith("val/") else None)
    ax.set_ylabel("cross-entropy (nats)")
    if accuracies:
        for key in accuracies:
            curve(axes[0][1], key, marker="o", lw=1.5)
        axes[0][1].set_ylabel("accuracy")
        axes[0][1].set_ylim(0, 1)
    for ax in axes[0]:
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # word vectors have no loss curve to label
            ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


# ---------------------------------------------------------------------------- samples


class TextSamples(Callback):
    """Generate from ``prompt`` at the end of every validation (not the sanity check)."""

    def __init__(self, prompt: str = "", max_new_tokens: int = 200, generation: dict | None = None) -> None:
        self.prompt = prompt
        self.generation = dict(generation or {})
        self.generation["max_new_tokens"] = max_new_tokens
        self.generation["num_samples"] = 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.global_rank != 0:
            return
        if getattr(pl_module, "tokenizer", None) is None:
            return
        text = pl_module.sample_text(self.prompt, self.generation)
        if text is None:  # a method that does not generate text
            return
        step = trainer.global_step
        print(f"--- sample at step {step} ---\n{self.prompt}{text}\n---", flush=True)
        if trainer.default_root_dir:
            path = Path(trainer.default_root_dir) / "samples.md"
            with open(path, "a", encoding="utf-8") as f:  # append-only log, one section per validation
                f.write(f"## step {step}, {pl_module.tokens_seen:,} tokens\n\n```\n{self.prompt}{text}\n```\n\n")
        for logger in trainer.loggers:
            name = type(logger).__name__
            if name == "WandbLogger":
                logger.log_text(key="samples", columns=["step", "text"], data=[[step, self.prompt + text]])
            elif name == "TensorBoardLogger":
                logger.experiment.add_text("samples", f"```\n{self.prompt}{text}\n```", step)


# ---------------------------------------------------------------------------- loggers


def wandb_logger(
    *,
    project: str = "llmlab",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    sweep_group: bool = True,
    job_type: str | None = None,
    tags: list[str] | None = None,
    extra_tags: list[str] | None = None,
    save_dir: str = ".",
    offline: Any = "auto",
    log_model: bool = False,
    id: str | None = None,
) -> Any:
    """A WandbLogger that works without network: offline unless credentials exist (WANDB_MODE=offline
    always wins). Under -m the jobs of one sweep share a group (``<group>/<sweep dir name>``); the
    tags are ``tags`` + ``extra_tags`` (method, run name) + the ``experiment=`` recipe."""
    from lightning.pytorch.loggers import WandbLogger

    if offline == "auto":
        offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun") or not _wandb_has_credentials()
    sweep_dir, recipe = _hydra_sweep_and_recipe()
    if sweep_group and sweep_dir is not None:
        group = f"{group or 'llmlab'}/{Path(sweep_dir).name}"
    tags = list(dict.fromkeys(str(t)[:64] for t in [*(tags or []), *(extra_tags or []), recipe] if t))  # wandb: <= 64 chars
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        entity=entity,
        name=name or f"{group or 'llmlab'}/{Path(save_dir).name}",
        group=group,
        job_type=job_type,
        tags=tags,
        save_dir=save_dir,
        offline=bool(offline),
        log_model=log_model,
        id=id,
        resume="allow" if id else None,
    )


def _hydra_sweep_and_recipe() -> tuple[str | None, str | None]:
    """(the sweep dir if this is a job of a -m sweep, the experiment= recipe chosen) from Hydra's runtime config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    recipe = hc.runtime.choices.get("experiment")
    return (str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None), recipe


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() == "online" or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` really is the last state.

    Lightning 2.6 writes ``last.ckpt`` after a validation only when the monitored metric also
    produced a new best checkpoint at that step, so a run whose final validation was not its best
    left ``last.ckpt`` at an earlier step — and ``ckpt_path=last`` resumed (and ``llmlab eval``
    scored) stale weights. Here every validation (and every epoch end that saves) refreshes it.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skipped = already saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
