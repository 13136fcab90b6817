"""Models by role (DESIGN.md): one builder, frozen roles outside optimizer and checkpoints, weights
from llmlab checkpoints with their tokenizer, stable method names, loading that runs no code."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import TINY, cli_env, run_dirs
from test_cli_errors import assert_user_error

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
ARCH = {"gpt": "gpt", "word2vec": "word2vec", "word2vec_seed": "word2vec", "glove": "glove", "glove_seed": "glove",
        "elmo": "elmo", "bert": "bert", "t5": "t5", "classify": "gpt", **dict.fromkeys(("sft", "reward", "dpo", "ppo", "distill", "distill_seed"), "gpt"),
        "distill_bert": "bert"}
TOKENIZER = {"gpt": "char", "word2vec": "word", "word2vec_seed": "word", "glove": "word", "glove_seed": "word",
             "elmo": "word", "bert": "wordpiece", "t5": "t5", "classify": "char",
             **dict.fromkeys(("sft", "reward", "dpo", "ppo", "distill", "distill_seed"), "char"), "distill_bert": "wordpiece"}
# classify needs labelled data (tests/test_classify.py runs it alone); the alignment methods read instruction /
# preference / prompt data of their own (test_alignment_methods_alone below); distillation needs a teacher
# (tests/distill/test_distill.py)
ALIGNMENT = ("sft", "reward", "dpo", "ppo")
DISTILL = ("distill", "distill_seed", "distill_bert")
LM_METHODS = [m for m in METHODS if m != "classify" and m not in ALIGNMENT + DISTILL]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


# ---------------------------------------------------------------------------- composition per group


@pytest.mark.parametrize("method", METHODS)
def test_method_alone_brings_its_groups(method):
    cfg = compose_train(f"method={method}")
    assert cfg.model.arch == ARCH[method]
    assert cfg.tokenizer.name == TOKENIZER[method]
    if ARCH[method] in ("word2vec", "glove"):  # manual optimisation: no clipping, epochs
        assert cfg.trainer.gradient_clip_val is None or method == "word2vec_seed"
        assert cfg.trainer.max_epochs > 0


def test_user_overrides_win_over_the_method():
    cfg = compose_train("method=bert", "model=bert_seed", "tokenizer.vocab_size=100", "trainer.max_steps=7")
    assert (cfg.model.name, cfg.tokenizer.vocab_size, cfg.trainer.max_steps) == ("bert_seed", 100, 7)
    cfg = compose_train("experiment=word2vec_shakespeare", "trainer.max_epochs=2", "method.vector_size=16")
    assert cfg.trainer.max_epochs == 2 and cfg.model.vector_size == 16  # the model group reads the method's key


@pytest.mark.parametrize("method, node", [("bert", "method.datamodule.batch_size"),
                                          ("word2vec", "method.datamodule.batch_words"),
                                          ("glove", "method.datamodule.batch_size"),
                                          ("t5", "method.datamodule.batch_size")])
def test_data_batch_size_is_the_one_key(method, node):
    from omegaconf import OmegaConf

    cfg = compose_train(f"method={method}", "data.batch_size=5")
    assert OmegaConf.select(cfg, node) == 5


def test_every_method_alone_runs(run_cli, small_corpus):
    """`llmlab train method=X` with nothing else composes and trains (one fast_dev_run per method)."""
    run_cli("train", "-m", "method=" + ",".join(LM_METHODS), "data=text", f"data.path={small_corpus}", "debug=fdr",
            "callbacks.samples.max_new_tokens=4", "generation.max_new_tokens=4")
    sweep = next((run_cli.root / "outputs" / "train" / "multiruns").iterdir())
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == len(LM_METHODS) and all(r["status"] == "ok" for r in rows), rows


def test_alignment_methods_alone(run_cli):
    """`llmlab train method=sft|reward` runs with its own default data; dpo and ppo need a starting policy
    and say so in one line."""
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "debug=fdr", "callbacks.samples.max_new_tokens=4"]
    run_cli("train", "method=sft", "data.builder.max_number=5", "method.eval_examples=2", *tiny)
    run_cli("train", "method=reward", "data.builder.lines_per_play=20", *tiny)
    assert len(run_dirs(run_cli.root)) == 2
    for args, key in [(["method=dpo"], "model.init_from"), (["method=ppo"], "model.init_from"),
                      (["experiment=dpo_sentiment"], "model.init_from"), (["experiment=ppo_sentiment"], "model.init_from"),
                      (["method=distill"], "method.teacher"), (["experiment=compress_compare"], "model.init_from")]:
        proc = run_cli("train", *args, *tiny, check=False)  # recipes say `requires: [model.init_from]` / [method.teacher]
        assert proc.returncode == 2 and key in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr


# ---------------------------------------------------------------------------- roles


def tiny_gpt(seed: int = 0):
    from llmlab.models.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.1))


def test_frozen_roles_are_eval_outside_optimizer_and_checkpoint():
    from llmlab.methods.gpt import GPTLM

    method = GPTLM(models={"model": tiny_gpt(0), "ref": tiny_gpt(1)}, optim={"optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1}})
    method.train()
    assert method.model.training and not method.roles["ref"].training
    assert not any(p.requires_grad for p in method.roles["ref"].parameters())
    trainable = {id(p) for g in method.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert trainable == {id(p) for p in method.model.parameters()}
    state = method.state_dict()
    assert state and not any(k.startswith("roles.") for k in state)
    method.load_state_dict(state)  # strict: the frozen role is not expected in the file


def test_state_hash_sees_every_weight():
    from llmlab.models.build import state_hash

    a, b = tiny_gpt(0), tiny_gpt(0)
    assert state_hash(a) == state_hash(b)
    with torch.no_grad():
        b.transformer.h[0].mlp.c_fc.bias[3] += 1e-6
    assert state_hash(a) != state_hash(b)


# ---------------------------------------------------------------------------- end to end


def small(corpus: Path) -> list[str]:
    return ["data=text", f"data.path={corpus}", *TINY, "callbacks.progress.kind=plain"]


@pytest.fixture(scope="module")
def trained_char_run(tmp_path_factory, small_corpus) -> Path:
    """A 12-step char GPT run, trained once per test worker."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("char_run")
    subprocess.run([sys.executable, "-m", "llmlab.cli", "train", *small(small_corpus), "trainer.max_steps=12",
                    "trainer.val_check_interval=6", "trainer.log_every_n_steps=5"],
                   cwd=root, env=cli_env(root), check=True, capture_output=True, text=True)
    return run_dirs(root)[-1]


