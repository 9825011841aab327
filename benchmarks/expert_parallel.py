"""Expert-parallel benchmark: all-reduce latency vs size (MPI, gloo) and 1 rank (1 core) vs 2 ranks (1 core each).

Decode runs the decode benchmark model (benchmarks/decode.py) through `moecluster generate`; the
byte-ideal speedup is (weight bytes one rank reads per token) / (bytes the busiest of 2 ranks reads).
Targets: 2-rank speedup >= 90% of byte-ideal after subtracting the measured exchange time; per-layer
exchange <= 1.5x the bare MPI all-reduce of the same size.

    .venv/bin/python benchmarks/expert_parallel.py [--tokens 32] [--repeats 3] [--backend mpi]
    .venv/bin/python benchmarks/expert_parallel.py --engine mlx [--model DIR]   # MLX ring; no bare MPI reference
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import keep_history  # a sibling module: benchmarks run as scripts

sys.path.insert(0, str(Path(__file__).parent))
from decode import PROMPT, bench_model_dir  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run_generate(
    model: Path,
    nodes: int,
    backend: str,
    tokens: int,
    exchange: str,
    placement: str = "contiguous",
    engine: str = "torch",
) -> dict:
    """One `moecluster generate` run; returns rank 0's report with the full per-step trace of every rank."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report, tempfile.NamedTemporaryFile(suffix=".json") as trace:
        cmd = [
            sys.executable,
            "-m",
            "moecluster.cli",
            "generate",
            "--model",
            str(model),
            "--prompt",
            PROMPT,
            "--max-tokens",
            str(tokens),
            "--ignore-eos",
            "--quiet",
            "--nodes",
            str(nodes),
            "--backend",
            backend,
            "--exchange",
            exchange,
            "--report",
            report.name,
            "--trace",
            trace.name,
            "--placement",
            placement,
            "--engine",
            engine,
        ]
        if (
            nodes == 1 and engine == "torch"
        ):  # one rank on one core, one thread: the same compute as each of the 2 ranks
            cmd = ["taskset", "-c", "0", *cmd, "--threads", "1"]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
        return {**json.loads(Path(report.name).read_text()), "trace": json.loads(Path(trace.name).read_text())}


def per_layer_split(run: dict, expert_bytes: float, dense_bytes: float) -> dict:
    """From both ranks' per-step, per-layer traces: pure exchange (the rank that arrived last waited ~0:
    min over ranks per layer), waiting (max - min), and the byte-ideal step (per layer the busiest rank's
    expert bytes, since every layer ends in a synchronizing exchange)."""
    ranks = [[s for s in r["steps"] if s["kind"] == "decode"] for r in run["trace"]["ranks"]]
    exch, wait, ideal = [], [], []
    for steps in zip(*ranks):
        layers = steps[0]["layers"].keys() - {"-1"}
        ar = [[st["layers"][k].get("all_reduce", 0.0) for st in steps] for k in layers]
        exch.append(sum(min(a) for a in ar))
        wait.append(sum(max(a) - min(a) for a in ar))
        ideal.append(dense_bytes + expert_bytes * sum(max(st["evals"][k] for st in steps) for k in layers))
    return {"exchange_s": statistics.mean(exch), "wait_s": statistics.mean(wait), "ideal_bytes": statistics.mean(ideal)}


