"""`llmlab train`: instantiate data, tokenizer, method, callbacks, loggers and Trainer; fit; test.

Writes into the run dir: the resolved config (.hydra/), checkpoints/ (last.ckpt, best.ckpt),
metrics.json (final train/val/test metrics), metrics.csv + loss.png (learning curves), samples.md.
"""

from __future__ import annotations

import logging
import time

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llmlab.checkpoint import CKPT_KEY, read_checkpoint, resolve_ckpt_path, trained_config
from llmlab.distributed import end_job, per_rank_eval_limits, relaunch_as
from llmlab.errors import UserError
from llmlab.faults import fault_callbacks, prepare_checkpoints, resume_command
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

from llmlab.quant import compress
from llmlab.scaling.isoflop import apply_isoflop
from llmlab.quant.prune_callback import prune_callbacks, prune_metrics
from llmlab.tasks.roles import build_models, check_role_tokenizers, load_init, tokenizer_roles
from llmlab.utils import plain

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    isoflop = apply_isoflop(cfg)  # scaling.compute: this job's GPT shape, steps and LR schedule

    ckpt_path, meta = None, {}
    if cfg.get("ckpt_path"):
        ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, cfg.get("name"))
        ckpt = read_checkpoint(ckpt_path)
        meta = ckpt[CKPT_KEY]
        check_resumable(ckpt, ckpt_path, cfg)
        log.info("resuming from %s", ckpt_path)
        init, recorded = None, {"model": trained_config(ckpt), "peft": meta.get("peft"), "base": meta.get("base"),
                                "quant": meta.get("quant"),
                                "asked": (meta.get("config") or {}).get("model")}
    else:
        init, recorded = load_init(cfg, plain(cfg.get("model")) or {}), None

    _tuner_learning_rate(cfg)
    method_cfg, datamodule_cfg = split_method_config(cfg.method)
    preloaded = tokenizer_roles(cfg)  # method.tokenizer_from: distillation reads its teacher's tokenizer
    tokenizer_state = (meta.get("tokenizer") or (init.tokenizer_state if init else None)
                       or next((p.tokenizer_state for p in preloaded.values() if p.tokenizer_state), None))
    if init is not None and init.tokenizer_state:
        log.info("tokenizer: the one of %s (the tokenizer group is not used)", init.source)
    datamodule, tokenizer = build_data(cfg.data, cfg.tokenizer, tokenizer_state=tokenizer_state,
                                       datamodule_cfg=datamodule_cfg, **_window_fits(cfg, init, recorded))
    check_role_tokenizers(preloaded, tokenizer)
    models = build_models(cfg, tokenizer, init=init, resumed=recorded, preloaded=preloaded)
    data_keys = datamodule.method_kwargs() if hasattr(datamodule, "method_kwargs") else {}  # e.g. class labels
    method = instantiate(method_cfg, models=models.models, optim=plain(cfg.get("optim")), _recursive_=False,
                         _convert_="all", **data_keys)  # plain containers in hparams: checkpoints load weights_only
    models.attach(method)
    method.attach_tokenizer(tokenizer)
    method.run_config = resolved(cfg)

    callbacks = instantiate_callbacks(cfg) + prune_callbacks(cfg)  # prune=...: masks at fit start / on a schedule
    faults = fault_callbacks()  # SIGINT/SIGTERM -> save last.ckpt and stop; NaN/inf loss -> stop (llmlab/faults.py)
    loggers = instantiate_loggers(cfg, wandb_id=meta.get("wandb_id"))
    relaunch_as("train")  # trainer=ddp: Lightning starts the other ranks as `llmlab train <these overrides>`
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=faults + callbacks, logger=loggers or False,
                                     **_validate_within_run(cfg.trainer))
    prepare_checkpoints(trainer)  # a writable checkpoint dir; writes by temp file + fsync + rename (kill-safe)
    per_rank_eval_limits(trainer)  # W ranks score limit_val_batches / W batches each: the same windows as one
    started = time.perf_counter()
    try:
        try:
            trainer.fit(method, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                        weights_only=True)
        except SIGTERMException:  # SIGINT/SIGTERM: last.ckpt is saved; one line and the signal's exit code
            raise faults[0].stopped(resume_command("train")) from None
        except MisconfigurationException as e:  # e.g. gradient clipping asked of a manually optimised method
            raise UserError(f"the trainer settings do not fit method={cfg.method.name}: {e} (try an experiment=..., see llmlab ls experiment)") from None
        metrics = {k: v for k, v in trainer.callback_metrics.items()
                   if k.startswith("train/") and not k.endswith(("_step", "_epoch"))}
        metrics.update(trainer.validate(method, datamodule=datamodule, verbose=False)[0])  # val = intrinsic eval for word vectors
        wall = time.perf_counter() - started
        compression = compress.start(cfg, method)  # compress=...: post-training quantization before the test (None: no)
        if cfg.get("test"):
            metrics.update(trainer.test(method, datamodule=datamodule, verbose=False)[0])
            if trainer.global_rank == 0:
                method.write_eval_artifacts(cfg.paths.output_dir, "test")
        metrics = scalar_metrics(metrics, perplexity_of_loss=method.loss_is_token_nll)
        metrics.update(run_costs(method, wall, cfg.paths.output_dir))
        metrics.update(prune_metrics(callbacks))  # prune/sparsity: zeros in the pruned weights
        if compression is not None:  # packed checkpoint size (model/ckpt_mb), generation tokens/s, peak RSS
            metrics.update(compression.finish(cfg.paths.output_dir))
        metrics["train/tokens_seen"] = float(method.tokens_seen)
        counted = {"train/tokens_seen": metrics["train/tokens_seen"]}
        if method.flops_seen:
            counted["train/flops"] = metrics["train/flops"] = float(method.flops_seen)
        metrics.update(method.cost_report())  # GPT: non-embedding parameters, FLOPs per token
        if isoflop is not None:  # the budget groups the IsoFLOP curves in `llmlab scaling fit`
            metrics.update({"scaling/compute": float(cfg.scaling.compute), "scaling/size": float(cfg.scaling.size),
                            "scaling/n_layer": float(isoflop["n_layer"]), "scaling/n_embd": float(isoflop["n_embd"])})
        if method.initial_val_loss is not None:
            metrics["val/loss_untrained"] = float(method.initial_val_loss)
        if trainer.global_rank == 0:  # data-parallel: every rank holds the same (reduced) metrics
            save_metrics(cfg.paths.output_dir, metrics)
        log_final(loggers, counted, trainer.global_step)
        if trainer.global_rank == 0:
            save_artifacts(method, cfg.paths.output_dir)  # plain weights / vectors / plots for other tools
            print_metrics(metrics, f"final metrics ({cfg.paths.output_dir}/metrics.json)")
            text = method.sample_text("", dict(cfg.generation))
            if text is not None:
                print(f"sample:\n{text}")
    finally:
        finish_loggers(loggers)
        end_job()  # trainer=ddp in a sweep: the next job starts its own ranks
    return metrics


