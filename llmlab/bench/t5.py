"""``llmlab bench t5``: llmlab's T5 against Hugging Face's ``T5ForConditionalGeneration``, side by side.

Both models are built from the *same* configuration (dropout 0) and start from the *same* weights:
llmlab's random init, exported with :meth:`T5.to_hf_config` / :meth:`T5.to_hf_state_dict` to a
temporary directory and loaded with ``from_pretrained``, as ``tests/models/test_t5.py`` checks the
export (this keeps an untied output layer untied, which ``load_state_dict`` into a fresh HF model
does not). They run in one process with the same number of threads, on the same batches. The
default model is a tiny T5 v1.1 (GeGLU feed-forward, untied output layer, as Flan-T5): at a
random init a tied v1.0 head greedily repeats the decoder-start token, which would make the
generation parity check vacuous; ``--arch v1.0`` times the ReLU / tied shape instead. Measured:

* **training tokens/s** (tokens = encoder input + decoder target, B × (S + T)): forward +
  backward + ``torch.optim.AdamW`` step on span-corruption-shaped batches (random ids, S input
  tokens, T target tokens with the last quarter of some rows -100 as shorter targets). The two
  models take turns in interleaved rounds (the order flips every round) and the table shows the
  median of the per-round tokens/s, because timings on a shared CPU drift.
* **generation tokens/s**: batch 1, an S-token input, greedy, ``--gen-tokens`` new tokens with
  the KV cache: llmlab ``T5.generate(use_cache=True)`` vs HF ``generate(do_sample=False,
  num_beams=1, use_cache=True, min_new_tokens=max_new_tokens=n)``. Neither has an end-of-sequence
  token here, so both always decode ``n`` tokens. Median of ``--gen-repeats`` runs, interleaved.

Parity checks (a failure is reported on stderr and exits with code 1): the initial losses and the
loss curves over all training steps agree to a relative ``1e-5``, and both libraries generate the
same token ids.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmlab.bench import vs_hf
from llmlab.bench.common import logger
from llmlab.nn.losses import IGNORE_INDEX

_log = logger("t5")

FIRST_WORD_ID = 2  # 0 = pad (= decoder start), 1 = end of sequence


@dataclass(frozen=True)
class Setup:
    """Model shape (d_kv = d_model / heads, d_ff = 4 × d_model) and batch shape."""

    vocab_size: int
    d_model: int
    layers: int  # encoder blocks = decoder blocks
    heads: int
    batch_size: int
    input_len: int
    target_len: int

    @property
    def shape(self) -> str:
        return f"{self.layers}+{self.layers}L/{self.d_model}d, vocab {self.vocab_size}"

    @property
    def batch(self) -> str:
        return f"B{self.batch_size}×(S{self.input_len}+T{self.target_len})"


SETUP = Setup(vocab_size=8192, d_model=256, layers=4, heads=4, batch_size=16, input_len=128, target_len=32)
QUICK_SETUP = Setup(vocab_size=8192, d_model=64, layers=2, heads=2, batch_size=4, input_len=32, target_len=8)
DEFAULTS = dict(steps=10, rounds=3, warmup=3, gen_tokens=64, gen_repeats=3)
QUICK = dict(steps=2, rounds=1, warmup=1, gen_tokens=8, gen_repeats=1)
ARCHS = {  # T5Config fields of each architecture
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}

LOSS_RTOL = 1e-5  # fp32; the two models run different kernels in a different order


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = vs_hf.ArgParser(
        prog="llmlab bench t5",
        description=(
            "Training and greedy-generation tokens/s of llmlab's T5 vs transformers' "
            "T5ForConditionalGeneration (same config, same weights, same batches, one process), "
            "with parity checks."
        ),
    )
    p.add_argument(
        "--arch",
        choices=tuple(ARCHS),
        default="v1.1",
        help="v1.1 = GeGLU feed-forward + untied output layer (default); v1.0 = ReLU + tied, scaled output",
    )
    vs_hf.add_options(p, DEFAULTS, QUICK)
    vs_hf.add_generate_options(p, DEFAULTS)
    return p


def run(args: argparse.Namespace) -> tuple[vs_hf.BenchResult, str]:
    """Run the benchmarks described by parsed ``args``; returns the result and the profile text."""
    args = vs_hf.resolve_args(args, DEFAULTS, QUICK, at_least_one=("gen_tokens", "gen_repeats"))
    setup = QUICK_SETUP if args.quick else SETUP
    describe = (
        f"T5 {args.arch} ({ARCHS[args.arch]['feed_forward_proj']}, "
        f"{'tied' if ARCHS[args.arch]['tie_word_embeddings'] else 'untied'} output layer); train tok/s counts "
        f"input + target tokens. Generate: batch 1, {setup.input_len}-token input, greedy, KV cache, "
        f"{args.gen_tokens} new tokens, median of {args.gen_repeats}."
    )
    return vs_hf.run_phases("t5", args, describe, {
        "train": lambda result: _bench_train(setup, args, result),
        "generate": lambda result: _bench_generate(setup, args, result),
        "profile": lambda result: vs_hf.profile_steps(
            f"{setup.shape}, {setup.batch}", _train_steppers(setup, args, 3)
        ),
    })


main = vs_hf.make_main("t5", build_parser, run)


# ----------------------------------------------------------------------------- models and data
def make_pair(setup: Setup, arch: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(llmlab T5, transformers T5ForConditionalGeneration) with identical config and weights, dropout 0.

    Neither model has an end-of-sequence token: nothing may stop greedy decoding early.
    """
    from safetensors.torch import save_file
    from transformers import T5ForConditionalGeneration

    from llmlab.models.t5 import T5, T5Config

    torch.manual_seed(seed)
    ours = T5(T5Config(
        vocab_size=setup.vocab_size,
        d_model=setup.d_model,
        d_kv=setup.d_model // setup.heads,
        d_ff=4 * setup.d_model,
        num_layers=setup.layers,
        num_heads=setup.heads,
        dropout_rate=0.0,
        attn_impl="sdpa",
        **ARCHS[arch],
    ))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({**ours.to_hf_config(), "eos_token_id": None}))
        weights = {k: v.clone().contiguous() for k, v in ours.to_hf_state_dict().items()}  # no shared memory
        save_file(weights, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        theirs = T5ForConditionalGeneration.from_pretrained(tmp, attn_implementation="sdpa")
    assert theirs.config._attn_implementation == "sdpa", theirs.config._attn_implementation
    assert (theirs.lm_head.weight is theirs.shared.weight) == ours.config.tie_word_embeddings
    return ours, theirs


def make_batches(setup: Setup, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` span-corruption-shaped batches as ``forward`` keyword arguments (HF's names, which llmlab shares)."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = setup.batch_size, setup.input_len, setup.target_len
    batches = []
    for _ in range(n):
        labels = torch.randint(FIRST_WORD_ID, setup.vocab_size, (B, T), generator=g)
        shorter = torch.rand(B, 1, generator=g) < 0.5  # half the rows end 3/4 of the way
        labels = labels.masked_fill(shorter & (torch.arange(T) >= T - T // 4), IGNORE_INDEX)
        batches.append(dict(
            input_ids=torch.randint(FIRST_WORD_ID, setup.vocab_size, (B, S), generator=g),
            attention_mask=torch.ones(B, S, dtype=torch.long),
            labels=labels,
        ))
    return batches


def _train_steppers(setup: Setup, args: argparse.Namespace, n_batches: int):
    """Both models, one ``step(i) -> loss`` per model, on the same ``n_batches`` random batches."""
    ours, theirs = make_pair(setup, args.arch, args.seed)
    batches = make_batches(setup, n_batches, args.seed + 1)
    return {
        "llmlab": vs_hf.adamw_stepper(ours, args.lr, lambda i: ours(**batches[i]).loss),
        vs_hf.REF: vs_hf.adamw_stepper(theirs, args.lr, lambda i: theirs(**batches[i], use_cache=False).loss),
    }


# ----------------------------------------------------------------------------- training
def _bench_train(setup: Setup, args: argparse.Namespace, result: vs_hf.BenchResult) -> None:
    _log(f"training {setup.shape}, {setup.batch}: building both models")
    steppers = _train_steppers(setup, args, args.warmup + args.steps)
    tokens = setup.batch_size * (setup.input_len + setup.target_len)
    timed = vs_hf.time_steps(steppers, "train", args, tokens, _log)
    losses = vs_hf.train_rows(result, timed, {"llmlab": f"train tok/s ({setup.shape}, {setup.batch})"})
    result.checks += vs_hf.loss_checks("span corruption", losses, LOSS_RTOL, LOSS_RTOL, relative=True)


# ----------------------------------------------------------------------------- generation
def _bench_generate(setup: Setup, args: argparse.Namespace, result: vs_hf.BenchResult) -> None:
    n_new = args.gen_tokens
    _log(f"generation: {setup.shape}, {setup.input_len}-token input + {n_new} new tokens")
    ours, theirs = make_pair(setup, args.arch, args.seed)
    ours.eval()
    theirs.eval()
    x = make_batches(replace(setup, batch_size=1), 1, args.seed + 2)[0]["input_ids"]
    mask = torch.ones_like(x)
    variants = {
        "llmlab": lambda n: ours.generate(x, mask, n, use_cache=True, eos_token_id=None),
        vs_hf.REF: lambda n: theirs.generate(
            input_ids=x,
            attention_mask=mask,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            max_new_tokens=n,
            min_new_tokens=n,
        ),
    }
    timed = vs_hf.time_generate(variants, args, _log)
    result.add_timing(timed)
    result.rows.append(vs_hf.Row(
        f"generate tok/s ({setup.shape}, batch 1, S{setup.input_len}, greedy, KV cache)",
        timed.median("llmlab"),
        timed.median(vs_hf.REF),
    ))
    result.checks.append(_greedy_parity(ours, x, vs_hf.distinct_outputs(timed)))


def _greedy_parity(ours: torch.nn.Module, x: torch.Tensor, outputs: dict[str, torch.Tensor]) -> vs_hf.Check:
    """Every output (both libraries, every repeat) must equal llmlab's first."""
    def next_logits(prefix: torch.Tensor) -> torch.Tensor:  # of the token after prefix (decoder start first)
        return ours(x, decoder_input_ids=prefix).logits[0, -1]

    return vs_hf.greedy_parity(outputs, "llmlab", 1, next_logits)


if __name__ == "__main__":
    main()
