"""Issue 16 item 6: `serve` refuses to start, before loading, when a rank's weights plus the KV cache of
--max-batch x --max-seq-len exceed the machine's free memory (MemAvailable); the estimate matches what the
engine then allocates (KV exactly, weights within a few percent) on plain, sliding-window and latent caches."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moecluster.engine.batching import kv_cache_bytes
from moecluster.engine.capacity import ServingMemory, check_fits, mem_available, serving_memory
from moecluster.engine.generate import Engine
from moecluster.errors import MoeClusterError
from moecluster.loading import load_model
from moecluster.runtime import held_bytes


@pytest.mark.parametrize("arch", ["dbrx", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_estimate_matches_the_engine(tiny_models, arch, dtype):
    engine = Engine(load_model(tiny_models[arch], dtype), num_slots=3, max_seq_len=100)
    need = serving_memory(tiny_models[arch], dtype, 3, 100)
    assert need.context == 100 and need.num_slots == 3
    assert need.kv_bytes == kv_cache_bytes(engine.model)
    params = held_bytes(engine.model) - kv_cache_bytes(engine.model)
    assert need.weight_bytes == pytest.approx(params, rel=0.1)  # RoPE tables and norms' rounding aside


def test_two_ranks_hold_half_the_experts(tiny_models):
    one = serving_memory(tiny_models["dbrx"], "bf16", 1, 64)
    halves = [serving_memory(tiny_models["dbrx"], "bf16", 1, 64, world_size=2, rank=r) for r in (0, 1)]
    assert halves[0].weight_bytes == halves[1].weight_bytes < one.weight_bytes
    assert halves[0].kv_bytes == one.kv_bytes  # attention is replicated: every rank holds the whole cache


def test_refuses_with_the_numbers():
    need = ServingMemory(weight_bytes=2 << 30, kv_bytes=8 << 30, num_slots=8, context=4096)
    check_fits(need, available=11 << 30)
    with pytest.raises(MoeClusterError) as err:
        check_fits(need, available=6 << 30, rank=1)
    msg = str(err.value)
    for part in ("rank 1", "--max-batch 8 x --max-seq-len 4096", "8.00 GiB", "2.00 GiB", "6.00 GiB", "--max-batch 4"):
        assert part in msg, msg
    with pytest.raises(MoeClusterError, match="the weights alone do not fit"):
        check_fits(need, available=1 << 30)


def test_mem_available_is_the_kernels():
    assert 0 < mem_available() < 1 << 50


def test_serve_refuses_before_loading(tiny_dbrx):
    """1M slots of 256 positions: terabytes of KV on a machine with gigabytes; one error line, no traceback."""
    res = subprocess.run(
        [sys.executable, "-m", "moecluster.cli", "serve", "--model", str(tiny_dbrx), "--max-batch", "1000000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert "not enough memory to serve" in res.stderr and "MemAvailable" in res.stderr, res.stderr
    assert "loaded" not in res.stderr  # refused before reading the weights
