"""All-reduce latency measurement, shared by benchmarks/allreduce.py and `calibrate`.

Legend: N values, I iterations, R ranks, V variants.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from moecluster.distributed.comm import Comm

DEFAULT_SIZES_BYTES = [1024 * k for k in (1, 2, 4, 8, 16, 32, 64)]


class Variant(NamedTuple):
    """One thing to time: fn(x_N); setup() (untimed) runs before every call, e.g. a mode switch."""

    name: str
    x_N: torch.Tensor
    fn: Callable[[torch.Tensor], object]
    setup: Callable[[], object] | None = None


def measure_interleaved(
    comm: Comm, variants: list[Variant], iters: int = 1000, warmup: int = 100, block: int = 50, settle: int = 5
) -> list[dict]:
    """Time the variants in alternating blocks of `block` calls, so drift and neighbours' load
    hit all alike; the first `settle` calls of a block (untimed) absorb the ranks' skew left by
    the previous variant.

    Every rank must call this with the same variants. Returns one dict per variant with
    median_us (mean over ranks of each rank's median), p99_us and max_us (worst rank), min_us;
    combined on rank 0 (other ranks get their own numbers).
    """
    num_blocks = max(1, -(-iters // block))
    t_VI = np.empty((len(variants), num_blocks * block))
    comm.barrier()
    for _, x_N, fn, setup in variants:
        if setup is not None:
            setup()
        for _ in range(warmup):
            fn(x_N)
    for b in range(num_blocks):
        for v, (_, x_N, fn, setup) in enumerate(variants):
            if setup is not None:
                setup()
            for _ in range(settle):
                fn(x_N)
            for i in range(b * block, (b + 1) * block):
                t0 = time.perf_counter()
                fn(x_N)
                t_VI[v, i] = time.perf_counter() - t0
    comm.barrier()
    t_VI *= 1e6
    iters = t_VI.shape[1]
    rows = []
    for v, var in enumerate(variants):
        mine = [
            float(np.median(t_VI[v])),
            float(np.percentile(t_VI[v], 99)),
            float(t_VI[v].max()),
            float(t_VI[v].min()),
        ]
        stats_R4 = np.array(comm.gather_floats(mine) or [mine])
        rows.append(
            {
                "variant": var.name,
                "size_bytes": int(var.x_N.nbytes),
                "dtype": str(var.x_N.dtype).removeprefix("torch."),
                "num_values": int(var.x_N.numel()),
                "iters": iters,
                "ranks": comm.world_size,
                "median_us": round(float(stats_R4[:, 0].mean()), 2),
                "p99_us": round(float(stats_R4[:, 1].max()), 2),
                "max_us": round(float(stats_R4[:, 2].max()), 2),
                "min_us": round(float(stats_R4[:, 3].min()), 2),
            }
        )
    return rows


def measure_allreduce(
    comm: Comm,
    sizes_bytes: list[int] | None = None,
    iters: int = 1000,
    *,
    dtype: torch.dtype = torch.float32,
    op: Callable[[torch.Tensor], object] | None = None,
    warmup: int = 100,
) -> list[dict]:
    """Latency of `op(x_N)` (default comm.all_reduce_sum) per message size (bytes), every rank.

    Rows as measure_interleaved (variant "all_reduce_sum"); zeros, so sums never overflow.
    """
    elem = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for size in sizes_bytes or DEFAULT_SIZES_BYTES:
        x_N = torch.zeros(max(size // elem, 1), dtype=dtype)
        variant = Variant("all_reduce_sum", x_N, op or comm.all_reduce_sum)
        rows += measure_interleaved(comm, [variant], iters, warmup)
    return rows
