"""`llmlab <command> [overrides]` — one entry point, one Hydra app per command.

    llmlab train [overrides]      fit a method (add -m for sweeps)
    llmlab eval  ckpt_path=...    score a checkpoint
    llmlab infer ckpt_path=...    generate from a checkpoint
    llmlab serve ckpt_path=...    OpenAI-compatible HTTP server (POST /v1/completions), batched
    llmlab ls    [group]          list config groups and their options
    llmlab bench NAME             side-by-side benchmark against a reference implementation
    llmlab scaling plan compute=C compute-optimal N*, D*, loss of a budget (or target_loss=L; law=...)
    llmlab scaling fit SWEEP_DIR  fit Kaplan and Chinchilla laws to a sweep's runs (fit.json + plots)
    llmlab compare DIR [DIR ...]  learning curves, metric vs swept keys, config differences of runs

Bad input (unknown command/option/key, missing file, corrupt checkpoint ...) ends with one line,
``error: <problem>: <fix>``, and exit code 2 — no traceback. Real bugs still show a traceback.
Values are checked (llmlab/schema.py) before torch or lightning is imported, so bad input fails fast.

In a sweep (-m), a failed job prints its line, keeps it in ``<job dir>/error.txt`` and the other
jobs still run; after the summary (status ``failed``, column ``error``) the sweep ends with one
line, ``error: N of M sweep jobs failed: see <sweep dir>/summary.md``, and exit code 2 (1 if only
bugs failed).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from llmlab.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
COMMANDS = {
    "train": ("fit a method", "llmlab train experiment=gpt_shakespeare trainer.max_steps=500"),
    "eval": ("score a checkpoint", "llmlab eval ckpt_path=last"),
    "infer": ("generate from a checkpoint", 'llmlab infer ckpt_path=last prompt="ROMEO:"'),
    "export": ("write HF model / peft adapter dirs", "llmlab export ckpt_path=last"),
    "quantize": ("quantize a checkpoint into a new run", "llmlab quantize ckpt_path=last quant=nf4"),
    "memory": ("memory of fine-tuning and serving", "llmlab memory model=gpt_65b params=65e9"),
    "serve": ("serve a checkpoint over HTTP (OpenAI)", "llmlab serve ckpt_path=last port=8000"),
    "ls": ("list config groups and options", "llmlab ls model"),
    "bench": ("benchmark against a reference", "llmlab bench gpt"),
    "scaling": ("plan N*, D* of a budget / fit a sweep", "llmlab scaling plan compute=5.76e23 law=chinchilla_besiroglu"),
    "compare": ("curves + config diff of runs/sweeps", "llmlab compare outputs/train/multiruns/<date> [DIR ...]"),
}
BENCHES = {
    "gpt": "llmlab.bench.gpt",
    "bert": "llmlab.bench.bert",
    "t5": "llmlab.bench.t5",
    "word2vec": "llmlab.bench.word2vec",
    "glove": "llmlab.bench.glove",
    "peft": "llmlab.bench.peft",
    "speculative": "llmlab.bench.speculative",
    "kv": "llmlab.bench.kv",
    "serving": "llmlab.bench.serving",
}

USAGE = "usage: llmlab <command> [overrides ...]\n\ncommands:\n" + "".join(
    f"  {name:<8} {desc:<37} {example}\n" for name, (desc, example) in COMMANDS.items()
) + (
    "\nOverrides are Hydra's: key=value, group=option, +new_key=value, ~key.\n"
    "After train/eval/infer: -m/--multirun (sweeps), --cfg job (print the config), --help (groups).\n"
    "Run `llmlab ls` for the config groups and `llmlab ls experiment` for ready recipes."
)


def main(argv: list[str] | None = None) -> None:
    # Back large CPU tensors with transparent huge pages: the (B*T, vocab) logits of a BPE model are
    # hundreds of MB per step and otherwise page-fault in 4 kB at a time (~4x slower to allocate).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(USAGE)
            return
        command, rest = argv[0], argv[1:]
        if command in ("train", "eval", "infer", "export", "memory", "quantize", "serve"):
            _run_hydra(command, rest)
        elif command == "ls":
            print(list_configs(rest[0] if rest else None))
        elif command == "bench":
            _bench(rest)
        elif command == "scaling":
            _scaling(rest)
        elif command == "compare":
            _compare(rest)
        elif command in ("--version", "version"):
            from llmlab import __version__

            print(f"llmlab {__version__}")
        else:
            raise UserError(f"unknown command {command!r}: use one of {', '.join(COMMANDS)} (llmlab --help)")
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl+C outside training (training saves last.ckpt and exits by itself)
        print("interrupted by SIGINT", file=sys.stderr, flush=True)
        sys.exit(130)


def fail(message: str, code: int = UserError.exit_code) -> None:
    """Print one line on stderr and exit with ``code`` (2: bad input)."""
    message = " ".join(str(message).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# ---------------------------------------------------------------------------- hydra apps


def _task(command: str):
    if command == "train":
        from llmlab.tasks.train import train as fn
    elif command == "eval":
        from llmlab.tasks.eval import evaluate as fn
    elif command == "export":
        from llmlab.tasks.export import export as fn
    elif command == "quantize":
        from llmlab.tasks.quantize import quantize as fn
    elif command == "memory":
        from llmlab.tasks.memory import memory as fn
    elif command == "serve":
        from llmlab.tasks.serve import serve as fn
    elif command == "scaling_plan":
        from llmlab.tasks.scaling import plan as fn
    else:
        from llmlab.tasks.infer import infer as fn
    return fn


def _run_hydra(command: str, args: list[str]) -> None:
    import hydra
    import hydra._internal.utils as hydra_utils

    hydra_utils.run_and_report = _run_and_report  # our error reporting instead of Hydra's
    from llmlab.distributed import register_resolvers

    register_resolvers()  # ${precision_for:ACCELERATOR} (conf/trainer/ddp.yaml)
    global _cli_pid
    _cli_pid = os.getpid()  # jobs run by joblib / submitit see another pid (and a fresh module: None)
    sys.argv = hydra_argv(command, args)
    _quiet_warnings()

    @hydra.main(config_path=str(CONF_DIR), config_name=command, version_base="1.3")
    def app(cfg):
        from llmlab.schema import check_required

        if command == "train":
            try:  # a recipe's `requires:` is the same for every job: a sweep without it stops at once
                check_required(cfg)
            except UserError as e:
                if _in_sweep() and os.getpid() != _cli_pid:  # a job in a launcher's process (joblib, submitit):
                    return _job_failed(e, str(e))          # exiting there would only kill that process
                fail(str(e))
        try:
            from llmlab.schema import validate

            validate(cfg, command)  # bad values end here, before torch/lightning are imported
            if command not in ("memory", "serve", "scaling_plan"):  # memory: a meta-device model; serve: checks
                # its port first; scaling_plan: arithmetic, no torch
                _quiet_lightning(cfg)
            result = _task(command)(cfg)
        except Exception as e:  # noqa: BLE001
            # report user errors here: past this point Hydra prints "Error executing job ..." first
            if _exit_if_stopped(e):  # SIGINT/SIGTERM during training: last.ckpt saved, one line, exit 130/143
                return None  # (in a launcher's worker process: the job is marked stopped)
            message = user_error_message(e)
            if _in_sweep():
                return _job_failed(e, message)  # recorded; the other jobs of the sweep still run
            if message is None:
                raise
            fail(message)
        if isinstance(result, dict):  # the value a sweeper (Optuna) optimises
            metric = cfg.get("optimized_metric")
            return result.get(metric) if metric else None
        return None

    app()
    _exit_if_sweep_failed()


# ---------------------------------------------------------------------------- sweeps

_failed_jobs: list[tuple[str, bool]] = []  # (job dir, user error?) of this process's sweep jobs
_cli_pid: int | None = None                # the process `llmlab` runs in (the basic launcher runs jobs there too)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_failed(e: Exception, message: str | None) -> None:
    """A sweep job failed: print its line, keep it in <job dir>/error.txt, let the sweep go on.

    Returns None, the value Hydra's Optuna sweeper records as a failed trial (NaN would crash it).
    """
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from llmlab.utils import atomic_write_text

    if message is not None:
        line = f"error: {_one_line(message)}"
        print(line, file=sys.stderr, flush=True)
    else:  # a bug: the traceback is for us, the summary gets its type and message
        traceback.print_exc()
        line = _one_line(f"{type(e).__name__}: {e}")
        print(f"job failed with a bug: {line}", file=sys.stderr, flush=True)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    atomic_write_text(job_dir / "error.txt", line + "\n")
    _failed_jobs.append((str(job_dir), message is not None))
    return None


def _exit_if_stopped(e: Exception) -> bool:
    """A signal stopped training after saving last.ckpt (llmlab.faults.Stopped): print its line and exit
    with the shell's code for the signal (130 SIGINT, 143 SIGTERM). In a sweep the job's line goes to
    its error.txt (status ``stopped`` in the summary), the summary of the jobs so far is written, and
    the whole sweep ends here: the user asked it to stop. In a launcher's worker process (joblib,
    submitit) the job is marked and True returned: exiting there would only end that worker."""
    faults = sys.modules.get("llmlab.faults")
    if faults is None or not isinstance(e, faults.Stopped):
        return False
    line = _one_line(str(e))
    if _in_sweep():
        from hydra.core.hydra_config import HydraConfig

        from llmlab.utils import atomic_write_text

        atomic_write_text(Path(HydraConfig.get().runtime.output_dir) / "error.txt", line + "\n")
        if os.getpid() != _cli_pid:  # a launcher's worker (joblib, submitit): its job is marked, the launcher
            print(line, file=sys.stderr, flush=True)  # process decides about the sweep
            return True
        sweep = sys.modules.get("llmlab.sweep")
        outcome = sweep.summarize_unfinished() if sweep is not None else None
        if outcome is not None:
            line += f" (the sweep stopped here: see {outcome.summary})"
    print(line, file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


def _exit_if_sweep_failed(stopped_by: Exception | None = None) -> None:
    """After a sweep (its summary printed): one line and a non-zero exit if any job failed —
    2 if one failed on bad input, 1 if only bugs did."""
    sweep = sys.modules.get("llmlab.sweep")  # imported by Hydra for the SweepSummary callback
    outcome = None
    if sweep is not None:
        outcome = sweep.take_outcome() if stopped_by is None else sweep.summarize_unfinished()
    if outcome is not None:
        failed, user_errors, of, where = outcome.failed, outcome.user_errors, f" of {outcome.total}", outcome.summary
    else:  # no summary callback (hydra.callbacks overridden): what this process saw
        failed, user_errors, of = len(_failed_jobs), sum(user for _, user in _failed_jobs), ""
        where = ", ".join(f"{d}/error.txt" for d, _ in _failed_jobs)
    _failed_jobs.clear()
    if not failed:
        return
    stopped = ""
    if stopped_by is not None:
        stopped = f" and the sweep stopped ({_one_line(f'{type(stopped_by).__name__}: {stopped_by}')})"
    fail(f"{failed}{of} sweep jobs failed{stopped}: see {where}", UserError.exit_code if user_errors else 1)


# ---------------------------------------------------------------------------- noise

# (category, message regex) of warnings that say nothing to an llmlab user
QUIET_WARNINGS = (
    # torch deprecated LeafSpec; Lightning's own _pytree still uses it (not ours to fix)
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # num_workers=0 is on purpose: batches are cheap slices of a memory-mapped token stream
    (UserWarning, r"The '\w+' does not have many workers"),
)
QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")  # adverts
# INFO lines of libraries the Optuna sweeper imports ("setup plugin alembic.autogenerate.comments" ...)
WARNINGS_ONLY_LOGGERS = ("alembic",)


class _NoAdverts:
    """logging filter: drop Lightning's "💡 Tip: try installing [litlogger]/[litmodels] ..." lines."""

    @staticmethod
    def filter(record) -> bool:
        return re.match(r"\W*Tip: ", str(record.msg)) is None


