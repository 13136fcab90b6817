"""``llmlab bench kv``: KV-cache memory of the paged cache (Kwon et al., SOSP 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention", §3 and §6.3) against a contiguous
cache that reserves the maximum length for every sequence. Three measurements:

1. **Waste table** (spec seed000_part3 §3.4): request lengths uniform on ``[1, 2048]``; a paged cache
   with block size ``B`` allocates ``ceil(len / B)`` blocks (waste: the empty tail of the last
   block), a contiguous one 2048 slots per request. Fraction wasted = empty slots / allocated slots.
   The paged side goes through the real allocator (:class:`~llmlab.inference.paged.PagedKVCache`
   with one-element blocks) for ``--allocator-requests`` of the requests, checked against the formula.
2. **Ragged batch on a real model**: ``--requests`` prompts of random lengths each generating a
   random number of tokens (greedy, real forward passes: one ragged prefill, then one batched
   decode step per token, finished requests free their blocks). Memory = peak blocks in use x bytes
   per block, against a contiguous cache of ``block_size`` (the context) slots per request, and
   against an exact reservation of each request's final length (the "oracle" of the paper's §6,
   which no real system knows in advance). Each request's output is checked against generating it
   alone on a contiguous cache.
3. **Sharing** (§4.4): ``n=4`` samples of one prompt (prefilled once, then ``fork``: the prompt's
   full blocks are shared, the partial last one is copied on write), and beam search with
   ``num_beams=4`` (beams share their common prefix through ``reorder``). Peak blocks with sharing
   against every sample/beam holding its own copy (measured by running the samples as independent
   sequences; for beams, the sum of each beam's own ``ceil(len / B)`` at every step).

The model is ``--ckpt`` (default: the trained char GPT of ``/work/runs/pretrain_char`` if present,
prompts cut from Shakespeare) or, with ``--random-model``, a tiny random GPT (random prompts).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from llmlab.bench.common import finish, logger
from llmlab.errors import UserError

NAME = "kv"
DEFAULT_CKPT = Path("/work/runs/pretrain_char/checkpoints/last.ckpt")
BLOCK_SIZES = (1, 8, 16, 32, 128, 512)  # the spec's waste table
MAX_LEN = 2048  # the spec's contiguous reservation / longest request
log = logger(NAME)


# ----------------------------------------------------------------------------- 1. waste table
def paged_waste(lengths, block_size: int) -> float:
    """Fraction of allocated slots left empty when each request takes ``ceil(len / B)`` blocks."""
    allocated = sum(math.ceil(n / block_size) * block_size for n in lengths)
    return 1.0 - sum(lengths) / allocated


def contiguous_waste(lengths, max_len: int = MAX_LEN) -> float:
    """Fraction of slots left empty when each request reserves ``max_len`` slots."""
    return 1.0 - sum(lengths) / (len(lengths) * max_len)


def allocator_waste(lengths, block_size: int) -> float:
    """:func:`paged_waste` measured through the real allocator: every request is added to a
    :class:`PagedKVCache` (1 layer, 1 head, head_dim 1) and all slots counted while all are resident."""
    from llmlab.inference.paged import PagedKVCache

    blocks = sum(math.ceil(n / block_size) for n in lengths)
    cache = PagedKVCache(1, 1, 1, blocks, block_size)
    for i, n in enumerate(lengths):
        cache.add_sequence(i, [0] * n)
    return 1.0 - sum(lengths) / (cache.blocks_in_use * block_size)


def waste_table(n_requests: int, allocator_requests: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    lengths = [rng.randint(1, MAX_LEN) for _ in range(n_requests)]
    rows = []
    for b in BLOCK_SIZES:
        rows.append({"allocation": f"paged, block {b}", "block_size": b, "waste": paged_waste(lengths, b),
                     "allocator_waste": allocator_waste(lengths[:allocator_requests], b),
                     "formula_waste_sample": paged_waste(lengths[:allocator_requests], b)})
    rows.append({"allocation": f"contiguous pre-allocation of {MAX_LEN}", "block_size": None,
                 "waste": contiguous_waste(lengths)})
    return rows


# ----------------------------------------------------------------------------- model side
def load_model(args):
    """(model, prompt source: callable(rng, n) -> token ids, description)."""
    import torch

    if args.random_model or not Path(args.ckpt).exists():
        if not args.random_model:
            log(f"{args.ckpt} not found: using a tiny random GPT")
        from llmlab.models.gpt import GPT, GPTConfig

        torch.manual_seed(args.seed)
        model = GPT(GPTConfig(vocab_size=61, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
        return model, lambda rng, n: [rng.randrange(61) for _ in range(n)], "tiny random GPT (2L x 32, context 64)"
    from llmlab.checkpoint import load_method
    from llmlab.data.corpora import shakespeare_plays

    method, _ = load_method(args.ckpt)
    model, tok = method.model.eval(), method.tokenizer
    text = "\n".join(body for _, body in shakespeare_plays()[:3])
    ids = tok.encode(text)

    def prompt(rng, n):
        start = rng.randrange(len(ids) - n)
        return list(ids[start : start + n])

    c = model.config
    return model, prompt, f"{args.ckpt} ({c.n_layer}L x {c.n_embd}, context {c.block_size})"


def ragged_run(model, prompts: list[list[int]], max_new: list[int], block_size: int) -> dict:
    """All requests admitted together; one ragged prefill, then one decode forward per step over the
    requests still running (greedy). Returns outputs and the memory trace."""
    import torch

    from llmlab.inference.paged import PagedKVCache

    n = len(prompts)
    num_blocks = sum(math.ceil((len(p) + m) / block_size) for p, m in zip(prompts, max_new))
    cache = PagedKVCache.for_model(model, num_blocks, block_size)
    T = max(map(len, prompts))
    x = torch.zeros(n, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        cache.add_sequence(i, p)
        x[i, T - len(p) :] = torch.tensor(p)
    outputs: list[list[int]] = [[] for _ in range(n)]
    running = list(range(n))
    trace = []  # (blocks in use, tokens stored) after each forward pass
    with torch.no_grad():
        view = cache.view(running, [len(p) for p in prompts])
        logits = model(x, kv_cache=view, attention_mask=view.attention_mask(T), last_only=True)[:, -1]
        while True:
            trace.append((cache.blocks_in_use, sum(cache.length(i) for i in running)))
            nxt = logits.argmax(-1)
            still = []
            for row, i in enumerate(running):
                outputs[i].append(int(nxt[row]))
                if len(outputs[i]) < max_new[i]:
                    still.append((row, i))
                else:
                    cache.free(i)
            if not still:
                break
            running = [i for _, i in still]
            view = cache.view(running)
            feed = nxt[[row for row, _ in still]][:, None]
            logits = model(feed, kv_cache=view, attention_mask=view.attention_mask(1), last_only=True)[:, -1]
    return {"outputs": outputs, "trace": trace, "peak_blocks": cache.peak_blocks_in_use, "cache": cache}


def ragged_memory(model, prompt_of, args) -> dict:
    import random

    import torch

    from llmlab.inference.generate import generate

    rng = random.Random(args.seed)
    ctx = model.config.block_size
    prompts, max_new = [], []
    for _ in range(args.requests):
        p = rng.randint(1, ctx // 2)
        prompts.append(prompt_of(rng, p))
        max_new.append(rng.randint(1, ctx - p))
    B = args.block_size
    run = ragged_run(model, prompts, max_new, B)
    cache = run["cache"]
    per_token = cache.block_bytes // B
    peak_step = max(range(len(run["trace"])), key=lambda s: run["trace"][s][0])
    blocks, tokens = run["trace"][peak_step]
    paged = run["peak_blocks"] * cache.block_bytes
    contiguous = args.requests * ctx * per_token
    oracle = (sum(map(len, prompts)) + sum(max_new)) * per_token  # each request reserves exactly what it will use
    mean_util = sum(t / (b * B) for b, t in run["trace"]) / len(run["trace"])
    checked = list(range(min(args.check_requests, args.requests)))
    same = all(
        generate(model, torch.tensor([prompts[i]]), max_new[i], greedy=True)[0, len(prompts[i]) :].tolist()
        == run["outputs"][i] for i in checked)
    return {"requests": args.requests, "block_size": B, "bytes_per_token": per_token, "block_bytes": cache.block_bytes,
            "prompt_tokens": sum(map(len, prompts)), "new_tokens": sum(max_new), "steps": len(run["trace"]),
            "paged_peak_blocks": run["peak_blocks"], "paged_peak_bytes": paged,
            "tokens_at_peak": tokens, "utilization_at_peak": tokens / (blocks * B), "mean_utilization": mean_util,
            "contiguous_bytes": contiguous, "oracle_bytes": oracle,
            "saved_vs_contiguous": 1 - paged / contiguous, "saved_vs_oracle": 1 - paged / oracle,
            "checked_requests": len(checked), "outputs_match_alone": same}


def sampling_sharing(model, prompt: list[int], n: int, max_new: int, block_size: int, seed: int) -> dict:
    """``n`` samples of ``prompt``: prefill once and fork (shared) vs ``n`` independent sequences."""
    import torch

    from llmlab.inference.paged import PagedKVCache
    from llmlab.inference.sampling import sample_next

    def run(share: bool) -> tuple[int, list[list[int]]]:
        need = n * math.ceil((len(prompt) + max_new) / block_size)
        cache = PagedKVCache.for_model(model, need, block_size)
        gen = torch.Generator().manual_seed(seed)
        ids = list(range(n))
        with torch.no_grad():
            if share:
                cache.add_sequence(0, prompt)
                logits = model(torch.tensor([prompt]), kv_cache=cache.view([0]), last_only=True)[:, -1]
                for i in ids[1:]:
                    cache.fork(0, i)
                logits = logits.expand(n, -1)
            else:
                for i in ids:
                    cache.add_sequence(i, prompt)
                logits = model(torch.tensor([prompt] * n), kv_cache=cache.view(ids), last_only=True)[:, -1]
            out = [[] for _ in ids]
            for step in range(max_new):
                nxt = sample_next(logits, generator=gen)
                for i in ids:
                    out[i].append(int(nxt[i]))
                if step + 1 < max_new:
                    logits = model(nxt[:, None], kv_cache=cache.view(ids), last_only=True)[:, -1]
        return cache.peak_blocks_in_use, out

    shared, out_s = run(True)
    alone, out_a = run(False)
    return {"n": n, "prompt_tokens": len(prompt), "new_tokens": max_new, "peak_blocks_shared": shared,
            "peak_blocks_unshared": alone, "saved": 1 - shared / alone, "same_samples": out_s == out_a}


def beam_sharing(model, prompt: list[int], num_beams: int, max_new: int, block_size: int) -> dict:
    """Beam search on a paged cache (:class:`PagedLM`): blocks in use after every forward vs each beam
    holding its own ``ceil(len / B)`` blocks; the prefill (every beam prefills its copy of the prompt,
    as ``beam_search`` feeds ``num_beams`` rows) is reported apart."""
    import torch

    from llmlab.inference.beam import beam_search
    from llmlab.inference.paged import PagedKVCache, PagedLM

    B = block_size
    cache = PagedKVCache.for_model(model, num_beams * math.ceil((len(prompt) + max_new) / B) + num_beams, B)
    trace = []

    class Traced(PagedLM):
        def forward(self, *a, **kw):
            out = super().forward(*a, **kw)
            view = kw.get("kv_cache")
            if view is not None:
                trace.append((cache.blocks_in_use, sum(math.ceil(n / B) for n in view.lengths)))
            return out

    x = torch.tensor([prompt])
    out = beam_search(Traced(model, cache), x, max_new, num_beams)
    ref = beam_search(model, x, max_new, num_beams)
    decode = trace[1:] or trace
    shared = max(b for b, _ in decode)
    alone = max(u for _, u in decode)
    return {"num_beams": num_beams, "prompt_tokens": len(prompt), "new_tokens": out.size(1) - len(prompt),
            "prefill_blocks": trace[0][0], "peak_blocks_shared": shared, "peak_blocks_unshared": alone,
            "saved": 1 - shared / alone, "same_as_contiguous": torch.equal(out, ref)}


# ----------------------------------------------------------------------------- report
def render(record: dict) -> str:
    lines = ["# llmlab bench kv: paged KV cache memory", "",
             f"## Waste (request lengths uniform on [1, {MAX_LEN}], {record['waste_requests']:,} requests)", "",
             "| allocation | fraction wasted | spec |", "|---|---|---|"]
    spec = {1: "0.0%", 8: "0.34%", 16: "0.72%", 32: "1.5%", 128: "5.9%", 512: "20%", None: "≈ 50%"}
    for r in record["waste"]:
        lines.append(f"| {r['allocation']} | {r['waste']:.2%} | {spec[r['block_size']]} |")
    m = record["ragged"]
    mib = 2**20
    lines += ["", f"## Ragged batch on {record['model']}", "",
              f"{m['requests']} requests ({m['prompt_tokens']} prompt + {m['new_tokens']} generated tokens, greedy), "
              f"block size {m['block_size']} ({m['block_bytes']:,} B per block, {m['bytes_per_token']:,} B per token):",
              "", "| KV cache | peak memory | saved by paging |", "|---|---|---|",
              f"| contiguous, context-length reservation per request | {m['contiguous_bytes'] / mib:.2f} MiB | "
              f"{m['saved_vs_contiguous']:.1%} |",
              f"| contiguous, exact reservation (prompt + its own new tokens; Orca's oracle) | "
              f"{m['oracle_bytes'] / mib:.2f} MiB | {m['saved_vs_oracle']:.1%} |",
              f"| paged ({m['paged_peak_blocks']} blocks at peak) | {m['paged_peak_bytes'] / mib:.2f} MiB | — |", "",
              f"Utilization (tokens stored / allocated slots): {m['utilization_at_peak']:.1%} at the peak, "
              f"{m['mean_utilization']:.1%} averaged over the {m['steps']} steps.", "",
              "## Sharing", "", "| workload | peak blocks, shared | each its own copy | memory saved |",
              "|---|---|---|---|"]
    s, b = record["sampling"], record["beams"]
    lines.append(f"| n={s['n']} samples, prompt {s['prompt_tokens']} + {s['new_tokens']} new | "
                 f"{s['peak_blocks_shared']} | {s['peak_blocks_unshared']} | {s['saved']:.1%} |")
    lines.append(f"| beam search num_beams={b['num_beams']}, prompt {b['prompt_tokens']} + {b['new_tokens']} new "
                 f"(decode steps) | {b['peak_blocks_shared']} | {b['peak_blocks_unshared']} | {b['saved']:.1%} |")
    lines += ["", "Checks:"]
    lines += [f"- {c['name']}: {c['detail']} — {'ok' if c['ok'] else '**MISMATCH**'}" for c in record["checks"]]
    return "\n".join(lines) + "\n"


def checks(record: dict) -> list[dict]:
    out = []
    for r in record["waste"]:
        if r["block_size"] is not None:
            ok = abs(r["allocator_waste"] - r["formula_waste_sample"]) < 1e-12 and r["waste"] < r["block_size"] / 1024.5
            out.append({"name": f"allocator waste, block {r['block_size']}", "ok": ok,
                        "detail": f"{r['allocator_waste']:.4%} = formula {r['formula_waste_sample']:.4%} < B/mean_len"})
    m, s, b = record["ragged"], record["sampling"], record["beams"]
    out.append({"name": "ragged batch outputs", "ok": m["outputs_match_alone"],
                "detail": f"{m['checked_requests']} requests equal to generating each alone (contiguous cache)"})
    out.append({"name": "shared samples", "ok": s["same_samples"], "detail": "forked samples equal independent ones"})
    out.append({"name": "paged beams", "ok": b["same_as_contiguous"], "detail": "beam search equal on both caches"})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmlab bench kv", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="a GPT checkpoint (default: the trained char GPT)")
    p.add_argument("--random-model", action="store_true", help="a tiny random GPT instead of a checkpoint")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block (vLLM default 16)")
    p.add_argument("--requests", type=int, default=32, help="ragged-batch requests (default 32)")
    p.add_argument("--check-requests", type=int, default=4, help="of them, checked against generating alone")
    p.add_argument("--waste-requests", type=int, default=100_000, help="requests of the waste table (default 100k)")
    p.add_argument("--allocator-requests", type=int, default=2000, help="of them, run through the allocator")
    p.add_argument("--n", type=int, default=4, help="parallel samples of one prompt (default 4)")
    p.add_argument("--num-beams", type=int, default=4, help="beams (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: random model, few requests")
    p.add_argument("--out", type=Path, default=Path("outputs") / "bench" / f"{NAME}.md",
                   help="write OUT.md and OUT.json (default outputs/bench/kv.{md,json})")
    return p


def main(argv: list[str] | None = None) -> None:
    """``llmlab bench kv [options]``: print the tables, write ``--out``; exit 1 if a check fails."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for key in ("block_size", "requests", "waste_requests", "allocator_requests", "n", "num_beams", "threads"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.quick:
        args.random_model, args.requests, args.waste_requests, args.allocator_requests = True, 6, 20_000, 300
    import torch

    torch.set_num_threads(args.threads)
    record = {"waste_requests": args.waste_requests,
              "waste": waste_table(args.waste_requests, min(args.allocator_requests, args.waste_requests), args.seed)}
    model, prompt_of, record["model"] = load_model(args)
    log(f"model: {record['model']}")
    record["ragged"] = ragged_memory(model, prompt_of, args)
    import random

    ctx = model.config.block_size
    rng = random.Random(args.seed + 1)
    prompt = prompt_of(rng, ctx // 2 + 5)  # a long prompt whose last block is partial (copied on write)
    record["sampling"] = sampling_sharing(model, prompt, args.n, ctx // 4, args.block_size, args.seed)
    record["beams"] = beam_sharing(model, prompt, args.num_beams, ctx // 4, args.block_size)
    record["checks"] = checks(record)
    text = render(record)
    finish(args.out, text, record, log)
