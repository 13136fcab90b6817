"""`llmlab memory model=... [peft=...] [quant=...] [optim=...]`: how much memory fine-tuning and serving take.

The model is built on torch's meta device (shapes only, no memory: a 65B preset costs nothing) and
the tuner applied to it, so parameter counts are exact for any preset; the arithmetic is
:mod:`llmlab.quant.memory`. Prints three tables — weights per precision, fine-tuning (full vs the
tuner vs the tuner on a quantized base: QLoRA by default) and inference (weights + KV cache) — and
writes every number to ``<run dir>/metrics.json`` (decimal GB, as the papers count).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmlab.errors import UserError
from llmlab.quant.memory import (
    GB,
    PRECISION_BYTES,
    QLORA_QUANT,
    WEIGHT_FORMATS,
    Breakdown,
    activation_bytes,
    base_weight_bytes,
    double_quant_saving_bytes,
    fine_tuning,
    kv_cache_bytes_per_token,
    layout_of,
    optimizer_bytes_per_param,
    quant_scheme,
    weights_bytes,
)
from llmlab.utils import write_json

log = logging.getLogger(__name__)


def memory(cfg: DictConfig) -> dict[str, float]:
    precision = str(cfg.precision)
    if precision not in PRECISION_BYTES:
        raise UserError(f"precision={precision}: use one of {', '.join(PRECISION_BYTES)}")
    model_cfg = _container(cfg.model) or {}
    if model_cfg.get("init_from"):
        raise UserError("llmlab memory reads a model preset, not trained weights: drop model.init_from and pass "
                        "model=<preset> (or the trained run's model.* sizes)")
    peft_cfg = _container(cfg.get("peft")) or {"name": "none"}
    quant_cfg = _container(cfg.get("quant"))
    layout = build_layout(model_cfg, peft_cfg, quant_cfg, vocab_size=cfg.get("vocab_size"))

    params = float(cfg.params) if cfg.get("params") is not None else None
    total = params or float(layout.params)
    seq = int(cfg.seq_len or layout.block_size or 0) or None
    if seq is None:
        raise UserError(f"model {model_cfg.get('name')} has no context length: pass seq_len=N")
    if cfg.get("batch_size") is None:
        raise UserError("batch_size=null: llmlab memory needs a number of sequences, e.g. batch_size=1")
    batch = int(cfg.batch_size)
    acts = activation_bytes(layout, batch, seq, precision, bool(cfg.activation_checkpointing),
                            bool(cfg.attention_scores))
    opt_bytes = cfg.get("optimizer_bytes_per_param")
    target = OmegaConf.select(cfg, "optim.optimizer._target_", default=None)  # not the whole group: its schedule
    opt_bytes = float(opt_bytes) if opt_bytes is not None else optimizer_bytes_per_param(  # refers to trainer keys
        {"optimizer": {"_target_": target, "momentum": OmegaConf.select(cfg, "optim.optimizer.momentum", default=0)}}
        if target else None)
    common = dict(precision=precision, optimizer_bytes=opt_bytes, master_weights=bool(cfg.master_weights),
                  activations=acts, params=params)

    tuner = str(peft_cfg.get("name") or "none")
    quant_name = quant_scheme(quant_cfg)
    q = quant_cfg if quant_name != "none" else QLORA_QUANT  # the quantized base: QLoRA's unless quant= says
    qname = quant_scheme(q)
    rows: dict[str, Breakdown] = {"full": fine_tuning("full fine-tuning", layout, tuned=False, quant=None, **common)}
    if tuner != "none":
        rows[tuner] = fine_tuning(f"peft={tuner} ({precision} base)", layout, tuned=True, quant=None, **common)
        label = "QLoRA: lora on nf4 + dq" if (tuner, qname) == ("lora", "nf4") else f"peft={tuner} on quant={qname}"
        rows[f"{tuner}_{qname}"] = fine_tuning(label, layout, tuned=True, quant=q, **common)

    kv_token = kv_cache_bytes_per_token(layout, precision)
    kv = (kv_token or 0.0) * seq * batch
    serve = {f"serve_{precision}": Breakdown(f"inference, {precision} weights",
                                             base_weight_bytes(layout, None, precision, params), kv_cache=kv)}
    serve[f"serve_{qname}"] = Breakdown(f"inference, quant={qname}",
                                                  base_weight_bytes(layout, q, precision, params), kv_cache=kv)

    metrics: dict[str, float] = {"model/params": total, "model/params_exact": float(layout.params),
                                 "model/trainable_params": float(layout.trainable), "memory/seq_len": float(seq),
                                 "memory/batch_size": float(batch), "memory/optimizer_bytes_per_param": opt_bytes}
    for fmt, bits in WEIGHT_FORMATS.items():
        metrics[f"memory/weights_gb/{fmt}"] = weights_bytes(total, bits) / GB
    metrics["memory/double_quant_saving_gb"] = double_quant_saving_bytes(total) / GB
    if acts is not None:
        metrics["memory/activations_gb"] = acts / GB
    if kv_token is not None:
        metrics["memory/kv_cache_bytes_per_token"] = kv_token
        metrics["memory/kv_cache_gb"] = kv / GB
    for key, row in {**rows, **serve}.items():
        for part, value in row.as_dict().items():
            if part == "trainable_params":
                continue
            metrics[f"memory/{key}/{part}_gb"] = value / GB
    path = write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
    print_tables(cfg, layout, total, rows, serve, kv_token, seq, batch, precision, model_cfg.get("name"), tuner,
                 opt_bytes)
    print(f"metrics: {path}")
    return metrics


def build_layout(model_cfg: dict, peft_cfg: dict, quant_cfg: dict | None, vocab_size: int | None = None):
    """The :class:`~llmlab.quant.memory.Layout` of the preset, built on the meta device (no memory),
    with ``peft_cfg``'s tuner applied to a second build (its trainable parameters)."""
    import torch

    from llmlab.models.build import build_model
    from llmlab.peft import apply_peft

    vocab = model_cfg.get("vocab_size") or vocab_size
    with torch.device("meta"):
        base = build_model(model_cfg, vocab_size=vocab)
        tuned = None
        if (peft_cfg.get("name") or "none") != "none":
            tuned = apply_peft(build_model(model_cfg, vocab_size=vocab), peft_cfg)
    return layout_of(base, tuned, quant_cfg)


