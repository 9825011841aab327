"""Run `moecluster calibrate`'s measuring jobs on local ranks and collect rank 0's results.

Each job is `python -m moecluster.cli calibrate --rank-worker --phase engine|allreduce ...` on N
ranks (`launch_local`); its ranks run `moecluster.calibration.measure.run_worker` and rank 0 writes
one JSON result. `moecluster.perfmodel.calibrate` turns the results into a profile (pure Python).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError


def worker_argv(
    args: argparse.Namespace,
    phase: str,
    result: str,
    *,
    ar_sizes: list[int],
    ar_dtype: str = "bfloat16",
    backend: str | None = None,
    trace: bool = True,
) -> list[str]:
    """Command line of one calibration rank (what launchers start on every rank)."""
    argv = [
        sys.executable,
        "-m",
        "moecluster.cli",
        "calibrate",
        "--model",
        str(args.model),
        "--backend",
        backend or args.backend,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--prompt-len",
        str(args.prompt_len),
        "--placement",
        args.placement,
        "--exchange",
        args.exchange,
        "--ar-iters",
        str(args.ar_iters),
        "--timeout",
        str(args.timeout),
        "--phase",
        phase,
        "--result",
        result,
        "--ar-sizes",
        ",".join(map(str, ar_sizes)),
        "--ar-dtype",
        ar_dtype,
        "--engine",
        getattr(args, "engine", "torch"),
        "--rank-worker",
    ]
    quant = (
        ["--quant-group-size", str(args.quant_group_size)]
        + (["--quantize", args.quantize] if args.quantize else [])
        + (["--quantize-dense", args.quantize_dense] if args.quantize_dense else [])
    )
    return argv + (["--dtype", args.dtype] if args.dtype else []) + quant + ([] if trace else ["--no-trace"])


def launch_job(args: argparse.Namespace, phase: str, world_size: int, tmp: str, **kw: Any) -> dict:
    """Run one calibration job on `world_size` local ranks; rank 0's result."""
    from moecluster.distributed.launch import launch_local

    result = str(Path(tmp) / f"{phase}-{world_size}.json")
    backend = args.backend if world_size > 1 else "single"
    cmd = worker_argv(args, phase, result, backend=backend, **kw)
    env = None
    if getattr(args, "engine", "torch") == "mlx":  # MLX's ring on 127.0.0.1 + the watchdog's port (engines/mlx)
        from moecluster.distributed.launch import free_port

        backend = "mlx" if world_size > 1 else "single"  # the ranks ignore --backend: MLX_HOSTFILE says ring
        env = {"MOECLUSTER_MLX_WATCHDOG": f"127.0.0.1:{free_port()}"}
    print(f"calibrate: {phase} on {world_size} rank(s) ...", file=sys.stderr, flush=True)
    pin = world_size > 1 and env is None
    code = launch_local(cmd, world_size, backend, pin=pin, timeout_s=args.timeout, env=env)
    if code != 0 or not Path(result).is_file():
        raise MoeClusterError(
            f"calibration {phase} job on {world_size} ranks failed (exit {code}); see the messages above"
        )
    return json.loads(Path(result).read_text())


def run_jobs(args: argparse.Namespace, sizes: list[int]) -> tuple[list[dict], dict[int, list[dict]]]:
    """--repeats engine jobs on N ranks (with the N-rank all-reduce), then one all-reduce job per 2..N-1."""
    total = args.repeats + max(args.nodes - 2, 0)
    with tempfile.TemporaryDirectory(prefix="moecluster-calibrate-") as tmp:
        engines = []
        for k in range(args.repeats):
            _status(k + 1, total, f"engine (load, decode, all-reduce) on {args.nodes} rank(s)")
            engines.append(launch_job(args, "engine", args.nodes, tmp, ar_sizes=sizes))
        tables = {args.nodes: [r for e in engines for r in e["allreduce"]]} if args.nodes > 1 else {}
        for w in range(2, args.nodes):
            _status(args.repeats + w - 1, total, f"all-reduce on {w} ranks")
            tables[w] = launch_job(
                args, "allreduce", w, tmp, ar_sizes=sizes, ar_dtype=engines[0]["model"]["exchange_dtype"]
            )["allreduce"]
    return engines, tables


def _status(k: int, n: int, what: str) -> None:
    """One line per measurement job on a terminal (a run takes minutes); nothing when stderr is not one."""
    if sys.stderr.isatty():
        print(f"calibrate: job {k}/{n}: {what} ...", file=sys.stderr, flush=True)
