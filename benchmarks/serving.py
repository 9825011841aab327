"""Serving benchmark: 1, 2, 4, 8 concurrent streams through the continuous-batching scheduler.

Runs the scheduler `moecluster serve` runs (same admission, batching, sampling and stop logic; no
HTTP) on the decode benchmark's DBRX-shaped bf16 checkpoint (benchmarks/decode.py), one process.
For each concurrency it submits that many greedy requests at once and measures, over the window in
which every stream is decoding: aggregate decode tok/s, p50/p99 gap between a stream's tokens, the
weight bytes actually read per step (dense + the experts the batch activated), and the ratio of the
achieved rate to the bandwidth bound those bytes imply (streaming bandwidth measured just before and
after that run). Levels run in rounds; each reports its medians.

    .venv/bin/python benchmarks/serving.py [--streams 1,2,4,8] [--tokens 64] [--rounds 3] [--threads 2]

--server-cases runs instead the cases of benchmarks/serving_cases.py against real 2-rank servers (prefix cache,
chunked prefill, batch invariance) and adds them to the same result files:

    .venv/bin/python benchmarks/serving.py --server-cases [--chunks 0,128,512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import RESULTS, bench_model_dir, streaming_bandwidth  # noqa: E402

from moecluster.engine.batching import Event, Request, Scheduler, StepObserver  # noqa: E402
from moecluster.engine.sampling import SamplingParams  # noqa: E402
from moecluster.runtime import open_engine  # noqa: E402

TOPICS = [
    "the history of bridges",
    "how rivers form deltas",
    "why the sky is blue",
    "a recipe for bread",
    "the rules of chess",
    "how vaccines work",
    "the life of bees",
    "a trip to the mountains",
]
SPEEDUP_TARGET, BOUND_TARGET = 2.0, 0.8


class StepLog(StepObserver):
    """Decode steps as (end time, rows, forward seconds, weight bytes read)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int, float, int]] = []

    def on_step(self, kind, num_rows, seconds, bytes_read, trace) -> None:
        if kind == "decode":
            self.steps.append((time.perf_counter(), num_rows, seconds, bytes_read))


def run_streams(scheduler: Scheduler, tokenizer, count: int, tokens: int, timeout_s: float = 1800) -> list[list[float]]:
    """Submit `count` requests at once; each stream's token arrival times."""
    stamps: list[list[float]] = [[] for _ in range(count)]
    errors: list[str] = []
    done = threading.Semaphore(0)

    def emitter(i: int):
        def emit(ev: Event) -> None:
            if ev.token is not None:
                stamps[i].append(time.perf_counter())
            if ev.finish_reason is not None:
                if ev.finish_reason != "length":
                    errors.append(f"stream {i} ended with {ev.finish_reason}: {ev.error}")
                done.release()

        return emit

    for i in range(count):
        ids = tokenizer.encode(f"Write a long essay about {TOPICS[i % len(TOPICS)]}.")
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        scheduler.submit(Request(ids, params, emitter(i)))
    for _ in range(count):
        if not done.acquire(timeout=timeout_s):
            raise RuntimeError(f"streams did not finish within {timeout_s} s")
    if errors:
        raise RuntimeError("; ".join(errors))
    return stamps


