"""`moecluster demo`: the built-in trained model's routing, a placement derived from it, then the same prompt
on N ranks (expert parallel, that placement) and on 1 rank, with the same output.

Legend: L MoE layers, E experts, N ranks.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from moecluster.cli.cluster import add_engine_arg
from moecluster.errors import MoeClusterError

DEMO_PROMPT = "The function returns"


def register(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="the built-in trained MoE: routing, placement, 2 ranks vs 1 rank",
        description="Runs the built-in model (a small Qwen3-MoE trained on the Python docs; "
        "or --model DIR): records its routing on the prompt, derives an optimized "
        "placement from it, generates on N ranks with that placement and on 1 rank, "
        "and checks that the outputs are identical.",
    )
    d.add_argument("--nodes", type=int, default=2)
    d.add_argument("--backend", choices=["mpi", "torch"], default="mpi")
    d.add_argument("--max-tokens", type=int, default=40)
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--model", default=None, help="checkpoint directory (default: the built-in demo model)")
    add_engine_arg(d)
    d.set_defaults(func=run_demo)


def demo_model_dir(model: str | None) -> Path:
    from moecluster.builtin import DEMO_MODEL_DIR

    path = Path(model) if model else DEMO_MODEL_DIR
    if not (path / "config.json").is_file():
        where = (
            "the built-in demo model is missing from the package: reinstall, or retrain it with "
            "`python scripts/train_demo_model.py`"
            if model is None
            else "pass a HF checkpoint directory"
        )
        raise MoeClusterError(f"{path} has no config.json; {where}")
    return path


def _profile_engine(model: Path, engine: str):
    if engine == "mlx":
        from moecluster.engines.mlx.generate import MlxEngine

        return MlxEngine(model)
    from moecluster.engine.generate import Engine
    from moecluster.loading import load_model

    return Engine(load_model(model))


def routing_report(
    model: Path, prompt: str, max_tokens: int, nodes: int, engine: str = "torch"
) -> tuple[list[str], dict]:
    """Record the routing of the demo's own tokens (1 process, greedy: the same tokens the runs below make),
    plan contiguous and optimized placements for `nodes` ranks from it, measure both on those tokens."""
    import torch

    from moecluster.engine.profile_routing import profile
    from moecluster.planning.placement_metrics import observed_max_rank_load
    from moecluster.planning.planner import Cluster, plan
    from moecluster.planning.sizes import read_model_sizes

    torch.set_num_threads(1)  # a tiny model: more threads only add synchronization, and the runs below use 1
    stats = profile(_profile_engine(model, engine), [prompt], max_tokens)
    sizes = read_model_sizes(str(model))
    L, E, K = sizes.num_layers, sizes.num_experts, sizes.top_k
    lines = [
        f"routing of the demo's {stats.tokens_L[0]} tokens (prompt + generated), top-{K} of {E} experts:",
        f"{'layer':>5} {'max/mean expert load':>21} {'busiest expert':>15} {'unused experts':>15}",
    ]
    skew_L = []
    for layer in range(L):
        counts = stats.counts_LE[layer]
        mean = sum(counts) / E
        skew_L.append(max(counts) / mean)
        busiest = max(range(E), key=counts.__getitem__)
        lines.append(
            f"{layer:>5} {skew_L[-1]:>21.2f} {f'{busiest} ({counts[busiest]})':>15} {sum(c == 0 for c in counts):>15}"
        )
    cluster = Cluster(nodes, (1.0,) * nodes, None, sizes.fixed_bytes, sizes.bytes_per_expert)
    placements = {name: plan(name, L, E, K, cluster, stats) for name in ("contiguous", "optimized")}
    loads = {name: observed_max_rank_load(p, stats) or [] for name, p in placements.items()}
    mean = {name: sum(v) / len(v) for name, v in loads.items()}
    lines += [
        "",
        f"placement on {nodes} ranks (`moecluster place --strategy optimized` from this routing, "
        f"with up to {placements['optimized'].num_replicas()} replicas) vs contiguous:",
        f"{'strategy':<11} {'busiest rank: experts evaluated per token (mean over layers)':>60}",
    ]
    lines += [f"{name:<11} {mean[name]:>60.3f}" for name in placements]
    result = {"skew_L": skew_L, "max_rank_load": mean, "placement": placements["optimized"].to_json()}
    return lines, result


def run_demo(args) -> int:
    from moecluster.cli import main

    if args.nodes < 2:
        raise MoeClusterError(f"--nodes must be at least 2 (the demo compares N ranks with 1), got {args.nodes}")
    model = demo_model_dir(args.model)
    err = sys.stderr
    backend = args.backend if args.engine == "torch" else "mlx ring"
    print(
        f"model: {model}\nprompt: {args.prompt!r} (greedy, {args.max_tokens} tokens; the continuation "
        f"streams to stdout)",
        file=err,
    )
    lines, routing = routing_report(model, args.prompt, args.max_tokens, args.nodes, args.engine)
    print("\n".join(lines), file=err, flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        placement_file = Path(tmp) / "placement.json"
        placement_file.write_text(json.dumps(routing["placement"]))
        for nodes in (args.nodes, 1):
            how = (
                f"expert parallel, {backend}, optimized placement, 1 thread per rank"
                if nodes > 1
                else "single process" + (", 1 thread" if args.engine == "torch" else "")
            )
            print(f"\n=== {nodes} rank{'s' if nodes > 1 else ''} ({how}) ===", file=err, flush=True)
            report = Path(tmp) / f"report{nodes}.json"
            argv = [
                "generate",
                "--model",
                str(model),
                "--prompt",
                args.prompt,
                "--max-tokens",
                str(args.max_tokens),
                "--ignore-eos",
                "--nodes",
                str(nodes),
                "--report",
                str(report),
                "--engine",
                args.engine,
            ]
            # torch: N ranks on N cores vs 1 process on 1 core; mlx: its ring backend, MLX's own threads
            argv += ["--backend", args.backend, "--threads", "1"] if args.engine == "torch" else []
            if nodes > 1:
                argv += ["--placement", str(placement_file)]
            code = main(argv)
            if code != 0:
                raise MoeClusterError(f"the {nodes}-rank run failed (exit {code}); see the messages above")
            results[nodes] = json.loads(report.read_text())
    many, one = results[args.nodes], results[1]
    same = many["tokens"] == one["tokens"]
    fast, slow = many["stats"]["decode_tok_s"], one["stats"]["decode_tok_s"]
    cont, opt = routing["max_rank_load"]["contiguous"], routing["max_rank_load"]["optimized"]
    print(
        f"\n{args.nodes} ranks: {fast:.1f} tok/s   1 rank: {slow:.1f} tok/s   "
        f"({args.nodes} ranks at {fast / slow:.2f}x the speed of 1; one thread each, all on this machine)",
        file=err,
    )
    print(f"outputs identical: {'yes' if same else 'NO'} ({len(one['tokens'])} tokens)", file=err)
    print(
        f"routing: the busiest expert of a layer got {min(routing['skew_L']):.1f}x to "
        f"{max(routing['skew_L']):.1f}x its even share; the optimized placement's busiest rank evaluated "
        f"{opt:.2f} experts per token and layer vs {cont:.2f} with contiguous ({(1 - opt / cont) * 100:.0f}% "
        f"less; planned and measured on the same tokens)",
        file=err,
    )
    return 0 if same else 1
