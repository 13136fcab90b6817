"""llmlab/schema.py: bad values end as one line before anything runs (and before torch is imported).

In-process tests compose the real configs with Hydra's compose API and call ``validate``; a few
subprocess tests check the CLI's one line / exit code 2 / speed, and that a valid run's output
carries each Lightning INFO line once and none of the known noise.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from conftest import REPO, TINY, cli_env, run_dirs
from llmlab.errors import UserError
from llmlab.schema import RULES, validate
from test_cli_errors import assert_user_error

CONF = REPO / "conf"


def composed(command: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(command, overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def requirements(experiment: str) -> list[str]:
    """The keys a recipe's ``requires:`` asks the command line for (model.init_from, method.teacher ...)."""
    import yaml

    return list((yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text()) or {}).get("requires") or [])


# ---------------------------------------------------------------------------- shipped configs pass


@pytest.mark.parametrize(
    "command, overrides",
    [("train", []), ("eval", []), ("infer", [])]
    + [("train", [f"experiment={e}", *(f"{k}=RUN" for k in requirements(e))]) for e in options("experiment")]
    + [("train", [f"debug={d}"]) for d in options("debug")]
    + [("train", [f"hparams_search={h}"]) for h in options("hparams_search")]
    + [("eval", ["data=shakespeare"]), ("train", ["data=text", "data.path=corpus.txt"])],
)
def test_shipped_configs_validate(command, overrides):
    validate(composed(command, *overrides), command)


def test_a_recipe_without_what_it_requires_is_one_line():
    with pytest.raises(UserError, match=r"dpo_sentiment needs model.init_from: pass model.init_from="):
        validate(composed("train", "experiment=dpo_sentiment"), "train")


