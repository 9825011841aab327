"""All-reduce latency vs message size, 2 local ranks pinned to one core each.

Variants: bare mpi4py Allreduce (fp32), our MPIComm.all_reduce_sum (fp32; bf16 by user MPI.Op;
bf16 via fp32), bare torch.distributed gloo all_reduce (fp32), our TorchComm.all_reduce_sum (fp32,
bf16). Prints a table; writes benchmarks/results/allreduce.json and allreduce.md.

    python benchmarks/allreduce.py [--iters 5000] [--gloo-iters 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_io import keep_history  # a sibling module: benchmarks run as scripts

from moecluster.calibration.commbench import DEFAULT_SIZES_BYTES, Variant, measure_interleaved

RESULTS = Path(__file__).parent / "results"
MPI_COLUMNS = [  # (variant, header)
    ("mpi_bare_fp32", "bare fp32"),
    ("mpi_ours_fp32", "MPIComm fp32"),
    ("mpi_bare_bf16", "bare bf16"),
    ("mpi_ours_bf16_auto", "MPIComm bf16 auto"),
    ("mpi_ours_bf16_native", "bf16 native"),
    ("mpi_ours_bf16_op", "bf16 Op"),
    ("mpi_ours_bf16_fp32", "bf16 via fp32"),
    ("mpi_ours_exchange", "exchange (bf16 bits)"),
]
MPI_RATIOS = [  # (header, numerator, denominator) of medians
    ("fp32 ours/bare", "mpi_ours_fp32", "mpi_bare_fp32"),
    ("bf16 ours/bare", "mpi_ours_bf16_auto", "mpi_bare_bf16"),
    ("bf16 ours/bare fp32 same bytes", "mpi_ours_bf16_auto", "mpi_bare_fp32"),
    ("exchange/bare bf16", "mpi_ours_exchange", "mpi_bare_bf16"),
]
TORCH_COLUMNS = [
    ("gloo_bare_fp32", "gloo bare fp32"),
    ("torch_ours_fp32", "TorchComm fp32"),
    ("torch_ours_bf16", "TorchComm bf16"),
]
TORCH_RATIOS = [("fp32 ours/bare", "torch_ours_fp32", "gloo_bare_fp32")]


class BareMPIAllreduce:
    """mpi4py's blocking Allreduce on a cached numpy view: the baseline the engine is held to."""

    def __init__(self, mpi_comm, mpi_type=None) -> None:
        self._comm, self._type, self._bufs = mpi_comm, mpi_type, {}

    def __call__(self, x_N: torch.Tensor) -> None:
        from mpi4py import MPI

        buf = self._bufs.get(x_N.data_ptr())
        if buf is None:  # bf16: MPI's native type (MPICH MPIX_BFLOAT16) on the raw bytes
            buf = (
                x_N.numpy() if self._type is None else [MPI.buffer.fromaddress(x_N.data_ptr(), x_N.nbytes), self._type]
            )
            self._bufs[x_N.data_ptr()] = buf
        self._comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)


