"""``llmlab bench bert``: llmlab's BERT against Hugging Face's ``BertForPreTraining``, side by side.

Both models are built from the *same* configuration (dropout 0, so that they compute the same
thing) and start from the *same* weights (llmlab's random init, copied into the HF model with
:meth:`Bert.to_hf_state_dict` as ``tests/models/test_bert.py`` does), run in one process with the
same number of threads, on the same batches: ``[CLS] A [SEP] B``-shaped rows of random ids
(lengths between T/2 and T, the rest padding; segment B from the middle), 15 % of the real
positions replaced by ``[MASK]`` and labelled (the rest -100), a random next-sentence label per row.
Measured (tokens = B × T positions, padding included):

* **training tokens/s**: forward + backward + ``torch.optim.AdamW`` step of the MLM + NSP loss.
  llmlab's main row uses ``masked_only=True`` (vocabulary logits at the labelled positions only,
  how llmlab's BERT method trains); the second row is llmlab computing logits at every position,
  as HF always does. The three take turns in interleaved rounds (who goes first rotates) and the
  table shows the median of the per-round tokens/s, because timings on a shared CPU drift.
* **inference tokens/s**: forward only under ``torch.no_grad``, eval mode, no labels: both
  heads' logits at every position (what fill-mask needs), from fresh models at init.

Parity checks (a failure is reported on stderr and exits with code 1): the MLM and NSP logits of
the fresh models agree on the first batch; the initial losses and the loss curves over all
training steps agree to a relative ``1e-5`` (both start from the same weights and see the same
batches; llmlab with and without ``masked_only``).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch

from llmlab.bench import vs_hf
from llmlab.bench.common import logger
from llmlab.nn.losses import IGNORE_INDEX

_log = logger("bert")

PAD_ID, MASK_ID, FIRST_WORD_ID = 0, 4, 5  # ids 0-4: [PAD] [UNK] [CLS] [SEP] [MASK], as llmlab's WordPiece
MLM_PROBABILITY = 0.15


@dataclass(frozen=True)
class Setup:
    """Model shape (feed-forward 4 × hidden) and batch shape."""

    vocab_size: int
    layers: int
    hidden: int
    heads: int
    batch_size: int
    seq_len: int

    @property
    def shape(self) -> str:
        return f"{self.layers}L/{self.hidden}d, vocab {self.vocab_size}, B{self.batch_size}×T{self.seq_len}"


SETUP = Setup(vocab_size=8192, layers=4, hidden=256, heads=4, batch_size=16, seq_len=128)
QUICK_SETUP = Setup(vocab_size=8192, layers=2, hidden=64, heads=2, batch_size=4, seq_len=32)
DEFAULTS = dict(steps=10, rounds=3, warmup=3)
QUICK = dict(steps=2, rounds=1, warmup=1)

# agreement tolerances (fp32; the two models run different kernels in a different order)
LOSS_RTOL = 1e-5
LOGITS_ATOL = 1e-5

# the llmlab training variants and how each calls forward
VARIANTS = {"llmlab masked-only": dict(masked_only=True), "llmlab full logits": dict(masked_only=False)}


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = vs_hf.ArgParser(
        prog="llmlab bench bert",
        description=(
            "Training and inference tokens/s of llmlab's BERT vs transformers' BertForPreTraining "
            "(MLM + NSP; same config, same weights, same batches, one process), with parity checks."
        ),
    )
    vs_hf.add_options(p, DEFAULTS, QUICK, default_lr=1e-4)
    p.add_argument("--no-infer", action="store_true", help="skip the inference benchmark")
    return p


def run(args: argparse.Namespace) -> tuple[vs_hf.BenchResult, str]:
    """Run the benchmarks described by parsed ``args``; returns the result and the profile text."""
    args = vs_hf.resolve_args(args, DEFAULTS, QUICK)
    setup = QUICK_SETUP if args.quick else SETUP
    describe = (
        f"MLM {MLM_PROBABILITY:.0%} of real positions + NSP; inference: forward, no grad, logits at every "
        f"position, {args.warmup} warm-up + {args.steps} timed batches per model. tok/s counts B×T positions."
    )
    return vs_hf.run_phases("bert", args, describe, {
        "train": lambda result: _bench_train(setup, args, result),
        "infer": lambda result: _bench_infer(setup, args, result),
        "profile": lambda result: vs_hf.profile_steps(setup.shape, _train_steppers(setup, args, 3)),
    })


main = vs_hf.make_main("bert", build_parser, run)


# ----------------------------------------------------------------------------- models and data
def make_pair(setup: Setup, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(llmlab Bert, transformers BertForPreTraining) with identical config and weights, dropout 0."""
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForPreTraining

    from llmlab.models.bert import Bert, BertConfig

    torch.manual_seed(seed)
    ours = Bert(BertConfig(
        vocab_size=setup.vocab_size,
        hidden_size=setup.hidden,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        intermediate_size=4 * setup.hidden,
        max_position_embeddings=setup.seq_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD_ID,
        attn_impl="sdpa",
    ))
    theirs = BertForPreTraining(HFBertConfig(**ours.to_hf_config(), attn_implementation="sdpa"))
    theirs.load_state_dict(ours.to_hf_state_dict(), strict=True)
    assert theirs.config._attn_implementation == "sdpa", theirs.config._attn_implementation
    assert theirs.cls.predictions.decoder.weight is theirs.bert.embeddings.word_embeddings.weight
    return ours, theirs