def test_table_keys_exist_in_some_config():
    """A typo in the table would silently check nothing."""
    cfgs = [composed("train"), composed("eval", "data=shakespeare"), composed("infer"), composed("train", "method=classify"),
            composed("memory"), composed("train", "method=distill"), composed("train", "prune=magnitude"),
            composed("eval", "prune=curve"), composed("train", "quant=qat_int4"), composed("train", "quant=nf4"),
            composed("train", "quant=llm_int8")]
    from omegaconf import OmegaConf

    for rule in RULES:
        assert any(OmegaConf.select(c, rule.key, default="<absent>") != "<absent>" for c in cfgs), rule.key


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    "command, overrides, needles",
    [
        ("train", ["trainer.max_steps=abc"], ["trainer.max_steps=abc", "integer", "e.g. trainer.max_steps="]),
        ("train", ["trainer.max_steps=1.5"], ["trainer.max_steps=1.5", "integer"]),
        ("train", ["trainer.max_steps=true"], ["trainer.max_steps=true", "integer"]),
        ("train", ["optim.lr=fast"], ["optim.lr=fast", "a number"]),
        ("train", ["optim.lr=-1"], ["optim.lr=-1", "> 0"]),
        ("train", ["optim.lr=0"], ["optim.lr=0", "> 0"]),
        ("train", ["trainer.max_steps=-1"], ["forever", "trainer.max_steps", "trainer.max_epochs"]),
        ("train", ["trainer.max_steps=-1", "trainer.max_epochs=null"], ["forever", "max_epochs=null"]),
        ("train", ["test=maybe"], ["test=maybe", "true or false"]),
        ("train", ["test=1"], ["test=1", "true or false"]),
        ("train", ["seed=abc"], ["seed=abc", "integer"]),
        ("infer", ["generation.num_samples=0"], ["generation.num_samples=0", ">= 1"]),
        ("infer", ["generation.max_new_tokens=-1"], ["generation.max_new_tokens=-1", ">= 0"]),
        ("infer", ["generation.temperature=-0.5"], ["generation.temperature=-0.5", ">= 0"]),
        ("infer", ["generation.top_p=0"], ["generation.top_p=0", "(0, 1]"]),
        ("infer", ["generation.top_p=1.5"], ["generation.top_p=1.5", "(0, 1]"]),
        ("infer", ["generation.top_k=0"], ["generation.top_k=0", ">= 1"]),
        ("infer", ["generation.num_beams=0"], ["generation.num_beams=0", ">= 1"]),
        ("infer", ["generation.num_beams=2.5"], ["generation.num_beams=2.5", "integer"]),
        ("infer", ["generation.early_stopping=sometimes"], ["generation.early_stopping=sometimes", "true, false or never"]),
        ("infer", ["generation.length_penalty=abc"], ["generation.length_penalty=abc", "a number"]),
        ("infer", ["generation.num_beams=2", "generation.num_return_sequences=3"],
         ["generation.num_return_sequences=3 is more than generation.num_beams=2", "generation.num_beams=3"]),
        ("train", ["data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
        ("train", ["data.eval_batch_size=-4"], ["data.eval_batch_size=-4", ">= 1"]),
        ("train", ["data.batch_size=${data.eval_batch_size}", "data.eval_batch_size=0"], ["data.batch_size=0"]),
        ("train", ["trainer.val_check_interval=0"], ["trainer.val_check_interval=0", "> 0"]),
        ("train", ["trainer.val_check_interval=2.5"], ["trainer.val_check_interval=2.5", "(0, 1]"]),
        ("train", ["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps=0", ">= 1"]),
        ("eval", ["vectors.similarity=pairs.txt"], ["vectors.similarity=pairs.txt", "vectors.similarity=[pairs.txt]"]),
        ("train", ["data.path=my.txt"], ["data.path=my.txt", "data=text data.path=my.txt"]),
        ("eval", ["data=shakespeare", "data.path=my.txt"], ["data=text data.path=my.txt"]),
        ("train", ["optim.lr=${nope}"], ["optim.lr=${nope}", "cannot be resolved", "nope"]),
        ("train", ["data.batch_size=${oc.env:LLMLAB_SURELY_UNSET_VAR}"], ["data.batch_size", "LLMLAB_SURELY_UNSET_VAR"]),
    ],
)
def test_bad_values(command, overrides, needles):
    with pytest.raises(UserError) as info:
        validate(composed(command, *overrides), command)
    message = str(info.value)
    assert "\n" not in message and ": " in message  # one line: "<problem>: <fix>"
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    "command, overrides",
    [
        ("train", ["data.batch_size=${seed}"]),          # interpolations that resolve to a number are fine
        ("train", ["data.eval_batch_size=null"]),        # null: the data module's default
        ("train", ["optim.lr=1"]),                       # an int is a number
        ("train", ["trainer.max_steps=-1", "trainer.max_epochs=3"]),
        ("train", ["trainer.max_steps=-1", "debug=fdr"]),  # fast_dev_run stops after one batch
        ("train", ["trainer.val_check_interval=1.0"]),   # a fraction of an epoch
        ("infer", ["generation.top_p=1.0", "generation.top_k=null", "generation.temperature=0"]),
        ("infer", ["generation.num_beams=4", "generation.num_return_sequences=4", "generation.early_stopping=never",
                   "generation.length_penalty=-0.5"]),
        ("eval", ["vectors.similarity=[a.txt,b.txt]"]),
        ("train", ["data=text", "data.path=my.txt"]),
    ],
)
def test_good_values(command, overrides):
    validate(composed(command, *overrides), command)


def test_a_missing_value_is_left_to_the_task():
    validate(composed("train", "data=text"), "train")  # data.path=??? : the task names it
    validate(composed("eval"), "eval")                 # ckpt_path=???


def test_gpu_requires_cuda(monkeypatch):
    import torch

    for trainer in ("gpu", "ddp"):
        cfg = composed("train", f"trainer={trainer}")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(UserError, match="trainer=cpu"):
            validate(cfg, "train")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        validate(cfg, "train")


# ---------------------------------------------------------------------------- ckpt_path


