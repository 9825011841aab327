"""`moecluster generate` and `moecluster demo`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from moecluster.engine.sampling import SamplingParams
from moecluster.errors import MoeClusterError
from moecluster.tracing import TRACER, format_breakdown

DEMO_PROMPT = "Expert parallelism places different experts on different machines"


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that can run on several ranks."""
    p.add_argument("--nodes", type=int, default=1, help="number of ranks (local processes) to run")
    p.add_argument("--backend", choices=["mpi", "torch"], default="mpi", help="collective backend")
    p.add_argument("--placement", default="contiguous",
                   help="contiguous | round-robin | groups | FILE.json (see `moecluster place`)")
    p.add_argument("--exchange", choices=["exact", "sum"], default="exact",
                   help="exact: all-reduce per-expert outputs (output bit-identical to 1 rank); "
                        "sum: all-reduce fp32 partial sums (smallest message)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds any rank may wait for another")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)


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
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 unless the checkpoint is fp32")
    p.add_argument("--chat", action="store_true", help="wrap the prompt with the tokenizer's chat template")
    p.add_argument("--trace", default=None, help="write the per-step, per-layer, per-rank trace to this JSON file")
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)  # JSON result, used by demo and tests
    p.add_argument("--quiet", action="store_true", help="do not stream text (stats only)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores on 1 rank, 1 per rank)")
    add_cluster_args(p)
    p.set_defaults(func=run_generate)

    d = sub.add_parser("demo", help="built-in DBRX-architecture model on 2 ranks vs 1 rank")
    d.add_argument("--nodes", type=int, default=2)
    d.add_argument("--backend", choices=["mpi", "torch"], default="mpi")
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--cache-dir", default=None, help="where the built-in model is cached")
    d.set_defaults(func=run_demo)


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop=list(args.stop),
                          ignore_eos=args.ignore_eos).validate()


def relaunch(args, argv_tail: list[str]) -> int:
    """Start args.nodes local ranks running this same command as rank workers."""
    from moecluster.distributed.launch import launch_local

    cmd = [sys.executable, "-m", "moecluster.cli", *argv_tail, "--rank-worker"]
    return launch_local(cmd, args.nodes, args.backend, timeout_s=args.timeout)


def run_generate(args) -> int:
    if args.nodes < 1:
        raise MoeClusterError(f"--nodes must be at least 1, got {args.nodes}")
    params = sampling_from_args(args)
    if not Path(args.model).is_dir():
        raise MoeClusterError(f"model directory {args.model!r} does not exist; pass --model DIR with a HF checkpoint")
    if args.nodes > 1 and not args.rank_worker:
        return relaunch(args, args.argv)
    if args.threads is not None:
        if args.threads < 1:
            raise MoeClusterError(f"--threads must be at least 1, got {args.threads}")
        os.environ["MOECLUSTER_THREADS"] = str(args.threads)  # init_comm applies it on ranks
        import torch

        torch.set_num_threads(args.threads)
    return run_on_rank(args, lambda comm: _generate_on_rank(args, params, comm))


def run_on_rank(args, body) -> int:
    """Run body(comm) on this rank: comm is None in a single process, else joined from the launcher's env.
    On any error the rank leaves without waiting for its peers (they are stopped, not left hanging)."""
    comm = None
    if args.rank_worker:
        from moecluster.distributed.comm import init_comm

        comm = init_comm(args.backend, timeout_s=args.timeout)
    try:
        code = body(comm)
    except BaseException:
        if comm is not None:
            comm.mark_failed()
        raise
    if comm is not None:
        comm.close()
    return code


def _generate_on_rank(args, params: SamplingParams, comm) -> int:
    from moecluster.runtime import gather_reports, open_engine, rank_report

    engine, placement = open_engine(args.model, args.dtype, comm, args.placement, exchange=args.exchange)
    rank0 = engine.rank == 0
    text = args.prompt
    if args.chat:
        text = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = engine.tokenizer.encode(text)
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
    reports = gather_reports(comm, rank_report(engine, stats))
    if rank0:
        _print_stats(stats, reports, engine.world_size)
        result = {"text": "".join(out), "tokens": tokens, "stats": stats.to_dict(), "ranks": reports,
                  "world_size": engine.world_size, "placement": placement.to_json() if placement else None}
        if args.report:
            Path(args.report).write_text(json.dumps(result))
    if args.trace:
        _write_trace(args.trace, engine, comm)
    return 0