def _container(node):
    if node is None:
        return None
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


# ---------------------------------------------------------------------------- printing


def human(n: float | None) -> str:
    """Decimal units, as the papers write them (780 GB, 800 KB)."""
    if n is None:
        return "—"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} B"


def print_tables(cfg, layout, total, rows, serve, kv_token, seq, batch, precision, name, tuner, opt_bytes) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, Console().width), highlight=False)
    exact = f" ({layout.params:,} in the preset, scaled)" if cfg.get("params") is not None else ""
    console.print(f"model={name}: {total:,.0f} parameters{exact}; peft={tuner}: {layout.trainable:,} trainable; "
                  f"batch {batch} x {seq} tokens, {precision}")

    t = Table(title="weights per precision (every parameter in that format)", box=box.SIMPLE_HEAD)
    for col in ("format", "bits/param", "weights"):
        t.add_column(col, justify="left" if col == "format" else "right")
    for fmt, bits in WEIGHT_FORMATS.items():
        t.add_row(fmt, f"{bits:.3f}", human(weights_bytes(total, bits)))
    console.print(t)
    console.print(f"double quantization saves {human(double_quant_saving_bytes(total))} "
                  f"(0.5 -> 0.127 bits/param of absmax constants)")

    t = Table(title=f"fine-tuning (optimizer state {opt_bytes:g} bytes/param"
                    f"{', fp32 master weights' if cfg.master_weights else ''}; activation checkpointing "
                    f"{'on' if cfg.activation_checkpointing else 'off'})", box=box.SIMPLE_HEAD)
    cols = ("", "trainable", "weights", "gradients", "optimizer", "activations", "total")
    for col in cols:
        t.add_column(col, justify="left" if not col else "right")
    for row in rows.values():
        t.add_row(row.label, f"{row.trainable:,.0f}", human(row.weights), human(row.gradients), human(row.optimizer),
                  human(row.activations), human(row.total))
    console.print(t)

    t = Table(title="inference (generation: weights + KV cache)", box=box.SIMPLE_HEAD)
    for col in ("", "weights", "KV cache", "total"):
        t.add_column(col, justify="left" if not col else "right")
    for row in serve.values():
        t.add_row(row.label, human(row.weights), human(row.kv_cache if kv_token is not None else None), human(row.total))
    console.print(t)
    if kv_token is not None:
        console.print(f"KV cache: {kv_token:,.0f} B/token ({kv_token / 2**20:.4g} MiB) = 2 x {layout.n_layer} layers x "
                      f"{layout.n_kv_head} heads x {layout.head_dim} x {PRECISION_BYTES[precision]} bytes")

