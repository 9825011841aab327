"""`moecluster place`: plan which node holds which experts, print the metrics, write the JSON.

Legend: E experts, L layers, N ranks, K top-k, D model dim, F expert hidden dim, V vocab.

Reads only the model's config.json (no weights, no torch) to know its shape and bytes
(`planning.sizes`).
"""

from __future__ import annotations

import argparse
import json

from moecluster.errors import MoeClusterError
from moecluster.parallel.placement import Placement
from moecluster.planning.placement_metrics import (
    bytes_per_rank,
    fits_memory,
    placement_metrics,
    summarize,
    trace_from_stats,
)
from moecluster.planning.planner import GB, STRATEGIES, Cluster, plan
from moecluster.planning.routing_stats import RoutingStats
from moecluster.planning.sizes import ModelSizes, read_model_sizes


def _per_node(text: str | None, nodes: int, what: str) -> tuple[float, ...] | None:
    """'192,192,64' (one per node) or '64' (all nodes) -> floats."""
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoeClusterError(f"{what} must be numbers separated by commas, got {text!r}") from None
    if len(values) == 1:
        values *= nodes
    if len(values) != nodes or any(v <= 0 for v in values):
        raise MoeClusterError(f"{what} needs one positive value or {nodes} (one per node), got {text!r}")
    return tuple(values)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "place",
        help="plan expert placement over nodes; print metrics; write placement JSON",
        description="Plan which node holds which experts (replicating popular ones where memory "
        "allows), print per-node metrics, write the JSON that --placement takes.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or its config.json")
    p.add_argument("--nodes", type=int, required=True, help="number of ranks (one per node)")
    p.add_argument("--stats", help="routing stats JSON from `moecluster profile-routing`")
    p.add_argument("--strategy", choices=STRATEGIES, default="optimized")
    p.add_argument("--memory-gb", help="usable memory per node, e.g. 192,192,64 (default: unlimited)")
    p.add_argument("--speed", help="relative speed per node, e.g. 1,1,0.5 (default: all 1)")
    p.add_argument(
        "--replica-budget-gb",
        type=float,
        help="extra expert memory for replicas over the whole cluster (default: 25%% of one copy of the experts)",
    )
    p.add_argument(
        "--reserve-gb",
        type=float,
        default=0.0,
        help="memory kept free per node for KV cache, activations, OS (default 0)",
    )
    p.add_argument("--groups", type=int, help="groups strategy: number of expert groups")
    p.add_argument("--batch", type=int, default=1, help="tokens per step to optimize for (default 1)")
    p.add_argument("--bytes-per-param", type=float, help="override the config's dtype, e.g. 0.5 for 4-bit weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-layer", action="store_true", help="also print one line per layer")
    p.add_argument("--out", help="write the placement JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise MoeClusterError(f"--nodes must be >= 1, got {args.nodes}")
    sizes = read_model_sizes(args.model, args.bytes_per_param)
    speeds = _per_node(args.speed, args.nodes, "--speed") or (1.0,) * args.nodes
    memory = _per_node(args.memory_gb, args.nodes, "--memory-gb")
    cluster = Cluster(
        args.nodes,
        speeds,
        tuple(m * GB for m in memory) if memory else None,
        sizes.fixed_bytes,
        sizes.bytes_per_expert,
        args.reserve_gb * GB,
    )
    stats = RoutingStats.load(args.stats) if args.stats else None
    if stats is not None:
        stats.check_model(sizes.num_layers, sizes.num_experts)
    budget = None if args.replica_budget_gb is None else args.replica_budget_gb * GB
    placement = plan(
        args.strategy,
        sizes.num_layers,
        sizes.num_experts,
        sizes.top_k,
        cluster,
        stats,
        budget,
        args.groups,
        args.batch,
        args.seed,
    )
    report = _report(placement, args.strategy, sizes, cluster, stats, args)
    print(report["text"])
    if args.out:
        data = placement.to_json()
        data["planner"] = {k: v for k, v in report.items() if k != "text"}
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.out}  (use: moecluster generate --nodes {args.nodes} --placement {args.out} ...)")
    else:
        print("placement not written: add --out placement.json")
    return 0


