"""What the benches of llmlab's models against Hugging Face ``transformers`` share.

:mod:`~llmlab.bench.gpt`, :mod:`~llmlab.bench.bert` and :mod:`~llmlab.bench.t5` all build both
models from one configuration with the *same* weights and run them in one process, with the same
number of threads, on the *same* batches. This module holds their common parts:

* results: :class:`Row` (llmlab, transformers, ratio), :class:`Check` (a parity check) and
  :class:`BenchResult` (the Markdown table, the contention warning, the JSON record);
* command line: :class:`ArgParser` (a bad option is one line and exit code 2), :func:`add_options`
  (``--threads --steps --rounds --warmup --lr --seed --quick --profile --out --no-train``),
  :func:`add_generate_options`, :func:`resolve_args` and :func:`make_main` (the bench's ``main``:
  print, write ``--out``, exit 1 on a failed check);
* running: :func:`run_phases` (the header, the phases the options ask for) under :func:`measure`
  (threads set, transformers quiet, the global RNG restored, the machine load noted);
* timing: :func:`interleave`, the loop every timed phase goes through (the calls split into
  rounds, who goes first rotating from round to round, a rate per round, :class:`CpuWatch` around
  it all), :func:`time_steps` and :func:`time_generate` (the same with the options' counts);
* steps and checks: :func:`adamw_stepper`, :func:`train_rows`, :func:`loss_checks`,
  :func:`distinct_outputs`, :func:`greedy_parity` and :func:`profile_steps`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

import torch

from llmlab.bench.common import CpuWatch, contention_warning, loadavg, logger, write_outputs
from llmlab.errors import UserError

REF = "transformers"  # the key of the reference library's entry in every dict of steppers / losses


# ----------------------------------------------------------------------------- results
@dataclass
class Row:
    """One line of the table: the same measurement for both libraries."""

    label: str
    llmlab: float
    hf: float
    unit: str = ""  # appended to both numbers ("×" for speed-ups)

    @property
    def ratio(self) -> float:
        return self.llmlab / self.hf


@dataclass
class Check:
    """One parity check: did both libraries compute the same thing?"""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"- {self.name}: {self.detail} — {'ok' if self.ok else '**MISMATCH**'}"


@dataclass
class BenchResult:
    """Everything a bench prints: rows, the text under the table, parity checks, details."""

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

    def record(self, bench: str, args: argparse.Namespace) -> dict[str, Any]:
        """Everything in the table as plain data (the ``--out`` JSON)."""
        return {
            "bench": bench,
            "args": dict(vars(args)),
            "header": self.header,
            "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows],
            "checks": [asdict(c) for c in self.checks],
            "ok": self.ok,
            "contention": self.contention,
            "threads": self.threads,
            "cpu_count": os.cpu_count(),
            "details": self.details,
        }

    def add_timing(self, timed: Timed) -> None:
        """Note a timed phase: its contention and its per-round rates."""
        self.contention[timed.what] = timed.others
        self.details.append(
            f"{timed.what} {timed.unit} per round: "
            + "; ".join(f"{n} [{', '.join(f'{v:.0f}' for v in rates)}]" for n, rates in timed.rates.items())
        )


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}"


# ----------------------------------------------------------------------------- command line
class ArgParser(argparse.ArgumentParser):
    """``argparse``, but a bad option ends like every other bad input of the CLI: one line
    ``error: <problem> (<fix>)`` on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        from llmlab.cli import fail

        fail(f"{self.prog}: {message} (see {self.prog} --help)")


def add_options(p: argparse.ArgumentParser, defaults: dict, quick: dict, default_lr: float = 3e-4) -> None:
    """The options every bench against transformers has; ``defaults``/``quick`` fill the unset ones."""
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both (default 2)")
    p.add_argument("--steps", type=int, help=f"timed steps per model and phase (default {defaults['steps']})")
    p.add_argument(
        "--rounds",
        type=int,
        help=f"interleaved rounds the timed steps are split into (default {defaults['rounds']})",
    )
    p.add_argument("--warmup", type=int, help=f"untimed steps per model first (default {defaults['warmup']})")
    p.add_argument("--lr", type=float, default=default_lr, help=f"AdamW learning rate (default {default_lr:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and batches (default 0)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny models and batches, "
        + ", ".join(f"{k.replace('_', '-')}={v}" for k, v in quick.items())
        + " (explicit options still win)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's top ops (self CPU time) of two training steps of each model",
    )
    p.add_argument(
        "--out", type=Path, help="also write the Markdown table to OUT.md and the raw results to OUT.json"
    )
    p.add_argument("--no-train", action="store_true", help="skip the training benchmark")


