"""`llmlab bench kv`: the spec's waste table (§3.4), the seed's pool size (§3.3), a quick run whose checks
pass, and a bad option as one line."""

from __future__ import annotations

import json
import random

import pytest
import torch
from bench_helpers import run_main

from llmlab.bench import kv
from llmlab.inference.paged import PagedKVCache
from llmlab.quant.memory import Layout, kv_cache_bytes_per_token


@pytest.fixture(scope="module")
def lengths() -> list[int]:
    rng = random.Random(0)
    return [rng.randint(1, 2048) for _ in range(100_000)]


# spec §3.4: lengths uniform on [1, 2048], 100k requests
@pytest.mark.parametrize("block,spec,tol", [(1, 0.0, 1e-12), (8, 0.0034, 3e-4), (16, 0.0072, 4e-4), (32, 0.015, 1e-3),
                                            (128, 0.059, 2e-3), (512, 0.20, 5e-3)])
def test_paged_waste_matches_the_spec_table(lengths, block, spec, tol):
    waste = kv.paged_waste(lengths, block)
    assert abs(waste - spec) <= tol
    assert waste < block / (sum(lengths) / len(lengths))  # at most B - 1 empty slots per request, B/2 on average
    sample = lengths[:300]
    assert kv.allocator_waste(sample, block) == pytest.approx(kv.paged_waste(sample, block), abs=1e-12)


def test_contiguous_preallocation_wastes_half(lengths):
    assert kv.contiguous_waste(lengths) == pytest.approx(0.50, abs=0.005)
    assert kv.paged_waste(lengths, 16) < kv.contiguous_waste(lengths) / 50


def test_seed_default_pool_is_16_mib_per_block_and_15_6_gib():
    # the seed's PagedAttentionKVCache defaults: 32 layers, 32 heads, head_dim 128, 16 tokens, fp32, 1000 blocks
    pool = PagedKVCache(32, 32, 128, 1000, 16, device="meta", dtype=torch.float32)  # nothing allocated
    llama = Layout(params=0, linears=[], trainable=0, n_layer=32, d_model=4096, n_head=32)  # the same shape
    assert pool.block_bytes == 16 * 2**20 == 16 * kv_cache_bytes_per_token(llama, "fp32")
    assert round(pool.block_bytes * pool.num_blocks / 2**30, 1) == 15.6


def test_quick_bench_runs_and_its_checks_pass(tmp_path):
    out = tmp_path / "kv"
    stdout, stderr, code = run_main(kv, ["--quick", "--out", str(out)])
    assert code == 0, stdout + stderr
    record = json.loads((tmp_path / "kv.json").read_text())
    assert all(c["ok"] for c in record["checks"]) and len(record["checks"]) == 9
    assert "| paged, block 16 | 0.7" in stdout and (tmp_path / "kv.md").read_text() == stdout
    m = record["ragged"]
    assert m["paged_peak_bytes"] < m["oracle_bytes"] < m["contiguous_bytes"]
    for share in (record["sampling"], record["beams"]):
        assert share["peak_blocks_shared"] < share["peak_blocks_unshared"]


def test_bad_block_size_is_one_line(run_cli):
    proc = run_cli("bench", "kv", "--block-size", "0", check=False)
    assert proc.returncode == 2
    assert "--block-size=0" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