def _quiet_warnings() -> None:
    """Silence known noise before anything is imported (filters match by text: no torch import)."""
    import logging
    import warnings

    for category, pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in logger.filters):
            logger.addFilter(_NoAdverts())
    for name in WARNINGS_ONLY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_lightning(cfg) -> None:
    """Lightning prints every INFO line through its own handler on the ``lightning`` logger *and*
    passes it on to the root logger, where Hydra's job logging prints it again and writes it to
    ``<run dir>/<task>.log``. Keep Hydra's (console once, and the log file)."""
    import logging
    import warnings

    from omegaconf import OmegaConf

    if (OmegaConf.select(cfg, "data.num_workers", default=0) or 0) <= 1:  # the warning is about > 1
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)

    import lightning

    handler = getattr(lightning, "_console", None)
    if handler is not None and logging.getLogger().handlers:  # Hydra's handlers are there to take over
        logging.getLogger("lightning").removeHandler(handler)


def hydra_argv(command: str, args: list[str]) -> list[str]:
    """The argv Hydra parses: prose values quoted, and ``-m``/``--multirun`` first, so that
    ``llmlab train data=text -m model.n_head=3,4`` works (argparse refuses overrides on both sides of a flag)."""
    sweep = [a for a in args if a in ("-m", "--multirun")]
    return [f"llmlab {command}", *sweep, *(quote_free_text(a) for a in args if a not in sweep)]