def measure(stamps: list[list[float]], log: StepLog, count: int) -> dict:
    """Numbers over the window in which all `count` streams decode together."""
    start = max(s[0] for s in stamps)  # the last stream has its first token
    end = min(s[-1] for s in stamps)  # the first stream finished
    in_window = [t for s in stamps for t in s if start < t <= end]
    gaps = sorted(b - a for s in stamps for a, b in zip(s, s[1:]) if start < b <= end)
    steps = [st for st in log.steps if start < st[0] <= end and st[1] == count]
    if end <= start or not gaps or not steps:
        raise RuntimeError("no window in which every stream decodes: use more --tokens")
    tok_s = len(in_window) / (end - start)
    return {
        "streams": count,
        "window_s": end - start,
        "tokens_in_window": len(in_window),
        "tok_s": tok_s,
        "per_token_p50_ms": 1e3 * gaps[len(gaps) // 2],
        "per_token_p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
        "steps": len(steps),
        "step_ms": 1e3 * statistics.mean(st[2] for st in steps),
        "bytes_per_step": statistics.mean(st[3] for st in steps),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,2,4,8", help="comma-separated concurrency levels")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream (must exceed the stream count)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--bw-gib", type=float, default=1.0, help="buffer size of the bandwidth measurement")
    ap.add_argument("--results", default=str(RESULTS), help="directory for serving.json and serving.md")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all levels; a level reports medians")
    ap.add_argument("--server-cases", action="store_true", help="run serving_cases.py's cases on 2-rank servers")
    ap.add_argument("--chats", type=int, default=3, help="server cases: 10-turn chats")
    ap.add_argument("--reply-tokens", type=int, default=24, help="server cases: tokens per chat reply")
    ap.add_argument("--long-tokens", type=int, default=2000, help="server cases: the long prompt's tokens")
    ap.add_argument("--stream-tokens", type=int, default=200, help="server cases: tokens of the 4 streams")
    ap.add_argument("--decode-tokens", type=int, default=64, help="server cases: tokens per decode stream")
    ap.add_argument("--chunks", default="0,128,512", help="server cases: --prefill-chunk values besides the default")
    ap.add_argument("--repeats", type=int, default=3, help="server cases: runs per measurement (median)")
    ap.add_argument("--backend", choices=["mpi", "torch"], default="torch", help="server cases: the ranks' backend")
    args = ap.parse_args()
    if args.server_cases:
        return server_cases(args)
    levels = [int(x) for x in args.streams.split(",")]
    if min(levels) < 1 or args.tokens <= max(levels):
        ap.error("every stream count must be >= 1 and --tokens larger than the largest")
    torch.set_num_threads(args.threads)
    model_dir = bench_model_dir("dbrx")
    engine, _ = open_engine(model_dir, "bf16", None, num_slots=max(levels), max_seq_len=512)
    log = StepLog()
    scheduler = Scheduler(engine, max_batch=max(levels), max_queue=max(levels), observer=log)
    scheduler.start()
    run_streams(scheduler, engine.tokenizer, max(levels), 4)  # warm-up: every kernel and batch shape once
    runs: dict[int, list[dict]] = {count: [] for count in levels}
    after = streaming_bandwidth(args.bw_gib, repeats=3)
    for rnd in range(args.rounds):  # each level's bound from the bandwidth measured just around it
        for count in levels:
            before = after
            log.steps.clear()
            r = measure(run_streams(scheduler, engine.tokenizer, count, args.tokens), log, count)
            after = streaming_bandwidth(args.bw_gib, repeats=3)
            r["reference_gbs"] = (
                max(v["median_gbs"] for v in before.values()) + max(v["median_gbs"] for v in after.values())
            ) / 2
            r["bound_tok_s"] = r["streams"] * r["reference_gbs"] * 1e9 / r["bytes_per_step"]
            r["ratio_to_bound"] = r["tok_s"] / r["bound_tok_s"]
            r["achieved_gbs"] = r["bytes_per_step"] * r["tok_s"] / r["streams"] / 1e9
            runs[count].append(r)
            print(
                f"round {rnd + 1}: {count} streams: {r['tok_s']:.2f} tok/s, {r['ratio_to_bound'] * 100:.0f}% of "
                f"the bound at {r['reference_gbs']:.1f} GB/s",
                flush=True,
            )
    scheduler.stop()
    rows = [
        {k: statistics.median(r[k] for r in runs[count]) for k in runs[count][0]} | {"rounds": runs[count]}
        for count in levels
    ]
    report(args, engine, rows)
    return 0


def server_cases(args) -> int:
    import serving_cases

    logs = Path(args.results) / "serving_logs"
    logs.mkdir(parents=True, exist_ok=True)
    res = serving_cases.run_cases(args, logs)
    machine = {"cpu": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    print(serving_cases.write_results(args, res, Path(args.results), machine))
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report(args, engine, rows: list[dict]) -> None:
    by = {r["streams"]: r for r in rows}
    checks = {}
    if 1 in by and 8 in by:
        checks["speedup_8_vs_1"] = by[8]["tok_s"] / by[1]["tok_s"]
        checks["speedup_target_met"] = checks["speedup_8_vs_1"] >= SPEEDUP_TARGET
    if 8 in by:
        checks["bound_target_met"] = by[8]["ratio_to_bound"] >= BOUND_TARGET
    a = engine.loaded.shape
    result = {
        "machine": {
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "command": "python " + " ".join(sys.argv),
        "model": {
            "dim": a.d_model,
            "n_layers": a.num_layers,
            "num_experts": a.num_experts,
            "top_k": a.top_k,
            "ffn_dim": a.expert_ffn,
            "vocab": a.vocab_size,
            "dtype": "bf16",
            "dense_bytes": engine.dense_bytes,
        },
        "tokens_per_stream": args.tokens,
        "rounds": args.rounds,
        "rows": rows,
        "checks": checks,
    }
    lines = [
        f"medians of {args.rounds} rounds; bound: streams x bandwidth measured around that run / bytes per step",
        f"{'streams':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'GB/step':>8} {'step ms':>8} "
        f"{'GB/s':>6} {'bound tok/s':>11} {'of bound':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['streams']:>7} {r['tok_s']:>8.2f} {r['per_token_p50_ms']:>8.1f} "
            f"{r['per_token_p99_ms']:>8.1f} {r['bytes_per_step'] / 1e9:>8.3f} {r['step_ms']:>8.1f} "
            f"{r['reference_gbs']:>6.1f} {r['bound_tok_s']:>11.2f} "
            f"{r['ratio_to_bound'] * 100:>7.0f}%"
        )
    if "speedup_8_vs_1" in checks:
        lines.append(f"8 streams vs 1: {checks['speedup_8_vs_1']:.2f}x aggregate tok/s (target >= {SPEEDUP_TARGET}x)")
    if 8 in by:
        lines.append(
            f"8 streams: {by[8]['ratio_to_bound'] * 100:.0f}% of the bandwidth bound "
            f"(target >= {BOUND_TARGET * 100:.0f}%)"
        )
    text = "\n".join(lines)
    print(text)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(result, indent=2))
    md = (
        f"# Serving benchmark (continuous batching)\n\nMachine: {result['machine']}\n\n"
        f"Command: `{result['command']}`\n\nModel: DBRX-shaped bf16 {result['model']}, "
        f"{args.tokens} greedy tokens per stream, one process.\n\n"
        "tok/s: aggregate over the window in which every stream decodes; p50/p99: gap between one stream's "
        "tokens; GB/step: weight bytes read per decode step (dense + the experts the batch activated); "
        "GB/s: streaming bandwidth, mean of the measurements just before and after the level's run; "
        "bound: streams x that bandwidth / bytes per step. Each column is the median over the rounds "
        "(per-round numbers in serving.json).\n\n"
        f"```\n{text}\n```\n"
    )
    (out / "serving.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
