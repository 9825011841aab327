"""Placement benchmark: load imbalance of each strategy on Zipf-skewed routing.

16 experts, top-4 (DBRX's shape), 40 layers. Routing: each layer's expert weights follow
Zipf(1.2) (weight of the i-th most popular expert ~ 1/i^1.2) over a random permutation of the
expert ids per layer (so popular experts are not adjacent ids); each token picks 4 distinct
experts with probability proportional to the weights (Plackett-Luce). The planner sees stats
recorded from one trace (4096 tokens/layer); metrics are measured with the real `assign` rule on
a held-out trace (another 4096 tokens/layer, same popularity).

imbalance = max over ranks of (pairs computed / speed) / (total pairs / sum of speeds), per
layer; 1.0 is the ideal. step max = mean over decode steps (batch 1) of the max over ranks of
experts evaluated / speed (the per-layer expert time in units of one expert on a speed-1 rank).

Run: .venv/bin/python benchmarks/placement.py   (writes benchmarks/results/placement.{json,md})
"""

from __future__ import annotations

import os

from results_io import keep_history  # a sibling module: benchmarks run as scripts

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices: one thread is fastest
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from moecluster.planning.placement_metrics import placement_metrics, summarize  # noqa: E402
from moecluster.planning.planner import Cluster, plan  # noqa: E402
from moecluster.planning.routing_stats import stats_from_trace, zipf_trace  # noqa: E402

NUM_EXPERTS, TOP_K, NUM_LAYERS, ALPHA, TOKENS = 16, 4, 40, 1.2, 4096
BUDGET = 0.25  # extra expert memory allowed to the optimized strategy, fraction of one copy
TARGET = 1.10  # optimized imbalance (mean over layers) must be within 10% of ideal
CASES = [(2, (1.0, 1.0)), (3, (1.0,) * 3), (4, (1.0,) * 4), (8, (1.0,) * 8), (3, (1.0, 1.0, 0.5))]
STRATEGIES = ("contiguous", "round-robin", "groups", "optimized")
HERE = os.path.dirname(os.path.abspath(__file__))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cpus, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}"
    )


def run_case(num_ranks: int, speeds: tuple[float, ...], stats, held_out) -> list[dict]:
    cluster = Cluster(num_ranks, speeds, bytes_per_expert=1.0)
    rows = []
    for strategy in STRATEGIES:
        t0 = time.perf_counter()
        budget = BUDGET * NUM_LAYERS * NUM_EXPERTS if strategy == "optimized" else None
        placement = plan(strategy, NUM_LAYERS, NUM_EXPERTS, TOP_K, cluster, stats, budget)
        seconds = time.perf_counter() - t0
        s = summarize(placement_metrics(placement, held_out, batch=1))
        rows.append(
            {
                "ranks": num_ranks,
                "speeds": list(speeds),
                "strategy": strategy,
                "extra_memory": placement.num_replicas() / (NUM_LAYERS * NUM_EXPERTS),
                "plan_seconds": round(seconds, 2),
                **s,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| ranks | speeds | strategy | imbalance mean | imbalance worst | step max (b=1) "
        "| extra expert memory | plan s |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        speeds = ",".join(f"{s:g}" for s in r["speeds"])
        lines.append(
            f"| {r['ranks']} | {speeds} | {r['strategy']} | {r['imbalance_mean']:.3f} | "
            f"{r['imbalance_worst']:.3f} | {r['step_max_experts_mean']:.3f} | "
            f"{100 * r['extra_memory']:.0f}% | {r['plan_seconds']:.1f} |"
        )
    return "\n".join(lines)


def assign_us_per_call(calls: int = 20000) -> float:
    """Median over 5 runs of the cost of one `Placement.assign` at decode (T=1, K=4, 4 ranks, replicas)."""
    from moecluster.parallel.placement import Placement

    p = Placement([[[e % 4, (e + 1) % 4] if e < 4 else [e % 4] for e in range(16)]] * 2, 4)
    ids = [[0, 1, 2, 9]]
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            p.assign(0, ids)
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return sorted(runs)[2]


def main() -> int:
    assign_us = assign_us_per_call()  # on the decode path once per MoE layer: must stay far below a layer's time
    profile = zipf_trace(NUM_LAYERS, NUM_EXPERTS, TOP_K, TOKENS, ALPHA, seed=1, popularity_seed=0)
    held_out = zipf_trace(NUM_LAYERS, NUM_EXPERTS, TOP_K, TOKENS, ALPHA, seed=2, popularity_seed=0)
    stats = stats_from_trace(profile, NUM_EXPERTS, max_samples=TOKENS)
    rows = []
    for num_ranks, speeds in CASES:
        rows += run_case(num_ranks, speeds, stats, held_out)
    opt = [r for r in rows if r["strategy"] == "optimized"]
    ok = all(r["imbalance_mean"] <= TARGET and r["extra_memory"] <= BUDGET + 1e-9 for r in opt)
    verdict = (
        f"target (optimized imbalance mean <= {TARGET} with <= {100 * BUDGET:.0f}% extra "
        f"expert memory, every case): {'MET' if ok else 'NOT MET'}"
    )
    text = table(rows)
    text += f"\n\nassign (decode, T=1, K=4, 4 ranks with replicas): {assign_us:.1f} us per call (median of 5)"
    print(text)
    print(verdict)
    command = "OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/placement.py"
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    run = keep_history(
        os.path.join(out, "placement.json"),
        {
            "machine": machine(),
            "command": command,
            "num_experts": NUM_EXPERTS,
            "top_k": TOP_K,
            "num_layers": NUM_LAYERS,
            "zipf_alpha": ALPHA,
            "tokens": TOKENS,
            "budget": BUDGET,
            "target": TARGET,
            "target_met": ok,
            "assign_us_per_call": assign_us,
            "rows": rows,
        },
    )
    with open(os.path.join(out, "placement.json"), "w") as f:
        json.dump(run, f, indent=1)
    with open(os.path.join(out, "placement.md"), "w") as f:
        f.write(
            f"# Placement benchmark\n\nMachine: {machine()}\n\nCommand: `{command}`\n\n"
            f"{__doc__.split('Run:')[0].split(chr(10), 2)[2].strip()}\n\n"
            f"For equal speeds the step max cannot go below max(1, 4/N) (4 experts per token "
            f"over N ranks).\n\nStrategies: contiguous (rank r holds "
            f"experts [rE/N, (r+1)E/N)); round-robin (e -> e % N); groups (ceil(N/2) groups, "
            f"each on ~2 ranks); optimized (`moecluster place --strategy optimized`, replica "
            f"budget {100 * BUDGET:.0f}% of one copy of the experts). Groups with N=3 is uneven by "
            f"construction (2 groups over 3 ranks: one group has a single rank).\n\n"
            f"{text}\n\n{verdict}\n"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