FREE_TEXT_KEYS = ("text", "prompt", "query", "analogy")  # values that are prose, not Hydra syntax


def quote_free_text(arg: str) -> str:
    """``text=Thank you <extra_id_0> me`` → ``text='Thank you <extra_id_0> me'``.

    The shell has already removed the user's quotes, and Hydra's override grammar rejects ``<``,
    ``>``, ``,`` (a sweep), ``[`` ... in an unquoted value; prose keys are quoted for it (values
    that are already quoted are left alone).
    """
    key, sep, value = arg.partition("=")
    if not sep or key.lstrip("+~") not in FREE_TEXT_KEYS or value[:1] in ("'", '"') or value == "":
        return arg
    return f"{key}={hydra_quote(value)}"


def hydra_quote(value: str) -> str:
    """``value`` single-quoted for Hydra's override grammar (prose, a path with spaces or commas)."""
    # Hydra: inside quotes only a quote, and backslashes right before one, need escaping
    body = value.rstrip("\\")
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", body) + "\\" * 2 * (len(value) - len(body))
    return f"'{escaped}'"


def _run_and_report(func):
    """Replacement for hydra's run_and_report: user errors become one line and exit code 2."""
    try:
        return func()
    except Exception as e:  # noqa: BLE001 — classify, then re-raise what is a bug
        # a sweeper that gives up because jobs failed (Optuna: "No trials are completed yet")
        _exit_if_sweep_failed(stopped_by=e)
        message = user_error_message(e)
        if message is None:
            raise
        fail(message)


