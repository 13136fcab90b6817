"""Faults a training run survives: a signal, a kill during a checkpoint write, a diverged loss.

- :class:`StopOnSignal` (a callback every ``llmlab train`` run gets): the first SIGINT (Ctrl+C) or
  SIGTERM (``kill``, a cluster's pre-emption) lets the current optimizer step finish, writes
  ``checkpoints/last.ckpt`` at that step and ends the run with one line and the shell's exit code
  for that signal (130, 143); ``ckpt_path=last`` continues it exactly (same weights, data position,
  LR schedule, token and FLOP counts as a run never stopped). A second Ctrl+C stops at once.
  It rides on Lightning's own SIGTERM path (``trainer.received_sigterm`` -> ``SIGTERMException``
  after the batch, the same point under DDP on every rank) and saves in ``on_exception``, where
  the loops' state is complete.
- :class:`AtomicCheckpointIO`: checkpoints are written to a temp file next to the target, fsync'ed
  and renamed over it, so ``kill -9`` mid-write leaves the previous checkpoint intact (Lightning's
  own writer goes through a temp file in /tmp and a copy, not a rename, across file systems).
- :class:`FiniteLoss`: a NaN/inf training or validation loss stops the run with one line naming the
  step, before the optimizer applies it and before a checkpoint of that state is written, so
  ``last.ckpt`` stays the last good state. Exit code 2: a diverged run is bad input (a learning
  rate, an init scale, a precision) in the project's convention, fixed by changing an override.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llmlab.errors import UserError

log = logging.getLogger(__name__)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report them
SLOW_CKPT_ENV = "LLMLAB_TEST_SLOW_CKPT"  # tests only: seconds between writing a checkpoint and renaming it over an older one


class Stopped(Exception):
    """Training stopped by a signal after saving; the CLI prints ``str(self)`` and exits ``exit_code``."""

    def __init__(self, message: str, exit_code: int, checkpoint: str | None) -> None:
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


class NonFiniteLoss(UserError):
    """A NaN/inf loss: one line naming the step and the fix, exit 2."""


# ---------------------------------------------------------------------------- signals


class StopOnSignal(Callback):
    """SIGINT/SIGTERM during fit: finish the step, save ``last.ckpt``, raise :class:`Stopped`."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.step: int | None = None
        self.saved: str | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, after Lightning registered its own SIGTERM handler (ours replaces it for the fit)
        if threading.current_thread() is not threading.main_thread():
            return
        self._trainer = trainer
        for sig in EXIT_CODES:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl+C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        log.info("received %s: stopping after this step", self.received.name)
        # Lightning's flag: the loop raises SIGTERMException once the current batch (and a validation
        # due at this step) is complete; under DDP rank 0 broadcasts it to every rank before the next step
        self._trainer._signal_connector.received_sigterm = True

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        if self.received is None:  # another rank was signalled (DDP): every rank saves together
            self.received = signal.SIGTERM
        self.step = trainer.global_step
        path = last_checkpoint_path(trainer)
        if path is None or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(path, weights_only=False)  # every rank calls it; rank 0 writes (atomically, see AtomicCheckpointIO)
        self.saved = str(path)

    def stopped(self, resume_hint: str) -> Stopped:
        name = self.received.name if self.received is not None else "SIGTERM"
        code = EXIT_CODES.get(self.received, 143)
        if self.saved:
            what = f"checkpoint {self.saved}; resume with: {resume_hint} ckpt_path={self.saved}"
        else:
            what = "no checkpoint (checkpointing is off for this run)"
        return Stopped(f"stopped by {name} at step {self.step}: {what}", code, self.saved)


def last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    """Where ``last.ckpt`` goes: the ModelCheckpoint callback's dir, else ``<run dir>/checkpoints``."""
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "dirpath", None):
        return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    if trainer.default_root_dir:
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    return None


# ---------------------------------------------------------------------------- atomic checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file in the target's directory, fsync, ``os.replace``: a reader
    (or a kill -9) sees the old checkpoint or the new one, never half of one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage (s3://, gs:// ...): fsspec's writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            slow = float(os.environ.get(SLOW_CKPT_ENV) or 0)
            if slow > 0 and path.exists():  # tests: a window to kill the process while it replaces a checkpoint
                time.sleep(slow)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a power cut after it keeps the new name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prepare_checkpoints(trainer: L.Trainer) -> None:
    """Before training: the checkpoint dir can be written (a file in its place, a read-only or
    missing location is one line now, not a crash at the first validation), and Lightning's default
    checkpoint writer becomes :class:`AtomicCheckpointIO` (a strategy with its own writer — sharded
    FSDP, DeepSpeed, a user's plugin — is left alone)."""
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "dirpath", None) and not trainer.fast_dev_run:
        check_writable_dir(Path(cb.dirpath), "the checkpoint dir", "callbacks.model_checkpoint.dirpath=DIR")
    strategy = trainer.strategy
    try:
        io = strategy.checkpoint_io
    except Exception:  # noqa: BLE001 - a strategy without a CheckpointIO
        return
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def check_writable_dir(directory: Path, what: str, option: str) -> None:
    """Create ``directory`` and write a probe file in it, or raise one line naming the obstacle."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{what} {directory} is a file: move it away, or choose another location "
                        f"({option}, hydra.run.dir=DIR or LLMLAB_ROOT=DIR)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".llmlab-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} {directory} ({e.strerror or type(e).__name__}): choose a writable "
                        f"location ({option}, hydra.run.dir=DIR or LLMLAB_ROOT=DIR)") from None


# ---------------------------------------------------------------------------- diverged loss


class FiniteLoss(Callback):
    """Stop at the first NaN/inf training loss (before its backward/optimizer step) or validation
    loss (before ModelCheckpoint, which Lightning runs after every other callback, saves it)."""

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # every rank stops together
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLoss(self._message("train/loss", float(loss.detach().float().sum()), trainer, pl_module))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get("val/loss")
        if value is not None and not math.isfinite(float(value)):
            raise NonFiniteLoss(self._message("val/loss", float(value), trainer, pl_module))

    @staticmethod
    def _message(key: str, value: float, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        what = "nan" if math.isnan(value) else "inf"
        lr = (getattr(pl_module, "optim_cfg", None) or {}).get("lr")  # the peak the user set, not this step's
        at = f"at step {trainer.global_step}" if not trainer.sanity_checking else "before training (step 0)"
        kept = last_checkpoint_path(trainer)
        kept = f"; the last good checkpoint, {kept}, is kept" if kept is not None and kept.is_file() else ""
        now = f" (now {lr:.3g})" if lr is not None else ""
        return (f"{key} is {what} {at}{kept}: lower optim.lr{now}, add warmup (optim.scheduler.warmup_steps), "
                "clip gradients (trainer.gradient_clip_val) or train in 32-bit (trainer.precision=32-true)")


def resume_command(command: str = "train") -> str:
    """``llmlab train <this run's overrides>`` (without its ckpt_path) — the command that resumes it."""
    from hydra.core.hydra_config import HydraConfig

    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    return " ".join(["llmlab", command, *(shlex.quote(o) for o in overrides)])


def fault_callbacks() -> list[Callback]:
    """The callbacks of every training run: stop on a signal, stop on a NaN/inf loss."""
    return [StopOnSignal(), FiniteLoss()]
