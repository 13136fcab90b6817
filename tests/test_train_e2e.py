"""End to end through the real CLI: every experiment, train -> eval -> infer, resume, sweeps, wandb."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, run_dirs

pytestmark = pytest.mark.slow


def small(corpus: Path) -> list[str]:
    return ["data=text", f"data.path={corpus}", *TINY]


# recipes that read their own data (labelled passages, a genre subset) or start from a trained model:
# run by test_fine_tuning_experiments_fast_dev_run; the alignment recipes (instruction / preference / prompt
# data) by tests/alignment/test_{sft,reward,dpo,ppo}.py
NOT_ON_TEXT = ("classify_shakespeare_genre", "peft_compare", "gpt_domain_adapt", "sft_arithmetic", "sft_shakespeare",
               "reward_sentiment", "dpo_sentiment", "ppo_sentiment",
               # start from a trained model (tests/distill, tests/quant/test_compress_compare.py)
               "distill_shakespeare", "distill_bert_shakespeare", "compress_compare",
               # sizes its own models from a compute budget (tests/scaling/test_isoflop.py)
               "scaling_sweep")


def test_every_experiment_fast_dev_run(run_cli, small_corpus):
    """One sweep over experiment=glob(*) with fast_dev_run: every recipe composes, trains, validates, tests
    (a small corpus keeps it fast; the full plays are read by the other end-to-end tests)."""
    proc = run_cli("train", "-m", f"experiment=glob(*,exclude=[{','.join(NOT_ON_TEXT)}])", "debug=fdr", "logger=csv",
                   "data=text", f"data.path={small_corpus}",
                   "callbacks.samples.max_new_tokens=8", "generation.max_new_tokens=8")
    sweep = next((run_cli.root / "outputs" / "train" / "multiruns").iterdir())
    jobs = [d for d in sweep.iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    experiments = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
    assert len(jobs) == len(experiments) - len(NOT_ON_TEXT) >= 2
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        if (job / "vectors.bin").exists():  # word2vec / GloVe: validation = intrinsic benchmarks
            assert {"train/loss", "val/ws353", "val/simlex", "val/analogy"} <= set(metrics)
        else:
            assert {"train/loss", "val/loss", "val/ppl", "test/loss", "test/ppl"} <= set(metrics)
    assert "sweep summary" in proc.stdout


def test_fine_tuning_experiments_fast_dev_run(run_cli, small_corpus):
    """The recipes that start from a trained model run from a tiny base: peft_compare sweeps all nine tuners
    (one summary row each), gpt_domain_adapt adapts to the tragedies, classify_shakespeare_genre classifies."""
    run_cli("train", *small(small_corpus), "model.n_layer=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "hydra.run.dir=${paths.log_dir}/base")  # 2 blocks: peft=freeze trains the top 2
    base = run_cli.root / "outputs" / "base"
    fast = ["debug=fdr", "data.max_passages_per_play=3", "callbacks.samples.max_new_tokens=8"]
    run_cli("train", "experiment=peft_compare", f"model.init_from={base}", *fast)
    sweep = next((run_cli.root / "outputs" / "train" / "multiruns").iterdir())
    summary = (sweep / "summary.csv").read_text()
    for tuner in ("none", "lora", "ia3", "adapter", "prefix", "ptuning_v2", "prompt", "bitfit", "freeze"):
        assert f"peft={tuner}" in summary or f",{tuner}," in summary, (tuner, summary)
    assert "failed" not in summary, summary
    run_cli("train", "experiment=gpt_domain_adapt", f"model.init_from={base}", "debug=fdr")
    run_cli("train", "experiment=classify_shakespeare_genre", *TINY[:4], *fast)


def test_train_eval_infer_round_trip(run_cli, small_corpus):
    proc = run_cli("train", *small(small_corpus), "debug=limit", "trainer.max_steps=30", "trainer.val_check_interval=15")
    run = run_dirs(run_cli.root)[-1]
    for name in (".hydra/config.yaml", "checkpoints/last.ckpt", "metrics.json", "metrics.csv", "loss.png",
                 "samples.md", "csv/metrics.csv"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/loss"] < metrics["val/loss_untrained"] - 0.3  # it learned something
    assert metrics["val/ppl"] == pytest.approx(2.718281828 ** metrics["val/loss"], rel=1e-5)
    assert metrics["train/tokens_seen"] == 30 * 8 * 32
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows[0]["tokens"] == "0" and rows[0]["val/loss"]  # untrained point of the curve
    assert "sample:" in proc.stdout

    # the exported Hugging Face directory loads in transformers with the same logits
    import transformers

    from llmlab.checkpoint import load_method

    hf = transformers.GPT2LMHeadModel.from_pretrained(run / "hf").eval()
    ours, _ = load_method(run / "checkpoints" / "last.ckpt")
    x = torch.randint(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), hf(x).logits, rtol=1e-4, atol=1e-4)

    ckpt = run / "checkpoints" / "last.ckpt"
    out = run_cli("eval", f"ckpt_path={ckpt}", "limit_batches=2").stdout  # debug=limit tested 2 batches
    assert "test/ppl" in out
    ev = json.loads((run_dirs(run_cli.root, "eval")[-1] / "metrics.json").read_text())
    assert ev["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
    assert ev["test/tokens"] > 0

    gen = ["generation.max_new_tokens=40", "generation.greedy=true"]
    a = run_cli("infer", f"ckpt_path={ckpt}", "prompt=ROMEO:", *gen).stdout
    b = run_cli("infer", "ckpt_path=last", "prompt=ROMEO:", *gen, "generation.use_kv_cache=false").stdout
    assert a.startswith("ROMEO:") and len(a.rstrip("\n")) == len("ROMEO:") + 40  # char tokens: 40 chars
    assert a == b  # last == this run; KV cache == no cache
    three = run_cli("infer", "ckpt_path=last", "prompt=KING", "generation.num_samples=3", "generation.max_new_tokens=20").stdout
    assert three.count("--- sample") == 3
    beams = run_cli("infer", "ckpt_path=last", "prompt=KING", "generation.num_beams=3", "generation.num_return_sequences=2",
                    "generation.max_new_tokens=20").stdout
    assert beams.count("--- beam") == 2
    prompt = torch.tensor([ours.tokenizer.encode("KING")])
    best = ours.model.generate(prompt, 20, num_beams=3)  # the first beam printed is the best one
    assert "--- beam 1/2 ---\nKING" + ours.tokenizer.decode(best[0, prompt.size(1):].tolist()) in beams


def test_resume_is_exact(run_cli, small_corpus):
    """20 steps straight == 10 steps, stop, resume from last.ckpt to 20 (weights, LR, data position)."""
    common = [*small(small_corpus), "debug=limit", "optim.scheduler.decay_steps=20", "trainer.val_check_interval=10",
              "model.dropout=0.1", "callbacks.samples.max_new_tokens=4", "test=false"]
    run_cli("train", *common, "trainer.max_steps=20")
    straight = run_dirs(run_cli.root)[-1]
    run_cli("train", *common, "trainer.max_steps=10")
    first = run_dirs(run_cli.root)[-1]
    run_cli("train", *common, "trainer.max_steps=20", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    resumed = run_dirs(run_cli.root)[-1]

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 20
    assert a["llmlab"]["tokens_seen"] == b["llmlab"]["tokens_seen"]
    assert a["llmlab"]["flops_seen"] == b["llmlab"]["flops_seen"] > 0  # FLOPs are counted across the resume
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=1e-6, msg=k)
    assert b["lr_schedulers"][0]["last_epoch"] == 20
    m_a = json.loads((straight / "metrics.json").read_text())
    m_b = json.loads((resumed / "metrics.json").read_text())
    assert m_a["val/loss"] == pytest.approx(m_b["val/loss"], abs=1e-6)
    # the resumed run's learning curve includes the first run's points
    rows = list(csv.DictReader((resumed / "metrics.csv").open()))
    assert int(rows[0]["step"]) == 0 and int(rows[-1]["step"]) == 20


def test_sweep_writes_summary(run_cli, small_corpus):
    run_cli("train", "-m", *small(small_corpus), "debug=limit", "trainer.max_steps=4", "trainer.val_check_interval=4",
            "model.n_layer=1,2", "optim.lr=1e-3,3e-4", "callbacks.samples.max_new_tokens=4")
    sweep = next((run_cli.root / "outputs" / "train" / "multiruns").iterdir())
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    assert {(int(r["model.n_layer"]), float(r["optim.lr"])) for r in rows} == {
        (1, 1e-3), (1, 3e-4), (2, 1e-3), (2, 3e-4)}
    assert all(r["status"] == "ok" and float(r["val/loss"]) > 0 for r in rows)
    losses = [float(r["val/loss"]) for r in rows]
    assert losses == sorted(losses)
    md = (sweep / "summary.md").read_text()
    assert md.count("\n| ") == 5 and "val/loss" in md
    for job in ("0", "1", "2", "3"):
        assert (sweep / job / "metrics.json").is_file() and (sweep / job / "checkpoints" / "last.ckpt").is_file()


def test_optuna_search(run_cli, small_corpus):
    run_cli("train", "-m", "hparams_search=gpt_optuna", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.n_startup_trials=2", *small(small_corpus), "debug=fdr")
    sweep = next((run_cli.root / "outputs" / "train" / "multiruns").iterdir())
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert (sweep / "optimization_results.yaml").is_file()  # written by the Optuna sweeper
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()


def wandb_records(run_dir: Path) -> dict:
    """The run, config and history records of an offline wandb run (its run-<id>.wandb file: wandb's
    LevelDB-style log of protobuf records, 32 KiB blocks of [crc32, length, type] + data)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, chunk, out = path.read_bytes(), 7, b"", {"run": [], "config": [], "history": []}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (n == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            out.setdefault(record.WhichOneof("record_type"), []).append(record)
    return out


def test_wandb_offline_grouped_and_resumed(run_cli, small_corpus):
    common = [*small(small_corpus), "debug=limit", "trainer.max_steps=10", "logger=many", "test=false",
              "callbacks.samples.max_new_tokens=4"]
    run_cli("train", "-m", *common, "model.n_layer=1,2")
    sweep = next((run_cli.root / "outputs" / "train" / "multiruns").iterdir())
    ids = []
    for job in ("0", "1"):
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs  # one wandb run per job
        ids.append(runs[0].name.rsplit("-", 1)[-1])
        # the jobs of one sweep form a group; tags = `tags` + method + run name; job_type = the task; the
        # whole resolved config is attached
        records = wandb_records(runs[0])
        (run,) = records["run"]
        assert run.run.run_group == f"gpt_text/{sweep.name}" and run.run.job_type == "train"
        assert list(run.run.tags) == ["dev", "gpt", "gpt_text"]
        config = {u.key: json.loads(u.value_json) for r in records["config"] for u in r.config.update}
        assert config["model"]["n_layer"] == int(job) + 1 and config["optim"]["lr"] > 0
        logged = {i.key or "/".join(i.nested_key) for r in records["history"] for i in r.history.item}
        assert {"train/loss", "val/loss", "train/tokens_seen"} <= logged
        # TensorBoard shows the same curves
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(sweep / job / "tensorboard"))
        events.Reload()
        assert {"train/loss", "val/loss", "train/tokens_seen"} <= set(events.Tags()["scalars"])
        val = [e.value for e in events.Scalars("val/loss")]
        assert val[-1] == pytest.approx(json.loads((sweep / job / "metrics.json").read_text())["val/loss"], rel=1e-6)
    assert ids[0] != ids[1]
    ckpt = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["llmlab"]["wandb_id"] == ids[0]
    run_cli("train", *common, "trainer.max_steps=20", "optim.scheduler.decay_steps=10",
            f"ckpt_path={sweep / '0' / 'checkpoints' / 'last.ckpt'}")
    resumed = run_dirs(run_cli.root)[-1]
    assert [p.name.rsplit("-", 1)[-1] for p in (resumed / "wandb").glob("offline-run-*")] == [ids[0]]


