"""Rank-side measurements for `moecluster calibrate` and benchmarks/perfmodel_validation.py.

On every rank of a job: batched lockstep decode of B sequences (one cache slot each) with the
tracer on (per layer: attention, router, experts with evaluation counts, all-reduce; head),
rank 0 sampling each row and broadcasting the B tokens, as `Engine.stream` does for one row; the
streaming memory bandwidth each rank gets while all ranks read at once; and all-reduce latency
against message size (`commbench`). Rank 0 writes one JSON result (see `run_worker`).

Legend: B batch rows, V vocab, S steps, L layers.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from moecluster.engine.sampling import Sampler, SamplingParams
from moecluster.errors import MoeClusterError
from moecluster.tracing import TRACER, now

PHASES = ("attention", "router", "experts", "all_reduce", "head")
TEXTS = [
    "Mixture of experts models route every token to a few experts chosen by a learned router.",
    "Expert parallelism places different experts on different machines; attention is replicated.",
    "The exchange after each layer is tiny, so latency matters more than bandwidth on the network.",
    "Decoding one token reads the weights of the selected experts once; memory bandwidth sets the speed.",
]


def prompt_ids(tokenizer, batch: int, length: int, vocab_size: int) -> list[list[int]]:
    """B prompts of exactly `length` tokens (distinct texts, repeated to length), same on every rank."""
    out = []
    for b in range(batch):
        ids = [t for t in tokenizer.encode(TEXTS[b % len(TEXTS)] + f" {b}") if 0 <= t < vocab_size]
        if not ids:
            raise MoeClusterError("the tokenizer produced no usable token ids for the calibration prompts")
        out.append((ids * (length // len(ids) + 1))[:length])
    return out


def _sample_and_broadcast(engine, sampler: Sampler, logits_BV: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Rank 0 samples each row; the B tokens are broadcast. Returns (tokens_B, sample s, broadcast s)."""
    t0 = now()
    rows = logits_BV.shape[0]
    tokens = [sampler(logits_BV[r]) for r in range(rows)] if engine.rank == 0 else [0] * rows
    tokens_B = torch.tensor(tokens, dtype=torch.int64)
    t1 = now()
    if engine.world_size > 1:
        engine.comm.broadcast(tokens_B, src=0)
    return tokens_B, t1 - t0, now() - t1


def probe_batches(engine, batches: list[int], args, gather) -> dict:
    """decode_probe at each batch size (args: steps, warmup, prompt_len, no_trace); gather(report) -> every
    rank's report. {batch: {ranks, tok_s_median, tok_s_mean}} from rank 0's step times."""
    out = {}
    for b in batches:
        ranks = gather(decode_probe(engine, b, args.steps, args.warmup, args.prompt_len, trace=not args.no_trace))
        step = ranks[0]["step_s"]
        out[str(b)] = {
            "ranks": ranks,
            "tok_s_median": b / statistics.median(step),
            "tok_s_mean": b * len(step) / sum(step),
        }
    return out


