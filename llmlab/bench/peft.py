"""``llmlab bench peft``: LoRA fine-tuning with llmlab vs ``transformers`` + ``peft``, side by side.

Both sides start from the *same* GPT-2 weights (:func:`llmlab.bench.gpt.make_pair`) and the *same*
LoRA weights (llmlab's init, with ``lora_B`` randomised so the adapter matters, copied into peft's
``default`` adapter), run in one process with the same threads on the same batches. Measured:
training tokens/s (forward + backward + AdamW over the LoRA parameters, dropout 0, fp32) on the
``bpe`` and ``char`` configurations of ``llmlab bench gpt``, interleaved rounds, median per round.

Parity checks: the trainable parameter counts are equal; the initial losses agree and the loss
curves stay together (the same LoRA update computed by two implementations); after training the
base weights of both are unchanged.
"""

from __future__ import annotations

import argparse
import gc

import torch

from llmlab.bench import vs_hf
from llmlab.bench.common import logger
from llmlab.bench.gpt import QUICK_SETUPS, SETUPS, TrainSetup, make_pair
from llmlab.nn.losses import IGNORE_INDEX

_log = logger("peft")

DEFAULTS = dict(steps=10, rounds=3, warmup=3)
QUICK = dict(steps=2, rounds=1, warmup=1)
INITIAL_LOSS_ATOL = 1e-4
TRAIN_LOSS_ATOL = 2e-3


def build_parser() -> argparse.ArgumentParser:
    p = vs_hf.ArgParser(
        prog="llmlab bench peft",
        description=("LoRA training tokens/s of llmlab (peft=lora) vs transformers + peft (LoraConfig) on the same "
                     "GPT-2 weights, LoRA weights and batches, with parity checks."),
    )
    p.add_argument("--config", choices=("all", *SETUPS), default="all", help="training configuration(s) (default: all)")
    p.add_argument("--r", type=_rank, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--target-modules", default="c_attn", help="comma-separated target modules (default c_attn)")
    vs_hf.add_options(p, DEFAULTS, QUICK, default_lr=1e-3)
    return p


def _rank(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--r={text}: the LoRA rank must be a positive integer")
    return int(text)


def run(args: argparse.Namespace) -> tuple[vs_hf.BenchResult, str]:
    args = vs_hf.resolve_args(args, DEFAULTS, QUICK)
    setups = QUICK_SETUPS if args.quick else SETUPS
    chosen = [s for name, s in setups.items() if args.config in ("all", name)]
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    describe = f"LoRA r={args.r}, alpha={args.lora_alpha:g} on {', '.join(targets)}; AdamW lr {args.lr:g}."

    def train(result: vs_hf.BenchResult) -> None:
        for setup in chosen:
            _bench_train(setup, args, targets, result)
            gc.collect()

    return vs_hf.run_phases("peft", args, describe, {
        "train": train,
        "profile": lambda result: "\n\n".join(vs_hf.profile_steps(s.name, _steppers(s, args, targets, 3)[0])
                                              for s in chosen),
    })


main = vs_hf.make_main("peft", build_parser, run)


def lora_pair(setup: TrainSetup, args: argparse.Namespace, targets: list[str]):
    """(llmlab GPT with LoRA, peft-wrapped GPT2LMHeadModel) with the same base and LoRA weights."""
    from peft import LoraConfig, get_peft_model

    from llmlab.peft import apply_peft

    ours, theirs = make_pair(setup.vocab_size, setup.seq_len, setup.n_layer, setup.n_head, setup.n_embd, args.seed)
    apply_peft(ours, {"name": "lora", "r": args.r, "lora_alpha": args.lora_alpha, "target_modules": targets})
    theirs = get_peft_model(theirs, LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=targets,
                                               lora_dropout=0.0, fan_in_fan_out=True))
    gen = torch.Generator().manual_seed(args.seed + 3)
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if not p.requires_grad:
                continue
            if ".lora_B." in name:
                p.normal_(0.0, 0.02, generator=gen)  # B = 0 would make both sides trivially equal
            key = "base_model.model." + name.replace(".weight", ".default.weight")
            their_params[key].copy_(p)
    return ours, theirs


def _steppers(setup: TrainSetup, args: argparse.Namespace, targets: list[str], n_batches: int):
    ours, theirs = lora_pair(setup, args, targets)
    gen = torch.Generator().manual_seed(args.seed + 1)
    B, T = setup.batch_size, setup.seq_len
    xs = [torch.randint(0, setup.vocab_size, (B, T), generator=gen) for _ in range(n_batches)]
    pad = torch.full((B, 1), IGNORE_INDEX, dtype=torch.long)
    ys = [torch.cat([x[:, 1:], pad], dim=1) for x in xs]
    steppers = {
        "llmlab": vs_hf.adamw_stepper(ours, args.lr, lambda i: ours(xs[i], ys[i])[1]),
        vs_hf.REF: vs_hf.adamw_stepper(theirs, args.lr,
                                       lambda i: theirs(input_ids=xs[i], labels=xs[i], use_cache=False).loss),
    }
    return steppers, ours, theirs


def _bench_train(setup: TrainSetup, args: argparse.Namespace, targets: list[str], result: vs_hf.BenchResult) -> None:
    from llmlab.peft import count_parameters

    _log(f"LoRA training {setup.label.removeprefix('train tok/s ')}: building both models")
    steppers, ours, theirs = _steppers(setup, args, targets, args.warmup + args.steps)
    base_before = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    ours_n = count_parameters(ours)["trainable"]
    theirs_n = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    result.checks.append(vs_hf.Check(f"{setup.name} trainable parameters", ours_n == theirs_n,
                                     f"llmlab {ours_n:,} vs peft {theirs_n:,}"))
    timed = vs_hf.time_steps(steppers, f"{setup.name} LoRA train", args, setup.batch_size * setup.seq_len, _log)
    losses = vs_hf.train_rows(result, timed, {"llmlab": setup.label.replace("train tok/s", "LoRA train tok/s")})
    result.checks += vs_hf.loss_checks(setup.name, losses, INITIAL_LOSS_ATOL, TRAIN_LOSS_ATOL)
    after = ours.state_dict()
    same = all(torch.equal(after[k], v) for k, v in base_before.items())
    result.checks.append(vs_hf.Check(f"{setup.name} base weights unchanged", same,
                                     "llmlab's frozen GPT-2 weights bit-identical after training"))


if __name__ == "__main__":
    main()