def test_ckpt_path(tmp_path):
    def check(spec):
        cfg = composed("eval", f"ckpt_path={spec}")
        validate(cfg, "eval")
        return cfg.ckpt_path

    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"x")
    assert check(ckpt) == str(ckpt)

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert check(run) == str(run / "checkpoints" / "last.ckpt")  # a run dir
    assert check(run / "checkpoints") == str(run / "checkpoints" / "last.ckpt")  # its checkpoints dir

    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "best.ckpt").write_bytes(b"x")
    with pytest.raises(UserError, match=r"without last\.ckpt \(it has best\.ckpt\).*ckpt_path=.*best\.ckpt"):
        check(other)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .ckpt files"):
        check(empty)
    with pytest.raises(UserError, match="does not exist"):
        check(tmp_path / "nope.ckpt")


def test_ckpt_path_last_without_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_ROOT", str(tmp_path))
    with pytest.raises(UserError, match="no last.ckpt.*llmlab train"):
        validate(composed("infer", "ckpt_path=last"), "infer")
    (tmp_path / "outputs" / "train" / "runs" / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "outputs" / "train" / "runs" / "r" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    validate(composed("infer", "ckpt_path=last"), "infer")  # there is one: the task picks it


def test_schema_and_cli_do_not_import_torch():
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "import llmlab.cli\n"
        "from llmlab.schema import validate\n"
        f"with initialize_config_dir(config_dir={str(CONF)!r}, version_base='1.3'):\n"
        "    cfg = compose('train')\n"
        "validate(cfg, 'train')\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=cli_env(REPO))


# ---------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "trainer.max_steps=abc"], ["trainer.max_steps=abc", "integer"]),
        (["train", "optim.lr=-1"], ["optim.lr=-1", "> 0"]),
        (["train", "data.path=my.txt"], ["data=text data.path=my.txt"]),
        (["infer", "ckpt_path=/no/such.ckpt", "generation.num_samples=0"], ["generation.num_samples=0"]),
        (["infer", "ckpt_path=/no/such.ckpt", "generation.num_return_sequences=2"],
         ["generation.num_return_sequences=2 is more than generation.num_beams=1"]),
        (["eval", "ckpt_path=/no/such.ckpt", "vectors.similarity=pairs.txt"], ["vectors.similarity=[pairs.txt]"]),
    ],
)
def test_cli_bad_values(run_cli, args, needles):
    assert_user_error(run_cli(*args, check=False), *needles)


def test_cli_checkpoint_dir_without_last(run_cli, tmp_path):
    ckpts = tmp_path / "somerun" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "best.ckpt").write_bytes(b"x")
    assert_user_error(run_cli("eval", f"ckpt_path={ckpts}", check=False), "best.ckpt", "without last.ckpt")
    assert (ckpts / "best.ckpt").read_bytes() == b"x"


def test_cli_gpu_without_cuda(run_cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_user_error(run_cli("train", "trainer=gpu", check=False), "trainer=cpu")


# ---------------------------------------------------------------------------- a valid run is quiet


def test_quiet_warnings_filter_known_noise():
    import logging
    import warnings

    from llmlab.cli import QUIET_LOGGERS, _quiet_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _quiet_warnings()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("The 'train_dataloader' does not have many workers which may be a bottleneck.", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in seen] == ["something else"]
    logger = logging.getLogger(QUIET_LOGGERS[0])
    tip = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "💡 Tip: try installing [litmodels]", (), None)
    info = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "`Trainer.fit` stopped", (), None)
    assert not logger.filter(tip) and logger.filter(info)


@pytest.mark.slow
def test_lightning_info_once_and_no_noise(tmp_path):
    env = cli_env(tmp_path)
    env.pop("PYTHONWARNINGS")  # see the warnings a user would see
    proc = subprocess.run(
        [sys.executable, "-m", "llmlab.cli", "train", *TINY, "trainer.max_steps=4", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("`Trainer.fit` stopped") == 1, out[-3000:]
    assert out.count("GPU available") == 1
    for noise in ("Tip:", "litlogger", "litmodels", "LeafSpec", "does not have many workers"):
        assert noise not in out, noise
    log = (run_dirs(tmp_path)[-1] / "train.log").read_text()
    assert "`Trainer.fit` stopped" in log and "GPU available" in log
