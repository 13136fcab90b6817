"""Serving cost of one checkpoint, measured in a fresh process: ``python -m llmlab.quant.probe CKPT``.

The compression table (:mod:`llmlab.quant.compress`) needs a peak resident set per variant, but a
Hydra sweep runs every job in one process, whose high-water mark only grows. So each variant's
packed checkpoint is loaded here, alone: the model only (its frozen roles, such as a distilled
student's teacher, are not loaded), greedy generation with the KV cache, batch 1, after a warm-up.
Prints one JSON line: ``tokens_per_s``, ``peak_rss_mb`` (the process's high-water mark, torch
included: ``VmHWM``, which starts afresh at ``exec``; ``ru_maxrss`` would carry the parent's over), ``load_s``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

MB = 2**20


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module, n_tokens: int, repeats: int = 3) -> float:
    """Greedy generation of ``n_tokens`` after a one-token prompt, batch 1, KV cache: tokens / s over
    ``repeats`` timed runs after one warm-up run (the model's context bounds ``n_tokens``)."""
    from llmlab.errors import UserError
    from llmlab.inference.generate import generate

    model = getattr(model, "_orig_mod", model).eval()
    context = getattr(getattr(model, "config", None), "block_size", None)
    if context:
        n_tokens = min(n_tokens, int(context) - 1)
    if n_tokens < 1:
        raise UserError(f"compress.gen_tokens={n_tokens}: generate at least 1 token (e.g. compress.gen_tokens=100)")
    device = next(iter(model.buffers()), next(model.parameters())).device
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    generate(model, prompt, n_tokens, greedy=True, use_kv_cache=True)  # warm-up: allocations, kernels, caches
    started = time.perf_counter()
    for _ in range(repeats):
        generate(model, prompt, n_tokens, greedy=True, use_kv_cache=True)
    return n_tokens * repeats / (time.perf_counter() - started)


def probe(path: str | Path, n_tokens: int = 100, repeats: int = 3) -> dict[str, float]:
    """Load ``path`` (its trained model, quantized layers included) and time generation, in this process."""
    from llmlab.models.build import load_pretrained

    started = time.perf_counter()
    model = load_pretrained(path).model
    load_s = time.perf_counter() - started
    tps = tokens_per_second(model, n_tokens, repeats)
    return {"tokens_per_s": tps, "peak_rss_mb": peak_rss_bytes() / MB, "load_s": load_s}


def peak_rss_bytes() -> int:
    """This process's peak resident set: Linux ``VmHWM`` (of this program since ``exec``), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def probe_in_subprocess(path: str | Path, n_tokens: int = 100, repeats: int = 3) -> dict[str, float]:
    """:func:`probe` in a fresh Python process (same interpreter, same threads setting)."""
    out = subprocess.run([sys.executable, "-m", "llmlab.quant.probe", str(path), str(n_tokens), str(repeats)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"probing {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # python -m llmlab.quant.probe CKPT [N_TOKENS] [REPEATS]
    args = sys.argv[1:]
    print(json.dumps(probe(args[0], *(int(a) for a in args[1:3]))))