def save_artifacts(method, run_dir: str) -> None:
    """What other tools read. A tuned model: ``hf/`` = the merged model (LoRA, IA3, BitFit, freeze) and
    ``adapter/`` = the tuner in peft's format (LoRA, IA3, prefix, prompt); else the method's own."""
    if not method.peft:
        method.save_artifacts(run_dir)
        return
    from pathlib import Path

    from llmlab.tasks.export import write_exports

    if not hasattr(getattr(method.model, "_orig_mod", method.model), "to_hf_state_dict"):
        return
    try:
        write_exports(method, Path(run_dir), "auto", merged_dir="hf")
    except UserError as e:  # e.g. bottleneck adapters: the checkpoint is the only format
        log.info("no export of this tuned model: %s", e)


def _tuner_learning_rate(cfg: DictConfig) -> None:
    """``peft.lr``: the learning rate a tuner trains well with (soft prompts want ~100x full
    fine-tuning's) replaces ``optim.lr`` when set, so one sweep over ``peft=`` compares each at its own."""
    lr = OmegaConf.select(cfg, "peft.lr")
    if lr is not None and cfg.get("optim") is not None:
        log.info("optim.lr=%s from peft.lr (the %s tuner's learning rate)", lr, cfg.peft.name)
        with open_dict(cfg):
            cfg.optim.lr = lr


