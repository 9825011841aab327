"""`moecluster generate --engine mlx`: one rank, N local ranks (MLX ring backend on 127.0.0.1), or one rank of a
job started by `mlx.launch` (MLX_HOSTFILE / MLX_RANK in the environment)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError


def relaunch_mlx(
    args: Any, argv: list[str] | None = None, env: dict | None = None, linger_s: float = 0.0, keep: bool = False
) -> int:
    """Start args.nodes local ranks of this same command (ring backend, a watchdog port for rank 0). linger_s, keep:
    as serve's launch (rank 0 outlives a dead rank to answer 503, then every rank is stopped)."""
    from moecluster.distributed.launch import free_port, launch_local

    cmd = [sys.executable, "-m", "moecluster.cli", *(args.argv if argv is None else argv), "--rank-worker"]
    env = {**(env or {}), "MOECLUSTER_MLX_WATCHDOG": f"127.0.0.1:{free_port()}"}
    timeout_s = args.timeout + linger_s
    return launch_local(cmd, args.nodes, "mlx", pin=False, timeout_s=timeout_s, env=env, keep_survivors=keep)


def check_mlx_args(args: Any) -> None:
    """Options of the torch engine that the MLX engine does not have: one clear error instead of ignoring them."""
    bad = []
    if getattr(args, "quantize_dense", False):
        bad.append(
            "--quantize-dense (--quantize int8|int4 quantizes the experts; for dense weights give an MLX "
            "quantized directory: mlx_lm.convert -q)"
        )
    if getattr(args, "exchange", "exact") != "exact":
        bad.append("--exchange sum")
    if getattr(args, "prefix_cache_gb", 0.0):
        bad.append("--prefix-cache-gb")
    if getattr(args, "threads", None) is not None:
        bad.append("--threads")
    if getattr(args, "quantize", None) and args.quant_group_size not in (32, 64, 128):  # = quantize.GROUP_SIZES
        raise MoeClusterError(
            f"--quant-group-size {args.quant_group_size}: MLX's affine quantization takes 32, 64, 128"
        )
    if bad:
        raise MoeClusterError(f"--engine mlx does not support {', '.join(bad)}; drop it or use --engine torch")


def open_mlx_comm(args: Any, keep_rank0: bool = False) -> Any:
    """This rank's MlxComm: the group (ring/jaccl from the launcher's environment, else one rank) and, on several
    ranks, the watchdog (keep_rank0: rank 0 reports a failure instead of being stopped, for serve's 503)."""
    from moecluster.distributed.launch import watch_launcher
    from moecluster.engines.mlx.comm import MlxComm, init_group, watchdog_address
    from moecluster.engines.mlx.watchdog import Watchdog

    watch_launcher()  # under moecluster's launcher: end with it, however it ends (macOS has no PDEATHSIG)

    group = init_group()
    if args.nodes > 1 and group.size() != args.nodes:
        raise MoeClusterError(f"--nodes {args.nodes} but the MLX group has {group.size()} ranks")
    watchdog = None
    address = watchdog_address()
    if group.size() > 1 and address is not None:
        keep = keep_rank0 and group.rank() == 0
        watchdog = Watchdog(group.rank(), group.size(), address, args.timeout, keep_rank=keep)
    return MlxComm(group, watchdog)


def run_generate_mlx(args: Any, params: Any) -> int:
    """The body of `generate --engine mlx` on this rank; rank 0 prints the text and stats (and writes --report,
    --trace in the torch engine's formats: per-rank reports, per-step per-layer phases)."""
    check_mlx_args(args)
    if args.nodes > 1 and not args.rank_worker:
        return relaunch_mlx(args)
    from moecluster.engines.mlx.generate import MlxEngine, peak_rss_bytes
    from moecluster.tracing import TRACER

    comm = open_mlx_comm(args)
    # on an error this rank just exits: its closed watchdog link tells the peers (no hung collective)
    engine = MlxEngine(
        args.model, args.dtype, comm, args.placement, quantize=args.quantize, quant_group_size=args.quant_group_size
    )
    text = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    TRACER.reset(enabled=bool(args.trace))  # per-layer phases need an evaluation per phase: only when asked
    out, tokens, stats = engine.generate(engine.tokenizer.encode(text), params, digest=bool(args.report))
    held = engine.held()
    mine = {
        "rank": engine.rank,
        "experts_layer0": held[0],
        "expert_copies": sum(len(h) for h in held),
        "bytes_per_token": stats.bytes_per_token,
        "peak_rss_bytes": peak_rss_bytes(),
        "trace": TRACER.summary("decode"),
    }
    reports = _gather(comm, mine)
    steps = _gather(comm, {"rank": engine.rank, "steps": TRACER.steps}) if args.trace else []
    if engine.rank == 0:
        copies = [r["expert_copies"] for r in reports]
        if not args.quiet:
            print(out, flush=True)
        print(
            f"[mlx] prompt tokens: {stats.prompt_tokens}  generated: {stats.generated_tokens} "
            f"({stats.finish_reason})  ttft {stats.ttft_s * 1e3:.1f} ms  decode {stats.decode_tok_s:.2f} tok/s  "
            f"peak RSS {max(r['peak_rss_bytes'] for r in reports) / 1e9:.2f} GB  expert copies per rank {copies}",
            file=sys.stderr,
        )
        if args.report:
            result = {
                "engine": "mlx",
                "text": out,
                "tokens": tokens,
                "stats": stats.__dict__,
                "world_size": engine.world_size,
                "placement": engine.placement.to_json(),
                "expert_copies": copies,
                "experts_layer0": held[0],
                "ranks": reports,
            }
            Path(args.report).write_text(json.dumps(result))
        if args.trace:
            _write_trace(args.trace, steps, engine.world_size)
    comm.close()
    return 0


def _gather(comm: Any, item: dict) -> list[dict]:
    """Every rank's item on every rank (typed JSON, one broadcast per rank)."""
    if comm.world_size == 1:
        return [item]
    mine = json.dumps(item).encode()
    return [json.loads(comm.broadcast_bytes(mine if comm.rank == r else None, src=r)) for r in range(comm.world_size)]


def _write_trace(path: str, ranks: list[dict], world_size: int) -> None:
    """The torch engine's trace file: Chrome/Perfetto traceEvents plus each rank's per-step, per-layer phases."""
    from moecluster.tracing import trace_events

    events = trace_events(ranks)
    for r in ranks:
        for step in r["steps"]:
            step.pop("events", None)
    doc = {"traceEvents": events, "displayTimeUnit": "ms", "world_size": world_size, "ranks": ranks}
    Path(path).write_text(json.dumps(doc))
