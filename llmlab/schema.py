"""Check the composed config before anything runs (`llmlab train|eval|infer`).

Hydra composes whatever the command line says: ``trainer.max_steps=abc`` arrives as the string
``'abc'``, ``optim.lr=-1`` as a number, and either would fail minutes later deep inside Lightning or
torch (or, worse, not fail at all). :func:`validate` checks the table :data:`RULES` and a few
checks that span keys, and raises a :class:`~llmlab.errors.UserError` (one line, exit code 2)
naming the key, its value and the fix.

Only keys present in the composed config are checked: commands and methods have different keys
(infer has no ``trainer``, word2vec no ``optim``), and a value still ``???`` is left to the task
(which names the missing key). Values are resolved first (interpolations!); a value that does not
resolve is a user error too.

Nothing here imports torch or lightning at module import time, so bad input fails in well under a
second; torch is imported only to ask for a GPU when the config asks for one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue, OmegaConfBaseException

from llmlab.distill import OBJECTIVES, STUDENT_INITS
from llmlab.distributed import check_strategy
from llmlab.errors import UserError
from llmlab.quant import BACKENDS, MAX_BITS, MIN_BITS, QAT_SCHEMES, SCHEMES

_ABSENT = object()  # the key is not in this config (or is still ???)

# ---------------------------------------------------------------------------- value checks


def boolean(v: Any) -> bool:
    return isinstance(v, bool)  # only real booleans: not 1, "yes" or "maybe"


def integer(min: int | None = None) -> Callable[[Any], bool]:  # noqa: A002 — reads well in the table
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and (min is None or v >= min)


def number(gt: float | None = None, ge: float | None = None, le: float | None = None) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (gt is None or v > gt) and (ge is None or v >= ge) and (le is None or v <= le)

    return check


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def fraction(v: Any) -> bool:
    """In [0, 1): a share of something, where all of it is not allowed (prune.amount)."""
    return number(ge=0)(v) and v < 1


def integer_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: integer(min=low)(v) and v <= high


def one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


def list_of_str(v: Any) -> bool:
    return isinstance(v, (list, ListConfig)) and all(isinstance(x, str) for x in v)


def val_interval(v: Any) -> bool:
    """Lightning: an int is a number of training batches, a float a fraction of an epoch."""
    if isinstance(v, float):
        return number(gt=0, le=1)(v)
    return integer(min=1)(v)


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Rule:
    key: str                       # dotted key in the composed config
    check: Callable[[Any], bool]   # True = the resolved value is fine
    must: str                      # what the value must be ("{key}={value} is not <must>")
    fix: str                       # how to write it; may use {key} and {value}


RULES: tuple[Rule, ...] = (
    Rule("seed", integer(), "an integer", "e.g. seed=1337"),
    Rule("test", boolean, "true or false", "e.g. test=false"),
    Rule("trainer.max_steps", integer(min=-1), "an integer >= -1 (-1 = no step limit)", "e.g. trainer.max_steps=1000"),
    Rule("trainer.max_epochs", optional(integer(min=-1)), "null or an integer >= -1 (-1 = no epoch limit)",
         "e.g. trainer.max_epochs=5"),
    Rule("trainer.val_check_interval", optional(val_interval),
         "> 0: an integer number of batches or a fraction of an epoch in (0, 1]", "e.g. trainer.val_check_interval=250"),
    Rule("trainer.log_every_n_steps", integer(min=1), "an integer >= 1", "e.g. trainer.log_every_n_steps=10"),
    Rule("trainer.accumulate_grad_batches", integer(min=1), "an integer >= 1", "e.g. trainer.accumulate_grad_batches=4"),
    Rule("trainer.gradient_clip_val", optional(number(ge=0)), "null or a number >= 0",
         "e.g. trainer.gradient_clip_val=1.0"),
    Rule("trainer.enable_model_summary", boolean, "true or false", "e.g. trainer.enable_model_summary=false"),
    Rule("optim.lr", number(gt=0), "a number > 0", "e.g. optim.lr=3e-4"),
    Rule("optim.weight_decay", number(ge=0), "a number >= 0", "e.g. optim.weight_decay=0.1"),
    Rule("optim.scheduler.warmup_steps", integer(min=0), "an integer >= 0", "e.g. optim.scheduler.warmup_steps=100"),
    Rule("optim.scheduler.min_lr", number(ge=0), "a number >= 0", "e.g. optim.scheduler.min_lr=1e-4"),
    Rule("data.batch_size", optional(integer(min=1)), "an integer >= 1", "e.g. data.batch_size=32"),
    Rule("data.eval_batch_size", optional(integer(min=1)), "an integer >= 1", "e.g. data.eval_batch_size=64"),
    Rule("data.num_workers", integer(min=0), "an integer >= 0", "e.g. data.num_workers=0"),
    Rule("data.genres", optional(list_of_str), "null or a list of genres", "write it as a list, data.genres=[{value}]"),
    Rule("data.max_length", integer(min=1), "an integer >= 1", "e.g. data.max_length=128"),
    Rule("data.passage_lines", integer(min=1), "an integer >= 1", "e.g. data.passage_lines=4"),
    Rule("data.max_passages_per_play", optional(integer(min=1)), "null or an integer >= 1",
         "e.g. data.max_passages_per_play=200"),
    Rule("data.balanced", boolean, "true or false", "e.g. data.balanced=true"),
    Rule("method.pooling", one_of("auto", "last", "cls", "mean"), "auto, last, cls or mean", "e.g. method.pooling=auto"),
    Rule("method.classifier_dropout", number(ge=0, le=0.99), "a probability in [0, 1)", "e.g. method.classifier_dropout=0.1"),
    Rule("method.objective", one_of(*OBJECTIVES), ", ".join(OBJECTIVES), "e.g. method.objective=forward_kl"),
    Rule("method.student_init", optional(one_of(*STUDENT_INITS)), "null (a fresh model= preset) or every_other (DistilBERT)",
         "e.g. method.student_init=every_other"),
    Rule("method.temperature", number(gt=0), "a number > 0", "e.g. method.temperature=2.0"),
    Rule("generation.max_new_tokens", integer(min=0), "an integer >= 0", "e.g. generation.max_new_tokens=200"),
    Rule("generation.temperature", number(ge=0), "a number >= 0 (0 = greedy)", "e.g. generation.temperature=0.8"),
    Rule("generation.top_k", optional(integer(min=1)), "null or an integer >= 1", "e.g. generation.top_k=200"),
    Rule("generation.top_p", optional(number(gt=0, le=1)), "null or a number in (0, 1]", "e.g. generation.top_p=0.9"),
    Rule("generation.min_p", optional(number(ge=0, le=1)), "null or a number in [0, 1]", "e.g. generation.min_p=0.05"),
    Rule("generation.repetition_penalty", optional(number(gt=0)), "null or a number > 0 (1.0 = off)",
         "e.g. generation.repetition_penalty=1.2"),
    Rule("generation.no_repeat_ngram_size", optional(integer(min=0)), "null or an integer >= 0 (0 = off)",
         "e.g. generation.no_repeat_ngram_size=3"),
    Rule("generation.stop_strings",
         lambda v: isinstance(v, (list, ListConfig)) and all(isinstance(s, str) and s for s in v),
         "a list of non-empty strings", "e.g. 'generation.stop_strings=[\"\\n\\n\"]'"),
    Rule("generation.num_samples", integer(min=1), "an integer >= 1", "e.g. generation.num_samples=1"),
    Rule("generation.greedy", boolean, "true or false", "e.g. generation.greedy=true"),
    Rule("generation.use_kv_cache", boolean, "true or false", "e.g. generation.use_kv_cache=true"),
    Rule("generation.stop_at_eos", boolean, "true or false", "e.g. generation.stop_at_eos=true"),
    Rule("generation.num_beams", integer(min=1), "an integer >= 1 (1 = sampling, >1 = beam search)",
         "e.g. generation.num_beams=4"),
    Rule("generation.length_penalty", number(), "a number (>0 favours longer beams)", "e.g. generation.length_penalty=1.0"),
    Rule("generation.early_stopping", lambda v: v is True or v is False or v == "never", "true, false or never",
         "e.g. generation.early_stopping=true"),
    Rule("generation.num_return_sequences", integer(min=1), "an integer >= 1", "e.g. generation.num_return_sequences=2"),
    Rule("generation.gamma", integer(min=1), "an integer >= 1 (draft tokens proposed per target call)",
         "e.g. generation.gamma=4"),
    Rule("generation.draft", optional(lambda v: isinstance(v, str) and v.strip() != ""),
         "null or the checkpoint / run dir of a smaller GPT with the same tokenizer", "e.g. generation.draft=RUN_DIR"),
    Rule("callbacks.samples.max_new_tokens", integer(min=0), "an integer >= 0",
         "e.g. callbacks.samples.max_new_tokens=200"),
    # prune (conf/prune): torch prune's `amount` is a fraction of weights to zero; 1 would leave none
    Rule("prune.amount", fraction, "a fraction in [0, 1)", "pass the share of weights to set to zero, e.g. prune.amount=0.5"),
    Rule("prune.initial_amount", fraction, "a fraction in [0, 1)", "e.g. prune.initial_amount=0.0"),
    Rule("prune.amounts", lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(fraction(x) for x in v),
         "a list of fractions in [0, 1)", "e.g. prune.amounts=[0.0,0.25,0.5,0.75]"),
    Rule("prune.schedule", one_of("one_shot", "iterative"), "one_shot or iterative", "e.g. prune.schedule=iterative"),
    Rule("prune.ramp", one_of("cubic", "linear"), "cubic or linear", "e.g. prune.ramp=cubic"),
    Rule("prune.begin_step", integer(min=0), "an integer >= 0", "e.g. prune.begin_step=0"),
    Rule("prune.end_step", optional(integer(min=1)), "null (the last step) or an integer >= 1", "e.g. prune.end_step=300"),
    Rule("prune.every_n_steps", integer(min=1), "an integer >= 1", "e.g. prune.every_n_steps=10"),
    Rule("prune.calibration_batches", integer(min=1), "an integer >= 1", "e.g. prune.calibration_batches=8"),
    # eval
    Rule("split", one_of("test", "val", "train"), "test, val or train", "e.g. split=val"),
    Rule("batch_size", optional(integer(min=1)), "null or an integer >= 1", "e.g. batch_size=64"),
    Rule("vectors.similarity", optional(list_of_str), "a list of files", "write it as a list, vectors.similarity=[{value}]"),
    Rule("vectors.restrict_vocab", optional(integer(min=1)), "null or an integer >= 1",
         "e.g. vectors.restrict_vocab=30000"),
    # infer
    Rule("topn", integer(min=1), "an integer >= 1", "e.g. topn=10"),
    # memory
    Rule("seq_len", optional(integer(min=1)), "null or an integer >= 1", "e.g. seq_len=2048"),
    Rule("params", optional(number(gt=0)), "null or a number > 0", "e.g. params=65e9"),
    Rule("precision", one_of("fp32", "bf16", "fp16"), "fp32, bf16 or fp16", "e.g. precision=bf16"),
    Rule("optimizer_bytes_per_param", optional(number(ge=0)), "null or a number >= 0", "e.g. optimizer_bytes_per_param=2"),
    Rule("activation_checkpointing", boolean, "true or false", "e.g. activation_checkpointing=true"),
    Rule("attention_scores", boolean, "true or false", "e.g. attention_scores=false"),
    Rule("master_weights", boolean, "true or false", "e.g. master_weights=true"),
)


# the `quant` group's keys (each option has its own: quant=none has only `name`), checked by _check_quant
QUANT_RULES: tuple[Rule, ...] = (
    Rule("quant.name", one_of(*SCHEMES), f"a quantization scheme ({', '.join(SCHEMES)})", "e.g. quant=int8"),
    Rule("quant.bits", integer_in(MIN_BITS, MAX_BITS), f"an integer in [{MIN_BITS}, {MAX_BITS}]", "e.g. quant.bits=4"),
    Rule("quant.act_bits", optional(integer_in(MIN_BITS, MAX_BITS)), f"null or an integer in [{MIN_BITS}, {MAX_BITS}]",
         "e.g. quant.act_bits=8"),
    Rule("quant.backend", one_of(*BACKENDS), " or ".join(BACKENDS), "e.g. quant.backend=llmlab"),
    Rule("quant.group_size", optional(integer(min=1)), "null (per output channel) or an integer >= 1",
         "e.g. quant.group_size=32"),
    Rule("quant.observer_momentum", lambda v: number(ge=0)(v) and v < 1, "a number in [0, 1)",
         "e.g. quant.observer_momentum=0.9"),
    Rule("quant.freeze_observers_after", optional(integer(min=0)), "null or an integer >= 0",
         "e.g. quant.freeze_observers_after=200"),
)

# `llmlab serve` (conf/serve.yaml) and the engine.* keys of `llmlab infer` (validate)
SERVE_RULES: tuple[Rule, ...] = (
    Rule("port", integer_in(0, 65535), "a TCP port in [0, 65535] (0 = pick a free one)", "e.g. port=8000"),
    Rule("host", lambda v: isinstance(v, str) and v != "", "a host name or address", "e.g. host=127.0.0.1"),
    Rule("served_model_name", optional(lambda v: isinstance(v, str) and v != ""), "null or a name",
         "e.g. served_model_name=shakespeare-nano"),
    Rule("engine.block_size", integer(min=1), "an integer >= 1", "e.g. engine.block_size=16"),
    Rule("engine.num_blocks", optional(integer(min=1)), "null (enough for max_num_seqs full sequences) or an integer >= 1",
         "e.g. engine.num_blocks=512"),
    Rule("engine.max_num_seqs", integer(min=1), "an integer >= 1", "e.g. engine.max_num_seqs=32"),
    Rule("engine.enable_prefix_caching", boolean, "true or false", "e.g. engine.enable_prefix_caching=true"),
    Rule("engine.preemption_mode", one_of("recompute"), "recompute", "e.g. engine.preemption_mode=recompute"),
)


# `llmlab scaling plan` (conf/scaling_plan.yaml) and `llmlab scaling fit` (conf/scaling_fit.yaml), checked by validate
SCALING_RULES: tuple[Rule, ...] = (
    Rule("compute", optional(number(gt=0)), "a positive, finite number of FLOPs",
         "a compute budget is e.g. compute=5.76e23 (Chinchilla's)"),
    Rule("target_loss", optional(number(gt=0)), "a positive, finite loss in nats/token", "e.g. target_loss=2.0"),
    Rule("gpu_flops", optional(number(gt=0)), "null or the peak FLOP/s of one accelerator",
         "e.g. gpu_flops=312e12 (A100 bf16)"),
    Rule("mfu", number(gt=0, le=1), "a fraction in (0, 1] of gpu_flops", "e.g. mfu=0.4"),
    Rule("n_gpus", integer(min=1), "an integer >= 1", "e.g. n_gpus=8"),
    Rule("n_bootstrap", integer(min=0), "an integer >= 0 (0 = no confidence intervals)", "e.g. n_bootstrap=200"),
    Rule("delta", number(gt=0), "a number > 0", "e.g. delta=1e-3 (Hoffmann et al.)"),
)


def validate(cfg: DictConfig, command: str) -> None:
    """Raise a UserError for the first bad value; then normalise ``ckpt_path=DIR`` to its checkpoint.

    ``command`` is train, eval or infer (some checks only make sense for one of them).
    """
    for rule in RULES:
        value = lookup(cfg, rule.key)
        if value is not _ABSENT and not rule.check(value):
            shown = show(value)
            raise UserError(f"{rule.key}={shown} is not {rule.must}: {rule.fix.format(key=rule.key, value=shown)}")
    if command == "train":
        check_required(cfg)
        _check_training_ends(cfg)
    _check_quant(cfg, command)
    if command in ("serve", "infer"):  # infer has the engine.* keys (prompts=FILE), not host/port
        for rule in SERVE_RULES:
            value = lookup(cfg, rule.key)
            if value is not _ABSENT and not rule.check(value):
                raise UserError(f"{rule.key}={show(value)} is not {rule.must}: {rule.fix}")
    if command in ("scaling_plan", "scaling_fit"):
        for rule in SCALING_RULES:
            value = lookup(cfg, rule.key)
            if value is not _ABSENT and not rule.check(value):
                raise UserError(f"{rule.key}={show(value)} is not {rule.must}: {rule.fix}")
    if command == "scaling_plan":
        _check_scaling_plan(cfg)
    _check_beams(cfg)
    _check_data_path(cfg)
    _check_ckpt_path(cfg)
    check_strategy(lookup(cfg, "trainer.strategy"), lookup(cfg, "trainer.accelerator"))  # fsdp/deepspeed: GPUs only
    _check_accelerator(cfg)  # last: the only check that may import torch


# ---------------------------------------------------------------------------- checks across keys


def check_required(cfg: DictConfig) -> None:
    """``requires: [model.init_from]`` of a recipe: each key must be set (``???`` cannot say so, since
    OmegaConf's merge keeps the value a missing one would replace). The CLI checks it first: in a
    sweep (``experiment=compress_compare`` is one) it stops the sweep at its first job, with one line."""
    for key in cfg.get("requires") or []:
        if lookup(cfg, str(key)) in (None, "", "???", _ABSENT) and not cfg.get("ckpt_path"):
            hint = " (an llmlab run dir or .ckpt, `last`, or a local Hugging Face directory)" if key == "model.init_from" else ""
            raise UserError(f"{cfg.get('name')} needs {key}: pass {key}=...{hint}")


def _check_scaling_plan(cfg: DictConfig) -> None:
    """A plan starts from exactly one of a budget and a target loss; a law's constants are positive numbers."""
    compute, target = lookup(cfg, "compute"), lookup(cfg, "target_loss")
    if compute in (None, _ABSENT) and target in (None, _ABSENT):
        raise UserError("llmlab scaling plan needs a budget: pass compute=FLOPs (e.g. compute=5.76e23) "
                        "or target_loss=nats/token (e.g. target_loss=2.0)")
    if compute not in (None, _ABSENT) and target not in (None, _ABSENT):
        raise UserError(f"compute={show(compute)} and target_loss={show(target)} both given: a plan starts from "
                        "one of them, drop the other")
    law = lookup(cfg, "law")
    for key in law if isinstance(law, DictConfig) else ():
        if key in ("form", "name", "path"):
            continue
        value = lookup(cfg, f"law.{key}")
        if value is not _ABSENT and not number(gt=0)(value):
            raise UserError(f"law.{key}={show(value)} is not a positive, finite number, as scaling-law constants are: "
                            "drop the override to use the preset's value")


def _check_beams(cfg: DictConfig) -> None:
    """Beam search returns at most its num_beams best hypotheses."""
    beams, ret = lookup(cfg, "generation.num_beams"), lookup(cfg, "generation.num_return_sequences")
    if isinstance(beams, int) and isinstance(ret, int) and ret > beams:
        raise UserError(f"generation.num_return_sequences={ret} is more than generation.num_beams={beams}: beam search "
                        f"returns at most its num_beams best beams: pass generation.num_beams={ret} or more")
    draft = lookup(cfg, "generation.draft")
    if isinstance(beams, int) and beams > 1 and draft not in (None, _ABSENT):
        raise UserError(f"generation.draft (speculative decoding) samples one sequence, not beams: drop "
                        f"generation.num_beams={beams} or generation.draft")


def _check_quant(cfg: DictConfig, command: str) -> None:
    """A scheme for `llmlab quantize`; bitsandbytes only where it has the scheme; PTQ trains only under a tuner."""
    for rule in QUANT_RULES:
        value = lookup(cfg, rule.key)
        if value is not _ABSENT and not rule.check(value):
            raise UserError(f"{rule.key}={show(value)} is not {rule.must}: {rule.fix}")
    name = lookup(cfg, "quant.name")
    if command == "quantize" and name in (None, "none", _ABSENT):
        raise UserError("llmlab quantize needs a scheme: pass quant=int8, int4, nf4, llm_int8, bf16 or qat_int8/qat_int4")
    if lookup(cfg, "quant.backend") == "bnb" and name not in ("llm_int8", "nf4"):
        raise UserError(f"quant={name} quant.backend=bnb: bitsandbytes backs only quant=llm_int8 (Linear8bitLt) and "
                        "quant=nf4 (Linear4bit): use quant.backend=llmlab")
    peft = lookup(cfg, "peft.name")
    if (command == "train" and name not in (None, "none", _ABSENT, *QAT_SCHEMES) and peft in (None, "none", _ABSENT)
            and not cfg.get("ckpt_path")):
        raise UserError(f"quant={name} stores frozen quantized weights, so nothing would train: add peft=lora (QLoRA) "
                        "or use quant=qat_int8 / qat_int4 (quantization-aware training)")


def _check_training_ends(cfg: DictConfig) -> None:
    trainer = lookup(cfg, "trainer")
    if not isinstance(trainer, DictConfig):
        return
    steps = lookup(cfg, "trainer.max_steps")
    epochs = lookup(cfg, "trainer.max_epochs")
    if steps not in (-1, _ABSENT) or epochs not in (-1, None, _ABSENT):
        return
    if lookup(cfg, "trainer.fast_dev_run") not in (False, 0, None, _ABSENT):
        return  # one batch, then stop
    if lookup(cfg, "trainer.max_time") not in (None, _ABSENT):
        return
    raise UserError(
        f"trainer.max_steps=-1 with trainer.max_epochs={show(None if epochs is _ABSENT else epochs)} sets no limit, "
        "so training would run forever: pass a positive trainer.max_steps (e.g. trainer.max_steps=1500) "
        "or trainer.max_epochs (e.g. trainer.max_epochs=5)"
    )


def _check_data_path(cfg: DictConfig) -> None:
    corpus = lookup(cfg, "data.corpus")
    path = lookup(cfg, "data.path")
    if corpus == "shakespeare" and path not in (None, _ABSENT):
        raise UserError(
            f"data.path={show(path)} is ignored by data=shakespeare (the built-in corpus): "
            f"to train on your text pass data=text data.path={show(path)}"
        )


def _check_ckpt_path(cfg: DictConfig) -> None:
    """An explicit ckpt_path must exist; ``last`` must have something to find (cheap: no torch)."""
    spec = lookup(cfg, "ckpt_path")
    if spec in (None, "", _ABSENT):
        return
    if spec == "last":
        _check_last_exists(cfg)
        return
    path = Path(str(spec)).expanduser()
    if path.is_file():
        return
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):  # a run dir, a checkpoints dir
            if candidate.is_file():
                cfg.ckpt_path = str(candidate)
                return
        found = sorted({p for d in (path, path / "checkpoints") for p in d.glob("*.ckpt") if p.is_file()})
        if found:
            names = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
            raise UserError(
                f"ckpt_path={path} is a directory without last.ckpt (it has {names}): "
                f"pass one of its checkpoints, e.g. ckpt_path={found[0]}"
            )
        raise UserError(
            f"ckpt_path={path} is a directory with no .ckpt files: pass a checkpoint file "
            "(a run's …/checkpoints/last.ckpt), a run dir, or ckpt_path=last"
        )
    raise UserError(
        f"checkpoint {path} does not exist: pass the .ckpt of a run (…/checkpoints/last.ckpt), a run dir, "
        "or ckpt_path=last"
    )


