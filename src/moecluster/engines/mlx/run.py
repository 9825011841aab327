"""`moecluster generate --engine mlx`: one rank, N local ranks (MLX ring backend on 127.0.0.1), or one rank of a
job started by `mlx.launch` (MLX_HOSTFILE / MLX_RANK in the environment)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError


def relaunch_mlx(args: Any) -> int:
    """Start args.nodes local ranks of this same command (ring backend, a watchdog port for rank 0)."""
    from moecluster.distributed.launch import free_port, launch_local

    cmd = [sys.executable, "-m", "moecluster.cli", *args.argv, "--rank-worker"]
    env = {"MOECLUSTER_MLX_WATCHDOG": f"127.0.0.1:{free_port()}"}
    return launch_local(cmd, args.nodes, "mlx", pin=False, timeout_s=args.timeout, env=env)


def run_generate_mlx(args: Any, params: Any) -> int:
    """The body of `generate --engine mlx` on this rank; rank 0 prints the text and stats."""
    if args.nodes > 1 and not args.rank_worker:
        return relaunch_mlx(args)
    from moecluster.engines.mlx.comm import init_group, watchdog_address
    from moecluster.engines.mlx.generate import MlxEngine, peak_rss_bytes
    from moecluster.engines.mlx.watchdog import Watchdog

    group = init_group()
    if args.nodes > 1 and group.size() != args.nodes:
        raise MoeClusterError(f"--nodes {args.nodes} but the MLX group has {group.size()} ranks")
    watchdog = None
    address = watchdog_address()
    if group.size() > 1 and address is not None:
        watchdog = Watchdog(group.rank(), group.size(), address, args.timeout)
    # on an error this rank just exits: its closed watchdog link tells the peers (no hung collective)
    engine = MlxEngine(args.model, args.dtype, group, args.placement, watchdog)
    text = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    out, tokens, stats = engine.generate(engine.tokenizer.encode(text), params, digest=bool(args.report))
    copies = engine.share_counts(sum(len(h) for h in engine.held()))
    if engine.rank == 0:
        if not args.quiet:
            print(out, flush=True)
        print(
            f"[mlx] prompt tokens: {stats.prompt_tokens}  generated: {stats.generated_tokens} "
            f"({stats.finish_reason})  ttft {stats.ttft_s * 1e3:.1f} ms  decode {stats.decode_tok_s:.2f} tok/s  "
            f"peak RSS {peak_rss_bytes() / 1e9:.2f} GB  expert copies per rank {copies}",
            file=sys.stderr,
        )
        if args.report:
            Path(args.report).write_text(
                json.dumps(
                    {
                        "engine": "mlx",
                        "text": out,
                        "tokens": tokens,
                        "stats": stats.__dict__,
                        "world_size": engine.world_size,
                        "placement": engine.placement.to_json(),
                        "expert_copies": copies,
                        "experts_layer0": engine.held()[0],
                    }
                )
            )
    if watchdog is not None:
        watchdog.close()
    return 0
