"""Several processes per run: Lightning's strategies (``trainer=ddp`` / ``fsdp`` / ``deepspeed``) under ``llmlab``.

Nothing here is a distributed engine: Lightning starts the processes, wraps the model and averages
gradients. This module makes llmlab's side fit it:

* **Relaunch.** Lightning starts ranks 1..N-1 by running the command that started rank 0 again
  (``_SubprocessScriptLauncher``; under Hydra it adds ``hydra.run.dir=<the same dir>``). It takes
  that command from ``sys.argv`` and ``__main__``, which for ``llmlab train`` are the console script
  and the argv Hydra parsed — not a command that runs. :func:`relaunch_as` makes the children
  ``python -m llmlab.cli <command> <this job's overrides> hydra.run.dir=<this job's dir>`` (the
  job's own overrides and dir, so a sweep job's ranks join that job, not a new sweep).
* **Precision follows the accelerator** (``precision: ${precision_for:${.accelerator}}`` in
  ``conf/trainer/ddp.yaml``): bf16 autocast on GPUs, full fp32 on CPUs.
* **Evaluation scores every window once.** Lightning's default ``DistributedSampler`` pads every
  rank to the same length with repeated items, which biases a mean over a split; :func:`eval_sampler`
  gives rank ``r`` items ``r, r+W, r+2W, ...`` (Lightning's ``UnrepeatedDistributedSampler``), the
  methods sum weighted losses over ranks (``LLMLabModule.epoch_metrics``), and
  :func:`per_rank_eval_limits` divides ``limit_val_batches`` / ``limit_test_batches`` among the ranks,
  so val/test metrics equal a one-process evaluation of the same weights.

* **Sweeps.** :func:`end_job` closes a job's process group and takes back the launcher's environment
  variables, so each job of ``llmlab train -m trainer=ddp ...`` starts ranks of its own.
* **GPU-only strategies** (``trainer=fsdp`` / ``deepspeed``) asked for on a CPU end with one line
  (:func:`check_strategy`, called by the schema check).

Training batches are drawn per rank already (``IndexedBatches``: ``rank`` joins the random key),
``train/tokens_seen`` / ``train/flops`` add every rank's count (``LLMLabModule.count_tokens``), and
ranks that build a tokenizer from the corpus must build the same one (:func:`check_same_on_all_ranks`).
"""

from __future__ import annotations

import math
import os
import sys

from omegaconf import OmegaConf

from llmlab.errors import UserError

# trainer.precision by trainer.accelerator (conf/trainer/ddp.yaml): bf16 autocast where it is fast
PRECISION = {"gpu": "bf16-mixed", "cuda": "bf16-mixed", "cpu": "32-true", "mps": "32-true"}


def precision_for(accelerator: str) -> str:
    """``trainer.precision`` for ``accelerator`` (``auto``: bf16 autocast only if torch sees a GPU)."""
    name = str(accelerator).lower()
    if name == "auto":
        import torch

        name = "gpu" if torch.cuda.is_available() else "cpu"
    return PRECISION.get(name, "32-true")


def register_resolvers() -> None:
    """``${precision_for:ACCELERATOR}`` in configs (idempotent)."""
    if not OmegaConf.has_resolver("precision_for"):
        OmegaConf.register_new_resolver("precision_for", precision_for)


# Lightning strategies that run on CUDA GPUs only (conf/trainer/<name>.yaml)
GPU_ONLY = {"FSDPStrategy": "fsdp", "DeepSpeedStrategy": "deepspeed", "fsdp": "fsdp", "deepspeed": "deepspeed"}


def check_strategy(strategy, accelerator) -> None:
    """``trainer=fsdp`` / ``deepspeed`` on a CPU: one line (Lightning refuses FSDP on CPU, and DeepSpeed's
    strategy only after the processes have started)."""
    target = strategy.get("_target_", "") if hasattr(strategy, "get") else str(strategy)
    name = GPU_ONLY.get(target.rsplit(".", 1)[-1].split("_")[0])
    if name and str(accelerator).lower() in ("cpu", "mps"):
        raise UserError(f"trainer={name} runs on CUDA GPUs only, not trainer.accelerator={accelerator}: on a CPU "
                        "use trainer=ddp trainer.accelerator=cpu trainer.devices=2 (data-parallel, gloo)")


