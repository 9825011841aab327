"""`moecluster generate`: text from a prompt on one rank or N (expert parallel)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moecluster.cli.cluster import (
    add_cluster_args,
    add_engine_arg,
    add_quant_args,
    quant_options,
    relaunch,
    run_on_rank,
)
from moecluster.engine.sampling import SamplingParams
from moecluster.errors import MoeClusterError
from moecluster.tracing import TRACER, format_breakdown


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout, stats to stderr)")
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 unless the checkpoint is fp32"
    )
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    p.add_argument("--trace", default=None, help="write the per-step, per-layer, per-rank trace to this JSON file")
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)  # JSON result, used by demo and tests
    p.add_argument("--quiet", action="store_true", help="do not stream text nor show the loading line (stats only)")
    p.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: all cores on 1 rank, 1 per rank)"
    )
    add_engine_arg(p)
    add_quant_args(p)
    p.add_argument("--no-check-weights", action="store_true", help="skip the NaN/Inf scan of the weights while loading")
    add_cluster_args(p)
    p.set_defaults(func=run_generate)


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=list(args.stop),
        ignore_eos=args.ignore_eos,
    ).validate()


def run_generate(args) -> int:
    if args.nodes < 1:
        raise MoeClusterError(f"--nodes must be at least 1, got {args.nodes}")
    params = sampling_from_args(args)
    if args.engine != "mlx":  # bad quantization options fail before ranks start (mlx: check_mlx_args)
        quant_options(args)
    if not Path(args.model).is_dir():
        raise MoeClusterError(f"model directory {args.model!r} does not exist; pass --model DIR with a HF checkpoint")
    if args.engine == "mlx":
        from moecluster.engines.mlx.run import run_generate_mlx

        return run_generate_mlx(args, params)
    if args.nodes > 1 and not args.rank_worker:
        return relaunch(args, args.argv)
    if args.threads is not None:
        if args.threads < 1:
            raise MoeClusterError(f"--threads must be at least 1, got {args.threads}")
        os.environ["MOECLUSTER_THREADS"] = str(args.threads)  # init_comm applies it on ranks
        import torch

        torch.set_num_threads(args.threads)
    return run_on_rank(args, lambda comm: _generate_on_rank(args, params, comm))


def _generate_on_rank(args, params: SamplingParams, comm) -> int:
    from moecluster.runtime import gather_reports, load_summary, open_engine, rank_report

    engine, placement = open_engine(
        args.model,
        args.dtype,
        comm,
        args.placement,
        exchange=args.exchange,
        quant=quant_options(args),
        check_weights=not args.no_check_weights,
        quiet=args.quiet,
    )
    rank0 = engine.rank == 0
    text = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = engine.tokenizer.encode(text)
    engine.check_prompt(prompt_ids, params)  # a bad prompt is the one error line, not after a "loaded" line
    summary = load_summary(engine)
    if summary and (rank0 or engine.world_size > 1):
        print(summary, file=sys.stderr, flush=True)
    TRACER.reset(enabled=True)
    out, tokens, stats = [], [], None
    for delta in engine.stream(prompt_ids, params):
        out.append(delta.text)
        tokens += [] if delta.token is None else [delta.token]
        stats = delta.stats or stats
        if rank0 and not args.quiet:
            print(delta.text, end="", flush=True)
    if rank0 and not args.quiet:
        print(flush=True)
    assert stats is not None  # Engine.stream's last delta carries the stats
    reports = gather_reports(comm, rank_report(engine, stats))
    if rank0:
        _print_stats(stats, reports, engine.world_size)
        result = {
            "text": "".join(out),
            "tokens": tokens,
            "stats": stats.to_dict(),
            "ranks": reports,
            "world_size": engine.world_size,
            "placement": placement.to_json() if placement else None,
        }
        if args.report:
            Path(args.report).write_text(json.dumps(result))
    if args.trace:
        _write_trace(args.trace, engine, comm)
    return 0


def _print_stats(stats, reports: list[dict], world_size: int) -> None:
    from moecluster.runtime import format_rank_table

    err = sys.stderr
    print(
        f"prompt tokens: {stats.prompt_tokens}  generated: {stats.generated_tokens} ({stats.finish_reason})", file=err
    )
    print(
        f"time to first token: {stats.ttft_s * 1e3:.1f} ms  prefill: {stats.prefill_tok_s:.1f} tok/s  "
        f"decode: {stats.decode_tok_s:.2f} tok/s",
        file=err,
    )
    read = max(r["bytes_per_token"] for r in reports)
    print(
        f"weights read per decode token: {read / 1e6:.1f} MB (slowest rank) -> "
        f"{read * stats.decode_tok_s / 1e9:.2f} GB/s",
        file=err,
    )
    print("peak RSS: " + ", ".join(f"rank {r['rank']} {r['peak_rss_bytes'] / 1e9:.2f} GB" for r in reports), file=err)
    print(
        "memory (GB; held = weights + KV cache; peaks sampled during load and decode): "
        + ", ".join(
            f"rank {r['rank']} held {r['held_bytes'] / 1e9:.2f} peak anon {r['peak_anon_bytes'] / 1e9:.2f} "
            f"file {r['peak_file_bytes'] / 1e9:.2f}"
            for r in reports
        ),
        file=err,
    )
    if world_size > 1:
        print(format_rank_table(reports), file=err)
    print("time per decode step (mean ms, share):", file=err)
    print(format_breakdown([(str(r["rank"]), r["trace"]) for r in reports]), file=err)


def _write_trace(path: str, engine, comm) -> None:
    """Rank 0 writes {"traceEvents": [...] (Chrome/Perfetto: open in ui.perfetto.dev or chrome://tracing),
    "world_size", "ranks": [each rank's step list, per-layer phase sums]}."""
    from moecluster.runtime import gather_reports
    from moecluster.tracing import trace_events

    ranks = gather_reports(comm, {"rank": engine.rank, "steps": TRACER.steps})
    if engine.rank == 0:
        events = trace_events(ranks)
        for r in ranks:
            for step in r["steps"]:
                step.pop("events", None)  # in traceEvents
        Path(path).write_text(
            json.dumps(
                {"traceEvents": events, "displayTimeUnit": "ms", "world_size": engine.world_size, "ranks": ranks}
            )
        )