def allreduce_table(iters: int) -> dict:
    """Run benchmarks/allreduce.py (2 pinned ranks) -> {variant: {size: us}}. iters 0: reuse its last warm
    results, but always measure the cold-cache all-reduce afresh (it moves with the machine's load)."""
    script = str(Path(__file__).parent / "allreduce.py")
    if iters > 0:
        subprocess.run(
            [sys.executable, script, "--iters", str(iters), "--gloo-iters", str(max(200, iters // 5))],
            check=True,
            timeout=1800,
        )
    else:
        subprocess.run([sys.executable, script, "--cold"], check=True, timeout=1800)
    info = json.loads((RESULTS / "allreduce.json").read_text())
    table: dict = {}
    for r in info["rows"] + info.get("cold_rows", []):
        table.setdefault(r["variant"], {})[r["size_bytes"]] = r["median_us"]
    return table


def interpolate(points: dict, size: int) -> float:
    xs = sorted(points)
    if size <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if size <= b:
            return points[a] + (points[b] - points[a]) * (size - a) / (b - a)
    return points[xs[-1]] * size / xs[-1]


def summarize(one: list[dict], two: list[dict], bare: dict, dims: dict) -> dict:
    t1 = statistics.median(1 / r["stats"]["decode_tok_s"] for r in one)
    t2 = statistics.median(1 / r["stats"]["decode_tok_s"] for r in two)
    bytes1 = one[0]["ranks"][0]["bytes_per_token"]
    wb = dims.get("weight_bytes", 2)  # bytes per weight: bf16, or fp32 (MLX on a CPU)
    expert_bytes = 3 * dims["dim"] * dims["ffn_dim"] * wb
    dense = bytes1 - dims["n_layers"] * dims["top_k"] * expert_bytes
    splits = [per_layer_split(r, expert_bytes, dense) for r in two]
    exch = statistics.median(x["exchange_s"] for x in splits)
    wait = statistics.median(x["wait_s"] for x in splits)
    ideal = bytes1 / statistics.median(x["ideal_bytes"] for x in splits)
    mean_ideal = bytes1 / max(rank["bytes_per_token"] for rank in two[0]["ranks"])
    per_layer_us = exch / dims["n_layers"] * 1e6
    msg_bytes = dims["top_k"] * dims["dim"] * wb  # exact exchange: y_NKD for one token
    bare_us = interpolate(bare["mpi_bare_bf16"], msg_bytes) if "mpi_bare_bf16" in bare else None
    cold = bare.get("mpi_bare_bf16_cold", {})
    cold_us = cold.get(msg_bytes)
    speedup_excl = t1 / (t2 - exch)
    return {
        "t1_ms": t1 * 1e3,
        "t2_ms": t2 * 1e3,
        "tok_s_1": 1 / t1,
        "tok_s_2": 1 / t2,
        "bytes_per_token_1": bytes1,
        "byte_ideal_speedup": ideal,
        "mean_bytes_ideal_speedup": mean_ideal,
        "speedup": t1 / t2,
        "speedup_excl_exchange": speedup_excl,
        "ratio_to_ideal": speedup_excl / ideal,
        "exchange_ms_per_token": exch * 1e3,
        "wait_ms_per_token": wait * 1e3,
        "per_layer_exchange_us": per_layer_us,
        "message_bytes": msg_bytes,
        "bare_mpi_allreduce_us": bare_us,
        "exchange_vs_bare": per_layer_us / bare_us if bare_us else None,
        "bare_mpi_allreduce_cold_us": cold_us,
        "exchange_vs_bare_cold": per_layer_us / cold_us if cold_us else None,
        "trace_2_ranks": [rank["trace"] for rank in two[0]["ranks"]],
        "trace_1_rank": one[0]["ranks"][0]["trace"],
    }


def model_dims(model: Path, engine: str) -> dict:
    """The dims summarize() needs, from a checkpoint's config.json (MoE layers, expert hidden size, top-k)."""
    from moecluster.models.configs import parse_config

    cfg = json.loads((model / "config.json").read_text())
    shape = parse_config(cfg).shape()
    ffn = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    on_cpu_mlx = engine == "mlx" and not platform.platform().startswith("macOS")
    return {
        "dim": cfg["hidden_size"],
        "ffn_dim": ffn,
        "n_layers": shape.num_moe_layers,
        "top_k": shape.top_k,
        "weight_bytes": 4 if on_cpu_mlx or cfg.get("torch_dtype", cfg.get("dtype")) == "float32" else 2,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="mpi", choices=["mpi", "torch"])
    ap.add_argument("--exchange", default="exact", choices=["exact", "sum"])
    ap.add_argument("--allreduce-iters", type=int, default=3000)
    ap.add_argument(
        "--placement",
        default="contiguous",
        help="for the 2-rank runs: contiguous, round-robin, groups or a placement JSON "
        "(e.g. benchmarks/placements/bench-2-replicated.json); results get its name as suffix",
    )
    ap.add_argument("--engine", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--model", default=None, help="any checkpoint directory instead of the benchmark model")
    args = ap.parse_args()
    from moecluster.builtin import PRESETS
    from moecluster.tracing import format_breakdown

    if args.model:
        model, dims, what = Path(args.model), model_dims(Path(args.model), args.engine), Path(args.model).name
    else:  # builds the 1.5 GB benchmark checkpoint once
        dims, model, what = PRESETS["bench"], bench_model_dir("dbrx"), "bench DBRX-shaped bf16"
    mlx = args.engine == "mlx"
    bare = {} if mlx else allreduce_table(args.allreduce_iters)  # the bare reference is MPI's (allreduce.py)
    one, two = [], []
    for _ in range(args.repeats):  # interleaved so that drift hits both alike
        one.append(run_generate(model, 1, args.backend, args.tokens, args.exchange, engine=args.engine))
        two.append(run_generate(model, 2, args.backend, args.tokens, args.exchange, args.placement, args.engine))
    s = summarize(one, two, bare, dims)
    backend = "mlx ring" if mlx else args.backend
    lines = [
        f"model: {what} {dims}; engine {args.engine}; backend {backend}; exchange {args.exchange}; "
        f"placement {args.placement}",
        f"1 rank{'' if mlx else ' (1 core)'}: {s['tok_s_1']:.2f} tok/s, "
        f"reads {s['bytes_per_token_1'] / 1e9:.4f} GB/token",
        f"2 ranks{' (MLX threads, unpinned)' if mlx else ' (1 core each)'}: {s['tok_s_2']:.2f} tok/s",
        f"byte-ideal speedup {s['byte_ideal_speedup']:.2f}x (per layer, the busiest rank's bytes; "
        f"{s['mean_bytes_ideal_speedup']:.2f}x if every layer were balanced)",
        f"speedup {s['speedup']:.2f}x; excluding exchange "
        f"({s['exchange_ms_per_token']:.2f} ms/token) {s['speedup_excl_exchange']:.2f}x = "
        f"{s['ratio_to_ideal'] * 100:.0f}% of ideal (target >= 90%)",
        f"waiting on the slowest rank: {s['wait_ms_per_token']:.2f} ms/token",
        (
            f"per-layer exchange {s['per_layer_exchange_us']:.1f} us for {s['message_bytes']} B vs bare MPI "
            f"all-reduce {s['bare_mpi_allreduce_us']:.1f} us = {s['exchange_vs_bare']:.2f}x (target <= 1.5x; "
            "bare = warm, tight loop)"
            if s["bare_mpi_allreduce_us"]
            else f"per-layer exchange {s['per_layer_exchange_us']:.1f} us for {s['message_bytes']} B (no bare one)"
        ),
        (
            f"vs bare MPI all-reduce of {s['message_bytes']} B right after streaming a layer's expert weights (cold "
            f"caches, as in decode): {s['bare_mpi_allreduce_cold_us']:.1f} us = {s['exchange_vs_bare_cold']:.2f}x"
            if s["bare_mpi_allreduce_cold_us"]
            else "(no cold-cache all-reduce measurement: run benchmarks/allreduce.py)"
        ),
        "",
        "time per decode step, 2 ranks:",
        format_breakdown([(str(i), t) for i, t in enumerate(s["trace_2_ranks"])]),
        "time per decode step, 1 rank:",
        format_breakdown([("0", s["trace_1_rank"])]),
    ]
    text = "\n".join(lines)
    print(text)
    command = "python " + " ".join(sys.argv)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    RESULTS.mkdir(exist_ok=True)
    name = "expert_parallel" if args.placement == "contiguous" else f"expert_parallel_{Path(args.placement).stem}"
    if args.model:
        name += f"_{model.name}"
    if mlx:
        name += "_mlx"
        if not platform.platform().startswith("macOS"):
            lines.append("MLX's Linux CPU build: a correctness run only; these numbers say nothing about a Mac")
            text = "\n".join(lines)
            print(lines[-1])
    run = keep_history(RESULTS / f"{name}.json", {"machine": machine, "command": command, **s})
    (RESULTS / f"{name}.json").write_text(json.dumps(run, indent=2))
    (RESULTS / f"{name}.md").write_text(
        f"# Expert-parallel benchmark\n\nMachine: {machine}\n\nCommand: `{command}`\n\n```\n{text}\n```\n\n"
        f"All-reduce latency against size: see allreduce.md (same run).\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
