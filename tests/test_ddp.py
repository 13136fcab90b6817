"""Data-parallel training through the real CLI: `trainer=ddp` with 2 CPU processes (gloo).

Checks what DDP promises: the run starts its second rank and exits 0, one run dir and one
last.ckpt (rank 0 writes), ``train/tokens_seen`` adds both ranks' tokens, val/test metrics equal a
one-process ``llmlab eval`` of the same weights (every window scored once, none repeated), and a
2-process checkpoint resumes in 1 process (and a 1-process one in 2).
"""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, run_dirs

pytestmark = pytest.mark.slow

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
STEPS = 4
QUIET = ["callbacks.samples.max_new_tokens=4", "generation.max_new_tokens=4"]


def metrics_of(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def the_run(root):
    """The one run dir a command made (rank 1 writes into rank 0's), with its one last.ckpt."""
    runs = run_dirs(root)
    assert len(runs) == 1, runs
    ckpts = sorted(root.glob("outputs/**/last.ckpt"))
    assert ckpts == [runs[0] / "checkpoints" / "last.ckpt"], ckpts
    return runs[0]


def test_gpt_ddp_counts_all_ranks_and_evaluates_like_one_process(run_cli, small_corpus):
    # the val split is scored whole: 313 windows, so rank 0 scores 157 and rank 1 156 (none repeated)
    common = [*TINY, *QUIET, "data=text", f"data.path={small_corpus}", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=null"]
    proc = run_cli("train", *common, *DDP, f"trainer.max_steps={STEPS}")
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    run = the_run(run_cli.root)
    assert (run / "train.log").is_file() and (run / "train_rank1.log").is_file()  # rank 1 logs beside rank 0
    metrics = metrics_of(run)

    per_rank = 8 * 32  # data.batch_size x block_size
    assert metrics["train/tokens_seen"] == 2 * per_rank * STEPS
    assert metrics["train/flops"] == 2 * per_rank * STEPS * metrics["model/flops_per_token"]
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("tokens")]
    assert float(rows[-1]["tokens"]) == metrics["train/tokens_seen"]  # the learning curve's x axis counts both ranks
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS and ckpt["llmlab"]["tokens_seen"] == 2 * per_rank * STEPS

    run_cli("eval", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "split=val")  # one process
    one = metrics_of(run_dirs(run_cli.root, "eval")[-1])
    assert one["val/tokens"] == 10_000 and one["val/loss"] == pytest.approx(metrics["val/loss"], abs=1e-5)

    # the 2-process checkpoint resumes in 1 process: step, token count and data position carry on
    run_cli("train", *common, f"trainer.max_steps={STEPS + 2}", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    resumed = metrics_of(run_dirs(run_cli.root)[-1])
    assert resumed["train/tokens_seen"] == 2 * per_rank * STEPS + per_rank * 2


def test_bert_ddp_resumes_a_one_process_checkpoint(run_cli, small_corpus):
    bert = ["experiment=bert_shakespeare", "data=text", f"data.path={small_corpus}", "tokenizer.vocab_size=500",
            "method.datamodule.max_seq_len=32", "data.batch_size=8", "data.eval_batch_size=32",
            "model.hidden_size=32", "model.intermediate_size=64", "model.max_position_embeddings=32",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
            "trainer.enable_model_summary=false", *QUIET]
    run_cli("train", *bert, "trainer.max_steps=2")
    first = run_dirs(run_cli.root)[-1]
    first_tokens = metrics_of(first)["train/tokens_seen"]
    run_cli("train", *bert, *DDP, f"trainer.max_steps={STEPS}", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    run = run_dirs(run_cli.root)[-1]
    assert sorted(run.glob("checkpoints/last.ckpt")) and not (run / "checkpoints" / "last-v1.ckpt").exists()
    metrics = metrics_of(run)
    for split in ("val", "test"):
        assert 0 <= metrics[f"{split}/mlm_acc"] <= 1 and 0 <= metrics[f"{split}/nsp_acc"] <= 1

    # masked tokens per batch vary: the count is every rank's batches, recomputed from the data
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS
    added = sum(masked_tokens(ckpt, rank, range(2, STEPS)) for rank in (0, 1))
    assert masked_tokens(ckpt, 0, range(2)) == first_tokens
    assert metrics["train/tokens_seen"] == ckpt["llmlab"]["tokens_seen"] == first_tokens + added


def masked_tokens(ckpt: dict, rank: int, batches) -> int:
    """Target (masked) tokens of training batches ``batches`` of data-parallel rank ``rank``."""
    from omegaconf import OmegaConf

    from llmlab.tasks.common import build_data, split_method_config

    meta = ckpt["llmlab"]
    config = meta["config"]
    _, datamodule_cfg = split_method_config(OmegaConf.create(config["method"]))
    datamodule, _ = build_data(OmegaConf.create(config["data"]), tokenizer_state=meta["tokenizer"],
                               datamodule_cfg=datamodule_cfg)
    datamodule.trainer = SimpleNamespace(global_rank=rank)
    batches_of_rank = datamodule.train_dataset()
    return sum(int((batches_of_rank.batch(i)["labels"] != -100).sum()) for i in batches)


def test_ranks_share_the_eval_windows_once():
    """What the ranks score: every window of a split once (an uneven split too), and under a batch
    limit the same windows as one process (limit_val_batches=6: 3 batches on each of 2 ranks)."""
    import numpy as np

    from llmlab.data.base import eval_loader
    from llmlab.data.lm import StridedWindows
    from llmlab.distributed import per_rank_eval_limits

    windows = StridedWindows(np.arange(10_000), 32)  # 313 windows (312 full + the tail), told apart by their first token
    one = [x[:, 0].tolist() for x, _ in eval_loader(windows, 16)]  # first token of every window, per batch

    def ranks(world: int) -> list[list[list[int]]]:
        return [[x[:, 0].tolist() for x, _ in eval_loader(windows, 16, SimpleNamespace(world_size=world, global_rank=r))]
                for r in range(world)]

    flat = sorted(t for b in one for t in b)
    for world in (2, 3):
        assert sorted(t for rank in ranks(world) for b in rank for t in b) == flat  # once each, nothing padded
    trainer = SimpleNamespace(world_size=2, limit_val_batches=6, limit_test_batches=1.0)
    per_rank_eval_limits(trainer)
    assert trainer.limit_val_batches == 3 and trainer.limit_test_batches == 1.0
    limited = sorted(t for rank in ranks(2) for b in rank[:3] for t in b)
    assert limited == sorted(t for b in one[:6] for t in b)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_gpu_strategies_compose_and_build(strategy):
    """As far as a CPU goes: the documented 8-GPU GPT-2 124M command composes and its Lightning strategy
    object builds (FSDP wraps llmlab's transformer blocks; DeepSpeed runs ZeRO stage 2)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import REPO
    from llmlab.models.gpt import Block

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=gpt_shakespeare", "model=gpt2_124m", f"trainer={strategy}",
                                          "trainer.devices=8"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.tokenizer.name) == (12, 768, "gpt2")
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("gpu", 8, "bf16-mixed")
    built = instantiate(cfg.trainer.strategy)
    if strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        assert isinstance(built, FSDPStrategy) and built.sharding_strategy.name == "FULL_SHARD"
        assert Block in built.kwargs["auto_wrap_policy"]._module_classes
    else:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        assert isinstance(built, DeepSpeedStrategy) and built.config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_gpu_strategies_on_a_cpu_are_one_line(run_cli, strategy):
    proc = run_cli("train", f"trainer={strategy}", "trainer.accelerator=cpu", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: trainer={strategy} runs on CUDA GPUs only, not trainer.accelerator=cpu: on a CPU use trainer=ddp "
        "trainer.accelerator=cpu trainer.devices=2 (data-parallel, gloo)"]


def test_ddp_precision_follows_the_accelerator():
    from hydra import compose, initialize_config_dir

    from conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        gpu = compose("train", overrides=["trainer=ddp"])
        cpu = compose("train", overrides=["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert (gpu.trainer.strategy, gpu.trainer.precision) == ("ddp", "bf16-mixed")
    assert (cpu.trainer.strategy, cpu.trainer.precision) == ("ddp", "32-true")