@pytest.fixture
def char_run(trained_char_run, tmp_path) -> Path:
    """This test's own copy of the run (tests change files in it)."""
    import shutil

    return Path(shutil.copytree(trained_char_run, tmp_path / "char_run"))


def test_init_from_llmlab_run_brings_tokenizer_and_config(run_cli, small_corpus, char_run, tmp_path):
    """model.init_from=<run> starts from its weights with its tokenizer and architecture, whatever
    the tokenizer/model groups say; the new run's first validation equals the old run's last."""
    from llmlab.checkpoint import load_method
    from llmlab.models.build import load_pretrained

    old, meta = load_method(char_run)
    pretrained = load_pretrained(char_run)
    assert pretrained.tokenizer_state == meta["tokenizer"] and pretrained.config["n_embd"] == 32
    for k, v in old.model.state_dict().items():
        torch.testing.assert_close(pretrained.model.state_dict()[k], v, rtol=0, atol=0)

    run_cli("train", "data=text", f"data.path={small_corpus}", f"model.init_from={char_run}", "tokenizer=gpt2",
            "data.batch_size=8", "data.eval_batch_size=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "callbacks.samples.max_new_tokens=4", "generation.max_new_tokens=4", "test=false")
    run = run_dirs(run_cli.root)[-1]
    new = json.loads((run / "metrics.json").read_text())
    before = json.loads((char_run / "metrics.json").read_text())
    assert new["val/loss_untrained"] == pytest.approx(before["val/loss"], abs=1e-4)  # same weights, same data
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["llmlab"]["tokenizer"] == meta["tokenizer"]  # char, not gpt2
    assert ckpt["llmlab"]["model"]["n_layer"] == 1 and ckpt["llmlab"]["method"] == "gpt"

    # the exported HF dir carries the tokenizer too
    run_cli("train", "data=text", f"data.path={small_corpus}", f"model.init_from={char_run / 'hf'}",
            "tokenizer=gpt2", "debug=fdr")


def test_frozen_role_recorded_not_stored_and_checked(run_cli, small_corpus, char_run):
    args = [*small(small_corpus), f"model.init_from={char_run}", "+method.roles.ref=null",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false"]
    run_cli("train", *args)
    run = run_dirs(run_cli.root)[-1]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    record = ckpt["llmlab"]["roles"]["ref"]
    assert record["source"].endswith("last.ckpt") and len(record["sha256"]) == 64
    assert not any(k.startswith("roles.") for k in ckpt["state_dict"])
    assert "test/ppl" in run_cli("eval", f"ckpt_path={run}", "limit_batches=1").stdout

    # the source changes under it: refused with one line naming the role
    source = Path(record["source"])
    changed = torch.load(source, weights_only=True)
    changed["state_dict"]["model.lm_head.weight"] += 1.0
    torch.save(changed, source)
    assert_user_error(run_cli("eval", f"ckpt_path={run}", check=False), "'ref'", "changed since training")


def test_tokens_seen_agree_everywhere(char_run):
    """train/tokens_seen: the loggers' last value == metrics.json == the curve's tokens column."""
    metrics = json.loads((char_run / "metrics.json").read_text())
    assert metrics["train/tokens_seen"] == 12 * 8 * 32
    logged = [r for r in csv.DictReader((char_run / "csv" / "metrics.csv").open()) if r.get("train/tokens_seen")]
    assert float(logged[-1]["train/tokens_seen"]) == metrics["train/tokens_seen"]
    curve = list(csv.DictReader((char_run / "metrics.csv").open()))
    assert float(curve[-1]["tokens"]) == metrics["train/tokens_seen"]


def test_format1_checkpoint_still_loads(char_run, tmp_path):
    """Checkpoints written before models by role (method as an import path, no model entry) load."""
    from llmlab.checkpoint import load_method

    new, _ = load_method(char_run)
    ckpt = torch.load(char_run / "checkpoints" / "last.ckpt", weights_only=True)
    meta = ckpt["llmlab"]
    arch = meta.pop("model")
    meta.pop("roles")
    meta.update(format=1, method="llmlab.methods.gpt.GPTLM")
    ckpt["hyper_parameters"] = {"model": {**{k: v for k, v in arch.items() if k != "arch"}, "name": "gpt_nano",
                                          "init_from": None, "compile": False},
                                "optim": ckpt["hyper_parameters"].get("optim"), "vocab_size": arch["vocab_size"],
                                "name": "gpt"}
    old_file = tmp_path / "format1.ckpt"
    torch.save(ckpt, old_file)
    old, _ = load_method(old_file)
    x = torch.randint(0, arch["vocab_size"], (2, 16))
    torch.testing.assert_close(old.model(x), new.model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------- loading runs no code


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


@pytest.mark.parametrize("command", ["eval", "infer", "train-resume", "train-init"])
def test_malicious_pickle_is_refused_without_running(run_cli, tmp_path, command):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:  # a torch-like pickle whose unpickling would write a file
        torch.save({"state_dict": {}, "llmlab": {"payload": _Evil(str(marker))}}, f)
    assert not marker.exists()
    args = {"eval": ["eval", f"ckpt_path={evil}"], "infer": ["infer", f"ckpt_path={evil}"],
            "train-resume": ["train", f"ckpt_path={evil}"],
            "train-init": ["train", f"model.init_from={evil}"]}[command]
    line = assert_user_error(run_cli(*args, check=False), str(evil), "needs code to load")
    assert "not loaded" in line
    assert not marker.exists()  # nothing ran


def test_bin_weights_need_the_flag(run_cli, small_corpus, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from llmlab.models.build import load_pretrained

    hf_dir = tmp_path / "hf-bin"
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(hf_dir)  # transformers 5 writes safetensors only: make the legacy pickle from it
    torch.save(load_file(hf_dir / "model.safetensors"), hf_dir / "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
    args = [*small(small_corpus), f"model.init_from={hf_dir}", "debug=fdr"]
    assert_user_error(run_cli("train", *args, check=False), "pytorch_model.bin", "allow_bin")
    ours = load_pretrained(hf_dir, allow_bin=True).model.eval()  # what model.allow_bin=true reads (weights_only)
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- what a new user hit


def test_gpt_with_word_tokenizers_samples_and_checkpoints(run_cli, small_corpus):
    for tok in ("word", "wordpiece"):
        run_cli("train", *small(small_corpus), f"tokenizer={tok}", "trainer.max_steps=4", "trainer.val_check_interval=2",
                "test=false")
        run = run_dirs(run_cli.root)[-1]
        assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "samples.md").is_file(), tok


def test_short_run_writes_best_and_samples(run_cli, small_corpus):
    run_cli("train", *small(small_corpus), "trainer.max_steps=3", "test=false")  # val_check_interval=250
    run = run_dirs(run_cli.root)[-1]
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "samples.md"):
        assert (run / name).is_file(), name


def test_resume_mistakes_are_one_line(run_cli, small_corpus, char_run):
    ckpt = char_run / "checkpoints" / "last.ckpt"
    assert_user_error(run_cli("train", *small(small_corpus), f"ckpt_path={ckpt}", "model.n_layer=3", check=False),
                      "model.n_layer=1", "3")
    assert_user_error(run_cli("train", *small(small_corpus), f"ckpt_path={ckpt}", "trainer.max_steps=5", check=False),
                      "step 12", "trainer.max_steps")
    assert_user_error(run_cli("eval", f"ckpt_path={char_run / 'checkpoints' / 'nothing'}", check=False), "does not exist")
    out = run_cli("eval", f"ckpt_path={char_run / 'checkpoints'}", "limit_batches=1").stdout  # the checkpoints dir works
    assert "test/ppl" in out


def test_init_from_hf_dir_with_another_vocabulary_names_it(run_cli, small_corpus, char_run):
    (char_run / "hf" / "llmlab_tokenizer.json").unlink()  # an HF dir without llmlab's tokenizer
    line = assert_user_error(run_cli("train", *small(small_corpus), f"model.init_from={char_run / 'hf'}",
                                     "tokenizer=gpt2", "debug=fdr", check=False), "vocabulary", "tokenizer")
    assert "block_size" not in line


def test_eval_of_a_char_checkpoint_on_text_with_unseen_characters(run_cli, char_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(("The naïve café owner paid 5€ — ΩΩ. " * 400) + "\n", encoding="utf-8")
    out = run_cli("eval", f"ckpt_path={char_run}", "data=text", f"data.path={other}").stdout
    metrics = json.loads((run_dirs(run_cli.root, "eval")[-1] / "metrics.json").read_text())
    assert metrics["test/unknown_tokens"] > 0 and metrics["test/loss"] > 0
    assert "unknown_tokens" in out


def test_models_and_nn_import_neither_lightning_nor_hydra():
    import subprocess
    import sys

    code = ("import sys, llmlab.models.build, llmlab.models.gpt, llmlab.models.bert, llmlab.models.t5, "
            "llmlab.models.elmo, llmlab.models.word2vec, llmlab.models.glove, llmlab.models.hf.gpt2, "
            "llmlab.models.hf.bert, llmlab.models.hf.t5, llmlab.nn, llmlab.checkpoint; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'hydra', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bert_and_t5_start_from_hf_directories(run_cli, small_corpus, tmp_path):
    """method=bert / method=t5 with model.init_from=<HF dir>: BERT's vocab.txt comes along (ids 100-103
    for its specials), T5 (SentencePiece, which llmlab cannot read) trains its tokenizer=t5 within
    the model's vocabulary."""
    import transformers

    words = sorted({w for w in small_corpus.read_text().lower().split() if w.isalpha()})[:400]
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    bert_dir = tmp_path / "hf-bert"
    bert_dir.mkdir()
    (bert_dir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64)).save_pretrained(bert_dir)
    run_cli("train", "method=bert", f"model.init_from={bert_dir}", "data=text", f"data.path={small_corpus}",
            "method.datamodule.max_seq_len=64", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "data.batch_size=4", "data.eval_batch_size=8", "trainer.limit_val_batches=2", "test=false")
    ckpt = torch.load(run_dirs(run_cli.root)[-1] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["llmlab"]["tokenizer"]["vocab"] == vocab and ckpt["llmlab"]["model"]["hidden_size"] == 16

    t5_dir = tmp_path / "hf-t5"
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=512, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(t5_dir)
    run_cli("train", "method=t5", f"model.init_from={t5_dir}", "tokenizer.vocab_size=512", "data=text",
            f"data.path={small_corpus}", "method.input_length=32", "debug=fdr")
    line = assert_user_error(run_cli("train", "method=t5", f"model.init_from={t5_dir}", "tokenizer.vocab_size=1024",
                                     "data=text", f"data.path={small_corpus}", "debug=fdr", check=False), "512")
    assert "tokenizer" in line
