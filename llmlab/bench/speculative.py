"""``llmlab bench speculative``: speculative decoding (Leviathan et al. 2023, Algorithm 1; Chen et al.
2023) with a trained target and a trained draft, measured against the target alone, side by side with
Hugging Face's assisted generation (``generate(assistant_model=...)``) on the *same* weights.

Per sampling temperature and per γ the table shows:

* **α**: the per-token acceptance rate (accepted drafts / drafts that faced the test), the estimate of
  α = E[β] the theory uses, and accepted / drafted (drafts after a rejection count, never verified);
* **tokens per target call**: measured mean of n + 1, next to ``(1 − α^{γ+1}) / (1 − α)`` from the
  measured α (Leviathan §3.3);
* **c**: measured cost of a draft forward / a target forward = the draft's per-token decode time over
  the target's (llmlab ``generate`` with the KV cache, batch 1, same sampling);
* **speed-up**: the theory's ``(1 − α^{γ+1}) / ((1 − α)(γc + 1))`` from the measured α and c, the
  measured wall-clock speed-up of llmlab's speculative decoding over llmlab's target-only ``generate``
  (same sampling settings, KV caches in both), and the same ratio for transformers: assisted generation
  (``num_assistant_tokens=γ``, schedule ``constant``, no confidence early exit) over plain ``generate``.

Timing: every variant generates ``--max-new-tokens`` tokens for each of ``--prompts`` Shakespeare
prompts of ``--prompt-len`` tokens (seeded per prompt, so each repeat does the same work); untimed
warm-up passes first, then ``--repeats`` interleaved rounds whose order rotates; the median tok/s of
the rounds. A greedy check follows: llmlab's speculative greedy output must equal the target's greedy
output token for token for every γ (and HF's assisted greedy output), else the bench exits 1.

Models: ``--target`` / ``--draft`` are llmlab checkpoints or run dirs with the same tokenizer. Without
them the bench trains its own into ``OUT_DIR/cache`` once (reused afterwards): a target like
``gpt_micro`` (4 layers x 256, block 256) and a draft of 2 layers x 64, both char-level on Shakespeare
for ``--train-steps`` steps each (300 by default: a few minutes each on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from llmlab.bench.common import contention_warning, logger, versions, write_outputs
from llmlab.bench.vs_hf import ArgParser, interleave
from llmlab.errors import UserError

_log = logger("speculative")

DEFAULT_OUT = Path("outputs") / "bench" / "speculative"
# the recipes the bench trains when no checkpoint is given (llmlab train overrides)
TARGET_RECIPE = ["experiment=gpt_shakespeare_char", "model=gpt_micro"]  # 4 layers x 256, block 256
DRAFT_RECIPE = ["experiment=gpt_shakespeare_char", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
                "model.block_size=256"]


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="llmlab bench speculative", description=(
        "Speculative decoding: acceptance, tokens per target call, measured vs theoretical speed-up over the "
        "target alone, and Hugging Face's assisted generation on the same weights."))
    p.add_argument("--target", help="target checkpoint or run dir (default: train one into OUT_DIR/cache)")
    p.add_argument("--draft", help="draft checkpoint or run dir with the target's tokenizer (default: train one)")
    p.add_argument("--gamma", type=int, nargs="+", default=[1, 2, 3, 4, 6], help="draft tokens per target call")
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                   help="sampling temperature(s); 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="top-k on both models (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--prompts", type=int, default=8, help="Shakespeare prompts (default 8)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes of every variant first (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the sampling (default 0)")
    p.add_argument("--train-steps", type=int, default=300, help="steps of each model the bench trains (default 300)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' assisted generation")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                   help=f"where speculative.md/.json (and cache/ of trained models) go (default {DEFAULT_OUT})")
    return p


def _check_args(args: argparse.Namespace) -> None:
    from llmlab.inference.sampling import validate_sampling_args
    from llmlab.inference.speculative import validate_gamma

    for g in args.gamma:
        validate_gamma(g, "--gamma")
    for t in args.temperature:
        validate_sampling_args(t, args.top_k)
    for key in ("max_new_tokens", "prompts", "prompt_len", "repeats", "threads", "train_steps"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.warmup < 0:
        raise UserError(f"--warmup={args.warmup} must be >= 0")


def main(argv: list[str] | None = None) -> None:
    """``llmlab bench speculative [options]``: print the table, write OUT_DIR/speculative.{md,json};
    exit 1 when the greedy outputs differ."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _check_args(args)
    markdown, record = run(args)
    print(markdown, end="", flush=True)
    md, js = write_outputs(args.out_dir / "speculative", markdown, record)
    png = plot(record["rows"], args.out_dir / "speculative.png")
    _log(f"wrote {md}, {js} and {png}")
    if not all(c["ok"] for c in record["checks"]):
        print("GREEDY IDENTITY CHECK FAILED", file=sys.stderr, flush=True)
        sys.exit(1)


