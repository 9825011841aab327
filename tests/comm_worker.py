"""One rank of a Comm test job (started by tests/test_comm.py through launch_local).

Scenarios: collectives (check every collective), die (the last rank os._exit(3)s mid-run),
stall (rank 1 sleeps inside the run), straggle (no comm: rank 1 exits 5, rank 0 and a child of
it sleep; the launcher must kill them). `--tag` only marks the processes for leak checks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from moecluster.distributed.comm import Comm, CommError, init_comm


def check_collectives(comm: Comm) -> None:
    """Every collective against a value computed locally; raises AssertionError on a mismatch."""
    r, w = comm.rank, comm.world_size
    gen = torch.Generator().manual_seed(0)
    base_WTD = torch.randn(w, 2, 2048, generator=gen)
    x_TD = base_WTD[r].clone()
    assert comm.all_reduce_sum(x_TD) is x_TD
    assert torch.allclose(x_TD, base_WTD.sum(0), rtol=1e-6, atol=1e-5), "fp32 sum"
    assert_same_on_all_ranks(comm, x_TD)
    modes = ["auto", "native", "op", "fp32"] if comm.backend == "mpi" else [None]
    for mode in modes:  # MPI: every bf16 strategy, small (native under auto) and 16 KiB (op)
        if mode == "native" and getattr(comm, "_bf16_native", None) is None:
            continue
        if mode:
            comm.bf16_mode = mode
        check_bf16(comm, base_WTD)
    check_disjoint(comm)
    for dtype in (torch.float64, torch.int64):
        v_N = torch.full((5,), r + 1, dtype=dtype)
        comm.all_reduce_sum(v_N)
        assert torch.equal(v_N, torch.full((5,), w * (w + 1) // 2, dtype=dtype)), dtype
    for src in (0, w - 1):
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            t_N = torch.arange(17).to(dtype) * (src + 1) if r == src else torch.zeros(17, dtype=dtype)
            comm.broadcast(t_N, src)
            assert torch.equal(t_N, torch.arange(17).to(dtype) * (src + 1)), (src, dtype)
    msg = json.dumps({"tokens": [1, 2, 3], "text": "héllo"}).encode()
    got = comm.broadcast_bytes(msg if r == w - 1 else None, src=w - 1)
    assert got == msg, got
    assert comm.broadcast_bytes(b"" if r == 0 else None) == b""
    gathered = comm.gather_floats([float(r)] * (r + 1) + [0.5])
    if r == 0:
        assert gathered == [[float(q)] * (q + 1) + [0.5] for q in range(w)], gathered
    else:
        assert gathered is None
    comm.barrier()
    print(f"rank {r} ok", flush=True)


def check_disjoint(comm: Comm) -> None:
    """all_reduce_disjoint: each element written by one rank (pair owner), others zero -> bit-exact
    values on every rank, -0.0 and NaN bits included; the reused exchange buffer (a persistent request
    under MPI) many times over with new contents, and shapes that are not kept."""
    r, w = comm.rank, comm.world_size
    gen = torch.Generator().manual_seed(1)
    for shape, dtype in [
        ((1, 4, 2048), torch.bfloat16),
        ((3, 2, 64), torch.float32),
        ((1, 4, 2048), torch.bfloat16),
        ((600, 4, 64), torch.bfloat16),
    ]:
        for step in range(5):
            values = torch.randn(shape, generator=gen).to(dtype)
            values.view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")]).to(dtype)
            owner = torch.randint(0, w, shape, generator=gen)
            y = comm.exchange_buffer(shape, dtype)
            assert y.shape == shape and y.dtype == dtype and not y.any(), "exchange buffer must come zeroed"
            y[owner == r] = values[owner == r]
            assert comm.all_reduce_disjoint(y) is y
            assert torch.equal(
                y.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                values.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
            ), (shape, step)
    loose = torch.zeros(7, dtype=torch.bfloat16)
    loose[r] = r + 1  # not from exchange_buffer: the one-off path
    comm.all_reduce_disjoint(loose)
    assert loose.tolist() == [float(q + 1) for q in range(w)] + [0.0] * (7 - w), loose


def check_bf16(comm: Comm, base_WTD: torch.Tensor) -> None:
    """bf16 sums: small integers exactly; random values within bf16 rounding of the fp32 sum."""
    r, w = comm.rank, comm.world_size
    for n in (4096, 8192):
        ints_N = (torch.arange(n) % 7 + r).to(torch.bfloat16)
        comm.all_reduce_sum(ints_N)
        want_N = sum((torch.arange(n) % 7 + q).float() for q in range(w))
        assert torch.equal(ints_N.float(), want_N), ("bf16 integer sum", n)
    xb_TD = base_WTD[r].to(torch.bfloat16)
    comm.all_reduce_sum(xb_TD)
    want_TD = base_WTD.to(torch.bfloat16).float().sum(0)
    assert torch.allclose(xb_TD.float(), want_TD, rtol=2e-2, atol=4e-2), "bf16 sum"
    assert_same_on_all_ranks(comm, xb_TD)


def assert_same_on_all_ranks(comm: Comm, x: torch.Tensor) -> None:
    """Replicated attention needs bit-identical sums on every rank: compare exact checksums."""
    bits = x.contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64) % 65521
    sums = comm.gather_floats([float((bits * weights).sum() % 2**50)])
    if comm.rank == 0:
        assert all(s == sums[0] for s in sums), f"ranks disagree on a sum: {sums}"


def run_die(comm: Comm) -> None:
    x_D = torch.ones(2048)
    for step in range(200):
        if step == 3 and comm.rank == comm.world_size - 1:
            os._exit(3)
        comm.all_reduce_sum(x_D)
        time.sleep(0.01)


def run_stall(comm: Comm) -> None:
    x_D = torch.ones(2048)
    for step in range(5):
        if step == 2 and comm.rank == 1:
            time.sleep(120)
        comm.all_reduce_sum(x_D)


def run_straggle(tag: str) -> int:
    if os.environ.get("RANK") == "1":
        return 5
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", tag])  # a grandchild
    time.sleep(120)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="mpi")
    ap.add_argument("--scenario", default="collectives")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.scenario == "straggle":
        return run_straggle(args.tag)
    try:
        with init_comm(args.backend, timeout_s=args.timeout) as comm:
            {"collectives": check_collectives, "die": run_die, "stall": run_stall}[args.scenario](comm)
    except CommError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: lines of several ranks do not interleave
        sys.stderr.flush()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
