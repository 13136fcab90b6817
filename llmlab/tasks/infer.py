"""`llmlab infer ckpt_path=X prompt="..."`: what the trained method does at inference time.

A method with an ``infer(cfg)`` does its own thing (word vectors: ``query=WORD`` neighbours,
``analogy="man:king::woman"``). For GPT: sample continuations of ``prompt`` (settings in the ``generation`` group) and print them.
"""

from __future__ import annotations

from omegaconf import DictConfig

from llmlab.checkpoint import load_method, resolve_ckpt_path
from llmlab.errors import UserError


def infer(cfg: DictConfig) -> list[str]:
    path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.get("name"))
    method, _ = load_method(path)
    if hasattr(method, "infer"):  # e.g. word vectors: neighbours and analogies
        return method.infer(cfg)
    if not hasattr(method, "sample"):
        raise UserError(f"{type(method).__name__} has no generation mode")
    gen = dict(cfg.generation)
    texts = method.sample(str(cfg.prompt), **gen)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1}/{len(texts)} ---")
        print(f"{cfg.prompt}{text}")
    return texts