def plot(rows: list[dict], path: Path) -> Path:
    """Speed-up against γ per temperature: Leviathan's theory from the measured α and c, llmlab and HF measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({r["temperature"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(temps), figsize=(5 * len(temps), 4), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], temps):
        sel = sorted((r for r in rows if r["temperature"] == t), key=lambda r: r["gamma"])
        g = [r["gamma"] for r in sel]
        ax.plot(g, [r["speedup_theory"] for r in sel], "o--", label="theory (measured α, c)")
        ax.plot(g, [r["speedup_llmlab"] for r in sel], "o-", label="llmlab measured")
        if all(r.get("speedup_hf") is not None for r in sel):
            ax.plot(g, [r["speedup_hf"] for r in sel], "s-", label="HF assisted measured")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=f"temperature {t:g}" if t else "greedy", xlabel="γ (draft tokens per target call)")
    axes[0][0].set_ylabel("speed-up over the target alone")
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- models
def train_default(which: str, out_dir: Path, steps: int) -> Path:
    """Train the bench's own target or draft once (``llmlab train`` in a subprocess); its run dir."""
    run_dir = out_dir / "cache" / f"{which}_{steps}steps"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        _log(f"reusing the {which} trained earlier: {run_dir}")
        return run_dir
    recipe = TARGET_RECIPE if which == "target" else DRAFT_RECIPE
    cmd = [sys.executable, "-m", "llmlab.cli", "train", *recipe, f"trainer.max_steps={steps}",
           f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=10", "test=false",
           f"hydra.run.dir={run_dir.resolve()}"]
    _log(f"training the {which} ({' '.join(recipe[1:])}, {steps} steps) into {run_dir}")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{which}_{steps}steps.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    if proc.returncode != 0:
        raise UserError(f"training the bench's {which} failed (exit {proc.returncode}): see {log_path}, "
                        "or pass --target/--draft checkpoints")
    return run_dir