def run_costs(method, wall_seconds: float, run_dir) -> dict[str, float]:
    """What a run cost, for comparing fine-tuning methods side by side (sweep summaries): trained and
    total parameters, wall time of fit + validation, peak resident memory while training (sampled at
    every batch end, so jobs of one sweep process do not inherit each other's peak), checkpoint size."""
    from pathlib import Path

    from llmlab.peft import count_parameters

    roles = {id(p) for p in method.roles.parameters()}  # frozen roles (ref, teacher ...) are not the model
    counts = count_parameters([p for p in method.parameters() if id(p) not in roles])  # heads count as trained
    ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
    out = {"model/params": float(counts["total"]), "model/trainable_params": float(counts["trainable"]),
           "model/trainable_pct": counts["trainable_pct"], "train/wall_time_s": wall_seconds,
           "train/peak_rss_mb": method.peak_rss / 2**20}
    if ckpt.is_file():
        out["model/ckpt_mb"] = ckpt.stat().st_size / 2**20
    return out


def check_resumable(ckpt: dict, path, cfg: DictConfig) -> None:
    """Resuming a run that is already past its end trains nothing: say so instead of exiting 0."""
    step, max_steps = int(ckpt.get("global_step", 0)), cfg.trainer.get("max_steps")
    if max_steps is not None and 0 <= int(max_steps) <= step:
        raise UserError(f"{path} is at step {step} and trainer.max_steps={max_steps}: nothing left to train; "
                        f"pass trainer.max_steps larger than {step} to continue it")


def _window_fits(cfg: DictConfig, init, resumed: dict | None = None) -> dict:
    """Training windows no longer than the model's context: a pretrained model's (or the one a
    resumed checkpoint records), minus the virtual tokens a prompt / prefix tuner puts in front of
    every window (the `peft` group's, or on resume the recorded tuner's)."""
    context = getattr(getattr(init.model, "config", None), "block_size", None) if init is not None else None
    virtual = OmegaConf.select(cfg, "peft.num_virtual_tokens") or 0
    if resumed is not None:
        context = (resumed.get("model") or {}).get("block_size")
        virtual = (resumed.get("peft") or {}).get("num_virtual_tokens") or 0
    if virtual:
        context = (context or OmegaConf.select(cfg, "model.block_size") or 0) - int(virtual)
        if context < 1:
            raise UserError(f"peft.num_virtual_tokens={virtual} leaves no room for text in the model's context of "
                            f"{context + int(virtual)} tokens: use fewer virtual tokens")
    size = OmegaConf.select(cfg, "data.block_size")
    if context and size and int(size) > context:
        log.info("data.block_size=%s is longer than the model's context (minus %d virtual tokens): windows of %d tokens",
                 size, virtual, context)
        return {"block_size": int(context)}
    return {}


def _validate_within_run(trainer_cfg: DictConfig) -> dict:
    """A step-based run shorter than val_check_interval still validates (and writes best.ckpt,
    samples.md) at its last step."""
    interval, max_steps = trainer_cfg.get("val_check_interval"), trainer_cfg.get("max_steps")
    if isinstance(interval, int) and not isinstance(interval, bool) and max_steps and 0 < max_steps < interval:
        return {"val_check_interval": int(max_steps)}
    return {}


def log_final(loggers, metrics: dict[str, float], step: int) -> None:
    """The final values, so every dashboard ends on the numbers metrics.json holds."""
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()
