"""`moecluster calibrate`: measure this cluster into a profile JSON that `plan --profile` reads.

    moecluster calibrate --model DIR --nodes 2 [--backend mpi] [--batch 1,4] [--out profile.json]

Runs the measuring jobs on N local ranks (`calibration.jobs`; each rank runs
`calibration.measure`), or reads rank-0 results of jobs started by hand (--from-results), then
builds the profile (`perfmodel.calibrate`) and prints the model's prediction from it as a check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moecluster.cli.cluster import add_engine_arg, add_quant_args
from moecluster.errors import MoeClusterError
from moecluster.perfmodel.calibrate import (
    BASE_SIZES,
    build_profile,
    message_sizes,
    parse_batches,
    read_results,
    self_check,
)
from moecluster.perfmodel.presets import load_presets


def register(subparsers: Any) -> None:
    """Add the `calibrate` subcommand."""
    p = subparsers.add_parser(
        "calibrate",
        help="measure this cluster into a profile JSON for `plan --profile`",
        description="Run the engine on N local ranks with tracing and time all-reduce against "
        "message size; write the per-term times as a profile for `moecluster plan --profile`.",
    )
    p.add_argument("--model", required=True, help="HF checkpoint directory (moecluster can run it)")
    p.add_argument("--nodes", type=int, default=1, help="ranks to run, one per node (default 1)")
    add_engine_arg(p)
    p.add_argument(
        "--backend",
        choices=["mpi", "torch", "single"],
        default="mpi",
        help="collective backend of the torch engine (--engine mlx: MLX's ring)",
    )
    p.add_argument("--out", default="profile.json", help="profile file to write (default profile.json)")
    p.add_argument(
        "--network",
        default=None,
        help="network preset this cluster's interconnect is (plan uses "
        "it for price and for node counts not measured); default: local (ranks on this machine, "
        "sharing its memory); required with --from-results of several hosts",
    )
    p.add_argument(
        "--node",
        default="linux-2core",
        help="node preset of these machines (label and self-check; default linux-2core)",
    )
    p.add_argument("--batch", default="1,4", help="decode batch sizes to time (default 1,4)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (default 3)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence (default 16)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the checkpoint's")
    p.add_argument("--placement", default="contiguous", help="expert placement (see `moecluster place`)")
    add_quant_args(p)
    p.add_argument("--exchange", choices=["exact", "sum"], default="exact", help="expert-parallel exchange")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="engine runs (new processes) whose per-term medians make the profile (default 1)",
    )
    p.add_argument("--ar-iters", type=int, default=400, help="all-reduce calls per message size (default 400)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any rank may wait for another")
    p.add_argument(
        "--from-results",
        nargs="+",
        default=None,
        metavar="FILE",
        help="build the profile from rank-0 result files of jobs started by hand (multi-host: "
        "mpiexec ... calibrate --rank-worker --result FILE) instead of running local ranks",
    )
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=["engine", "allreduce"], default="engine", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ar-sizes", default=",".join(map(str, BASE_SIZES)), help=argparse.SUPPRESS)
    p.add_argument("--ar-dtype", default="bfloat16", help=argparse.SUPPRESS)
    p.add_argument("--no-trace", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    """Entry point of `moecluster calibrate` (and of its rank workers)."""
    if args.rank_worker:
        from moecluster.calibration.measure import run_worker

        return run_worker(args)
    if args.nodes < 1:
        raise MoeClusterError(f"--nodes must be at least 1, got {args.nodes}")
    if not (Path(args.model) / "config.json").is_file():
        raise MoeClusterError(f"{args.model!r} is not a model directory with a config.json; pass --model DIR")
    if args.steps < 2 or args.warmup < 0 or args.prompt_len < 1:
        raise MoeClusterError("--steps must be >= 2, --warmup >= 0 and --prompt-len >= 1")
    presets = load_presets()
    if args.network is None and args.from_results and args.nodes > 1:
        raise MoeClusterError("--from-results of several hosts: pass --network (the preset of their interconnect)")
    args.network = args.network or "local"
    presets.network(args.network)  # unknown names fail before any run
    presets.node(args.node)
    batches = parse_batches(args.batch)
    if args.repeats < 1:
        raise MoeClusterError(f"--repeats must be at least 1, got {args.repeats}")
    if args.engine == "mlx" and not args.from_results:
        from moecluster.engines.mlx.run import check_mlx_args

        check_mlx_args(args)  # before any job: options the MLX engine lacks
    if args.from_results:
        engines, tables = read_results(args.from_results)
    else:
        from moecluster.calibration.jobs import run_jobs

        engines, tables = run_jobs(args, message_sizes(args.model, batches, args.exchange, args.dtype))
    engines[0]["model_dir"] = str(args.model)
    engine = engines[0]
    profile = build_profile(engines, tables, args.network, args.node)
    Path(args.out).write_text(json.dumps(profile, indent=1))
    print(format_summary(profile, self_check(profile, args.model, args.node, engine["world_size"])))
    print(
        f"wrote {args.out}: use it with  moecluster plan --model {args.model} --node {args.node} --profile {args.out}"
    )
    return 0


def format_summary(profile: dict, check: list[dict]) -> str:
    """Per batch: measured step breakdown and tok/s; then the model's prediction of each measured
    configuration from this profile, per term, with a warning for each term off by more than 15%."""
    m = profile["measured"]
    lines = [
        f"calibrated on {m['ranks']} rank(s), engine {profile.get('engine', 'torch')}, {m['backend']}, "
        + (f"{m['threads']} thread(s) per rank, " if m.get("threads") else "")
        + f"network "
        f"{profile['network']!r}"
        + (" (one machine: the ranks share its memory bandwidth and cores)" if profile["network"] == "local" else "")
        + f"; memory bandwidth {profile['memory_bandwidth_gbs']:.1f} GB/s per rank (all ranks reading at once)",
        f"{'batch':>5} {'attn/L ms':>9} {'router/L':>9} {'eval ms':>8} {'tok/exp':>7} {'head ms':>8} "
        f"{'sample':>7} {'tok/s':>7} {'model':>7}",
    ]
    pred = {c["batch"]: c["predicted_tok_s"] for c in check}
    for b, t in sorted(m["batches"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"{b:>5} {t['attention_per_layer'] * 1e3:>9.3f} {t['router_per_layer'] * 1e3:>9.3f} "
            f"{t['expert_eval'] * 1e3:>8.3f} {t['tokens_per_expert']:>7.2f} {t['head'] * 1e3:>8.3f} "
            f"{t['sampling'] * 1e3:>7.3f} {t['tok_s']:>7.2f} {pred.get(int(b), 0.0):>7.2f}"
        )
    for w, rows in profile["allreduce"].items():
        cells = " ".join(
            f"{int(s) // 1024 if s >= 1024 else int(s)}{'K' if s >= 1024 else 'B'}:{t * 1e6:.0f}" for s, t in rows
        )
        lines.append(f"all-reduce on {w} ranks, us: {cells}")
    if profile.get("exchange_overhead_s"):
        lines.append(
            f"in-engine exchange costs {profile['exchange_overhead_s'] * 1e6:.0f} us more than the bare "
            "all-reduce (cold caches after streaming weights); the profile adds it to every exchange"
        )
    lines.append("self-check, ms per step (measured / predicted from this profile):")
    for c in check:
        cells = "  ".join(f"{t} {c['measured'][t] * 1e3:.3f}/{c['predicted'][t] * 1e3:.3f}" for t in c["measured"])
        lines.append(f"  batch {c['batch']}: {cells}")
        for t in c["warnings"]:
            mt, pt = c["measured"][t], c["predicted"][t]
            lines.append(
                f"  WARNING batch {c['batch']}: {t} predicted {pt * 1e3:.3f} ms vs measured {mt * 1e3:.3f} ms "
                f"({100 * (pt / mt - 1) if mt else float('inf'):+.0f}%, "
                f"{100 * mt / c['measured']['step']:.0f}% "
                "of the measured step)"
            )
            if t == "experts" and c.get("distinct_measured") is not None:
                lines.append(
                    f"    the slowest rank evaluated {c['distinct_measured']:.2f} distinct experts per layer; uniform "
                    f"routing assumes {c['distinct_predicted']:.2f} (real routing is skewed: pass the recorded "
                    "routing's load to plan with --expert-load/--expert-distinct, see `moecluster place --stats`)"
                )
    return "\n".join(lines)