def to_hf(gpt: torch.nn.Module):
    """The same weights as ``transformers.GPT2LMHeadModel`` (eval mode), with no special tokens (nothing
    may stop or bias generation)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {k: v for k, v in gpt.to_hf_config().items() if k not in ("model_type", "architectures")}
    config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    hf = GPT2LMHeadModel(GPT2Config(**config))
    hf.load_state_dict(gpt.to_hf_state_dict(), strict=True)
    hf.generation_config.pad_token_id = None
    return hf.eval()


def load_models(args: argparse.Namespace):
    """(target GPT, draft GPT, tokenizer, target source, draft source); the tokenizers must be equal."""
    from llmlab.checkpoint import find_checkpoint_file, load_method
    from llmlab.inference.speculative import load_draft

    target_src = Path(args.target) if args.target else train_default("target", args.out_dir, args.train_steps)
    draft_src = Path(args.draft) if args.draft else train_default("draft", args.out_dir, args.train_steps)
    method, _ = load_method(find_checkpoint_file(target_src))
    target = getattr(method.model, "_orig_mod", method.model).eval()
    draft = load_draft(draft_src, method.tokenizer, key="--draft")
    return target, draft, method.tokenizer, target_src, draft_src


def make_prompts(tokenizer, n: int, length: int, seed: int) -> list[torch.Tensor]:
    """``n`` prompts of ``length`` tokens cut from Shakespeare at random places (seeded)."""
    from llmlab.data.corpora import load_corpus

    text = "\n\n".join(load_corpus("shakespeare"))
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    while len(prompts) < n:
        start = int(torch.randint(0, len(text) - 8 * length, (1,), generator=gen))
        start = text.find("\n", start) + 1  # from the start of a line
        ids = tokenizer.encode(text[start : start + 8 * length])[:length]
        if len(ids) == length:
            prompts.append(torch.tensor([ids]))
    return prompts


# ----------------------------------------------------------------------------- measuring
def run(args: argparse.Namespace) -> tuple[str, dict]:
    from llmlab.inference.speculative import SpecStats, expected_tokens, speedup

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        target, draft, tok, target_src, draft_src = load_models(args)
        context = min(target.config.block_size, draft.config.block_size)
        if args.prompt_len + args.max_new_tokens > context:
            raise UserError(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} exceed the "
                            f"models' context of {context} tokens: generate fewer tokens")
        prompts = make_prompts(tok, args.prompts, args.prompt_len, args.seed)
        hf = None if args.no_hf else (to_hf(target), to_hf(draft))
        rows, rates_all, contention = [], {}, {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for temperature in args.temperature:
                timed = _time_variants(args, target, draft, hf, prompts, temperature)
                med = {name: statistics.median(r) for name, r in timed.rates.items()}
                rates_all[f"T={temperature:g}"] = timed.rates
                contention[f"T={temperature:g}"] = timed.others
                c = med["llmlab target"] / med["llmlab draft"]  # time per draft token / time per target token
                for g in args.gamma:
                    stats = sum((s for _, s in timed.outputs[f"llmlab γ={g}"][0]), SpecStats(gamma=g))
                    alpha = stats.alpha
                    row = dict(temperature=temperature, gamma=g, alpha=alpha, acceptance_rate=stats.acceptance_rate,
                               tokens_per_target_call=stats.tokens_per_target_call,
                               expected_tokens=expected_tokens(alpha, g), c=c, speedup_theory=speedup(alpha, g, c),
                               speedup_llmlab=med[f"llmlab γ={g}"] / med["llmlab target"],
                               target_tok_s=med["llmlab target"], spec_tok_s=med[f"llmlab γ={g}"],
                               stats=stats.as_dict())
                    if hf is not None:
                        row.update(speedup_hf=med[f"HF assisted γ={g}"] / med["HF generate"],
                                   hf_tok_s=med["HF generate"], hf_assisted_tok_s=med[f"HF assisted γ={g}"])
                    rows.append(row)
            checks = _greedy_checks(args, target, draft, hf, prompts)
    finally:
        torch.set_num_threads(prev_threads)
    record = dict(bench="speculative", target=str(target_src), draft=str(draft_src),
                  target_config=_arch(target), draft_config=_arch(draft), args={k: str(v) if isinstance(v, Path)
                  else v for k, v in vars(args).items()}, rows=rows, checks=checks, rates=rates_all,
                  contention=contention, versions=versions("torch", "transformers"))
    return _markdown(args, record, target, draft), record


def _arch(m) -> dict:
    c = m.config
    return dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                vocab_size=c.vocab_size, params=m.num_params())


def _time_variants(args, target, draft, hf, prompts, temperature):
    """Interleaved timing of every variant at one temperature; each call generates for every prompt."""
    from llmlab.inference.generate import generate
    from llmlab.inference.speculative import speculative_generate

    n, greedy, top_k = args.max_new_tokens, temperature == 0, args.top_k

    def seeded(i: int) -> torch.Generator:  # the same draws on every repeat: the same work to time
        return torch.Generator().manual_seed(args.seed * 1000 + i)

    def plain(model):
        return lambda _: [generate(model, p, n, temperature=temperature, top_k=top_k, greedy=greedy,
                                   generator=seeded(i)) for i, p in enumerate(prompts)]

    def spec(g: int):
        return lambda _: [speculative_generate(target, draft, p, n, gamma=g, temperature=temperature, top_k=top_k,
                                               greedy=greedy, generator=seeded(i)) for i, p in enumerate(prompts)]

    fns = {"llmlab target": plain(target), "llmlab draft": plain(draft)}
    fns.update({f"llmlab γ={g}": spec(g) for g in args.gamma})
    if hf is not None:
        hf_target, hf_draft = hf
        sampling = dict(do_sample=not greedy, max_new_tokens=n, min_new_tokens=n)
        if not greedy:
            sampling.update(temperature=temperature, top_k=top_k or 0)  # 0 = off (HF's default would be 50)

        def hf_run(g: int | None):
            def call(_):
                outs = []
                for i, p in enumerate(prompts):
                    torch.manual_seed(args.seed * 1000 + i)  # HF samples from the global RNG
                    extra = {}
                    if g is not None:
                        _assistant(hf_draft, g)
                        extra["assistant_model"] = hf_draft
                    outs.append(hf_target.generate(p, attention_mask=torch.ones_like(p), **sampling, **extra))
                return outs
            return call

        fns["HF generate"] = hf_run(None)
        fns.update({f"HF assisted γ={g}": hf_run(g) for g in args.gamma})
    _log(f"timing T={temperature:g}: {', '.join(fns)}")
    return interleave(fns, what=f"T={temperature:g}", calls=args.repeats, rounds=args.repeats, warmup=args.warmup,
                      units=n * len(prompts), log=_log)


def _assistant(hf_draft, gamma: int) -> None:
    """HF assisted generation drafting exactly γ tokens per round (no schedule, no confidence early exit)."""
    gc = hf_draft.generation_config
    gc.num_assistant_tokens = gamma
    gc.num_assistant_tokens_schedule = "constant"
    gc.assistant_confidence_threshold = 0.0


def _greedy_checks(args, target, draft, hf, prompts) -> list[dict]:
    """Speculative greedy ≡ target greedy (every γ, every prompt), and ≡ HF assisted greedy."""
    from llmlab.inference.generate import generate
    from llmlab.inference.speculative import speculative_generate

    n = args.max_new_tokens
    same = hf_same = total = 0
    for p in prompts:
        want = generate(target, p, n, greedy=True)
        for g in args.gamma:
            total += 1
            same += torch.equal(speculative_generate(target, draft, p, n, gamma=g, greedy=True)[0], want)
            if hf is not None:
                _assistant(hf[1], g)
                theirs = hf[0].generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=n,
                                        min_new_tokens=n, assistant_model=hf[1])
                hf_same += torch.equal(theirs, want)
    checks = [dict(name="greedy identity (llmlab speculative = llmlab target greedy)", ok=same == total,
                   detail=f"{same}/{total} (prompt, γ) pairs token-identical over {n} new tokens")]
    if hf is not None:
        checks.append(dict(name="greedy identity (HF assisted greedy = llmlab target greedy)", ok=hf_same == total,
                           detail=f"{hf_same}/{total} (prompt, γ) pairs token-identical"))
    return checks


# ----------------------------------------------------------------------------- report
def _markdown(args, record: dict, target, draft) -> str:
    hf = not args.no_hf
    head = ("| T | γ | α (per token) | accepted / drafted | tokens / target call | E[tokens] from α | c | "
            "speed-up theory | speed-up llmlab (measured) |" + (" speed-up HF assisted (measured) |" if hf else ""))
    lines = [head, "|" + "---:|" * (10 if hf else 9)]
    for r in record["rows"]:
        cells = [f"{r['temperature']:g}", str(r["gamma"]), f"{r['alpha']:.3f}", f"{r['acceptance_rate']:.3f}",
                 f"{r['tokens_per_target_call']:.2f}", f"{r['expected_tokens']:.2f}", f"{r['c']:.2f}",
                 f"{r['speedup_theory']:.2f}×", f"{r['speedup_llmlab']:.2f}×"]
        if hf:
            cells.append(f"{r['speedup_hf']:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    ta, da = record["target_config"], record["draft_config"]
    base = []
    for t in args.temperature:
        r = next(x for x in record["rows"] if x["temperature"] == t)
        base.append(f"T={t:g}: llmlab target-only {r['target_tok_s']:.0f} tok/s"
                    + (f", HF generate {r['hf_tok_s']:.0f} tok/s" if hf else ""))
    lines += [
        "",
        f"Target {ta['n_layer']}L×{ta['n_embd']} ({ta['params'] / 1e6:.2f}M params, {record['target']}), draft "
        f"{da['n_layer']}L×{da['n_embd']} ({da['params'] / 1e6:.2f}M, {record['draft']}), vocabulary "
        f"{ta['vocab_size']}. {args.prompts} Shakespeare prompts × {args.prompt_len} tokens + "
        f"{args.max_new_tokens} new tokens, batch 1, top_k={args.top_k}, {args.threads} thread(s), fp32 CPU; "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up pass(es). " + "; ".join(base) + ".",
        "α = accepted / verified drafts; c = draft / target time per token (plain generate with KV cache); theory = "
        "(1 − α^{γ+1}) / ((1 − α)(γc + 1)) (Leviathan et al. 2023), which assumes verifying γ + 1 tokens "
        "costs one target step and ignores the per-round overhead.",
        "",
        *[f"- {c['name']}: {c['detail']} — {'ok' if c['ok'] else '**MISMATCH**'}" for c in record["checks"]],
        *contention_warning(record["contention"], args.threads),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