def test_overfit_one_batch(run_cli, small_corpus):
    run_cli("train", *small(small_corpus), "debug=overfit", "trainer.max_steps=150", "model.n_embd=64",
            "optim.lr=3e-3", "test=false", "callbacks.samples.max_new_tokens=4")
    metrics = json.loads((run_dirs(run_cli.root)[-1] / "metrics.json").read_text())
    assert metrics["train/loss"] < 0.5


def test_init_from_hf_directory(run_cli, small_corpus, tmp_path):
    """model.init_from=DIR starts from local HF GPT-2 weights; the checkpoint no longer needs DIR."""
    import shutil

    import transformers

    hf_dir = tmp_path / "hf-gpt2-tiny"
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(config)
    hf.save_pretrained(hf_dir)
    run_cli("train", *small(small_corpus), "tokenizer=gpt2", f"model.init_from={hf_dir}", "debug=fdr")
    run = run_dirs(run_cli.root)[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/loss"] == pytest.approx(10.82, abs=0.3)  # ~ln(50257): random HF init

    run_cli("train", *small(small_corpus), "tokenizer=gpt2", f"model.init_from={hf_dir}", "debug=limit",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false")
    ckpt = run_dirs(run_cli.root)[-1] / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state["model.transformer.wpe.weight"].shape == (32, 32)  # block_size=32 trims n_positions=64
    shutil.rmtree(hf_dir)
    assert "test/ppl" in run_cli("eval", f"ckpt_path={ckpt}", "limit_batches=1").stdout
