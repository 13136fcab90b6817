"""``llmlab bench serving``: throughput of continuous batching (Yu et al. 2022, "Orca", OSDI §3; Kwon et
al. 2023, "PagedAttention", SOSP §6.2) against serving the same requests one at a time and against
Hugging Face ``generate`` with padded static batches, on the same weights, in one process.

The workload: ``--requests`` (64) prompts cut from Shakespeare at line starts, of varied lengths,
each with its own ``max_new_tokens`` (uniform on ``[--min-new, --max-new]``), greedy, no early stop
(every request generates exactly its own count, so all three produce the same tokens). Throughput is
the useful tokens (the sum of each request's own ``max_new_tokens``) per second of wall time:

* **continuous batching**: :class:`llmlab.inference.engine.Engine` (paged KV cache, up to
  ``--max-num-seqs`` sequences per decode step; requests join as others finish);
* **one at a time**: :func:`llmlab.inference.generate.generate` per request, contiguous KV cache;
* **HF static batches**: ``GPT2LMHeadModel.generate`` on batches of ``--hf-batch-size`` prompts,
  left-padded, ``max_new_tokens`` = the batch's largest, so the shorter requests of a batch keep
  decoding tokens nobody asked for (only each request's own tokens count).

Memory: the engine's peak KV blocks x block bytes, against a contiguous cache reserving the full
context for each of ``--max-num-seqs`` sequences (what a static server with the same concurrency
preallocates) and HF's padded cache (batch x (longest prompt + largest max_new_tokens), its largest
batch). Checks: the engine's tokens equal one-at-a-time's for every request (exact); HF's greedy
tokens are reported as the share of requests equal to ours (a rare rounding near-tie may flip one).

The model is ``--ckpt`` (default: the trained char GPT of ``/work/runs/pretrain_char``) or, with
``--random-model`` (or ``--quick``), a tiny random GPT with random prompts.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from pathlib import Path

from llmlab.bench.common import CpuWatch, contention_warning, finish, loadavg, logger
from llmlab.errors import UserError

NAME = "serving"
DEFAULT_CKPT = Path("/work/runs/pretrain_char/checkpoints/last.ckpt")
HF_MATCH_MIN = 0.9  # share of requests whose HF greedy tokens must equal ours (rounding near-ties aside)
log = logger(NAME)


# ----------------------------------------------------------------------------- workload
def load_model(args):
    """(model, tokenizer or None, prompts: list of token-id lists, description)."""
    import torch

    rng = random.Random(args.seed)
    if args.random_model or not Path(args.ckpt).exists():
        if not args.random_model:
            log(f"{args.ckpt} not found: using a tiny random GPT")
        from llmlab.models.gpt import GPT, GPTConfig

        torch.manual_seed(args.seed)
        model = GPT(GPTConfig(vocab_size=61, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
        prompts = [[rng.randrange(61) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
                   for _ in range(args.requests)]
        return model, None, prompts, "tiny random GPT (2L x 32, context 64), random prompts"
    from llmlab.checkpoint import load_method
    from llmlab.data.corpora import shakespeare_plays

    method, _ = load_method(args.ckpt)
    model, tok = method.model.eval(), method.tokenizer
    lines = [line for _, body in shakespeare_plays()[:5] for line in body.splitlines() if line.strip()]
    prompts = []
    while len(prompts) < args.requests:  # a line start, then as many characters as this prompt's length
        start = rng.randrange(len(lines) - 8)
        text = "\n".join(lines[start : start + 8])[: rng.randint(args.min_prompt, args.max_prompt)]
        ids = tok.encode(text)
        if len(ids) >= args.min_prompt:
            prompts.append(ids[: args.max_prompt])
    c = model.config
    return model, tok, prompts, f"{args.ckpt} ({c.n_layer}L x {c.n_embd}, context {c.block_size}), Shakespeare lines"


class _Ids:
    """A stand-in tokenizer for a random model: no EOS, text = the ids."""

    eos_id = None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


# ----------------------------------------------------------------------------- the three servers
def run_engine(model, tok, prompts, max_new, args) -> dict:
    from llmlab.inference.engine import Engine, SamplingParams

    engine = Engine(model, tok or _Ids(), block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                    num_blocks=args.num_blocks)
    params = [SamplingParams(max_new_tokens=m, greedy=True, stop_at_eos=False) for m in max_new]
    start = time.perf_counter()
    done = engine.run(prompts, params)
    seconds = time.perf_counter() - start
    stats = engine.stats
    return {"seconds": seconds, "outputs": [c.outputs[0]["token_ids"] for c in done], "stats": stats,
            "block_bytes": engine.cache.block_bytes}


def run_one_at_a_time(model, prompts, max_new) -> dict:
    import torch

    from llmlab.inference.generate import generate

    outputs = []
    start = time.perf_counter()
    for p, m in zip(prompts, max_new):
        outputs.append(generate(model, torch.tensor([p]), m, greedy=True)[0, len(p):].tolist())
    return {"seconds": time.perf_counter() - start, "outputs": outputs}


def hf_twin(model):
    """transformers' GPT2LMHeadModel with the same weights (no special tokens: nothing stops early)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {k: v for k, v in model.to_hf_config().items() if k not in ("model_type", "architectures")}
    config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    hf = GPT2LMHeadModel(GPT2Config(**config))
    hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    return hf.eval()


