"""Rank-side measurements of `moecluster calibrate --engine mlx`: the torch engine's (measure.py) on the MLX engine.

The same decode probe (measure.decode_probe: B sequences in lockstep over cache slots through the ServingEngine
step, tracer on: per layer attention, router, experts with evaluation counts, all-reduce; the rest of the
forward counted as head), the streaming memory bandwidth MLX gets on its device (Metal on a Mac, the CPU
here) with every rank reading at once, and `mx.distributed.all_sum` latency against message size at the
engine's exchange dtype (commbench's interleaved timing, through MlxComm: under the watchdog, as the engine
calls it). Rank 0 writes a result JSON in measure.run_worker's format, with "engine": "mlx".
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten

from moecluster.calibration.commbench import measure_allreduce
from moecluster.calibration.measure import _sizes, probe_batches
from moecluster.errors import MoeClusterError

_DTYPES = {"float32": (mx.float32, torch.float32), "bfloat16": (mx.bfloat16, torch.bfloat16)}


class _BenchComm:
    """What commbench needs of a comm (world_size, barrier, gather_floats), over an MlxComm."""

    def __init__(self, comm: Any):
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.world_size

    def barrier(self) -> None:
        self.comm.barrier()

    def gather_floats(self, values: list[float]) -> list[list[float]] | None:
        """Each rank's few floats on rank 0 ([rank][i]); None elsewhere (one all_sum, zero-padded, fp32)."""
        v_WN = np.zeros((self.world_size, len(values)), np.float32)
        v_WN[self.rank] = values
        out = np.array(self.comm.all_sum(mx.array(v_WN), "a gather"))
        return [list(map(float, row)) for row in out] if self.rank == 0 else None


def allreduce_rows(comm: Any, sizes: list[int], iters: int, dtype: str) -> list[dict]:
    """commbench rows per message size for MLX's all_sum of zeros (latency steps of the ring: not modelled)."""
    if dtype not in _DTYPES:
        raise MoeClusterError(f"cannot time all-reduce of {dtype}; use a bf16 or fp32 model")
    mx_dtype, torch_dtype = _DTYPES[dtype]
    arrays: dict[int, mx.array] = {}

    def all_sum(x_N: torch.Tensor) -> None:  # x_N: commbench's size and dtype; the MLX array is sent
        a = arrays.get(x_N.numel())
        if a is None:
            a = arrays[x_N.numel()] = mx.zeros((x_N.numel(),), dtype=mx_dtype)
        comm.all_sum(a, "a timed all-reduce")

    bench: Any = _BenchComm(comm)
    rows = measure_allreduce(bench, sizes, iters, dtype=torch_dtype, op=all_sum, warmup=max(10, iters // 10))
    for row in rows:
        row["latency_steps"] = None
    return rows


def streaming_bandwidth_gbs(comm: Any, mib: int = 256, repeats: int = 5) -> float:
    """Best GB/s of summing an fp32 buffer far larger than caches on MLX's device, every rank at once."""
    buf_N = mx.ones((mib * 2**20 // 4,), dtype=mx.float32)
    mx.eval(buf_N)
    mx.eval(buf_N.sum())
    best = float("inf")
    for _ in range(repeats):
        if comm.world_size > 1:
            comm.barrier()
        t0 = time.perf_counter()
        mx.eval(buf_N.sum())
        best = min(best, time.perf_counter() - t0)
    return buf_N.nbytes / best / 1e9


def model_summary(engine: Any) -> dict:
    """measure._model_summary's fields for an MlxEngine (exact exchange: K x D values per token)."""
    cfg = engine.config
    names = dict(tree_flatten(engine.model.parameters()))
    floats = [a for n, a in names.items() if "embed_tokens" in n and mx.issubdtype(a.dtype, mx.floating)]
    dtype = floats[0].dtype if floats else mx.float32  # quantized embedding: its scales' dtype
    top_k, d_model = int(cfg["num_experts_per_tok"]), int(cfg["hidden_size"])
    name = "fp32" if dtype == mx.float32 else "bf16" if dtype == mx.bfloat16 else "fp16"
    exchange_dtype = {mx.float32: "float32", mx.bfloat16: "bfloat16"}.get(dtype, "float16")
    return {
        "arch": cfg.get("model_type", ""),
        "d_model": d_model,
        "layers": len(engine.model.layers),
        "moe_layers": engine.placement.num_layers,
        "experts": engine.placement.num_experts,
        "top_k": top_k,
        "vocab": engine.vocab_size,
        "dtype": name,
        "expert_bytes": engine.expert_bytes(),
        "exchange": "exact",
        "exchange_bytes_per_token": top_k * d_model * dtype.size,
        "exchange_dtype": exchange_dtype,
    }


def run_mlx_worker(args: Any) -> int:
    """One rank of an MLX calibration job (phase engine or allreduce); rank 0 writes args.result."""
    from moecluster.engines.mlx.run import _gather, check_mlx_args, open_mlx_comm

    check_mlx_args(args)
    comm = open_mlx_comm(args)
    backend = "mlx-jaccl" if os.environ.get("MLX_JACCL_COORDINATOR") else "mlx-ring"
    result: dict = {
        "world_size": comm.world_size,
        "backend": backend if comm.world_size > 1 else "single",
        "threads": None,  # MLX schedules its own threads (and the GPU on a Mac)
        "phase": args.phase,
        "engine": "mlx",
        "device": "gpu" if mx.metal.is_available() else "cpu",
    }
    if args.phase == "engine":
        result.update(_engine_phase(args, comm, _gather))
    else:
        result["allreduce"] = allreduce_rows(comm, _sizes(args.ar_sizes), args.ar_iters, args.ar_dtype)
    if comm.rank == 0:
        Path(args.result).write_text(json.dumps(result))
    comm.close()
    return 0


def _engine_phase(args: Any, comm: Any, gather: Any) -> dict:
    from moecluster.engines.mlx.generate import MlxEngine

    batches = [int(b) for b in str(args.batch).split(",")]
    max_len = args.prompt_len + args.warmup + args.steps + 8
    engine = MlxEngine(
        args.model,
        args.dtype,
        comm,
        args.placement,
        num_slots=max(batches),
        max_seq_len=max_len,
        quantize=args.quantize,
        quant_group_size=args.quant_group_size,
    )
    model = model_summary(engine)
    out: dict = {"model": model, "placement": args.placement}
    out["bandwidth_gbs"] = [r["gbs"] for r in gather(comm, {"gbs": streaming_bandwidth_gbs(comm)})]
    out["batches"] = probe_batches(engine, batches, args, lambda mine: gather(comm, mine))
    if comm.world_size > 1 and args.ar_iters > 0:  # the exchanges this engine sends, whatever dtype it runs in
        sizes = set(_sizes(args.ar_sizes)) | {b * model["exchange_bytes_per_token"] for b in batches}
        out["allreduce"] = allreduce_rows(comm, sorted(sizes), args.ar_iters, model["exchange_dtype"])
    return out
