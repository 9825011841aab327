"""Open an engine on this rank (single process or one rank of an expert-parallel job) and report on it.

Shared by generate, demo, serve and calibrate so that every entry point loads and places experts the
same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from moecluster.engine.generate import Engine
from moecluster.loading import load_model, peak_rss_bytes, read_config
from moecluster.parallel.placement import Placement, make_placement
from moecluster.tracing import TRACER


def open_engine(model_dir: str | Path, dtype: str | None = None, comm=None, placement_spec: str = "contiguous",
                num_slots: int = 1, max_seq_len: int | None = None,
                exchange: str = "exact", check_weights: bool = True) -> tuple[Engine, Placement | None]:
    """Load the model (only this rank's experts), apply expert parallelism when world_size > 1."""
    if comm is None or comm.world_size == 1:
        return Engine(load_model(model_dir, dtype, check_weights=check_weights), comm, num_slots, max_seq_len), None
    from moecluster.parallel.expert_parallel import apply_expert_parallel

    _, cfg = read_config(model_dir)
    shape = cfg.shape()
    placement = make_placement(placement_spec, shape.num_experts, shape.num_moe_layers, comm.world_size)
    loaded = load_model(model_dir, dtype, expert_filter=lambda layer: placement.experts_of(comm.rank, layer),
                        check_weights=check_weights)
    apply_expert_parallel(loaded.model, comm, placement, exchange)
    return Engine(loaded, comm, num_slots, max_seq_len), placement


def rank_report(engine: Engine, stats) -> dict:
    """What this rank holds and did: experts per layer, weight bytes, peak RSS, bytes/token, trace summary."""
    model = engine.model
    moes = model.moe_layers()
    held = [moe.experts.expert_ids for moe in moes]
    expert_bytes = sum(len(h) * moe.experts.expert_bytes() for h, moe in zip(held, moes, strict=True))
    return {
        "rank": engine.rank,
        "experts_layer0": held[0],
        "expert_copies": sum(len(h) for h in held),
        "expert_bytes": expert_bytes,
        "weight_bytes": expert_bytes + sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                           if ".experts." not in n),
        "peak_rss_bytes": peak_rss_bytes(),
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
    lines = [f"{'rank':>4} {'experts (layer 0)':<28} {'weights GB':>10} {'peak RSS GB':>11} {'read/token MB':>13}"]
    for r in reports:
        experts = ",".join(map(str, r["experts_layer0"]))
        lines.append(f"{r['rank']:>4} {experts:<28} {r['weight_bytes'] / 1e9:>10.3f} "
                     f"{r['peak_rss_bytes'] / 1e9:>11.3f} {r['bytes_per_token'] / 1e6:>13.1f}")
    return "\n".join(lines)

