"""Open an engine on this rank (single process or one rank of an expert-parallel job) and report on it.

Shared by generate, demo, serve and calibrate so that every entry point loads and places experts the
same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from moecluster.engine.generate import Engine
from moecluster.loading import load_model, peak_rss_bytes, read_config
from moecluster.memory import SAMPLER
from moecluster.parallel.placement import Placement, make_placement
from moecluster.quant.experts import QuantOptions
from moecluster.quant.stack import QuantizedStack
from moecluster.tracing import TRACER


def open_engine(
    model_dir: str | Path,
    dtype: str | None = None,
    comm=None,
    placement_spec: str = "contiguous",
    num_slots: int = 1,
    max_seq_len: int | None = None,
    exchange: str = "exact",
    quant: QuantOptions | None = None,
    check_weights: bool = True,
    quiet: bool = False,
) -> tuple[Engine, Placement | None]:
    """Load the model (only this rank's experts; `quant`: quantize on load), apply expert parallelism when
    world_size > 1. Starts this process's memory sampler; a live progress line on rank 0's terminal while
    loading, with every rank's completion (`load_summary` is the line to print once the command has checked its
    inputs); `quiet`: no live line."""
    SAMPLER.start()
    if comm is None or comm.world_size == 1:
        return Engine(
            load_model(
                model_dir,
                dtype,
                quant=quant,
                progress="",
                check_weights=check_weights,
                progress_live=False if quiet else None,
            ),
            comm,
            num_slots,
            max_seq_len,
        ), None
    from moecluster.parallel.expert_parallel import apply_expert_parallel

    _, cfg = read_config(model_dir)
    shape = cfg.shape()
    placement = make_placement(placement_spec, shape.num_experts, shape.num_moe_layers, comm.world_size)
    loaded = load_model(
        model_dir,
        dtype,
        expert_filter=lambda layer: placement.experts_of(comm.rank, layer),
        quant=quant,
        progress=f"rank {comm.rank}: ",
        check_weights=check_weights,
        progress_rank=comm.rank,
        progress_live=False if quiet or comm.rank != 0 else None,  # one live line on a shared terminal
    )
    apply_expert_parallel(loaded.model, comm, placement, exchange)
    return Engine(loaded, comm, num_slots, max_seq_len), placement


def load_summary(engine: Engine) -> str | None:
    """'loaded X GB in Y s (Z GB/s)' (with a rank prefix on several ranks), if the engine loaded with progress."""
    if engine.loaded.load is None:
        return None
    from moecluster.distributed.comm import CPU_NOTE

    return engine.loaded.load.summary() + (f"; {CPU_NOTE[0]}" if engine.world_size > 1 and CPU_NOTE[0] else "")


def held_bytes(model) -> int:
    """Bytes this process holds for the model: parameters, buffers (KV cache included), RoPE tables, quantized
    expert stacks."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if not t.is_meta}
    # quantized experts keep their packed weights and scales in QuantizedStacks, which are not parameters
    stacks = [v for m in model.modules() for v in vars(m).values() if isinstance(v, QuantizedStack)]
    tensors |= {t.data_ptr(): t for s in stacks for t in (s.data, s.scales)}
    tensors |= {
        t.data_ptr(): t for t in (getattr(model, "rope_cos", None), getattr(model, "rope_sin", None)) if t is not None
    }  # tied weights count once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def rank_report(engine: Engine, stats) -> dict:
    """What this rank holds and did: experts per layer, weight bytes, bytes held, peak memory (anonymous and
    file-backed, sampled), bytes/token, trace summary."""
    model = engine.model
    moes = model.moe_layers()
    held = [moe.experts.expert_ids for moe in moes]
    expert_bytes = sum(len(h) * moe.experts.expert_bytes() for h, moe in zip(held, moes, strict=True))
    peaks = SAMPLER.snapshot()
    return {
        "rank": engine.rank,
        "experts_layer0": held[0],
        "expert_copies": sum(len(h) for h in held),
        "expert_bytes": expert_bytes,
        "weight_bytes": expert_bytes
        + sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n),
        "held_bytes": held_bytes(model),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_anon_bytes": peaks.anon_bytes,
        "peak_file_bytes": peaks.file_bytes,
        "peak_resident_bytes": peaks.total_bytes,
        "base_rss_bytes": peaks.base_bytes,
        "base_file_bytes": peaks.base_file_bytes,
        "bytes_per_token": stats.bytes_per_token if stats else 0.0,
        "trace": TRACER.summary("decode"),
    }


def gather_reports(comm, report: dict) -> list[dict]:
    """Every rank's report on every rank (typed JSON messages, one broadcast per rank)."""
    if comm is None or comm.world_size == 1:
        return [report]
    out = []
    for src in range(comm.world_size):
        data = comm.broadcast_bytes(json.dumps(report).encode() if comm.rank == src else None, src=src)
        out.append(json.loads(data.decode()))
    return out


def format_rank_table(reports: list[dict]) -> str:
    lines = [
        f"{'rank':>4} {'experts (layer 0)':<28} {'weights GB':>10} {'held GB':>8} {'peak anon GB':>12} "
        f"{'peak file GB':>12} {'read/token MB':>13}"
    ]
    for r in reports:
        experts = ",".join(map(str, r["experts_layer0"]))
        lines.append(
            f"{r['rank']:>4} {experts:<28} {r['weight_bytes'] / 1e9:>10.3f} {r['held_bytes'] / 1e9:>8.3f} "
            f"{r['peak_anon_bytes'] / 1e9:>12.3f} {r['peak_file_bytes'] / 1e9:>12.3f} "
            f"{r['bytes_per_token'] / 1e6:>13.1f}"
        )
    return "\n".join(lines)