def mpi_variants(comm, size: int) -> list[Variant]:
    """Bare mpi4py and MPIComm, fp32 and every bf16 mode, on `size`-byte messages."""
    from mpi4py import MPI

    from moecluster.distributed.comm_mpi import native_bf16_type

    def x(dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(size // torch.empty(0, dtype=dtype).element_size(), dtype=dtype)

    def mode(m: str):
        return lambda: setattr(comm, "bf16_mode", m)

    native = native_bf16_type(MPI)
    out = [
        Variant("mpi_bare_fp32", x(torch.float32), BareMPIAllreduce(MPI.COMM_WORLD)),
        Variant("mpi_ours_fp32", x(torch.float32), comm.all_reduce_sum),
    ]
    if native is not None:
        out += [
            Variant("mpi_bare_bf16", x(torch.bfloat16), BareMPIAllreduce(MPI.COMM_WORLD, native)),
            Variant("mpi_ours_bf16_native", x(torch.bfloat16), comm.all_reduce_sum, mode("native")),
        ]
    out += [
        Variant(f"mpi_ours_bf16_{m}", x(torch.bfloat16), comm.all_reduce_sum, mode(m)) for m in ("auto", "op", "fp32")
    ]
    # the decode exchange itself: the reused exchange buffer, raw bits by a persistent all-reduce
    return out + [
        Variant("mpi_ours_exchange", comm.exchange_buffer((size // 2,), torch.bfloat16), comm.all_reduce_disjoint)
    ]


def torch_variants(comm, size: int) -> list[Variant]:
    """Bare gloo all_reduce and TorchComm (fp32, bf16) on `size`-byte messages."""
    import torch.distributed as dist

    return [
        Variant("gloo_bare_fp32", torch.zeros(size // 4), dist.all_reduce),
        Variant("torch_ours_fp32", torch.zeros(size // 4), comm.all_reduce_sum),
        Variant("torch_ours_bf16", torch.zeros(size // 2, dtype=torch.bfloat16), comm.all_reduce_sum),
    ]


def worker(backend: str, out: str, sizes: list[int], iters: int) -> None:
    """One rank: per size, all variants round-robin (see measure_interleaved)."""
    from moecluster.distributed.comm import init_comm

    comm = init_comm(backend, timeout_s=60)
    make = mpi_variants if backend == "mpi" else torch_variants
    rows = []
    for size in sizes:
        rows += measure_interleaved(comm, make(comm, size), iters)
    if comm.rank == 0:
        Path(out).write_text(json.dumps(rows))
    comm.close()


def cold_worker(out: str, size: int, iters: int, stream_mb: int) -> None:
    """The exchange as decode meets it: before every all-reduce each rank streams `stream_mb` of
    bf16 weights through torch.mv (what a rank reads for its experts of one layer), which evicts the
    caches the all-reduce's code and data live in. Variants alternate per iteration; per iteration
    the rank that arrived last (the smaller time) counts, as in benchmarks/expert_parallel.py.
    Ours is the decode exchange itself: exchange_buffer + all_reduce_disjoint (exact y_NKD)."""
    import statistics

    from mpi4py import MPI

    from moecluster.distributed.comm import init_comm
    from moecluster.distributed.comm_mpi import native_bf16_type

    torch.set_num_threads(1)
    comm = init_comm("mpi", timeout_s=60)
    native = native_bf16_type(MPI)
    x = torch.zeros(size // 2, dtype=torch.bfloat16)
    x32 = torch.zeros(size // 4, dtype=torch.float32)
    y = comm.exchange_buffer((1, size // 2 // 2048, 2048), torch.bfloat16)  # decode's y_NKD (K = 4 at 16 KiB)
    variants = {
        "mpi_bare_bf16_cold": lambda _: bare_bf16(x),
        "mpi_bare_fp32_cold": lambda _: bare_fp32(x32),
        "mpi_ours_bf16_cold": lambda _: comm.all_reduce_disjoint(y),
    }
    bare_bf16, bare_fp32 = BareMPIAllreduce(MPI.COMM_WORLD, native), BareMPIAllreduce(MPI.COMM_WORLD)
    rows_per_mat = 8192  # 32 MiB, one expert's gate+up matrix in the bench model
    mats = torch.empty(2**29, dtype=torch.bfloat16).normal_().view(-1, rows_per_mat, 2048)  # 1 GiB
    per_iter = max(1, stream_mb * 2**20 // (rows_per_mat * 2048 * 2))
    vec = torch.ones(2048, dtype=torch.bfloat16)
    times = {name: [] for name in variants}
    k = 0
    for it in range(iters + 2):
        for name, fn in variants.items():
            for _ in range(per_iter):
                torch.mv(mats[k % mats.shape[0]], vec)
                k += 1
            t0 = time.perf_counter()
            fn(x)
            if it >= 2:
                times[name].append(time.perf_counter() - t0)
    gathered = MPI.COMM_WORLD.gather(times, root=0)
    if comm.rank == 0:
        rows = []
        for name in variants:
            last = [min(ts) for ts in zip(*(g[name] for g in gathered))]
            rows.append(
                {
                    "variant": name,
                    "size_bytes": size,
                    "median_us": statistics.median(last) * 1e6,
                    "stream_mb": per_iter * 32,
                    "iters": iters,
                }
            )
        Path(out).write_text(json.dumps(rows))
    comm.close()


def machine() -> dict:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor(),
    )
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import mpi4py
    from mpi4py import MPI

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi": " ".join(MPI.Get_library_version().splitlines()[0].split()),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def table(rows: list[dict], columns: list, ratios: list) -> str:
    """Markdown table: per size, median / p99 (us) of each variant, then ratios of medians."""
    by = {(r["variant"], r["size_bytes"]): r for r in rows}
    columns = [(v, h) for v, h in columns if any(k[0] == v for k in by)]
    lines = [
        "| size | " + " | ".join([h for _, h in columns] + [h for h, _, _ in ratios]) + " |",
        "|" + "---|" * (1 + len(columns) + len(ratios)),
    ]
    for s in sorted({r["size_bytes"] for r in rows}):
        cells = [
            f"{by[(v, s)]['median_us']:.1f} / {by[(v, s)]['p99_us']:.0f}" if (v, s) in by else "-" for v, _ in columns
        ]
        for _, num, den in ratios:
            a, b = by.get((num, s)), by.get((den, s))
            cells.append(f"{a['median_us'] / b['median_us']:.2f}" if a and b else "-")
        lines.append(f"| {s // 1024} KiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["mpi", "torch", "cold"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--iters", type=int, default=5000, help="iterations per MPI measurement")
    ap.add_argument("--gloo-iters", type=int, default=1000, help="iterations per gloo measurement")
    ap.add_argument("--sizes-kib", type=int, nargs="*", default=[s // 1024 for s in DEFAULT_SIZES_BYTES])
    ap.add_argument(
        "--cold", action="store_true", help="only the cold-cache measurement (all-reduce right after streaming weights)"
    )
    ap.add_argument("--cold-kib", type=int, default=16, help="message size of the cold measurement")
    ap.add_argument("--cold-iters", type=int, default=200)
    ap.add_argument("--cold-stream-mb", type=int, default=96)
    args = ap.parse_args()
    sizes = [k * 1024 for k in args.sizes_kib]
    if args.worker == "cold":
        cold_worker(args.out, args.cold_kib * 1024, args.cold_iters, args.cold_stream_mb)
        return 0
    if args.worker:
        worker(args.worker, args.out, sizes, args.iters)
        return 0
    from moecluster.distributed.launch import launch_local

    cold_cmd = [
        "--cold-kib",
        str(args.cold_kib),
        "--cold-iters",
        str(args.cold_iters),
        "--cold-stream-mb",
        str(args.cold_stream_mb),
    ]
    if args.cold:
        cold = run_cold(cold_cmd)
        if cold is None:
            return 1
        path = RESULTS / "allreduce.json"
        info = {**(json.loads(path.read_text()) if path.is_file() else {"rows": []}), "cold_rows": cold}
        path.write_text(json.dumps(info, indent=1) + "\n")
        print(cold_table(cold))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, iters in (("mpi", args.iters), ("torch", args.gloo_iters)):
            out = f"{tmp}/{backend}.json"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                backend,
                "--out",
                out,
                "--iters",
                str(iters),
                "--sizes-kib",
                *map(str, args.sizes_kib),
            ]
            if launch_local(cmd, 2, backend, pin=True, timeout_s=120) != 0:
                print(f"the {backend} benchmark failed", file=sys.stderr)
                return 1
            rows += json.loads(Path(out).read_text())
    cold = run_cold(cold_cmd)
    if cold is None:
        return 1
    command = "python benchmarks/allreduce.py " + " ".join(sys.argv[1:])
    md_table = (
        "MPI (mpi4py + MPICH):\n\n"
        + table(rows, MPI_COLUMNS, MPI_RATIOS)
        + "\n\ntorch.distributed (gloo):\n\n"
        + table(rows, TORCH_COLUMNS, TORCH_RATIOS)
        + "\n\n"
        + cold_table(cold)
    )
    print(md_table)
    info = {
        "machine": machine(),
        "command": command.strip(),
        "iters": f"MPI {args.iters}, gloo {args.gloo_iters} (rounded up to blocks of 50)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ranks": 2,
        "pinned": True,
        "rows": rows,
        "cold_rows": cold,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    keep_history(RESULTS / "allreduce.json", info)
    (RESULTS / "allreduce.json").write_text(json.dumps(info, indent=1) + "\n")
    (RESULTS / "allreduce.md").write_text(markdown(info, md_table))
    return 0


def run_cold(extra: list[str]) -> list[dict] | None:
    from moecluster.distributed.launch import launch_local

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/cold.json"
        cmd = [sys.executable, __file__, "--worker", "cold", "--out", out, *extra]
        if launch_local(cmd, 2, "mpi", pin=True, timeout_s=600) != 0:
            print("the cold-cache benchmark failed", file=sys.stderr)
            return None
        return json.loads(Path(out).read_text())


def cold_table(cold: list[dict]) -> str:
    by = {r["variant"]: r for r in cold}
    bare, bare32, ours = by["mpi_bare_bf16_cold"], by["mpi_bare_fp32_cold"], by["mpi_ours_bf16_cold"]
    return (
        f"After streaming {bare['stream_mb']} MiB of weights per rank before each call (caches cold, as for "
        f"a decode layer's exchange), {bare['size_bytes'] // 1024} KiB, last-arriving rank, median of "
        f"{bare['iters']}:\n\n| bare MPI bf16 cold | bare MPI fp32 cold | MPIComm exchange cold | ours/bare bf16 |"
        f"\n|---|---|---|---|\n| {bare['median_us']:.1f} us | {bare32['median_us']:.1f} us | "
        f"{ours['median_us']:.1f} us | {ours['median_us'] / bare['median_us']:.2f} |"
    )


def markdown(info: dict, md_table: str) -> str:
    m = info["machine"]
    return f"""# All-reduce latency, 2 local ranks

Machine: {m["cpu"]}, {m["cores"]} cores, {m["mem_gib"]} GiB, Linux {m["kernel"]}; Python
{m["python"]}, torch {m["torch"]}, mpi4py {m["mpi4py"]}, {m["mpi"]}. {info["date"]}.

Command: `{info["command"]}` (2 ranks, each pinned to one core, one torch thread).

Cells: median / p99 latency in microseconds of one in-place sum of `size` bytes
(mean over ranks of the per-rank median; worst rank's p99). Per size, the variants of a table
alternate in blocks of 50 timed calls (after 5 untimed ones), so drift and load from other
processes hit them alike. Load average at the end of the run: {m["load_avg_1min"]} (the 2 cores
are shared with other jobs: p99 columns are noisy, medians are stable to ~0.5 us). Bare MPI is
mpi4py's blocking `Allreduce` (fp32 on a numpy array; bf16 with MPICH's MPIX_BFLOAT16 type);
MPIComm is `all_reduce_sum` (Iallreduce polled with Test(); timeout and control plane armed).
bf16 modes: native (MPIX_BFLOAT16), Op (user MPI.Op calling torch), via fp32 (convert, sum
fp32, convert back); auto = native up to 12 KiB, Op above (the default). "exchange" is what a
decode layer runs by default (`--exchange exact`): `all_reduce_disjoint` on the reused exchange
buffer, the bf16 bits OR-ed as int16 by a persistent all-reduce (MPI_Allreduce_init + Start/Test).
Iterations per cell: {info["iters"]}. The engine's default decode exchange is y_NKD, top_k x [1, D]
in bf16: 16 KiB for the benchmark model (D = 2048, top-4), 48 KiB for DBRX; `--exchange sum` sends
one fp32 [1, D] partial (8 KiB, 24 KiB).

{md_table}
"""


if __name__ == "__main__":
    sys.exit(main())