def decode_probe(engine, batch: int, steps: int, warmup: int = 3, prompt_len: int = 16, trace: bool = True) -> dict:
    """Decode `steps` (+ `warmup` untimed) steps of B rows in lockstep; this rank's measurements.

    Returns per-step seconds (whole step, sampling, broadcast) and, with trace, the tracer's
    per-layer phases and expert evaluations per step (lists over the timed steps).
    """
    if batch < 1 or batch > engine.num_slots:  # engine: the torch Engine or the MlxEngine (ServingEngine)
        raise MoeClusterError(f"batch {batch} needs 1..{engine.num_slots} cache slots")
    if prompt_len + warmup + steps + 1 > engine.max_seq_len:
        raise MoeClusterError(
            f"{prompt_len} prompt + {warmup + steps} decode positions exceed the "
            f"context of {engine.max_seq_len}; use fewer --steps"
        )
    sampler = Sampler(SamplingParams(temperature=0.0))
    slots_B = torch.arange(batch)
    TRACER.reset(enabled=False)
    with torch.inference_mode():
        logits = [
            engine.step(torch.tensor([ids]), torch.tensor([0]), slots_B[b : b + 1])[0]
            for b, ids in enumerate(prompt_ids(engine.tokenizer, batch, prompt_len, engine.vocab_size))
        ]
    tokens_B, _, _ = _sample_and_broadcast(engine, sampler, torch.stack(logits))
    pos_B = torch.full((batch,), prompt_len, dtype=torch.int64)
    step_s, sample_s, bcast_s = [], [], []
    for i in range(warmup + steps):
        if i == warmup:
            TRACER.reset(enabled=trace)
        t0 = now()
        TRACER.begin_step("decode", batch)
        logits_BV = engine.step(tokens_B[:, None], pos_B, slots_B)
        TRACER.end_step()
        tokens_B, ts, tb = _sample_and_broadcast(engine, sampler, logits_BV)
        pos_B += 1
        if i >= warmup:
            step_s.append(now() - t0)
            sample_s.append(ts)
            bcast_s.append(tb)
    out = {
        "batch": batch,
        "steps": steps,
        "context_mean": prompt_len + warmup + (steps + 1) / 2,
        "step_s": step_s,
        "sample_s": sample_s,
        "bcast_s": bcast_s,
    }
    if trace:
        out.update(_trace_lists(len(engine.model.layers)))
    TRACER.reset(enabled=False)
    return out


def _trace_lists(num_layers: int) -> dict:
    """Per timed step: forward seconds, head seconds, and [L] lists per phase and of evaluations."""
    out: dict = {"forward_s": [], "head_s": [], "evals_SL": []}
    out.update({f"{p}_SL": [] for p in PHASES if p != "head"})
    for s in TRACER.steps:
        layers = s["layers"]
        out["forward_s"].append(s["total"])
        out["head_s"].append(layers.get(-1, {}).get("head", 0.0))
        for p in PHASES:
            if p != "head":
                out[f"{p}_SL"].append([layers.get(layer, {}).get(p, 0.0) for layer in range(num_layers)])
        out["evals_SL"].append([s["evals"].get(layer, 0) for layer in range(num_layers)])
    return out


def streaming_bandwidth_gbs(comm, mib: int = 256, repeats: int = 5) -> float:
    """Best GB/s of summing a buffer far larger than caches, every rank at once (a node's share)."""
    buf_N = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    buf_N.sum()
    best = float("inf")
    for _ in range(repeats):
        if comm is not None:
            comm.barrier()
        t0 = time.perf_counter()
        buf_N.sum()
        best = min(best, time.perf_counter() - t0)
    return buf_N.nbytes / best / 1e9


def _model_summary(engine, exchange: str) -> dict:
    a = engine.loaded.shape
    dtype = engine.model.embed.weight.dtype
    elem = torch.empty(0, dtype=dtype).element_size()
    expert_bytes = next(
        (moe.experts.expert_bytes() for moe in engine.model.moe_layers() if moe.experts.expert_bytes()), 0
    )
    per_token = a.top_k * a.d_model * elem if exchange == "exact" else a.d_model * 4
    return {
        "arch": a.model_type,
        "d_model": a.d_model,
        "layers": a.num_layers,
        "moe_layers": a.num_moe_layers,
        "experts": a.num_experts,
        "top_k": a.top_k,
        "vocab": a.vocab_size,
        "dtype": "fp32" if dtype == torch.float32 else "bf16",
        "expert_bytes": expert_bytes,
        "exchange": exchange,
        "exchange_bytes_per_token": per_token,
        "exchange_dtype": str(dtype if exchange == "exact" else torch.float32).removeprefix("torch."),
    }


