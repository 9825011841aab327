"""Load benchmark: cold-ish load of the decode benchmark checkpoint against sequential-read speed of its files.

Before each run the shards are dropped from the page cache (posix_fadvise DONTNEED; pages another process
maps stay). Each round measures `dd` over the shards, then loads one rank's share (rank 0 of --ranks,
contiguous placement; --ranks 1 loads everything) in a fresh process that samples RssAnon/RssFile every
20 ms. --before SRC also loads with another source tree (e.g. an export of the commit before this loader) to
compare peak memory and speed. Speeds are GB/s of bytes loaded; on a shared machine quote the ratios.

    .venv/bin/python benchmarks/load.py [--rounds 2] [--ranks 2] [--before /tmp/loader/before/src]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import RESULTS, bench_model_dir  # noqa: E402  (reuses the cached ~4.9 GB checkpoint, builds once)

CHILD = r"""
import json, sys, threading, time
peaks = {"anon": 0, "file": 0, "total": 0}
def sample():
    s = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
    a, f = (int(s[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
    for key, value in (("anon", a), ("file", f), ("total", a + f)):
        peaks[key] = max(peaks[key], value)
stop = threading.Event()
def run():
    while not stop.wait(0.02):
        sample()
import torch
from moecluster.loading import load_model, read_config
model_dir, ranks = sys.argv[1], int(sys.argv[2])
shape = read_config(model_dir)[1].shape()
share = -(-shape.num_experts // ranks)
sample(); base = dict(peaks)
threading.Thread(target=run, daemon=True).start()
t0 = time.perf_counter()
loaded = load_model(model_dir, "bf16", expert_filter=lambda layer: list(range(share)))
seconds = time.perf_counter() - t0
stop.set(); sample()
held = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*loaded.model.parameters()]}.values())
print(json.dumps({"seconds": seconds, "held_bytes": held, "peak_anon": peaks["anon"], "peak_file": peaks["file"],
                  "peak_total": peaks["total"], "base_anon": base["anon"], "base_file": base["file"]}))
"""


def shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def drop_cache(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def dd_gbs(files: list[Path]) -> float:
    """Sequential read speed of the shards, cold: dd with 16 MiB blocks to /dev/null."""
    drop_cache(files)
    t0 = time.perf_counter()
    for f in files:
        subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    return sum(f.stat().st_size for f in files) / (time.perf_counter() - t0) / 1e9


def load_once(model_dir: Path, ranks: int, src: str) -> dict:
    drop_cache(shards(model_dir))
    env = dict(os.environ, PYTHONPATH=src)
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(model_dir), str(ranks)], env=env, capture_output=True, text=True, timeout=1800
    )
    if res.returncode != 0:
        raise SystemExit(f"load failed with {src}:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["gbs"] = out["held_bytes"] / out["seconds"] / 1e9
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2, help="load rank 0's share of this many ranks (1: the whole model)")
    ap.add_argument("--before", default=None, help="a src directory with the previous loader, loaded once per round")
    args = ap.parse_args()
    model_dir = bench_model_dir()
    src = str(Path(__file__).resolve().parent.parent / "src")
    rounds = []
    for i in range(args.rounds):
        r = {"dd_gbs": dd_gbs(shards(model_dir)), "after": load_once(model_dir, args.ranks, src)}
        if args.before:
            r["before"] = load_once(model_dir, args.ranks, args.before)
        rounds.append(r)
        print(f"round {i}: " + json.dumps(r), flush=True)
    report(args, model_dir, rounds)
    return 0


def _line(name: str, runs: list[dict], dd: list[float]) -> str:
    g = 1e9
    return f"{name:<7} " + "  ".join(
        f"{x['seconds']:6.1f} s {x['gbs']:5.2f} GB/s ({x['gbs'] / d * 100:3.0f}% of dd) held {x['held_bytes'] / g:.2f} "
        f"peak anon {x['peak_anon'] / g:.2f} file {x['peak_file'] / g:.2f} (base {x['base_anon'] / g:.2f}/"
        f"{x['base_file'] / g:.2f})"
        for x, d in zip(runs, dd, strict=True)
    )


def report(args, model_dir: Path, rounds: list[dict]) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    dd = [r["dd_gbs"] for r in rounds]
    lines = [
        f"checkpoint: {model_dir} ({sum(f.stat().st_size for f in shards(model_dir)) / 1e9:.2f} GB); "
        f"loading rank 0's share of {args.ranks} rank(s), bf16, page cache dropped before each run",
        "dd (cold, sequential): " + ", ".join(f"{x:.2f}" for x in dd) + " GB/s",
        _line("after", [r["after"] for r in rounds], dd),
    ]
    if args.before:
        lines.append(_line("before", [r["before"] for r in rounds], dd))
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
