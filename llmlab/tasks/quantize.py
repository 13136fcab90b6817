"""`llmlab quantize ckpt_path=X quant=NAME`: a trained checkpoint, quantized, as a new run.

Writes into its run dir (``outputs/quantize/runs/<time>``): ``checkpoints/last.ckpt`` — an llmlab
checkpoint like any other (tokenizer, run config, data config carried over) whose metadata
records ``quant`` and whose state holds the packed integer buffers, so ``llmlab eval`` and
``llmlab infer ckpt_path=<run dir>`` load the quantized model — and ``metrics.json``:

* ``quant/size_mb``: the written checkpoint; ``quant/fp_size_mb``: the same checkpoint with the float
  weights (the one ``quant=none`` would write; a training checkpoint also holds optimizer state);
* ``quant/ratio`` = size / fp size; ``quant/bits_per_param``: bits per weight of the quantized
  layers, codes and scales (int8 per channel: 8.25 at 128 columns; int4 groups of 32: 5.0).

A QAT-trained checkpoint with ``quant=qat_int<b>`` is exported to real integers (same outputs);
``quant=qat_*`` on a float checkpoint is post-training absmax at those bits (weights only). An
already quantized checkpoint is refused with one line before anything is written.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from llmlab.checkpoint import CKPT_KEY, load_method, read_checkpoint, resolve_ckpt_path
from llmlab.errors import UserError
from llmlab.quant import quant_name, quantize_trained, storage
from llmlab.tasks.common import print_metrics, save_metrics
from llmlab.utils import atomic_write_bytes, plain

log = logging.getLogger(__name__)
MB = 2**20
KEPT = ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "hparams_name")  # not optimizer state


def quantize(cfg: DictConfig) -> dict[str, float]:
    quant_cfg = plain(cfg.get("quant"))
    if not quant_cfg or quant_name(quant_cfg) == "none":
        raise UserError("llmlab quantize needs a scheme: pass quant=int8, int4, nf4, llm_int8, bf16 or qat_int8/qat_int4")
    path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.get("name"))
    source = read_checkpoint(path)
    method, _ = load_method(path)
    fp_bytes = len(serialize(checkpoint_of(method, source)))
    quantize_method(method, quant_cfg)
    data = serialize(checkpoint_of(method, source, quantized_from=str(Path(path).resolve())))
    out = atomic_write_bytes(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", data)
    held = storage(method.model)
    metrics = {
        "quant/size_mb": len(data) / MB,
        "quant/fp_size_mb": fp_bytes / MB,
        "quant/ratio": len(data) / fp_bytes,
        "quant/bits_per_param": 8 * held["bytes"] / max(held["params"], 1),
        "quant/layers": float(held["layers"]),
    }
    save_metrics(cfg.paths.output_dir, metrics)
    print_metrics(metrics, f"quant={quant_name(method.quant)}: {out} ({cfg.paths.output_dir}/metrics.json)")
    return metrics


def quantize_method(method, quant_cfg: dict) -> dict:
    """Quantize a loaded method's trained model in place (``quant=`` of quantize / eval / infer) and
    record the scheme on it (what its checkpoint's metadata says)."""
    model = getattr(method.model, "_orig_mod", method.model)
    if method.base_record:  # a tuned checkpoint stores its tuner only; the base would be re-read in float
        raise UserError("the checkpoint holds a tuner over a referenced base model: quantize the base "
                        "(llmlab quantize ckpt_path=<base run>) and train the tuner on it, or merge it first "
                        "(llmlab export what=merged) and quantize the merged model")
    method.quant = quantize_trained(model, quant_cfg)
    method.eval()
    return method.quant


def checkpoint_of(method, source: dict, quantized_from: str | None = None) -> dict:
    """An llmlab checkpoint of ``method`` as it is now (the keys a Lightning save has, no optimizer
    state), metadata written by the method itself."""
    ckpt = {k: source[k] for k in KEPT if k in source}
    ckpt["state_dict"] = {k: v.detach().contiguous() for k, v in method.state_dict().items()}
    method.on_save_checkpoint(ckpt)
    ckpt[CKPT_KEY]["quantized_from"] = quantized_from
    return ckpt


def serialize(ckpt: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()