def _print_stats(stats, reports: list[dict], world_size: int) -> None:
    from moecluster.runtime import format_rank_table

    err = sys.stderr
    print(f"prompt tokens: {stats.prompt_tokens}  generated: {stats.generated_tokens} ({stats.finish_reason})", file=err)
    print(f"time to first token: {stats.ttft_s * 1e3:.1f} ms  prefill: {stats.prefill_tok_s:.1f} tok/s  "
          f"decode: {stats.decode_tok_s:.2f} tok/s", file=err)
    read = max(r["bytes_per_token"] for r in reports)
    print(f"weights read per decode token: {read / 1e6:.1f} MB (slowest rank) -> "
          f"{read * stats.decode_tok_s / 1e9:.2f} GB/s", file=err)
    print("peak RSS: " + ", ".join(f"rank {r['rank']} {r['peak_rss_bytes'] / 1e9:.2f} GB" for r in reports), file=err)
    if world_size > 1:
        print(format_rank_table(reports), file=err)
    print("time per decode step (mean ms, share):", file=err)
    print(format_breakdown([(str(r["rank"]), r["trace"]) for r in reports]), file=err)


def _write_trace(path: str, engine, comm) -> None:
    """Each rank's full step list; rank 0 writes {"ranks": [...]}."""
    from moecluster.runtime import gather_reports

    steps = gather_reports(comm, {"rank": engine.rank, "steps": TRACER.steps})
    if engine.rank == 0:
        Path(path).write_text(json.dumps({"world_size": engine.world_size, "ranks": steps}))


def demo_model_dir(cache_dir: str | None) -> Path:
    """Build the built-in demo checkpoint once; later runs reuse it."""
    from moecluster.builtin import build_dbrx_checkpoint

    root = Path(cache_dir or os.environ.get("MOECLUSTER_CACHE", Path.home() / ".cache" / "moecluster"))
    path = root / "demo-dbrx"
    if not (path / "config.json").is_file():
        print(f"building the built-in DBRX-architecture demo model in {path} ...", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(dir=root if root.exists() else None))
        build_dbrx_checkpoint(tmp, "demo")
        root.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path) if not path.exists() else None
    return path


def run_demo(args) -> int:
    model = demo_model_dir(args.cache_dir)
    results = {}
    for nodes in (args.nodes, 1):
        print(f"\n=== {nodes} rank{'s' if nodes > 1 else ''} ({'expert parallel, ' + args.backend if nodes > 1 else 'single process'}) ===",
              file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as report:
            argv = ["generate", "--model", str(model), "--prompt", args.prompt, "--max-tokens", str(args.max_tokens),
                    "--ignore-eos", "--nodes", str(nodes), "--backend", args.backend, "--report", report.name]
            from moecluster.cli import main

            code = main(argv)
            if code != 0:
                raise MoeClusterError(f"the {nodes}-rank run failed (exit {code}); see the messages above")
            results[nodes] = json.loads(Path(report.name).read_text())
    many, one = results[args.nodes], results[1]
    same = many["tokens"] == one["tokens"]
    print(f"\n{args.nodes} ranks: {many['stats']['decode_tok_s']:.1f} tok/s   1 rank: {one['stats']['decode_tok_s']:.1f} tok/s",
          file=sys.stderr)
    print(f"outputs identical: {'yes' if same else 'NO'} ({len(one['tokens'])} tokens)", file=sys.stderr)
    print("note: local ranks share this machine's memory bandwidth, so on one machine they cannot beat one "
          "process; across machines each node adds bandwidth and memory (see `moecluster plan`)", file=sys.stderr)
    return 0 if same else 1
