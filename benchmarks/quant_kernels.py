"""Quantized expert kernels: streaming GB/s of moe_gemm (bf16) and moe_gemm_q (int8, int4, fp8, mxfp4), each on its
own bytes (packed data + scales), against this machine's streaming bandwidth measured in the same run.

One "step" is a batch-1 decode over every MoE layer of the set: per layer, the up (w13 [2F, D]) and the down
(w2 [D, F]) mat-vecs of all its experts, each expert's weights read once. Shapes:
  dbrx-like:  1 layer of 2 experts, D=6144, F=10752 (DBRX's expert shape; 2 experts keep the run under ~2 GB)
  qwen3-like: 8 layers of 8 experts, D=2048, F=768 (Qwen3-30B-A3B fine-grained experts, top-8)
Rounds interleave a streaming-read reference (fp32 sum of 512 MiB) with every kernel; a kernel's ratio is taken
against the reference of its own round, and the table quotes medians. Also measured once per round, for
comparison: core torch's weight-only `_weight_int8pack_mm` (per-channel int8) and `_weight_int4pack_mm_for_cpu`
(int4, group 128) looping over the same experts, and int8/int4 at group sizes 64/128/256 (qwen3-like).

    PYTHONPATH=src .venv/bin/python benchmarks/quant_kernels.py [--rounds 7] [--threads N] [--no-save]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moecluster import kernels
from moecluster.quant import QuantizedStack

RESULTS = Path(__file__).parent / "results"
SHAPES = {"dbrx-like": (1, 2, 6144, 10752), "qwen3-like": (8, 8, 2048, 768)}  # layers, experts, D, F


def random_stack(fmt: str, e: int, O: int, I: int, g: int | None = None) -> QuantizedStack:
    """Random packed bytes and plausible scales: speed does not depend on the values (no NaN fp8 codes)."""
    s = QuantizedStack.empty(fmt, e, O, I, g)
    s.data.view(torch.uint8).copy_(torch.randint(0, 256, s.data.shape, dtype=torch.uint8))
    if fmt == "fp8":
        s.data.view(torch.uint8).bitwise_and_(0x77)  # exponent < 15: no NaN
    if s.scales.dtype == torch.uint8:
        s.scales.copy_(torch.randint(118, 128, s.scales.shape, dtype=torch.uint8))
    else:
        s.scales.uniform_(1e-3, 1e-2)
    return s


def make_step(kind: str, layers: list, D: int, F: int):
    """A function running one decode step over `layers` ([(w13, w2)] per layer) and its bytes per step."""
    e = layers[0][0].num_experts if kind != "bf16" else layers[0][0].shape[0]
    local, counts = list(range(e)), [1] * e
    x = torch.randn(1, D).bfloat16()
    h = torch.randn(e, F).bfloat16()
    y13, y2 = torch.empty(e, 2 * F, dtype=torch.bfloat16), torch.empty(e, D, dtype=torch.bfloat16)
    rows = list(range(e))
    if kind == "bf16":
        nbytes = sum(w13.nbytes + w2.nbytes for w13, w2 in layers)

        def step():
            for w13, w2 in layers:
                kernels.moe_gemm(w13, local, counts, x, [0] * e, y13, rows)
                kernels.moe_gemm(w2, local, counts, h, rows, y2, rows)
    else:
        nbytes = sum(w13.nbytes() + w2.nbytes() for w13, w2 in layers)

        def step():
            for w13, w2 in layers:
                kernels.moe_gemm_q(w13, local, counts, x, [0] * e, y13, rows)
                kernels.moe_gemm_q(w2, local, counts, h, rows, y2, rows)

    return step, nbytes


def make_torch_step(kind: str, L: int, e: int, D: int, F: int):
    """Core torch's weight-only int8 / int4 mat-vecs over the same experts, one call per expert and projection."""
    x, h = torch.randn(1, D).bfloat16(), torch.randn(1, F).bfloat16()
    mats = []
    for _ in range(L * e):
        for O, I in ((2 * F, D), (D, F)):
            if kind == "torch-int8pack":
                w = torch.randint(-127, 128, (O, I), dtype=torch.int8)
                mats.append((w, torch.rand(O).bfloat16() * 1e-2))
            else:
                w = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (O, I), dtype=torch.int32), 2)
                mats.append((w, torch.rand(I // 128, O, 2).bfloat16() * 1e-2))
    nbytes = sum(w.nbytes + s.nbytes for w, s in mats)
    if kind == "torch-int8pack":

        def step():
            for i, (w, s) in enumerate(mats):
                torch._weight_int8pack_mm(x if i % 2 == 0 else h, w, s)
    else:

        def step():
            for i, (w, s) in enumerate(mats):
                torch.ops.aten._weight_int4pack_mm_for_cpu(x if i % 2 == 0 else h, w, 128, s)

    return step, nbytes


def stream_gbs(buf: torch.Tensor, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.nbytes / statistics.median(times) / 1e9


def time_gbs(step, nbytes: int, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def bench_shape(name: str, rounds: int, buf: torch.Tensor) -> list[dict]:
    L, e, D, F = SHAPES[name]
    cases = {}
    for kind in ("bf16", "int8", "int4", "fp8", "mxfp4"):
        if kind == "bf16":
            layers = [(torch.randn(e, 2 * F, D).bfloat16(), torch.randn(e, D, F).bfloat16()) for _ in range(L)]
        else:
            layers = [(random_stack(kind, e, 2 * F, D), random_stack(kind, e, D, F)) for _ in range(L)]
        cases[kind] = make_step(kind, layers, D, F)
    if name == "qwen3-like":
        for kind in ("int8", "int4"):
            for g in (64, 256):
                layers = [(random_stack(kind, e, 2 * F, D, g), random_stack(kind, e, D, F, g)) for _ in range(L)]
                cases[f"{kind} g{g}"] = make_step(kind, layers, D, F)
    for kind in ("torch-int8pack", "torch-int4pack"):
        cases[kind] = make_torch_step(kind, L, e, D, F)
    for step, _ in cases.values():
        step()  # warm-up (builds the kernels on first use)
    gbs = {k: [] for k in cases}
    ratios = {k: [] for k in cases}
    refs = []
    for _ in range(rounds):
        ref = stream_gbs(buf)
        refs.append(ref)
        for kind, (step, nbytes) in cases.items():
            g = time_gbs(step, nbytes)
            gbs[kind].append(g)
            ratios[kind].append(g / ref)
    out = []
    for kind, (_step, nbytes) in cases.items():
        t = nbytes / statistics.median(gbs[kind]) / 1e9
        out.append(
            {
                "shape": name,
                "kernel": kind,
                "bytes_per_step": nbytes,
                "median_ms": round(t * 1e3, 2),
                "median_gbs": round(statistics.median(gbs[kind]), 2),
                "median_ratio": round(statistics.median(ratios[kind]), 3),
                "ref_median_gbs": round(statistics.median(refs), 2),
            }
        )
    return out


def header(argv: list[str]) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = "?"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *argv]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--no-save", action="store_true", help="print only (trial runs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (kernels.moe_gemv_available() and kernels.moe_gemm_q_available()):
        sys.exit(f"kernels unavailable: {kernels.unavailable_reason} {kernels.q_unavailable_reason}")
    buf = torch.empty(2**27, dtype=torch.float32).normal_()  # 512 MiB: far beyond the 32 MiB L3
    rows = []
    for name in args.shapes:
        rows += bench_shape(name, args.rounds, buf)
        gc.collect()
    run = {**header(sys.argv), "rounds": args.rounds, "results": rows}
    lines = [
        f"\n## {run['date']} commit {run['commit']}\n",
        (
            f"CPU {run['cpu']}, {run['threads']} threads, torch {run['torch']}; `{run['command']}`; "
            f"{args.rounds} interleaved rounds, medians; ratio = kernel GB/s on its own bytes / streaming "
            f"reference (fp32 sum of 512 MiB) of the same round\n"
        ),
        "| shape | kernel | MB/step | ms/step | GB/s | ratio to streaming | streaming GB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['kernel']} | {r['bytes_per_step'] / 1e6:.1f} | {r['median_ms']} | "
            f"{r['median_gbs']} | {r['median_ratio']:.0%} | {r['ref_median_gbs']} |"
        )
    print("\n".join(lines))
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    jpath, mpath = RESULTS / "quant_kernels.json", RESULTS / "quant_kernels.md"
    history = json.loads(jpath.read_text()) if jpath.is_file() else {"version": 1, "runs": []}
    history["runs"].append(run)  # keep history: every run appended
    jpath.write_text(json.dumps(history, indent=1) + "\n")
    if not mpath.is_file():
        mpath.write_text("# Quantized expert kernels: GB/s on their own bytes (benchmarks/quant_kernels.py)\n")
    with mpath.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
