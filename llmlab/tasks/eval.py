"""`llmlab eval ckpt_path=X [data=...]`: score a checkpoint on a split (default: test).

Methods with their own benchmarks define ``evaluate(cfg)`` (word2vec/GloVe: WordSim-353,
SimLex-999 and Google analogies); everything else is scored by the Lightning test loop.

For language models: token-weighted mean cross-entropy and perplexity over non-overlapping windows
that cover the split (every token scored once). Printed, and written to <run dir>/metrics.json.
"""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llmlab.checkpoint import load_method, resolve_ckpt_path
from llmlab.errors import UserError
from llmlab.tasks.common import (
    build_data,
    finish_loggers,
    instantiate_loggers,
    print_metrics,
    save_metrics,
    scalar_metrics,
    split_method_config,
)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    L.seed_everything(cfg.seed, verbose=False)
    path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.get("name"))
    method, meta = load_method(path)
    if cfg.get("quant"):  # quant=int8|nf4|...: post-training quantization of the loaded model, on the fly
        from llmlab.tasks.quantize import quantize_method
        from llmlab.utils import plain

        quantize_method(method, plain(cfg.quant))
    metrics = method.evaluate(cfg)  # methods with their own benchmarks (word vectors: similarity, analogies)
    if metrics is not None:
        save_metrics(cfg.paths.output_dir, metrics)
        print(f"{path}: metrics written to {cfg.paths.output_dir}/metrics.json")
        return metrics
    if cfg.split not in ("train", "val", "test"):
        raise UserError(f"split={cfg.split!r}: use test, val or train")

    data_cfg = cfg.get("data")
    if data_cfg is None:  # the data the checkpoint was trained on
        data_cfg = OmegaConf.create((meta.get("config") or {}).get("data"))
        if not data_cfg:
            raise UserError(f"{path} records no data config: pass one, e.g. data=shakespeare")
    model = getattr(method.model, "_orig_mod", method.model)
    block_size = getattr(getattr(model, "config", None), "block_size", None)  # GPT: its context ...
    if block_size:  # ... minus the positions a soft prompt / prefix takes before every window
        block_size -= int(getattr(model, "num_virtual_tokens", 0) or 0)
    overrides = {"block_size": block_size} if block_size else {}
    if cfg.get("batch_size"):
        overrides["eval_batch_size"] = cfg.batch_size
    method_cfg = (meta.get("config") or {}).get("method")  # methods that batch their own way (BERT, T5)
    datamodule_cfg = split_method_config(OmegaConf.create(method_cfg))[1] if method_cfg else None
    datamodule, _ = build_data(data_cfg, tokenizer_state=meta["tokenizer"], datamodule_cfg=datamodule_cfg,
                               **overrides)

    loggers = instantiate_loggers(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=loggers or False,
        callbacks=[],
        enable_checkpointing=False,
        limit_test_batches=cfg.get("limit_batches") or 1.0,
        limit_val_batches=cfg.get("limit_batches") or 1.0,
        num_sanity_val_steps=0,
    )
    try:
        from llmlab.quant.prune_curve import eval_pruning

        # prune=...: prune the loaded model one-shot (prune=curve: score every method x amount, then the dense model)
        pruned = eval_pruning(cfg, method, meta, datamodule, lambda: _score(trainer, method, datamodule, cfg.split))
        raw = _score(trainer, method, datamodule, cfg.split)
    finally:
        finish_loggers(loggers)
    method.write_eval_artifacts(cfg.paths.output_dir, cfg.split)  # e.g. a classifier's confusion matrix
    metrics = scalar_metrics(raw, perplexity_of_loss=method.eval_ppl)  # no perplexity of a classification loss
    metrics.update(pruned)  # prune/sparsity, the curve's points
    metrics[f"{cfg.split}/tokens"] = float(datamodule.stats().get(cfg.split, 0))
    unknown = _unknown_tokens(datamodule, cfg.split)
    if unknown is not None:  # text outside the checkpoint's vocabulary, scored as its unknown id
        metrics[f"{cfg.split}/unknown_tokens"] = float(unknown)
    save_metrics(cfg.paths.output_dir, metrics)
    print_metrics(metrics, f"{path} on the {cfg.split} split ({cfg.paths.output_dir}/metrics.json)")
    return metrics


def _score(trainer: L.Trainer, method, datamodule, split: str) -> dict:
    """Lightning's test loop (test) or validation loop (val, train) on ``split``: ``{split}/loss`` ..."""
    if split == "test":
        return trainer.test(method, datamodule=datamodule, verbose=False)[0]
    datamodule.setup("fit")
    raw = trainer.validate(method, dataloaders=datamodule.eval_dataloader(split), verbose=False)[0]
    return {k.replace("val/", f"{split}/"): v for k, v in raw.items()}


def _unknown_tokens(datamodule, split: str) -> int | None:
    """Tokens of ``split`` that are the tokenizer's unknown id (None: no unknown id, or not a token stream)."""
    from llmlab.data.lm import count_unknown

    splits = getattr(datamodule, "splits", None)
    tokens = splits.get(split) if isinstance(splits, dict) else None
    if tokens is None or getattr(datamodule.tokenizer, "unk_id", None) is None:
        return None
    return count_unknown(tokens, datamodule.tokenizer)