def add_generate_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    """``--gen-tokens --gen-repeats --no-generate``, for the benches that also time ``generate``."""
    p.add_argument(
        "--gen-tokens", type=int, help=f"new tokens per generation (default {defaults['gen_tokens']})"
    )
    p.add_argument(
        "--gen-repeats", type=int, help=f"timed generations per variant (default {defaults['gen_repeats']})"
    )
    p.add_argument("--no-generate", action="store_true", help="skip the generation benchmark")


def resolve_args(
    args: argparse.Namespace, defaults: dict, quick: dict, at_least_one: Iterable[str] = ()
) -> argparse.Namespace:
    """Fill the unset numeric options from ``--quick``/the defaults and validate them."""
    for key, value in (quick if args.quick else defaults).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("threads", "steps", "rounds", *at_least_one):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}={getattr(args, key)} must be >= 1")
    if args.warmup < 0:
        raise UserError(f"--warmup={args.warmup} must be >= 0")
    if not args.lr > 0:
        raise UserError(f"--lr={args.lr} must be > 0")
    args.rounds = min(args.rounds, args.steps)
    return args


def make_main(
    bench: str,
    build_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], tuple[BenchResult, str]],
) -> Callable[[list[str] | None], None]:
    """The bench's ``main(argv)``: parse, ``run``, print the table (and the profile), write ``--out``
    (Markdown + JSON); exit 1 on a parity failure."""

    def main(argv: list[str] | None = None) -> None:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        result, profile = run(args)
        text = result.markdown()
        print(text, end="", flush=True)
        if profile:
            print("\n" + profile, flush=True)
        if args.out is not None:
            md, js = write_outputs(args.out, text, result.record(bench, args))
            logger(bench)(f"wrote {md} and {js}")
        if not result.ok:
            bad = "; ".join(f"{c.name}: {c.detail}" for c in result.checks if not c.ok)
            print(f"PARITY CHECK FAILED: {bad}", file=sys.stderr, flush=True)
            sys.exit(1)

    main.__doc__ = (
        f"``llmlab bench {bench} [options]``: print the table (and write ``--out``); exit 1 on a parity failure."
    )
    return main


