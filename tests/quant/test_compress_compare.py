"""experiment=compress_compare: every conf/compress option composes and sets what it claims; one
post-training job end to end through the CLI (test perplexity, packed checkpoint size, generation
tokens/s, peak RSS, the sweep summary's columns), and its compressed checkpoint reloads to the same
perplexity with `llmlab eval`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmlab.cli import CONF_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the batch runner)
from test_peft_e2e import llmlab_batch  # noqa: E402

EXPERIMENT = CONF_DIR / "experiment" / "compress_compare.yaml"
POST_TRAINING = {"fp32": None, "bf16": "bf16", "int8": "int8", "llm_int8": "llm_int8", "nf4": "nf4",
                 "nf4_bnb": "nf4", "ptq_int4": "int4", "magnitude50": None, "wanda50": None}
TRAINED = ("qat_int4", "distill_half")


def variants() -> list[str]:
    params = yaml.safe_load(EXPERIMENT.read_text())["hydra"]["sweeper"]["params"]
    return str(params["+compress"]).split(",")


def composed(option: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=["experiment=compress_compare", f"+compress={option}",
                                           "model.init_from=/runs/ref"])


def test_the_sweep_is_every_compress_option_the_issue_names():
    files = sorted(p.stem for p in (CONF_DIR / "compress").glob("*.yaml"))
    assert sorted(variants()) == files == sorted([*POST_TRAINING, *TRAINED])
    assert yaml.safe_load(EXPERIMENT.read_text())["requires"] == ["model.init_from"]


@pytest.mark.parametrize("option", sorted(POST_TRAINING))
def test_post_training_variants_train_nothing_and_set_their_scheme(option):
    cfg = composed(option)
    assert cfg.compress.name == option
    assert cfg.trainer.max_steps == 0 and cfg.method.name == "gpt" and cfg.quant.name == "none"
    assert OmegaConf.select(cfg, "compress.quant.name") == POST_TRAINING[option]
    assert cfg.model.init_from == "/runs/ref" and cfg.optimized_metric == "test/ppl"
    if option == "nf4_bnb":
        assert cfg.compress.quant.backend == "bnb" and cfg.compress.quant.bnb_4bit_use_double_quant is True
    elif option == "nf4":
        assert cfg.compress.quant.backend == "llmlab" and cfg.compress.quant.blocksize == 64
    elif option == "ptq_int4":  # the granularity QAT int4 learns: one scale per output channel
        assert cfg.compress.quant.bits == 4 and cfg.compress.quant.group_size is None
    elif option == "llm_int8":
        assert cfg.compress.quant.llm_int8_threshold == 6.0
    expected_prune = {"magnitude50": "magnitude", "wanda50": "wanda"}.get(option, "none")
    assert cfg.prune.name == expected_prune
    if expected_prune != "none":
        assert cfg.prune.amount == 0.5 and cfg.prune.schedule == "one_shot"


def test_qat_int4_fine_tunes_through_the_quantizer_then_exports_like_ptq_int4():
    cfg, ptq = composed("qat_int4"), composed("ptq_int4")
    assert cfg.quant.name == "qat_int4" and cfg.trainer.max_steps > 0
    assert cfg.compress.quant.name == "qat_int4" and cfg.compress.quant.act_bits is None and cfg.quant.act_bits is None
    assert (cfg.quant.bits, cfg.quant.group_size) == (ptq.compress.quant.bits, ptq.compress.quant.group_size) == (4, None)


def test_distill_half_students_learn_from_the_reference():
    cfg = composed("distill_half")
    assert cfg.method.name == "distill" and cfg.trainer.max_steps > 0 and cfg.compress.quant is None
    assert cfg.method.teacher == cfg.method.roles.teacher == "/runs/ref"  # the model every row compresses
    assert cfg.method.student_init == "every_other"


def test_int8_job_end_to_end(tmp_path, small_corpus):
    data = ["data=text", f"data.path={small_corpus}", "data.batch_size=4", "data.eval_batch_size=8"]
    sweep = tmp_path / "sweep"
    ckpt = sweep / "0" / "checkpoints" / "compressed.ckpt"
    r = llmlab_batch(
        tmp_path,
        ["train", *data, "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32",
         "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "test=false",
         "optim.scheduler.warmup_steps=0", "trainer.enable_model_summary=false", "callbacks.samples.max_new_tokens=4",
         "generation.max_new_tokens=4"],
        ["train", "-m", "experiment=compress_compare", "model.init_from={run0}", "+compress=int8", *data,
         f"hydra.sweep.dir={sweep}", "++trainer.limit_test_batches=2", "trainer.limit_val_batches=1",
         "compress.gen_tokens=8", "compress.gen_repeats=1", "generation.max_new_tokens=4"],
        ["eval", f"ckpt_path={ckpt}", "limit_batches=2", "batch_size=8"],  # the packed checkpoint, reloaded
    )
    assert [x.returncode for x in r] == [0, 0, 0], "\n".join(x.stderr[-2000:] for x in r)
    m = json.loads((sweep / "0" / "metrics.json").read_text())
    assert m["model/ckpt_mb"] == ckpt.stat().st_size / 2**20
    assert m["test/ppl"] > 1 and m["infer/tokens_per_s"] > 0 and m["infer/peak_rss_mb"] > 50
    assert 8 < m["quant/bits_per_param"] < 9  # int8 codes + one fp32 scale per output channel of 64 inputs: 8.5
    float_ckpt = Path(r[0].run_dir) / "checkpoints" / "last.ckpt"
    assert m["model/ckpt_mb"] < 0.5 * float_ckpt.stat().st_size / 2**20  # no optimizer state, 1-byte weights
    summary = (sweep / "summary.md").read_text()
    assert "infer/tokens_per_s" in summary and "model/ckpt_mb" in summary and "| int8 |" in summary
    reloaded = json.loads((Path(r[2].run_dir) / "metrics.json").read_text())
    assert reloaded["test/ppl"] == pytest.approx(m["test/ppl"], rel=1e-5)  # the packed weights on disk are the tested model


def test_probe_measures_its_own_process_not_the_sweeps(tmp_path):
    """A sweep's jobs share one process whose peak memory only grows: each row's serving cost is probed
    in a fresh process, whose peak must not inherit the parent's (ru_maxrss would, across exec)."""
    import torch

    from llmlab.data.tokenizers import CharTokenizer
    from llmlab.methods.gpt import GPTLM
    from llmlab.models.build import build_model, config_dict
    from llmlab.quant.probe import peak_rss_bytes, probe_in_subprocess
    from llmlab.tasks.quantize import checkpoint_of, serialize

    tokenizer = CharTokenizer.train(["to be or not to be"])
    model = build_model({"arch": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16}, tokenizer)
    method = GPTLM({"model": model})
    method.model_config = config_dict(model, "gpt")
    method.attach_tokenizer(tokenizer)
    path = tmp_path / "tiny.ckpt"
    path.write_bytes(serialize(checkpoint_of(method, {})))  # the file compress.py writes

    ballast = torch.ones(100_000_000)  # 400 MB more in this (the sweep's) process
    assert peak_rss_bytes() > 400 * 2**20
    served = probe_in_subprocess(path, n_tokens=8, repeats=1)
    assert served["tokens_per_s"] > 0 and 50 < served["peak_rss_mb"] < peak_rss_bytes() / 2**20 - 300
    del ballast