def user_error_message(e: BaseException) -> str | None:
    """One-line message for user errors (also when wrapped by hydra.utils.instantiate); None for bugs."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue

    seen = e
    while seen is not None:  # InstantiationException wraps the real error as __cause__
        if isinstance(seen, UserError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    if isinstance(e, MissingConfigException):
        return _missing_option_message(str(e))
    if isinstance(e, ConfigCompositionException):
        return _composition_message(e)
    if isinstance(e, OverrideParseException):
        return f"cannot parse override: {_one_line(str(e))} (use key=value, group=option)"
    if isinstance(e, MissingMandatoryValue):
        key = getattr(e, "full_key", None) or "a required key"
        return f"{key} is required: pass {key}=... on the command line"
    return file_system_message(e)


def file_system_message(e: BaseException) -> str | None:
    """A run dir or output that cannot be written (no permission, read-only file system, a file where a
    directory goes, disk full): the machine's problem, not a bug — one line. Hydra creates the run dir
    before the task runs, so this also catches ``hydra.run.dir`` / ``LLMLAB_ROOT`` pointing somewhere unwritable."""
    import errno

    if not isinstance(e, OSError) or not e.filename:
        return None
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EROFS: "read-only file system",
               errno.ENOTDIR: "a part of the path is a file, not a directory", errno.EEXIST: "a file is in the way",
               errno.EISDIR: "it is a directory", errno.ENOSPC: "no space left on the device",
               errno.EDQUOT: "disk quota exceeded"}
    if e.errno not in reasons:
        return None
    move = ", or move the file away" if e.errno in (errno.ENOTDIR, errno.EEXIST) else ""
    return (f"cannot write {e.filename} ({reasons[e.errno]}): write outputs somewhere writable "
            f"(LLMLAB_ROOT=DIR, paths.root_dir=DIR or hydra.run.dir=DIR){move}")


def _missing_option_message(text: str) -> str:
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = _options(group)
        return (
            f"unknown {group}={option}: choose one of {', '.join(options)} (llmlab ls {group})"
            if options
            else f"unknown {group}={option} (llmlab ls)"
        )
    m = re.search(r"Could not load '([^']+)'", text)
    if m:
        return f"unknown config {m.group(1)!r} (llmlab ls)"
    return _one_line(text)


def _composition_message(e: Exception) -> str:
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        if "." not in key and (CONF_DIR / key).is_dir():  # a group whose default is null
            return _one_line(str(e.__cause__ or text))
        return (
            f"unknown config key '{key}': check the spelling (`llmlab train --cfg job` prints every key) "
            f"or add a new key with +{key}=..."
        )
    cause = e.__cause__
    if cause is not None and "Could not find" in str(cause):
        return _missing_option_message(str(cause))
    return _one_line(text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------------------- ls


def _options(group: str) -> list[str]:
    d = CONF_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _describe(path: Path) -> str:
    """First comment line of a config that is not a directive or a command line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s.startswith("#"):
            break
        s = s.lstrip("# ").strip()
        if s and not s.startswith("@package") and not s.startswith("llmlab "):
            return s
    return ""