# ----------------------------------------------------------------------------- running
def import_transformers(bench: str) -> ModuleType:
    """``transformers``, or a :class:`UserError` saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            f"llmlab bench {bench} compares against Hugging Face transformers, which is not installed: "
            "pip install -e '.[dev]'"
        ) from e
    return transformers


def train_header(transformers: ModuleType, args: argparse.Namespace) -> str:
    """The first sentences of the text under every table: versions, threads, the training schedule."""
    return (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} thread{'s' if args.threads > 1 else ''}, fp32 CPU, SDPA attention in both. "
        f"Train: AdamW lr={args.lr:g}, {args.warmup} warm-up + {args.steps} timed steps per model in "
        f"{args.rounds} interleaved round{'s' if args.rounds > 1 else ''} (median of per-round tok/s)."
    )


def run_phases(
    bench: str, args: argparse.Namespace, describe: str, phases: dict[str, Callable[[BenchResult], str | None]]
) -> tuple[BenchResult, str]:
    """Run a bench's phases under :func:`measure`; returns the result and the text they return (profiles).

    ``phases`` maps a name to ``fn(result)``, run in order: ``"profile"`` only with ``--profile``,
    any other NAME unless ``--no-NAME`` was given. ``describe`` follows :func:`train_header` under
    the table.
    """
    transformers = import_transformers(bench)
    result = BenchResult(header=f"{train_header(transformers, args)} {describe}", threads=args.threads)
    todo = [
        functools.partial(fn, result)
        for name, fn in phases.items()
        if (args.profile if name == "profile" else not getattr(args, f"no_{name}"))
    ]
    return result, measure(transformers, result, args.threads, todo)


def measure(
    transformers: ModuleType, result: BenchResult, threads: int, phases: Iterable[Callable[[], str | None]]
) -> str:
    """Run ``phases`` one after the other and return the text they return (profiles), joined.

    Meanwhile torch uses ``threads`` threads, transformers logs only errors (config chatter is not
    our business here) and shows no progress bars, and the global RNG is forked (restored
    afterwards). The CPUs other processes kept busy in each timed phase and the load average go
    into ``result.details``.
    """
    load_start = loadavg()
    prev_threads = torch.get_num_threads()
    prev_verbosity = transformers.logging.get_verbosity()
    prev_bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar
    torch.set_num_threads(threads)
    texts = []
    try:
        with torch.random.fork_rng(devices=[]):
            for phase in phases:
                texts.append(phase())
                gc.collect()
    finally:
        torch.set_num_threads(prev_threads)
        transformers.logging.set_verbosity(prev_verbosity)
        if prev_bars:
            transformers.logging.enable_progress_bar()
    if result.contention:
        result.details.append(
            f"CPUs (of {os.cpu_count()}) kept busy by other processes while timing: "
            + ", ".join("n/a" if v is None else f"{k} {v:.2f}" for k, v in result.contention.items())
            + f"; 1-minute load average at start {load_start}, at end {loadavg()}"
        )
    return "\n\n".join(t for t in texts if t)


# ----------------------------------------------------------------------------- timing
@dataclass
class Timed:
    """What :func:`interleave` measured."""

    what: str  # the phase ("bpe train", "generate", ...)
    unit: str  # of the rates ("tok/s")
    outputs: dict[str, list]  # every call's return value, in call order, warm-up calls first
    rates: dict[str, list[float]]  # units per second of each round
    others: float | None  # CPUs other processes kept busy meanwhile (None: unknown)

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])


def split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` near-equal positive sizes (larger first)."""
    q, r = divmod(n, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def interleave(
    fns: dict[str, Callable[[int], Any]],
    *,
    what: str,
    calls: int,
    rounds: int,
    units: float,
    warmup: int = 0,
    unit: str = "tok/s",
    log: Callable[[str], None],
) -> Timed:
    """Call every ``fns[name](i)`` for ``i`` in ``range(warmup + calls)``, timing the last ``calls``.

    Warm-up calls go name after name, untimed. The timed calls are split into ``rounds``; in each
    round every function makes its share of the calls in a row, and who goes first rotates from
    round to round, so that a drifting machine slows all of them alike. A round's rate is
    ``units`` per call times its calls over its wall time.
    """
    names = list(fns)
    outputs: dict[str, list] = {n: [] for n in names}
    rates: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup):
        for name in names:
            outputs[name].append(fns[name](i))
    step = warmup
    with CpuWatch() as watch:
        for r, size in enumerate(split(calls, rounds)):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                for i in range(step, step + size):
                    outputs[name].append(fns[name](i))
                rates[name].append(size * units / (time.perf_counter() - t0))
            step += size
            log(f"  {what} round {r + 1}/{rounds}: " + ", ".join(f"{n} {rates[n][-1]:.0f} {unit}" for n in names))
    others = "n/a" if watch.others is None else f"{watch.others:.2f}"
    log(f"  {what}: other processes kept {others} CPUs busy meanwhile")
    return Timed(what, unit, outputs, rates, watch.others)


def time_steps(
    fns: dict[str, Callable[[int], Any]],
    what: str,
    args: argparse.Namespace,
    units: float,
    log: Callable[[str], None],
) -> Timed:
    """:func:`interleave` with the step counts of the options: ``--warmup``, ``--steps``, ``--rounds``."""
    return interleave(
        fns, what=what, calls=args.steps, rounds=args.rounds, warmup=args.warmup, units=units, log=log
    )


def time_generate(
    variants: dict[str, Callable[[int], torch.Tensor]], args: argparse.Namespace, log: Callable[[str], None]
) -> Timed:
    """``variants[name](n)`` generates ``n`` tokens for one input: a warm-up of up to 8 tokens each
    (allocators, kernels, HF's generation-config plumbing), then ``--gen-repeats`` interleaved timed
    generations of ``--gen-tokens`` tokens each."""
    n_new = args.gen_tokens
    with torch.no_grad():
        for fn in variants.values():
            fn(min(8, n_new))
        return interleave(
            {name: lambda i, fn=fn: fn(n_new) for name, fn in variants.items()},
            what="generate",
            calls=args.gen_repeats,
            rounds=args.gen_repeats,
            units=n_new,
            log=log,
        )


