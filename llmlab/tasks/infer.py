"""`llmlab infer ckpt_path=X prompt="..."`: what the trained method does at inference time.

A method with an ``infer(cfg)`` does its own thing (word vectors: ``query=WORD`` neighbours,
``analogy="man:king::woman"``). For GPT: sample continuations of ``prompt`` (settings in the ``generation`` group) and print them.
"""

from __future__ import annotations

from omegaconf import DictConfig

from llmlab.checkpoint import load_method, resolve_ckpt_path


def infer(cfg: DictConfig):
    path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.get("name"))
    method, _ = load_method(path)
    if cfg.get("quant"):  # quant=int8|nf4|...: post-training quantization of the loaded model, on the fly
        from llmlab.tasks.quantize import quantize_method
        from llmlab.utils import plain

        quantize_method(method, plain(cfg.quant))
    return method.infer(cfg)
