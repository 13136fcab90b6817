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
  tokens: llmlab with and without its KV cache, HF ``generate`` with ``use_cache=True`` and
  ``False``. Median of ``--gen-repeats`` runs, variants interleaved. On the ``bpe`` configuration
  (the 50,257 x 256 head is most of the arithmetic: a step streams its 51 MB from memory, the
  same work in both libraries) and, with ``--config all|char``, on the ``char`` one (the small
  presets such as ``gpt_nano``: there a step is mostly per-token Python overhead, which is what
  llmlab's lean decode step removes; rows labelled ``char:``).

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
from dataclasses import dataclass
from typing import Callable

import torch

from llmlab.bench import vs_hf
from llmlab.bench.common import logger
from llmlab.nn.losses import IGNORE_INDEX

_log = logger("gpt")


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


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = vs_hf.ArgParser(
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
    vs_hf.add_options(p, DEFAULTS, QUICK)
    vs_hf.add_generate_options(p, DEFAULTS)
    p.add_argument("--prompt-len", type=int, help=f"prompt tokens (default {DEFAULTS['prompt_len']})")
    return p


def run(args: argparse.Namespace) -> tuple[vs_hf.BenchResult, str]:
    """Run the benchmarks described by parsed ``args``; returns the result and the profile text."""
    args = vs_hf.resolve_args(args, DEFAULTS, QUICK, at_least_one=("gen_tokens", "gen_repeats", "prompt_len"))
    setups = QUICK_SETUPS if args.quick else SETUPS
    chosen = [s for name, s in setups.items() if args.config in ("all", name)]
    describe = (
        f"Generate: batch 1, greedy, {args.prompt_len}-token prompt + {args.gen_tokens} new tokens, "
        f"median of {args.gen_repeats}."
    )

    def train(result: vs_hf.BenchResult) -> None:
        for setup in chosen:
            _bench_train(setup, args, result)
            gc.collect()

    def generate(result: vs_hf.BenchResult) -> None:
        _bench_generate(setups["bpe"], args, result)
        if args.config in ("all", "char"):
            _bench_generate(setups["char"], args, result, "char: ")

    return vs_hf.run_phases("gpt", args, describe, {
        "train": train,
        "generate": generate,
        "profile": lambda result: "\n\n".join(_profile_train(s, args) for s in chosen),
    })


main = vs_hf.make_main("gpt", build_parser, run)


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
    gen = torch.Generator().manual_seed(args.seed + 1)
    B, T = setup.batch_size, setup.seq_len
    xs = [torch.randint(0, setup.vocab_size, (B, T), generator=gen) for _ in range(n_batches)]
    # llmlab's targets are pre-shifted; the last position has no next token in the window, which
    # is exactly what HF's internal shift of labels=x drops: both score the same T - 1 predictions
    pad = torch.full((B, 1), IGNORE_INDEX, dtype=torch.long)
    ys = [torch.cat([x[:, 1:], pad], dim=1) for x in xs]
    return {
        "llmlab": vs_hf.adamw_stepper(ours, args.lr, lambda i: ours(xs[i], ys[i])[1]),
        vs_hf.REF: vs_hf.adamw_stepper(
            theirs, args.lr, lambda i: theirs(input_ids=xs[i], labels=xs[i], use_cache=False).loss
        ),
    }


# ----------------------------------------------------------------------------- training
def _bench_train(setup: TrainSetup, args: argparse.Namespace, result: vs_hf.BenchResult) -> None:
    _log(f"training {setup.label.removeprefix('train tok/s ')}: building both models")
    steppers = _train_steppers(setup, args, args.warmup + args.steps)
    timed = vs_hf.time_steps(steppers, f"{setup.name} train", args, setup.batch_size * setup.seq_len, _log)
    losses = vs_hf.train_rows(result, timed, {"llmlab": setup.label})
    result.checks += vs_hf.loss_checks(setup.name, losses, INITIAL_LOSS_ATOL, TRAIN_LOSS_ATOL)


# ----------------------------------------------------------------------------- generation
def _bench_generate(setup: TrainSetup, args: argparse.Namespace, result: vs_hf.BenchResult, prefix: str = "") -> None:
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
    timed = vs_hf.time_generate(variants, args, _log)
    timed.what = f"{prefix}generate"
    result.add_timing(timed)
    med = {n: timed.median(n) for n in variants}
    result.rows.append(vs_hf.Row(f"{prefix}generate tok/s, KV cache", med["llmlab KV cache"], med["HF KV cache"]))
    result.rows.append(vs_hf.Row(f"{prefix}generate tok/s, no cache", med["llmlab no cache"], med["HF no cache"]))
    if not prefix:
        result.rows.append(
            vs_hf.Row(
                "KV-cache speed-up (cache / no cache)",
                med["llmlab KV cache"] / med["llmlab no cache"],
                med["HF KV cache"] / med["HF no cache"],
                unit="×",
            )
        )
    # all variants must equal llmlab's uncached output (the plainest computation)
    outputs = vs_hf.distinct_outputs(timed)

    def next_logits(prefix: torch.Tensor) -> torch.Tensor:  # llmlab's logits of the token after prefix
        return ours(prefix, last_only=True)[0, -1]

    check = vs_hf.greedy_parity(outputs, "llmlab no cache", T0, next_logits)
    check.name = f"{prefix}{check.name}"
    result.checks.append(check)


# ----------------------------------------------------------------------------- profiling
def _profile_train(setup: TrainSetup, args: argparse.Namespace) -> str:
    """torch.profiler tables (top ops by self CPU time) of 2 training steps of each model."""
    _log(f"profiling {setup.name} training")
    return vs_hf.profile_steps(setup.label.removeprefix("train tok/s "), _train_steppers(setup, args, 3))


if __name__ == "__main__":
    main()