def distinct_outputs(timed: Timed) -> dict[str, Any]:
    """Each function's first output, plus any later one that differs from it (as ``"name (call k)"``):
    a non-deterministic function then fails the parity check that compares them all."""
    out = {}
    for name, values in timed.outputs.items():
        out[name] = values[0]
        for k, v in enumerate(values[1:], start=2):
            if not torch.equal(v, values[0]):
                out[f"{name} (call {k})"] = v
    return out


def greedy_parity(
    outputs: dict[str, torch.Tensor],
    ref_name: str,
    start: int,
    next_logits: Callable[[torch.Tensor], torch.Tensor],
) -> Check:
    """Every output (batch 1, new tokens from index ``start``) must equal ``outputs[ref_name]``.

    At a first difference, llmlab's top-2 logit gap there (``next_logits(prefix)``: its logits of
    the token after ``prefix``) tells a near tie, i.e. rounding, from a bug.
    """
    ref = outputs[ref_name]
    name = f"greedy tokens ({ref.size(1) - start} new): {' == '.join(outputs)}"
    bad = []
    for other, out in outputs.items():
        if out.shape != ref.shape:
            bad.append(f"{other} has shape {tuple(out.shape)} vs {tuple(ref.shape)}")
        elif not torch.equal(out, ref):
            pos = int((out[0] != ref[0]).nonzero()[0])
            with torch.no_grad():
                top2 = next_logits(ref[:, :pos]).float().topk(2).values
            bad.append(
                f"{other} differs from {ref_name} first at new token {pos - start} "
                f"({int(out[0, pos])} vs {int(ref[0, pos])}; llmlab top-2 logit gap there "
                f"{float(top2[0] - top2[1]):.1e})"
            )
    if bad:
        return Check(name, False, "; ".join(bad))
    distinct = ref[0, start:].unique().numel()
    return Check(name, True, f"all {len(outputs)} identical ({distinct} distinct new tokens)")


def adamw_stepper(
    model: torch.nn.Module, lr: float, loss_of: Callable[[int], torch.Tensor]
) -> Callable[[int], float]:
    """``step(i) -> loss``: zero the grads, ``loss_of(i)`` (batch ``i``), backward, an AdamW step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(i: int) -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(i)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def train_rows(result: BenchResult, timed: Timed, labels: dict[str, str]) -> dict[str, list[float]]:
    """One table row per llmlab stepper (``labels[name]``) against transformers; returns the losses."""
    result.add_timing(timed)
    for name, label in labels.items():
        result.rows.append(Row(label, timed.median(name), timed.median(REF)))
    return timed.outputs


def loss_checks(
    tag: str, losses: dict[str, list[float]], initial_tol: float, curve_tol: float, *, relative: bool = False
) -> list[Check]:
    """Each llmlab run's losses against transformers' on the same batches: the first, then all.

    With ``relative`` the tolerances bound ``|Δ| / |HF loss|``, else ``|Δ|``.
    """
    ref = losses[REF]
    measure_name = "rel. |Δ|" if relative else "|Δ|"
    checks = []
    for name, ours in losses.items():
        if name == REF:
            continue
        who = tag if len(losses) == 2 else f"{tag}, {name}"
        diffs = [abs(a - b) / (abs(b) if relative else 1.0) for a, b in zip(ours, ref)]
        checks.append(Check(
            f"initial loss ({who})",
            diffs[0] <= initial_tol,
            f"llmlab {ours[0]:.6f} vs HF {ref[0]:.6f} ({measure_name} {diffs[0]:.1e}, tol {initial_tol:g})",
        ))
        checks.append(Check(
            f"training losses ({who}, {len(diffs)} steps, same batches)",
            max(diffs) <= curve_tol,
            f"last llmlab {ours[-1]:.6f} vs HF {ref[-1]:.6f}, "
            f"max {measure_name} {max(diffs):.1e} (tol {curve_tol:g})",
        ))
    return checks


def profile_steps(title: str, steppers: dict[str, Callable[[int], Any]], row_limit: int = 15) -> str:
    """torch.profiler tables (top ops by self CPU time) of steps 1 and 2 of each stepper, after step 0."""
    from torch.profiler import ProfilerActivity, profile, record_function

    parts = [f"## profile: {title}, 2 steps after 1 warm-up"]
    for name, step in steppers.items():
        step(0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in (1, 2):
                with record_function(f"{name}_step"):
                    step(i)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
        parts.append(f"### {name}\n```\n{table}\n```")
    return "\n\n".join(parts)