def list_configs(group: str | None = None) -> str:
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    if group is None:
        lines = ["config groups (llmlab ls GROUP for details; choose with GROUP=OPTION):"]
        lines += [f"  {g:<15} {', '.join(_options(g))}" for g in groups]
        return "\n".join(lines)
    if group not in groups:
        raise UserError(f"unknown config group {group!r}: choose one of {', '.join(groups)}")
    lines = [f"{group} options ({group}=OPTION):"]
    for name in _options(group):
        lines.append(f"  {name:<24} {_describe(CONF_DIR / group / f'{name}.yaml')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- scaling

SCALING_USAGE = (
    "llmlab scaling plan compute=FLOPs|target_loss=LOSS [law=chinchilla_hoffmann|chinchilla_besiroglu|kaplan|FIT.json] "
    "or llmlab scaling fit SWEEP_DIR [SWEEP_DIR ...] [out=DIR n_bootstrap=200 seed=0 delta=1e-3]"
)


def _scaling(args: list[str]) -> None:
    sub = args[0] if args else None
    if sub in ("-h", "--help"):
        print(f"usage: {SCALING_USAGE}")
    elif sub == "plan":
        _run_hydra("scaling_plan", law_file_override(args[1:]))
    elif sub == "fit":
        _scaling_fit(args[1:])
    else:
        what = f"unknown subcommand {sub!r}" if sub else "a subcommand is missing"
        raise UserError(f"llmlab scaling: {what}: use {SCALING_USAGE}")


def law_file_override(args: list[str]) -> list[str]:
    """``law=PATH.json`` (or an existing file, or a fit dir holding fit.json) -> ``law=fit law.path=PATH``:
    Hydra composes groups from option names, so a fitted law is the `fit` option reading that file."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key == "law" and sep and value not in _options("law"):
            path = Path(value).expanduser()
            if path.is_dir() and (path / "fit.json").is_file():
                path = path / "fit.json"
            if value.endswith(".json") or path.is_file():
                out += ["law=fit", f"law.path={hydra_quote(str(path.resolve()))}"]
                continue
        out.append(arg)
    return out


def _scaling_fit(args: list[str]) -> None:
    """Plain arguments, not a Hydra app: sweep dirs are positional (paths need no Hydra quoting)."""
    from llmlab.schema import validate
    from llmlab.tasks.scaling import fit, fit_config

    dirs = [a for a in args if "=" not in a]
    if not dirs:
        raise UserError("llmlab scaling fit needs a sweep dir: llmlab scaling fit outputs/train/multiruns/<date> "
                        "(the dir of an `llmlab train -m experiment=scaling_sweep` run)")
    cfg = fit_config(CONF_DIR / "scaling_fit.yaml", dirs, [a for a in args if "=" in a])
    validate(cfg, "scaling_fit")
    fit(cfg)


# ---------------------------------------------------------------------------- compare


def _compare(args: list[str]) -> None:
    """Plain arguments, like `scaling fit`: run/sweep dirs, metric=..., out=... (default
    $LLMLAB_ROOT/outputs/compare/<date>, where conf/paths puts every run)."""
    from llmlab import compare

    if args[:1] in (["-h"], ["--help"]):
        print(f"usage: {compare.USAGE}")
        return
    compare.main(args, Path(os.environ.get("LLMLAB_ROOT", ".")) / "outputs")


# ---------------------------------------------------------------------------- bench


def _bench(args: list[str]) -> None:
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: llmlab bench NAME [options]   (NAME: {', '.join(BENCHES)}; llmlab bench NAME --help)")
        return
    name = args[0]
    if name not in BENCHES:
        raise UserError(f"unknown benchmark {name!r}: choose one of {', '.join(BENCHES)}")
    import importlib

    importlib.import_module(BENCHES[name]).main(args[1:])


if __name__ == "__main__":
    main()