def make_batches(setup: Setup, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` random MLM + NSP batches as ``forward`` keyword arguments (HF's names, which llmlab shares)."""
    g = torch.Generator().manual_seed(seed)
    B, T = setup.batch_size, setup.seq_len
    positions = torch.arange(T)
    batches = []
    for _ in range(n):
        lengths = torch.randint(T // 2, T + 1, (B, 1), generator=g)
        real = positions < lengths  # (B, T)
        ids = torch.randint(FIRST_WORD_ID, setup.vocab_size, (B, T), generator=g).masked_fill(~real, PAD_ID)
        picked = (torch.rand(B, T, generator=g) < MLM_PROBABILITY) & real
        picked[:, 1] = True  # every row predicts something
        batches.append(dict(
            input_ids=ids.masked_fill(picked, MASK_ID),
            attention_mask=real.long(),
            token_type_ids=((positions >= lengths // 2) & real).long(),  # segment B from the middle
            labels=ids.masked_fill(~picked, IGNORE_INDEX),
            next_sentence_label=torch.randint(0, 2, (B,), generator=g),
        ))
    return batches


def _train_steppers(setup: Setup, args: argparse.Namespace, n_batches: int):
    """llmlab (masked-only and full logits) and HF, one ``step(i) -> loss`` each, on the same batches."""
    ours, theirs = make_pair(setup, args.seed)
    batches = make_batches(setup, n_batches, args.seed + 1)
    steppers = {}
    for name, kw in VARIANTS.items():
        model = copy.deepcopy(ours)  # each variant trains its own copy (deepcopy keeps the tied decoder tied)
        steppers[name] = vs_hf.adamw_stepper(model, args.lr, lambda i, m=model, kw=kw: m(**batches[i], **kw).loss)
    steppers[vs_hf.REF] = vs_hf.adamw_stepper(theirs, args.lr, lambda i: theirs(**batches[i]).loss)
    return steppers


# ----------------------------------------------------------------------------- training
def _bench_train(setup: Setup, args: argparse.Namespace, result: vs_hf.BenchResult) -> None:
    _log(f"training {setup.shape}: building the models")
    steppers = _train_steppers(setup, args, args.warmup + args.steps)
    timed = vs_hf.time_steps(steppers, "train", args, setup.batch_size * setup.seq_len, _log)
    labels = {
        "llmlab masked-only": f"train tok/s ({setup.shape}), llmlab masked-only logits",
        "llmlab full logits": f"train tok/s ({setup.shape}), llmlab full logits",
    }
    losses = vs_hf.train_rows(result, timed, labels)
    result.checks += vs_hf.loss_checks("MLM + NSP", losses, LOSS_RTOL, LOSS_RTOL, relative=True)


# ----------------------------------------------------------------------------- inference
def _bench_infer(setup: Setup, args: argparse.Namespace, result: vs_hf.BenchResult) -> None:
    _log(f"inference {setup.shape}: building both models")
    ours, theirs = make_pair(setup, args.seed)
    ours.eval()
    theirs.eval()
    batches = [
        {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        for b in make_batches(setup, args.warmup + args.steps, args.seed + 2)
    ]
    models = {"llmlab": ours, vs_hf.REF: theirs}

    def forward(model: torch.nn.Module):
        def call(i: int) -> None:  # returns nothing: every batch's (B, T, V) logits would pile up
            model(**batches[i])

        return call

    with torch.no_grad():
        result.checks.append(_logits_check(ours(**batches[0]), theirs(**batches[0])))  # untimed
        fns = {name: forward(m) for name, m in models.items()}
        timed = vs_hf.time_steps(fns, "infer", args, setup.batch_size * setup.seq_len, _log)
    result.add_timing(timed)
    label = f"inference tok/s ({setup.shape}), forward, no grad"
    result.rows.append(vs_hf.Row(label, timed.median("llmlab"), timed.median(vs_hf.REF)))


def _logits_check(ours, theirs) -> vs_hf.Check:
    """The fresh models' MLM and NSP logits on the same batch."""
    mlm = (ours.prediction_logits - theirs.prediction_logits).abs().max().item()
    nsp = (ours.seq_relationship_logits - theirs.seq_relationship_logits).abs().max().item()
    return vs_hf.Check(
        "MLM and NSP logits at init (first batch)",
        max(mlm, nsp) <= LOGITS_ATOL,
        f"max |Δ| MLM {mlm:.1e}, NSP {nsp:.1e} (tol {LOGITS_ATOL:g})",
    )


if __name__ == "__main__":
    main()
