"""The compression table: one trained GPT made smaller in every way the course names, measured alike.

``llmlab train -m experiment=compress_compare model.init_from=RUN`` runs one job per option of the
``compress`` config group (conf/compress/): fp32 and bf16 copies, post-training int8, LLM.int8()
(Dettmers et al. 2022), NF4 (Dettmers et al. 2023; llmlab's and bitsandbytes'), int4 after
training (PTQ) vs quantization-aware fine-tuning (QAT, Jacob et al. 2018), 50 % magnitude (Han et
al. 2015) and Wanda (Sun et al. 2023) pruning, and a half-depth student distilled from the model
(Hinton et al. 2015; DistilBERT's every-other-layer init). Each option sets the run's ordinary
groups (``quant=``, ``prune=``, ``method=distill``, ``trainer.max_steps``: 0 = nothing trains,
just measure) and ``compress.quant``: a scheme applied *after* fit, before the test — post-training
quantization of the float model, or the export of a QAT model to real integers.

This module is what ``llmlab train`` adds for a run with a ``compress`` node (none: nothing):

* :func:`start` — after fit and validation: ``compress.quant`` (via :func:`llmlab.tasks.quantize.
  quantize_method`, the code of ``llmlab quantize``);
* :func:`finish` — after the test: ``checkpoints/compressed.ckpt`` (the model as it is now, packed
  integer buffers, no optimizer state; ``llmlab eval ckpt_path=<that file>`` loads it) whose size is
  ``model/ckpt_mb``; then that file is loaded in a fresh process (:mod:`llmlab.quant.probe`: a sweep's
  jobs share one process, whose peak memory only grows) for generation speed ``infer/tokens_per_s``
  (greedy, KV cache, batch 1, after a warm-up) and ``infer/peak_rss_mb`` (that process's peak resident
  set: torch itself is most of it at this size).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from llmlab.errors import UserError
from llmlab.utils import atomic_write_bytes, plain

log = logging.getLogger(__name__)
MB = 2**20


class Compression:
    """One compress run between fit and the end of ``llmlab train``."""

    def __init__(self, cfg: dict, method) -> None:
        self.cfg, self.method = cfg, method

    def finish(self, run_dir: str | Path) -> dict[str, float]:
        from llmlab.quant import quant_name, storage
        from llmlab.quant.base import QuantLinear
        from llmlab.quant.probe import probe_in_subprocess
        from llmlab.tasks.quantize import checkpoint_of, serialize

        method = self.method
        data = serialize(checkpoint_of(method, {}))
        path = atomic_write_bytes(Path(run_dir) / "checkpoints" / "compressed.ckpt", data)
        out = {"model/ckpt_mb": len(data) / MB}
        held = storage(method.model)
        if held["layers"]:  # quantized weights (and their biases) are buffers: count what they stand for
            params = {id(p): p.numel() for p in method.model.parameters()}
            biases = sum(m.bias.numel() for m in method.model.modules()
                         if isinstance(m, QuantLinear) and m.bias is not None)
            out["model/params"] = float(sum(params.values()) + held["params"] + biases)
            out["quant/bits_per_param"] = 8 * held["bytes"] / max(held["params"], 1)
        served = probe_in_subprocess(path, int(self.cfg.get("gen_tokens") or 100), int(self.cfg.get("gen_repeats") or 3))
        out["infer/tokens_per_s"], out["infer/peak_rss_mb"] = served["tokens_per_s"], served["peak_rss_mb"]
        log.info("compress=%s (quant=%s): %s, %.3f MB", self.cfg.get("name"), quant_name(method.quant), path,
                 out["model/ckpt_mb"])
        return out


def start(cfg: DictConfig, method) -> Compression | None:
    """After fit: apply ``compress.quant`` to the trained model (None: not a compress run)."""
    node = cfg.get("compress")
    if node is None:
        return None
    ccfg = plain(node) if not isinstance(node, dict) else dict(node)
    post = ccfg.get("quant")
    if post:
        from llmlab.quant import quant_name
        from llmlab.tasks.quantize import quantize_method

        if method.peft:
            raise UserError(f"compress={ccfg.get('name')}: compress.quant after a tuner (peft={method.peft.get('name')}) "
                            "would quantize the base under it: drop peft=, or quantize with llmlab quantize")
        quantize_method(method, dict(post))
        log.info("compress=%s: quant=%s applied to the trained model before the test", ccfg.get("name"),
                 quant_name(method.quant))
    return Compression(ccfg, method)