def _report(
    placement: Placement,
    strategy: str,
    sizes: ModelSizes,
    cluster: Cluster,
    stats: RoutingStats | None,
    args: argparse.Namespace,
) -> dict:
    """The printed tables and the same numbers as a dict (stored in the JSON's "planner")."""
    n, k = cluster.world_size, sizes.top_k
    if stats is None:
        stats = RoutingStats(sizes.num_layers, sizes.num_experts, k)  # uniform routing
    expected_trace = trace_from_stats(stats, 1024, args.seed, k, recorded=False)
    observed_trace = trace_from_stats(stats, recorded=True) if all(stats.samples_L) else None
    metrics = placement_metrics(placement, expected_trace, args.batch)
    bytes_N = bytes_per_rank(placement, sizes.fixed_bytes, sizes.bytes_per_expert)
    fits = fits_memory(bytes_N, list(cluster.memory_N) if cluster.memory_N else None, cluster.reserve_bytes)
    lines = [
        f"model: {sizes.arch}, {sizes.num_layers} layers x {sizes.num_experts} experts, "
        f"top-{k}; one expert {sizes.bytes_per_expert / GB:.3f} GB; replicated weights "
        f"{sizes.fixed_bytes / GB:.2f} GB per rank",
        f"strategy: {strategy}; routing: "
        + (
            f"{args.stats} ({sum(stats.tokens_L) // max(stats.num_layers, 1)} tokens/layer)"
            if args.stats
            else "uniform (no --stats: run `moecluster profile-routing`)"
        ),
        "",
        f"{'rank':>4} {'speed':>6} {'memory GB':>10} {'weights GB':>11} {'experts':>8} {'work/token':>11} {'fits':>5}",
    ]
    work_N = [sum(m.work_N[r] for m in metrics) / len(metrics) for r in range(n)]
    for r in range(n):
        mem = f"{cluster.memory_N[r] / GB:.1f}" if cluster.memory_N else "-"
        lines.append(
            f"{r:>4} {cluster.speeds[r]:>6.2f} {mem:>10} {bytes_N[r] / GB:>11.2f} "
            f"{placement.num_expert_copies(r):>8} {work_N[r]:>11.3f} "
            f"{'yes' if fits[r] else 'NO':>5}"
        )
    compare: dict[str, Placement] = {strategy: placement}
    failed: dict[str, str] = {}
    for other in ("contiguous", "round-robin", "groups"):
        if other != strategy:
            try:
                compare[other] = plan(other, sizes.num_layers, sizes.num_experts, k, cluster, None, None, args.groups)
            except MoeClusterError as e:
                failed[other] = str(e).split(";")[0]
    lines += [
        "",
        f"per layer (batch {args.batch}; imbalance = max/ideal work, speed-weighted):",
        f"{'strategy':<12} {'max-rank experts/step':>22} {'observed':>9} "
        f"{'imbalance mean':>15} {'worst':>6} {'extra expert GB':>16}",
    ]
    summary = {}
    for name, p in compare.items():
        s = summarize(metrics if p is placement else placement_metrics(p, expected_trace, args.batch))
        if observed_trace is not None:
            s["observed_step_max_experts_mean"] = summarize(placement_metrics(p, observed_trace, args.batch))[
                "step_max_experts_mean"
            ]
        s["extra_expert_gb"] = p.num_replicas() * sizes.bytes_per_expert / GB
        summary[name] = s
        obs = f"{s['observed_step_max_experts_mean']:.3f}" if observed_trace else "-"
        lines.append(
            f"{name:<12} {s['step_max_experts_mean']:>22.3f} {obs:>9} "
            f"{s['imbalance_mean']:>15.3f} {s['imbalance_worst']:>6.3f} "
            f"{s['extra_expert_gb']:>16.2f}"
        )
    lines += [f"{name:<12} cannot be used: {why}" for name, why in failed.items()]
    idle = [r for r in range(n) if any(not placement.experts_of(r, layer) for layer in range(sizes.num_layers))]
    if idle:
        lines.append(
            f"note: rank(s) {', '.join(map(str, idle))} hold no expert in some layers "
            f"and idle there; a larger --replica-budget-gb lets them share the work"
        )
    if args.per_layer:
        lines += ["", f"{'layer':>5} {'max-rank experts/step':>22} {'imbalance':>10} {'replicas':>9}"]
        for layer, m in enumerate(metrics):
            reps = sum(len(placement.holders(layer, e)) - 1 for e in range(sizes.num_experts))
            lines.append(f"{layer:>5} {m.step_max_experts:>22.3f} {m.imbalance:>10.3f} {reps:>9}")
    return {
        "text": "\n".join(lines),
        "strategy": strategy,
        "batch": args.batch,
        "bytes_per_rank": bytes_N,
        "fits_memory": fits,
        "work_per_token": work_N,
        "expected_max_rank_load": [m.step_max_experts for m in metrics],
        "summary": summary,
    }