# ---------------------------------------------------------------------------- relaunch

_command: str | None = None  # the llmlab command of this process (train, eval ...), set by relaunch_as
# what Lightning's launcher writes into rank 0's environment (and reads back as "my ranks are running")
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_env_before: dict[str, str | None] = {}


def relaunch_as(command: str) -> None:
    """Make Lightning start the other ranks of this job as ``python -m llmlab.cli <command> ...``."""
    global _command
    _command = command
    _env_before.clear()
    _env_before.update({k: os.environ.get(k) for k in LAUNCHER_ENV})
    from lightning.pytorch.strategies.launchers import subprocess_script

    # Lightning's launcher calls this module-level function for the children's command line under Hydra
    if not hasattr(subprocess_script, "_hydra_subprocess_cmd"):
        raise RuntimeError("this Lightning version builds its child processes' command elsewhere: "
                           "llmlab.distributed.relaunch_as needs updating")
    subprocess_script._hydra_subprocess_cmd = child_command


def end_job() -> None:
    """After a job: close its process group and take back the launcher's variables, so that the next
    job of a sweep (``-m``, jobs in this process) starts ranks of its own instead of calling the
    finished job's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in _env_before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def child_command(local_rank: int) -> tuple[list[str], str]:
    """The command line (and working directory) of rank ``local_rank``: this job's overrides, its run
    dir, no second ``.hydra/`` (rank 0 writes it) and a log file of its own."""
    from hydra.core.hydra_config import HydraConfig

    from llmlab.cli import hydra_quote

    hc = HydraConfig.get()
    overrides = [o for o in hc.overrides.task if not o.startswith("hydra.")]
    command = [sys.executable, "-m", "llmlab.cli", _command or "train", *overrides,
               f"hydra.run.dir={hydra_quote(hc.runtime.output_dir)}", "hydra.output_subdir=null",
               f"hydra.job.name={hc.job.name}_rank{local_rank}"]
    return command, hc.runtime.cwd


# ---------------------------------------------------------------------------- evaluation


def eval_sampler(dataset, trainer, split: str = "evaluation"):
    """A sampler giving rank ``r`` of ``W`` the items ``r, r+W, ...`` of ``dataset`` (each item on
    exactly one rank, nothing repeated); None in a single process (the DataLoader's own order)."""
    world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
    if world <= 1 or len(dataset) == 0:
        return None
    if len(dataset) < world:
        raise UserError(f"the {split} split has {len(dataset)} items for {world} processes: every process needs "
                        f"one; use fewer processes (trainer.devices) or a larger split (data.val_fraction / test_fraction)")
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=False)


def per_rank_eval_limits(trainer) -> None:
    """``limit_val_batches=N`` (an integer) scores N batches in one process; with W ranks each scores
    ceil(N / W), and with rank ``r`` holding items ``r, r+W, ...`` the ranks together score the same
    first N batches' items (exactly, when W divides N)."""
    world = int(trainer.world_size)
    if world <= 1:
        return
    for name in ("limit_val_batches", "limit_test_batches"):
        limit = getattr(trainer, name)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            setattr(trainer, name, math.ceil(limit / world))


def check_same_on_all_ranks(trainer, value, what: str) -> None:
    """Stop a rank whose ``value`` (e.g. a tokenizer fingerprint) differs from rank 0's: ranks that
    tokenise differently would train one model on two vocabularies without a word."""
    reference = trainer.strategy.broadcast(value, src=0)
    if reference != value:
        raise RuntimeError(f"rank {trainer.global_rank} built another {what} than rank 0 ({value!r} != {reference!r})")