def _check_last_exists(cfg: DictConfig) -> None:
    log_dir = lookup(cfg, "paths.log_dir")
    if not isinstance(log_dir, str):
        return
    train_dir = Path(log_dir, "train")
    if next(train_dir.glob("**/checkpoints/last.ckpt"), None) is None:
        raise UserError(
            f"ckpt_path=last: no last.ckpt under {train_dir}: train first (llmlab train) or pass ckpt_path=PATH"
        )


def _check_accelerator(cfg: DictConfig) -> None:
    accelerator = lookup(cfg, "trainer.accelerator")
    if not isinstance(accelerator, str) or accelerator.lower() not in ("gpu", "cuda"):
        return
    import torch  # only now: asking for a GPU is the one check that needs it

    if not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} but torch finds no CUDA GPU on this machine: "
            "use trainer=cpu (or run where a GPU is visible)"
        )


# ---------------------------------------------------------------------------- helpers


def lookup(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``; ``_ABSENT`` if the key is not there or still ``???``."""
    try:
        return OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
    except (MissingMandatoryValue, InterpolationToMissingValueError):
        return _ABSENT  # interpolates a ??? value: the task names the missing key
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{key}={_raw(cfg, key)} cannot be resolved ({reason}): "
            "fix the value, or the key or variable its ${...} refers to"
        ) from None


def _raw(cfg: DictConfig, key: str) -> str:
    parent, _, last = key.rpartition(".")
    try:
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return str(OmegaConf.to_container(node, resolve=False)[last])
    except Exception:  # noqa: BLE001 — only for the message
        return "..."


def show(value: Any) -> str:
    """A value as it would be written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, list):
        return "[" + ",".join(show(v) for v in value) + "]"
    if value == "":
        return "''"
    return str(value)