def run_hf(hf, prompts, max_new, batch_size: int) -> dict:
    """Static batches in arrival order, left-padded; each request keeps only its own tokens."""
    import torch

    outputs, peak_slots = [], 0
    start = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        chunk, news = prompts[b : b + batch_size], max_new[b : b + batch_size]
        T = max(map(len, chunk))
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, p in enumerate(chunk):
            x[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        with torch.no_grad():
            out = hf.generate(x, attention_mask=mask, max_new_tokens=max(news), do_sample=False, pad_token_id=0,
                              eos_token_id=None)
        outputs += [out[i, T : T + n].tolist() for i, n in enumerate(news)]
        peak_slots = max(peak_slots, len(chunk) * (T + max(news)))
    return {"seconds": time.perf_counter() - start, "outputs": outputs, "peak_slots": peak_slots}


# ----------------------------------------------------------------------------- report
def render(r: dict) -> str:
    useful = r["useful_tokens"]
    mib = 2**20
    lines = [f"# llmlab bench serving: {r['requests']} requests", "",
             f"{r['model']}; prompts {r['prompt_tokens_min']}-{r['prompt_tokens_max']} tokens "
             f"({r['prompt_tokens']} in all), max_new_tokens {r['min_new']}-{r['max_new']} "
             f"({useful} useful tokens), greedy, torch threads {r['threads']}, load average {r['loadavg']}.", "",
             "| server | wall time | useful tokens/s | vs one at a time | KV cache memory |",
             "|---|---:|---:|---:|---:|"]
    base = r["one_at_a_time"]["tokens_per_s"]
    rows = [(f"continuous batching (llmlab Engine, max_num_seqs={r['max_num_seqs']}, block {r['block_size']})",
             r["engine"]), ("one request at a time (llmlab generate, KV cache)", r["one_at_a_time"])]
    rows += [(f"HF GPT2LMHeadModel.generate, static batches of {b}, left-padded", row) for b, row in r["hf"].items()]
    for label, row in rows:
        lines.append(f"| {label} | {row['seconds']:.2f} s | {row['tokens_per_s']:.0f} | "
                     f"{row['tokens_per_s'] / base:.2f}× | {row['kv_bytes'] / mib:.2f} MiB |")
    e = r["engine"]
    lines += ["", f"KV memory: the engine peaked at {e['peak_blocks']} blocks of {r['block_size']} tokens "
              f"({e['kv_bytes'] / mib:.2f} MiB); a contiguous cache reserving the full context for "
              f"{r['max_num_seqs']} sequences takes {r['contiguous_bytes'] / mib:.2f} MiB "
              f"({1 - e['kv_bytes'] / r['contiguous_bytes']:.0%} saved). HF's padded batch cache at its largest is "
              "in the table. One at a time needs one context "
              f"({r['one_at_a_time']['kv_bytes'] / mib:.2f} MiB). Engine: {e['steps']} steps, "
              f"{e['preemptions']} preemptions, {e['prefix_cache_hit_tokens']} prompt tokens from the prefix cache."]
    lines += contention_warning(r["contention"], r["threads"])
    lines += ["", "Checks:"]
    lines += [f"- {c['name']}: {c['detail']} — {'ok' if c['ok'] else '**MISMATCH**'}" for c in r["checks"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from llmlab.bench.vs_hf import ArgParser

    p = ArgParser(prog="llmlab bench serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="a GPT checkpoint (default: the trained char GPT)")
    p.add_argument("--random-model", action="store_true", help="a tiny random GPT instead of a checkpoint")
    p.add_argument("--requests", type=int, default=64, help="requests (default 64)")
    p.add_argument("--min-prompt", type=int, default=8, help="shortest prompt in tokens (default 8)")
    p.add_argument("--max-prompt", type=int, default=32, help="longest prompt in tokens (default 32)")
    p.add_argument("--min-new", type=int, default=16, help="smallest max_new_tokens (default 16)")
    p.add_argument("--max-new", type=int, default=96, help="largest max_new_tokens (default 96; the context bounds it)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine: sequences per decode step (default 64)")
    p.add_argument("--block-size", type=int, default=16, help="engine: tokens per KV block (default 16)")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="engine: pool size (default: max_num_seqs full contexts)")
    p.add_argument("--hf-batch-size", type=int, nargs="+", default=[16, 64],
                   help="HF static batch size(s), one row each (default 16 64)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: random model, 12 requests")
    p.add_argument("--out", type=Path, default=Path("outputs") / "bench" / f"{NAME}.md",
                   help="write OUT.md and OUT.json (default outputs/bench/serving.{md,json})")
    return p


def main(argv: list[str] | None = None) -> None:
    """``llmlab bench serving [options]``: print the table, write ``--out``; exit 1 if a check fails."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.random_model, args.requests, args.max_new, args.max_prompt = True, min(args.requests, 12), 24, 16
    for key in ("requests", "min_prompt", "max_prompt", "min_new", "max_new", "max_num_seqs", "block_size",
                "hf_batch_size", "threads"):
        for value in getattr(args, key) if key == "hf_batch_size" else [getattr(args, key)]:
            if value < 1:
                raise UserError(f"--{key.replace('_', '-')}={value} must be >= 1")
    if args.min_prompt > args.max_prompt or args.min_new > args.max_new:
        raise UserError("--min-prompt / --min-new must not exceed --max-prompt / --max-new")
    import torch

    torch.set_num_threads(args.threads)
    model, tok, prompts, description = load_model(args)
    ctx = model.config.block_size
    if args.max_prompt + args.min_new > ctx:
        raise UserError(f"--max-prompt={args.max_prompt} + --min-new={args.min_new} exceed the model's context of "
                        f"{ctx}: lower them")
    rng = random.Random(args.seed + 1)
    max_new = [min(rng.randint(args.min_new, args.max_new), ctx - len(p)) for p in prompts]
    log(f"model: {description}; {len(prompts)} requests, {sum(max_new)} useful tokens")
    hf = None
    if not args.no_hf:
        from llmlab.bench.vs_hf import import_transformers

        import_transformers(NAME)
        hf = hf_twin(model)
    # warm-up (allocator, SDPA kernels), untimed
    warm = slice(0, min(4, len(prompts)))
    run_engine(model, tok, prompts[warm], [8] * len(prompts[warm]), args)
    run_one_at_a_time(model, prompts[warm], [8] * len(prompts[warm]))
    if hf is not None:
        run_hf(hf, prompts[warm], [8] * len(prompts[warm]), 4)

    record = {"requests": len(prompts), "model": description, "prompt_tokens": sum(map(len, prompts)),
              "prompt_tokens_min": min(map(len, prompts)), "prompt_tokens_max": max(map(len, prompts)),
              "min_new": min(max_new), "max_new": max(max_new), "useful_tokens": sum(max_new),
              "max_num_seqs": args.max_num_seqs, "block_size": args.block_size,
              "threads": args.threads, "loadavg": loadavg(), "contention": {}}
    from llmlab.inference.paged import PagedKVCache

    c = model.config
    bytes_per_token = PagedKVCache(c.n_layer, c.n_head, c.n_embd // c.n_head, 1, 1).block_bytes
    runs = {}
    timed = [("engine", lambda: run_engine(model, tok, prompts, max_new, args)),
             ("one_at_a_time", lambda: run_one_at_a_time(model, prompts, max_new))]
    if hf is not None:
        timed += [(f"hf{b}", functools.partial(run_hf, hf, prompts, max_new, b)) for b in args.hf_batch_size]
    for key, fn in timed:
        log(f"timing {key} ...")
        with CpuWatch() as watch:
            runs[key] = fn()
        record["contention"][key] = watch.others
        runs[key]["tokens_per_s"] = sum(max_new) / runs[key]["seconds"]
    e = runs["engine"]
    record["engine"] = {"seconds": e["seconds"], "tokens_per_s": e["tokens_per_s"],
                        "peak_blocks": e["stats"]["peak_blocks_in_use"],
                        "kv_bytes": e["stats"]["peak_blocks_in_use"] * e["block_bytes"],
                        **{k: e["stats"][k] for k in ("steps", "preemptions", "prefix_cache_hit_tokens")}}
    o = runs["one_at_a_time"]
    record["one_at_a_time"] = {"seconds": o["seconds"], "tokens_per_s": o["tokens_per_s"],
                               "kv_bytes": ctx * bytes_per_token}
    record["contiguous_bytes"] = args.max_num_seqs * ctx * bytes_per_token
    same = sum(a == b for a, b in zip(e["outputs"], o["outputs"]))
    record["checks"] = [{"name": "engine == one at a time", "ok": same == len(prompts),
                         "detail": f"{same}/{len(prompts)} requests token-identical"}]
    record["hf"] = {}
    for key in [k for k in runs if k.startswith("hf")]:
        h = runs[key]
        record["hf"][int(key[2:])] = {"seconds": h["seconds"], "tokens_per_s": h["tokens_per_s"],
                                      "kv_bytes": h["peak_slots"] * bytes_per_token}
        agree = sum(a == b for a, b in zip(h["outputs"], o["outputs"]))
        record["checks"].append({"name": f"HF greedy (batches of {key[2:]}) == llmlab",
                                 "ok": agree >= HF_MATCH_MIN * len(prompts),
                                 "detail": f"{agree}/{len(prompts)} requests token-identical "
                                           f"(>= {HF_MATCH_MIN:.0%} required: fp rounding may flip a near-tie)"})
    text = render(record)
    finish(args.out, text, record, log)
