"""What every command that can run on several ranks shares: its options, relaunching itself as N
local rank workers, and joining the job as one of them."""

from __future__ import annotations

import argparse
import platform
import sys


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that can run on several ranks."""
    p.add_argument("--nodes", type=int, default=1, help="number of ranks (local processes) to run")
    p.add_argument("--backend", choices=["mpi", "torch"], default="mpi", help="collective backend")
    p.add_argument(
        "--placement",
        default="contiguous",
        help="contiguous | round-robin | groups | FILE.json (see `moecluster place`)",
    )
    p.add_argument(
        "--exchange",
        choices=["exact", "sum"],
        default="exact",
        help="exact: all-reduce per-expert outputs (output bit-identical to 1 rank); "
        "sum: all-reduce fp32 partial sums (smallest message)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds any rank may wait for another")
    p.add_argument(
        "--iface",
        default=None,
        metavar="NAME",
        help="network interface for the ranks' traffic across machines (e.g. eth1 on a private "
        "network); a one-machine job always uses loopback",
    )
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)


def default_engine() -> str:
    """mlx on macOS arm64 (Apple Silicon), torch elsewhere."""
    return "mlx" if sys.platform == "darwin" and platform.machine() == "arm64" else "torch"


def add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=["torch", "mlx"],
        default=default_engine(),
        help="torch (default on Linux) or mlx (Apple Silicon, default on macOS arm64; on Linux CPU for "
        "correctness only); --nodes N with mlx runs N local ranks on MLX's ring backend",
    )


def add_quant_args(p: argparse.ArgumentParser) -> None:
    """Options of commands that load a model: quantize a bf16/fp32 checkpoint's experts on load."""
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="hold the routed experts as int8 or int4 (group-wise, fp32 scales), quantized while "
        "loading; fp8 checkpoints are read as fp8 without this",
    )
    p.add_argument(
        "--quant-group-size",
        type=int,
        default=128,
        help="inputs per int8/int4 scale, dividing the model's dims (default 128): a multiple of 64 on the torch "
        "engine; 32, 64 or 128 on mlx",
    )
    add_quantize_dense_arg(p, "with --quantize: also hold")


def add_quantize_dense_arg(p: argparse.ArgumentParser, lead: str) -> None:
    """--quantize-dense [int8|int4] (bare: int8), for the commands that load models and for plan."""
    p.add_argument(
        "--quantize-dense",
        nargs="?",
        const="int8",
        default=None,
        choices=("int8", "int4"),
        help=f"{lead} attention and dense / shared MLP weights as int8 (bare) or int4, and the lm_head as int8",
    )


def quant_options(args):
    """The QuantOptions of add_quant_args' flags (None: none given)."""
    if args.quantize is None and not args.quantize_dense:
        return None
    from moecluster.quant.experts import QuantOptions

    return QuantOptions(args.quantize, args.quant_group_size, args.quantize_dense).check()


def relaunch(args, argv_tail: list[str]) -> int:
    """Start args.nodes local ranks running this same command as rank workers."""
    from moecluster.distributed.launch import launch_local

    cmd = [sys.executable, "-m", "moecluster.cli", *argv_tail, "--rank-worker"]
    return launch_local(cmd, args.nodes, args.backend, timeout_s=args.timeout)


def run_on_rank(args, body) -> int:
    """Run body(comm) on this rank: comm is None in a single process, else joined from the launcher's env.
    On any error the rank leaves without waiting for its peers (they are stopped, not left hanging)."""
    comm = None
    if args.rank_worker:
        from moecluster.distributed.comm import init_comm

        comm = init_comm(args.backend, timeout_s=args.timeout, iface=getattr(args, "iface", None))
    try:
        code = body(comm)
    except BaseException:
        if comm is not None:
            comm.mark_failed()
        raise
    if comm is not None:
        comm.close()
    return code
