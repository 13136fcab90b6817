"""`llmlab quantize` end to end through the CLI: a trained char GPT quantized to int8 / int4 / nf4 into
new run dirs (real packed weights: files measured against the float checkpoint), loaded by
`llmlab eval` and `llmlab infer ckpt_path=<run dir>`; a QAT run trained, evaluated and exported with
the same perplexity; bad input is one line, exit 2, and no checkpoint written.

All commands of a test run in one Python process (test_peft_e2e's batch runner: ``llmlab.cli.main``
per command, its exit code, stdout and stderr), Lightning imported once.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest helpers, the batch runner)
from test_cli_errors import assert_user_error  # noqa: E402
from test_peft_e2e import llmlab_batch  # noqa: E402

pytestmark = pytest.mark.xdist_group("quantize_cli")

# Linear weights dominate (2 blocks x 12 x 256^2 = 1.57M of 1.6M parameters), as in any real LM
MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=256", "model.block_size=32"]
FAST = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "test=false",
        "optim.scheduler.warmup_steps=0", "trainer.enable_model_summary=false", "callbacks.samples.max_new_tokens=4",
        "generation.max_new_tokens=4"]
EVAL = ["limit_batches=2", "batch_size=8"]


def data(corpus: Path) -> list[str]:
    return ["data=text", f"data.path={corpus}", "data.batch_size=4", "data.eval_batch_size=8"]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def float_checkpoint_bytes(ckpt: Path) -> int:
    """The training checkpoint without its optimizer state: what the float model takes in this format."""
    full = torch.load(ckpt, map_location="cpu", weights_only=True)
    full.pop("optimizer_states", None)
    buf = io.BytesIO()
    torch.save(full, buf)
    return len(buf.getvalue())


def test_quantize_eval_infer_round_trip(tmp_path, small_corpus):
    root = tmp_path
    r = llmlab_batch(
        root,
        ["train", *data(small_corpus), *MODEL, *FAST],                                # 0 the float model
        ["quantize", "ckpt_path={run0}", "quant=int8"],                               # 1
        ["quantize", "ckpt_path={run0}", "quant=nf4"],                                # 2
        ["quantize", "ckpt_path={run0}", "quant=int4", "quant.group_size=null"],      # 3
        ["eval", "ckpt_path={run1}", *EVAL],                                          # 4 the int8 run dir
        ["eval", "ckpt_path={run0}", *EVAL, "quant=int8"],                            # 5 int8 on the fly
        ["eval", "ckpt_path={run0}", *EVAL],                                          # 6 fp32
        ["eval", "ckpt_path={run2}", *EVAL],                                          # 7 nf4
        ["infer", "ckpt_path={run2}", "prompt=ROMEO:", "generation.max_new_tokens=8"],  # 8
        ["quantize", "ckpt_path={run1}", "quant=int4"],                               # 9 already quantized
    )
    for res in r[:9]:
        res.ok()
    fp_run, int8_run, nf4_run, int4_run = r[0].run, r[1].run, r[2].run, r[3].run
    assert all(p.parent.parent.name == "quantize" for p in (int8_run, nf4_run, int4_run))  # outputs/quantize/runs/...

    # real bytes on disk, measured against the float model's checkpoint
    fp_bytes = float_checkpoint_bytes(fp_run / "checkpoints" / "last.ckpt")
    sizes = {name: (run / "checkpoints" / "last.ckpt").stat().st_size for name, run in
             (("int8", int8_run), ("nf4", nf4_run), ("int4", int4_run))}
    assert sizes["int8"] < 0.35 * fp_bytes, (sizes, fp_bytes)
    assert sizes["nf4"] < 0.2 * fp_bytes and sizes["int4"] < 0.2 * fp_bytes, (sizes, fp_bytes)
    m8 = metrics(int8_run)
    assert m8["quant/size_mb"] * 2**20 == pytest.approx(sizes["int8"])
    assert m8["quant/fp_size_mb"] * 2**20 == pytest.approx(fp_bytes, rel=0.02)  # the same format, float weights
    assert m8["quant/ratio"] == pytest.approx(sizes["int8"] / (m8["quant/fp_size_mb"] * 2**20))
    assert m8["quant/bits_per_param"] == pytest.approx(8 + 32 * (3 * 256 + 256 + 4 * 256 + 256) / (12 * 256 * 256))
    assert metrics(int4_run)["quant/bits_per_param"] < 4.2 and metrics(nf4_run)["quant/bits_per_param"] < 4.2
    ckpt = torch.load(int8_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    meta = ckpt["llmlab"]
    assert meta["quant"]["name"] == "int8" and meta["tokenizer"] and meta["config"]["data"]["path"] == str(small_corpus)
    assert ckpt["state_dict"]["model.transformer.h.0.mlp.c_fc.qweight"].dtype == torch.int8
    assert "model.transformer.h.0.mlp.c_fc.weight" not in ckpt["state_dict"] and "optimizer_states" not in ckpt

    # eval / infer load the quantized run dirs; the int8 file scores what int8 on the fly scores
    ppl = {name: metrics(r[i].run)["test/ppl"] for name, i in (("int8", 4), ("int8_fly", 5), ("fp32", 6), ("nf4", 7))}
    assert ppl["int8"] == pytest.approx(ppl["int8_fly"], rel=1e-6)
    assert ppl["int8"] != ppl["fp32"] and abs(ppl["int8"] / ppl["fp32"] - 1) < 0.02, ppl
    assert abs(ppl["nf4"] / ppl["fp32"] - 1) < 0.1, ppl
    assert r[8].output.strip().startswith("ROMEO:")

    # quantizing an already quantized checkpoint: one line, exit 2, no checkpoint written
    assert_user_error(r[9], "already quantized")
    assert r[9].run_dir is None or not (Path(r[9].run_dir) / "checkpoints").exists()
    assert len(list((root / "outputs" / "quantize").glob("runs/*/checkpoints/*.ckpt"))) == 3  # int8, nf4, int4 only


def test_qat_train_eval_export_and_bad_input(tmp_path, small_corpus):
    root = tmp_path
    small = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]
    r = llmlab_batch(
        root,
        ["train", *data(small_corpus), *small, *FAST, "quant=qat_int4"],    # 0 QAT
        ["eval", "ckpt_path={run0}", *EVAL],                                 # 1 fake-quant model
        ["quantize", "ckpt_path={run0}", "quant=qat_int4"],                  # 2 export to real int4
        ["eval", "ckpt_path={run2}", *EVAL],                                 # 3
        ["quantize", "ckpt_path={run0}", "quant=qat_int8"],                  # 4 other bits than trained
        ["train", *data(small_corpus), *small, *FAST, "quant=int8"],         # 5 PTQ with nothing to train
        ["quantize", "ckpt_path={run0}", "quant=int8", "quant.bits=9"],      # 6
        ["quantize", "ckpt_path={run0}"],                                    # 7 no scheme
        ["eval", "ckpt_path={run0}", "quant=int4", "quant.backend=bnb"],     # 8 bnb has no absmax int4
        ["train", *data(small_corpus), *small, *FAST, "quant.name=int3"],    # 9 unknown scheme
    )
    for res in r[:4]:
        res.ok()
    meta = torch.load(r[0].run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["llmlab"]
    assert meta["quant"]["name"] == "qat_int4"
    exported = torch.load(r[2].run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert exported["llmlab"]["quant"]["name"] == "int4" and exported["llmlab"]["quant"]["qat"] == "qat_int4"
    assert exported["state_dict"]["model.transformer.h.0.attn.c_attn.qweight"].dtype == torch.uint8
    assert metrics(r[3].run)["test/ppl"] == pytest.approx(metrics(r[1].run)["test/ppl"], rel=1e-6)  # same model
    assert_user_error(r[4], "qat_int4", "bits=4")
    assert_user_error(r[5], "nothing would train", "peft=lora")
    assert_user_error(r[6], "quant.bits=9", "[2, 8]")
    assert_user_error(r[7], "needs a scheme")
    assert_user_error(r[8], "quant.backend=bnb")
    assert_user_error(r[9], "quant.name=int3")
    for bad in (r[4], r[6], r[7]):
        assert bad.run_dir is None or not (Path(bad.run_dir) / "checkpoints").exists()
