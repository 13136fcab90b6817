"""``llmlab bench gpt``: llmlab's GPT-2 against Hugging Face's ``GPT2LMHeadModel``, side by side.

Both models are built from the *same* configuration and start from the *same* weights (llmlab's
random init, copied into the HF model with :meth:`GPT.to_hf_state_dict`), run in one process with
the same number of threads, on the same batches. Measured:

* **training tokens/s** (forward + backward + ``torch.optim.AdamW`` step, dropout 0, fp32) on two
  configurations: ``bpe`` (4 layers, 4 heads, 256 wide, GPT-2 vocabulary, batch 8 x 256 tokens)
  and ``char`` (4 layers, 4 heads, 128 wide, 65 characters, batch 32 x 128). After a few warm-up
  steps the two models take turns in interleaved rounds (the order flips every round) and the
  table shows the median of the per-round tokens/s, because timings on a shared CPU drift.
* **generation tokens/s**: batch 1, greedy, a random 16-token prompt then ``--gen-tokens`` new
  tokens, on the ``bpe`` configuration: llmlab with and without its KV cache, HF ``generate``
  with ``use_cache=True`` and ``False``. Median of ``--gen-repeats`` runs, variants interleaved.

Parity checks (printed under the table; a failure is reported on stderr and exits with code 1):
the initial losses agree (HF ``labels=x`` with its internal shift vs llmlab's pre-shifted
targets, last position ignored, so both score the same ``T - 1`` predictions), the loss curves
stay together through training, and all four generation variants emit the same tokens.

Timings include everything each library does per call (HF ``generate`` runs its logits
processors and stopping criteria; llmlab's ``generate`` its sampling rules). HF training calls
pass ``use_cache=False`` (no point building a KV cache for a training step).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llmlab.bench.common import CpuWatch, contention_warning
from llmlab.bench.common import loadavg as _loadavg
from llmlab.errors import UserError

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainSetup:
    """One training configuration: model shape and batch shape."""

    name: str
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    batch_size: int
    seq_len: int

    @property
    def label(self) -> str:
        return (
            f"train tok/s ({self.name} {self.n_layer}L/{self.n_embd}d, "
            f"B{self.batch_size}×T{self.seq_len})"
        )


SETUPS = {
    "bpe": TrainSetup("bpe", 50257, n_layer=4, n_head=4, n_embd=256, batch_size=8, seq_len=256),
    "char": TrainSetup("char", 65, n_layer=4, n_head=4, n_embd=128, batch_size=32, seq_len=128),
}
# --quick: same vocabularies (the bpe head is what makes it "bpe"), tiny bodies and batches
QUICK_SETUPS = {
    "bpe": TrainSetup("bpe", 50257, n_layer=2, n_head=2, n_embd=64, batch_size=2, seq_len=64),
    "char": TrainSetup("char", 65, n_layer=2, n_head=2, n_embd=64, batch_size=4, seq_len=64),
}
DEFAULTS = dict(steps=10, rounds=3, warmup=3, gen_tokens=200, gen_repeats=3, prompt_len=16)
QUICK = dict(steps=2, rounds=1, warmup=1, gen_tokens=32, gen_repeats=1, prompt_len=16)

# agreement tolerances (fp32; the two models run different kernels in a different order)
INITIAL_LOSS_ATOL = 1e-4
TRAIN_LOSS_ATOL = 2e-3  # after a few AdamW steps the tiny differences have grown a little


# ----------------------------------------------------------------------------- results
@dataclass
class Row:
    label: str
    llmlab: float
    hf: float
    unit: str = ""  # appended to both numbers ("×" for speed-ups)

    @property
    def ratio(self) -> float:
        return self.llmlab / self.hf


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"- {self.name}: {self.detail} — {'ok' if self.ok else '**MISMATCH**'}"


@dataclass
class BenchResult:
    header: str
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    # CPUs kept busy by *other* processes while each phase was timed (None: unknown)
    contention: dict[str, float | None] = field(default_factory=dict)
    threads: int = 1  # ours; other processes may use the remaining CPUs without slowing us down

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def markdown(self) -> str:
        lines = [
            "| benchmark | llmlab | transformers | ratio (llmlab / HF) |",
            "|---|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(f"| {r.label} | {_num(r.llmlab)}{r.unit} | {_num(r.hf)}{r.unit} | {r.ratio:.2f} |")
        lines += ["", self.header]
        lines += contention_warning(self.contention, self.threads)
        lines += ["", "Parity checks:"]
        lines += [c.line() for c in self.checks] or ["- (none run)"]
        if self.details:
            lines += ["", "Details:"] + [f"- {d}" for d in self.details]
        return "\n".join(lines) + "\n"


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}"


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmlab bench gpt",
        description=(
            "Training and generation tokens/s of llmlab's GPT-2 vs transformers' GPT2LMHeadModel "
            "(same config, same weights, same batches, one process), with parity checks."
        ),
    )
    p.add_argument(
        "--config",
        choices=("all", *SETUPS),
        default="all",
        help="training configuration(s) to time (default: all): "
        + "; ".join(f"{k} = {s.label.removeprefix('train tok/s ')}" for k, s in SETUPS.items()),
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both (default 2)")
    p.add_argument("--steps", type=int, help=f"timed training steps per model (default {DEFAULTS['steps']})")
    p.add_argument(
        "--rounds",
        type=int,
        help=f"interleaved rounds the timed steps are split into (default {DEFAULTS['rounds']})",
    )
    p.add_argument(
        "--warmup", type=int, help=f"untimed training steps per model first (default {DEFAULTS['warmup']})"
    )
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default 3e-4)")
    p.add_argument(
        "--gen-tokens", type=int, help=f"new tokens per generation (default {DEFAULTS['gen_tokens']})"
    )
    p.add_argument("--prompt-len", type=int, help=f"prompt tokens (default {DEFAULTS['prompt_len']})")
    p.add_argument(
        "--gen-repeats", type=int, help=f"timed generations per variant (default {DEFAULTS['gen_repeats']})"
    )
    p.add_argument("--no-generate", action="store_true", help="skip the generation benchmark")
    p.add_argument("--no-train", action="store_true", help="skip the training benchmark")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and prompt (default 0)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny models and batches, "
        + ", ".join(f"{k.replace('_', '-')}={v}" for k, v in QUICK.items())
        + " (explicit options still win)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's top ops (self CPU time) of two training steps of each model",
    )
    p.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    return p


def main(argv: list[str] | None = None) -> None:
    """``llmlab bench gpt [options]``: print the table (and write ``--out``); exit 1 on a parity failure."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    result, profile = run(args)
    text = result.markdown()
    print(text, end="", flush=True)
    if profile:
        print("\n" + profile, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if not result.ok:
        bad = "; ".join(f"{c.name}: {c.detail}" for c in result.checks if not c.ok)
        print(f"PARITY CHECK FAILED: {bad}", file=sys.stderr, flush=True)
        sys.exit(1)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the unset numeric options from ``--quick``/the defaults and validate them."""
    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("threads", "steps", "rounds", "gen_tokens", "gen_repeats", "prompt_len"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.warmup < 0:
        raise UserError(f"--warmup={args.warmup} must be >= 0")
    if not args.lr > 0:
        raise UserError(f"--lr={args.lr} must be > 0")
    args.rounds = min(args.rounds, args.steps)
    return args


def run(args: argparse.Namespace) -> tuple[BenchResult, str]:
    """Run the benchmarks described by parsed ``args``; returns the result and the profile text."""
    args = resolve_args(args)
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            "llmlab bench gpt compares against Hugging Face transformers, which is not installed: "
            "pip install -e '.[dev]'"
        ) from e

    setups = QUICK_SETUPS if args.quick else SETUPS
    names = list(setups) if args.config == "all" else [args.config]
    header = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} thread{'s' if args.threads > 1 else ''}, fp32 CPU, SDPA attention in both. "
        f"Train: AdamW lr={args.lr:g}, {args.warmup} warm-up + {args.steps} timed steps per model in "
        f"{args.rounds} interleaved round{'s' if args.rounds > 1 else ''} (median of per-round tok/s). "
        f"Generate: batch 1, greedy, {args.prompt_len}-token prompt + {args.gen_tokens} new tokens, "
        f"median of {args.gen_repeats}."
    )
    result = BenchResult(header=header, threads=args.threads)
    profile_parts: list[str] = []

    load_start = _loadavg()
    prev_threads = torch.get_num_threads()
    prev_verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # config/loss-type chatter, not our business here
    torch.set_num_threads(args.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            if not args.no_train:
                for name in names:
                    _bench_train(setups[name], args, result)
                    gc.collect()
            if not args.no_generate:
                _bench_generate(setups["bpe"], args, result)
                gc.collect()
            if args.profile:
                for name in names:
                    profile_parts.append(_profile_train(setups[name], args))
    finally:
        torch.set_num_threads(prev_threads)
        transformers.logging.set_verbosity(prev_verbosity)
    if result.contention:
        result.details.append(
            f"CPUs (of {os.cpu_count()}) kept busy by other processes while timing: "
            + ", ".join("n/a" if v is None else f"{k} {v:.2f}" for k, v in result.contention.items())
            + f"; 1-minute load average at start {load_start}, at end {_loadavg()}"
        )
    return result, "\n".join(profile_parts)


def _contention_note(result: BenchResult, phase: str, watch: CpuWatch) -> str:
    result.contention[phase] = watch.others
    return "n/a" if watch.others is None else f"{watch.others:.2f}"


def _log(msg: str) -> None:
    print(f"[bench gpt] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- models
def make_pair(
    vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, seed: int
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(llmlab GPT, transformers GPT2LMHeadModel) with identical config and weights, dropout 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmlab.models.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    config = GPTConfig(
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        dropout=0.0,
        bias=True,
        tie_embeddings=True,
        attn_impl="sdpa",
    )
    ours = GPT(config)
    hf_config = {k: v for k, v in ours.to_hf_config().items() if k not in ("model_type", "architectures")}
    # no special tokens: nothing may stop or bias greedy decoding (ids would not even fit a char vocab)
    hf_config.update(bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    theirs = GPT2LMHeadModel(GPT2Config(**hf_config))
    theirs.load_state_dict(ours.to_hf_state_dict(), strict=True)
    assert theirs.config.activation_function == "gelu_new"
    assert theirs.config._attn_implementation == "sdpa", theirs.config._attn_implementation
    assert theirs.lm_head.weight is theirs.transformer.wte.weight, "HF head should stay tied"
    return ours, theirs


def _train_steppers(setup: TrainSetup, args: argparse.Namespace, n_batches: int):
    """Both models, one ``step(i) -> loss`` per model, on the same ``n_batches`` random batches."""
    ours, theirs = make_pair(
        setup.vocab_size, setup.seq_len, setup.n_layer, setup.n_head, setup.n_embd, args.seed
    )
    ours.train()
    theirs.train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    B, T = setup.batch_size, setup.seq_len
    xs = [torch.randint(0, setup.vocab_size, (B, T), generator=gen) for _ in range(n_batches)]
    # llmlab's targets are pre-shifted; the last position has no next token in the window, which
    # is exactly what HF's internal shift of labels=x drops: both score the same T - 1 predictions
    pad = torch.full((B, 1), IGNORE_INDEX, dtype=torch.long)
    ys = [torch.cat([x[:, 1:], pad], dim=1) for x in xs]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=args.lr)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=args.lr)

    def step_ours(i: int) -> float:
        opt_ours.zero_grad(set_to_none=True)
        _, loss = ours(xs[i], ys[i])
        loss.backward()
        opt_ours.step()
        return loss.item()

    def step_theirs(i: int) -> float:
        opt_theirs.zero_grad(set_to_none=True)
        loss = theirs(input_ids=xs[i], labels=xs[i], use_cache=False).loss
        loss.backward()
        opt_theirs.step()
        return loss.item()

    return {"llmlab": step_ours, "transformers": step_theirs}


def _split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` near-equal positive sizes (larger first)."""
    q, r = divmod(n, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


# ----------------------------------------------------------------------------- training
def _bench_train(setup: TrainSetup, args: argparse.Namespace, result: BenchResult) -> None:
    _log(f"training {setup.label.removeprefix('train tok/s ')}: building both models")
    steppers = _train_steppers(setup, args, args.warmup + args.steps)
    names = list(steppers)
    losses: dict[str, list[float]] = {n: [] for n in names}
    tokens_per_step = setup.batch_size * setup.seq_len

    for i in range(args.warmup):
        for name in names:
            losses[name].append(steppers[name](i))
    per_round: dict[str, list[float]] = {n: [] for n in names}
    step = args.warmup
    with CpuWatch() as watch:
        for r, size in enumerate(_split(args.steps, args.rounds)):
            order = names if r % 2 == 0 else names[::-1]  # flip the order: neither always goes first
            for name in order:
                t0 = time.perf_counter()
                for i in range(step, step + size):
                    losses[name].append(steppers[name](i))
                per_round[name].append(size * tokens_per_step / (time.perf_counter() - t0))
            step += size
            _log(
                f"  {setup.name} round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {per_round[n][-1]:.0f} tok/s" for n in names)
            )
    others = _contention_note(result, f"{setup.name} train", watch)
    _log(f"  {setup.name}: other processes kept {others} CPUs busy meanwhile")

    ours, theirs = (statistics.median(per_round[n]) for n in names)
    result.rows.append(Row(setup.label, ours, theirs))
    result.details.append(
        f"{setup.name} train per-round tok/s: "
        + "; ".join(f"{n} [{', '.join(f'{v:.0f}' for v in per_round[n])}]" for n in names)
    )

    l0, h0 = losses["llmlab"][0], losses["transformers"][0]
    result.checks.append(
        Check(
            f"initial loss ({setup.name})",
            abs(l0 - h0) <= INITIAL_LOSS_ATOL,
            f"llmlab {l0:.6f} vs HF {h0:.6f} (|Δ| {abs(l0 - h0):.1e}, tol {INITIAL_LOSS_ATOL:g})",
        )
    )
    diffs = [abs(a - b) for a, b in zip(losses["llmlab"], losses["transformers"])]
    n = len(diffs)
    result.checks.append(
        Check(
            f"training losses ({setup.name}, {n} steps, same batches)",
            max(diffs) <= TRAIN_LOSS_ATOL,
            f"last llmlab {losses['llmlab'][-1]:.6f} vs HF {losses['transformers'][-1]:.6f}, "
            f"max |Δ| {max(diffs):.1e} (tol {TRAIN_LOSS_ATOL:g})",
        )
    )


# ----------------------------------------------------------------------------- generation
def _bench_generate(setup: TrainSetup, args: argparse.Namespace, result: BenchResult) -> None:
    from llmlab.inference.generate import generate

    n_new, T0 = args.gen_tokens, args.prompt_len
    block_size = max(setup.seq_len, T0 + n_new)  # HF cannot slide a window; never make it need to
    _log(f"generation: {setup.n_layer}L/{setup.n_embd}d, vocab {setup.vocab_size}, {T0} + {n_new} tokens")
    ours, theirs = make_pair(
        setup.vocab_size, block_size, setup.n_layer, setup.n_head, setup.n_embd, args.seed
    )
    ours.eval()
    theirs.eval()
    gen = torch.Generator().manual_seed(args.seed + 2)
    prompt = torch.randint(0, setup.vocab_size, (1, T0), generator=gen)
    mask = torch.ones_like(prompt)

    def hf(use_cache: bool) -> Callable[[int], torch.Tensor]:
        return lambda n: theirs.generate(
            prompt,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            use_cache=use_cache,
        )

    variants: dict[str, Callable[[int], torch.Tensor]] = {
        "llmlab KV cache": lambda n: generate(ours, prompt, n, greedy=True, use_kv_cache=True),
        "llmlab no cache": lambda n: generate(ours, prompt, n, greedy=True, use_kv_cache=False),
        "HF KV cache": hf(True),
        "HF no cache": hf(False),
    }
    names = list(variants)
    speeds: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in names:  # warm-up: allocators, kernels, HF's generation-config plumbing
            variants[name](min(8, n_new))
        with CpuWatch() as watch:
            for r in range(args.gen_repeats):
                order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
                for name in order:
                    t0 = time.perf_counter()
                    out = variants[name](n_new)
                    speeds[name].append(n_new / (time.perf_counter() - t0))
                    if name not in outputs:
                        outputs[name] = out
                    elif not torch.equal(out, outputs[name]):
                        outputs[name + f" (repeat {r + 1})"] = out  # non-deterministic: fails parity
                done = ", ".join(f"{n} {speeds[n][-1]:.0f} tok/s" for n in names)
                _log(f"  generate repeat {r + 1}/{args.gen_repeats}: {done}")
    others = _contention_note(result, "generate", watch)
    _log(f"  generate: other processes kept {others} CPUs busy meanwhile")

    med = {n: statistics.median(v) for n, v in speeds.items()}
    result.rows.append(Row("generate tok/s, KV cache", med["llmlab KV cache"], med["HF KV cache"]))
    result.rows.append(Row("generate tok/s, no cache", med["llmlab no cache"], med["HF no cache"]))
    result.rows.append(
        Row(
            "KV-cache speed-up (cache / no cache)",
            med["llmlab KV cache"] / med["llmlab no cache"],
            med["HF KV cache"] / med["HF no cache"],
            unit="×",
        )
    )
    result.details.append(
        "generate tok/s per repeat: "
        + "; ".join(f"{n} [{', '.join(f'{v:.0f}' for v in speeds[n])}]" for n in names)
    )
    result.checks.append(_greedy_parity(ours, prompt, outputs, n_new))


def _greedy_parity(
    ours: torch.nn.Module, prompt: torch.Tensor, outputs: dict[str, torch.Tensor], n_new: int
) -> Check:
    """All generation variants must equal llmlab's uncached output (the plainest computation)."""
    ref_name = "llmlab no cache"
    ref = outputs[ref_name]
    name = f"greedy tokens ({n_new} new): {' == '.join(outputs)}"
    T0 = prompt.size(1)
    bad = []
    for other, out in outputs.items():
        if out.shape != ref.shape:
            bad.append(f"{other} has shape {tuple(out.shape)} vs {tuple(ref.shape)}")
        elif not torch.equal(out, ref):
            pos = int((out[0] != ref[0]).nonzero()[0])
            with torch.no_grad():  # a near-tie at the first difference points at rounding, not a bug
                top2 = ours(ref[:, :pos], last_only=True)[0, -1].float().topk(2).values
            bad.append(
                f"{other} differs from {ref_name} first at new token {pos - T0} "
                f"({int(out[0, pos])} vs {int(ref[0, pos])}; llmlab top-2 logit gap there "
                f"{float(top2[0] - top2[1]):.1e})"
            )
    if bad:
        return Check(name, False, "; ".join(bad))
    return Check(name, True, f"all {len(outputs)} identical")


# ----------------------------------------------------------------------------- profiling
def _profile_train(setup: TrainSetup, args: argparse.Namespace, row_limit: int = 15) -> str:
    """torch.profiler tables (top ops by self CPU time) of 2 training steps of each model."""
    from torch.profiler import ProfilerActivity, profile, record_function

    _log(f"profiling {setup.name} training")
    steppers = _train_steppers(setup, args, 3)
    parts = [f"## profile: {setup.label.removeprefix('train tok/s ')}, 2 steps after 1 warm-up"]
    for name, step in steppers.items():
        step(0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in (1, 2):
                with record_function(f"{name}_step"):
                    step(i)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
        parts.append(f"### {name}\n```\n{table}\n```")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
