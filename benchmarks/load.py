"""Load benchmark: GB/s per rank from a cold and a warm page cache against the disk's sequential read speed.

Each round: the shards are dropped from the page cache (posix_fadvise DONTNEED, or --drop-caches: the whole
cache through /proc/sys/vm/drop_caches, root only), `dd` reads them cold (the disk's sequential speed), they
are dropped again, then ranks 0..K-1 of a --ranks placement (contiguous) load their share concurrently in
fresh processes (cold), then once more with the page cache as they left it (warm). Every rank samples
RssAnon/RssFile every 20 ms. A rank's speed is the bytes it read over its load time; ranks on one host read
the replicated (dense) tensors from the page cache after the first. --before SRC also loads cold with another
source tree (e.g. an export of an older commit). Medians over --rounds; the load average is quoted.

    .venv/bin/python benchmarks/load.py [--rounds 3] [--ranks 4] [--concurrent 2] [--before /tmp/before/src]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import RESULTS, bench_model_dir  # noqa: E402  (reuses the cached ~5.2 GB checkpoint, builds once)

CHILD = r"""
import json, sys, threading, time
peaks = {"anon": 0, "file": 0}
def sample():
    s = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    a, f = (int(s[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
    peaks["anon"], peaks["file"] = max(peaks["anon"], a), max(peaks["file"], f)
stop = threading.Event()
def run():
    while not stop.wait(0.02):
        sample()
import torch
from moecluster.loading import load_model, read_config
from moecluster.parallel.placement import make_placement
model_dir, ranks, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shape = read_config(model_dir)[1].shape()
placement = make_placement("contiguous", shape.num_experts, shape.num_moe_layers, ranks)
sample(); base = dict(peaks)
threading.Thread(target=run, daemon=True).start()
t0 = time.perf_counter()
loaded = load_model(model_dir, "bf16", expert_filter=lambda layer: placement.experts_of(rank, layer), progress="")
seconds = time.perf_counter() - t0
stop.set(); sample()
tensors = [*loaded.model.parameters()]
held = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())
dense = sum(p.numel() * p.element_size() for n, p in loaded.model.named_parameters() if ".experts." not in n)
read = loaded.load.bytes if loaded.load is not None else held
print(json.dumps({"rank": rank, "seconds": seconds, "read_bytes": read, "held_bytes": held, "dense_bytes": dense,
                  "peak_anon": peaks["anon"], "peak_file": peaks["file"], "base_anon": base["anon"],
                  "base_file": base["file"]}))
"""


def shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def drop_cache(files: list[Path], everything: bool) -> None:
    if everything:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_fraction(files: list[Path]) -> float:
    """Share of the shards' bytes in the page cache (fincore), to show that a cold run starts cold."""
    try:
        out = subprocess.run(
            ["fincore", "-b", "-n", "-o", "RES,SIZE", *map(str, files)], capture_output=True, text=True
        )
        res = [tuple(map(int, line.split())) for line in out.stdout.splitlines() if line.strip()]
        return sum(r for r, _ in res) / max(sum(s for _, s in res), 1)
    except (OSError, ValueError):
        return float("nan")


def dd_gbs(files: list[Path], everything: bool) -> float:
    """Sequential read speed of the shards, cold: dd with 16 MiB blocks to /dev/null."""
    drop_cache(files, everything)
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    return sum(f.stat().st_size for f in files) / (time.perf_counter() - t0) / 1e9


def load_ranks(model_dir: Path, ranks: int, concurrent: int, src: str) -> dict:
    """Ranks 0..concurrent-1 load at once; per-rank results and the wall time of the slowest."""
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(model_dir), str(ranks), str(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(concurrent)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"load failed with {src}:\n{stderr[-3000:]}")
        res = json.loads(stdout.strip().splitlines()[-1])
        res["gbs"] = res["read_bytes"] / res["seconds"] / 1e9
        out.append(res)
    return {"wall": time.perf_counter() - t0, "ranks": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=4, help="placement over this many ranks (1: the whole model)")
    ap.add_argument("--concurrent", type=int, default=None, help="ranks 0..K-1 load at once (default: all)")
    ap.add_argument(
        "--drop-caches", action="store_true", help="drop the whole page cache (root) instead of the shards'"
    )
    ap.add_argument("--before", default=None, help="a src directory with another loader, loaded cold once per round")
    args = ap.parse_args()
    concurrent = args.concurrent or args.ranks
    model_dir = bench_model_dir("dbrx")
    files = shards(model_dir)
    src = str(Path(__file__).resolve().parent.parent / "src")
    rounds = []
    for i in range(args.rounds):
        r: dict = {"loadavg": os.getloadavg()[0], "dd_gbs": dd_gbs(files, args.drop_caches)}
        drop_cache(files, args.drop_caches)
        r["cached_before_cold"] = cached_fraction(files)
        r["cold"] = load_ranks(model_dir, args.ranks, concurrent, src)
        r["warm"] = load_ranks(model_dir, args.ranks, concurrent, src)
        if args.before:
            drop_cache(files, args.drop_caches)
            r["before"] = load_ranks(model_dir, args.ranks, concurrent, args.before)
        rounds.append(r)
        print(f"round {i}: " + json.dumps(r), flush=True)
    report(args, concurrent, model_dir, rounds)
    return 0


def _lines(name: str, rounds: list[dict], key: str) -> list[str]:
    g, out = 1e9, []
    ranks = len(rounds[0][key]["ranks"])
    for k in range(ranks):
        runs = [r[key]["ranks"][k] for r in rounds]
        pct = [x["gbs"] / r["dd_gbs"] * 100 for x, r in zip(runs, rounds, strict=True)]
        x = runs[0]
        out.append(
            f"{name:<6} rank {k}: {statistics.median(x['gbs'] for x in runs):5.2f} GB/s median "
            f"({statistics.median(pct):3.0f}% of dd; runs " + ", ".join(f"{p:.0f}%" for p in pct) + ") "
            f"read {x['read_bytes'] / g:.2f} GB in {statistics.median(x['seconds'] for x in runs):5.1f} s, held "
            f"{x['held_bytes'] / g:.2f}, peak anon {max(x['peak_anon'] for x in runs) / g:.2f} file "
            f"{max(x['peak_file'] for x in runs) / g:.2f} (base {x['base_anon'] / g:.2f}/{x['base_file'] / g:.2f})"
        )
    return out


def _host_line(name: str, rounds: list[dict], key: str) -> str:
    """What the disk delivered to all ranks together: distinct bytes (the replicated tensors once: the other
    ranks read them from the page cache) over the slowest rank's load time."""
    pct = []
    for r in rounds:
        ranks = r[key]["ranks"]
        distinct = sum(x["read_bytes"] for x in ranks) - (len(ranks) - 1) * ranks[0].get("dense_bytes", 0)
        pct.append(distinct / max(x["seconds"] for x in ranks) / 1e9 / r["dd_gbs"] * 100)
    return (
        f"{name:<6} all ranks: {statistics.median(pct):3.0f}% of dd median (runs "
        + ", ".join(f"{p:.0f}%" for p in pct)
        + ")"
    )


def report(args, concurrent: int, model_dir: Path, rounds: list[dict]) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    dd = [r["dd_gbs"] for r in rounds]
    size = sum(f.stat().st_size for f in shards(model_dir))
    lines = [
        f"checkpoint: {model_dir} ({size / 1e9:.2f} GB); ranks 0..{concurrent - 1} of {args.ranks} (contiguous) "
        f"loading concurrently, bf16; {'whole page cache' if args.drop_caches else 'shards'} dropped before cold runs",
        "load average (1 min) per round: " + ", ".join(f"{r['loadavg']:.1f}" for r in rounds),
        "in page cache before cold loads: " + ", ".join(f"{r['cached_before_cold'] * 100:.0f}%" for r in rounds),
        f"dd (cold, sequential): {statistics.median(dd):.2f} GB/s median (" + ", ".join(f"{x:.2f}" for x in dd) + ")",
        *_lines("cold", rounds, "cold"),
        _host_line("cold", rounds, "cold"),
        *_lines("warm", rounds, "warm"),
    ]
    if args.before:
        lines += [*_lines("before", rounds, "before"), _host_line("before", rounds, "before")]
    text = "\n".join(lines)
    print(text)
    header = (
        f"## {datetime.datetime.now().isoformat(timespec='seconds')} commit {commit}\n\n"
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}\n\n"
        f"Command: `python {' '.join(sys.argv)}`\n\n"
    )
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "load.md").open("a") as f:  # history: one section per run
        f.write(header + f"```\n{text}\n```\n\n")
    with (RESULTS / "load.jsonl").open("a") as f:
        f.write(json.dumps({"commit": commit, "command": sys.argv, "ranks": args.ranks, "rounds": rounds}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