def _allreduce_rows(comm, sizes: list[int], iters: int, dtype: str) -> list[dict]:
    """commbench rows per message size, each with the latency steps of the MPI's algorithm."""
    from moecluster.calibration.commbench import measure_allreduce

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise MoeClusterError(f"cannot time all-reduce of {dtype}; use a bf16 or fp32 model")
    rows = measure_allreduce(comm, sizes, iters, dtype=torch_dtype, warmup=max(10, iters // 10))
    for row in rows:
        row["latency_steps"] = latency_steps(comm, torch_dtype, row["size_bytes"])
    return rows


def latency_steps(comm, dtype: torch.dtype, nbytes: int) -> int | None:
    """Network latencies in series in one `comm.all_reduce_sum` of `nbytes` (None if unknown).

    MPICH's Iallreduce selection (its built-in tuning JSON): recursive doubling (log2 N steps)
    up to 2 KiB, for user-defined ops (our bf16 Op above the native-type limit) and for counts
    below the power of two; reduce-scatter + all-gather (2 log2 N) otherwise. A non-power-of-two
    N adds 2 steps. Assumes MPI's eager protocol (a rendezvous adds a round trip per message).
    """
    if comm.world_size < 2 or comm.backend != "mpi":
        return None
    from mpi4py import MPI

    if MPI.get_vendor()[0] != "MPICH":
        return None
    n = comm.world_size
    p2 = 1 << (n.bit_length() - 1)
    fold = 0 if p2 == n else 2
    log = p2.bit_length() - 1
    entry = comm._sum_types.get(dtype)  # (MPI type, largest size it sums natively) of MPIComm
    builtin = entry is not None and nbytes <= entry[1]
    count = nbytes // torch.empty(0, dtype=dtype).element_size()
    if nbytes <= 2048 or not builtin or count < p2:
        return log + fold
    return 2 * log + fold


def run_worker(args) -> int:
    """One rank of a calibration job; rank 0 writes the result JSON to args.result.

    Phases: "engine" (bandwidth, decode probes, then all-reduce if several ranks) or "allreduce".
    """
    if getattr(args, "engine", "torch") == "mlx":
        from moecluster.calibration.measure_mlx import run_mlx_worker

        return run_mlx_worker(args)
    from moecluster.distributed.comm import init_comm
    from moecluster.runtime import gather_reports

    comm = init_comm(args.backend, timeout_s=args.timeout)
    with comm:
        result: dict = {
            "world_size": comm.world_size,
            "backend": args.backend,
            "threads": torch.get_num_threads(),
            "phase": args.phase,
            "engine": "torch",
        }
        if args.phase == "engine":
            result.update(_engine_phase(args, comm, gather_reports))
        else:
            result["allreduce"] = _allreduce_rows(comm, _sizes(args.ar_sizes), args.ar_iters, args.ar_dtype)
        if comm.rank == 0:
            Path(args.result).write_text(json.dumps(result))
    return 0


def _sizes(spec: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise MoeClusterError(f"bad all-reduce sizes {spec!r}: use bytes like 256,4096") from None
    if not sizes or sizes[0] < 1:
        raise MoeClusterError(f"bad all-reduce sizes {spec!r}: need positive byte counts")
    return sizes


def _engine_phase(args, comm, gather_reports) -> dict:
    from moecluster.runtime import open_engine

    batches = [int(b) for b in str(args.batch).split(",")]
    max_len = args.prompt_len + args.warmup + args.steps + 8
    quant = None
    if args.quantize or args.quantize_dense:
        from moecluster.quant.experts import QuantOptions

        quant = QuantOptions(args.quantize, args.quant_group_size, args.quantize_dense)
    engine, _ = open_engine(
        args.model,
        args.dtype,
        comm,
        args.placement,
        num_slots=max(batches),
        max_seq_len=max_len,
        exchange=args.exchange,
        quant=quant,
    )
    out: dict = {"model": _model_summary(engine, args.exchange), "placement": args.placement}
    bandwidth = streaming_bandwidth_gbs(comm if comm.world_size > 1 else None)
    out["bandwidth_gbs"] = [r["gbs"] for r in gather_reports(comm, {"gbs": bandwidth})]
    out["batches"] = probe_batches(engine, batches, args, lambda mine: gather_reports(comm, mine))
    if comm.world_size > 1 and args.ar_iters > 0:
        out["allreduce"] = _allreduce_rows(comm, _sizes(args.ar_sizes), args.ar_iters, out["model"]["exchange_dtype"])
    return out
