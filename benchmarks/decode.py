"""Decode benchmark: batch-1 tok/s of a DBRX- or Qwen3-MoE-shaped bf16 model against this machine's streaming bandwidth.

Builds (once, cached) a random-weight checkpoint reading >= 1 GB of weights per decode token,
measures the machine's streaming read bandwidth in the same run, then decodes with moecluster and
with transformers `generate` on the same weights. Prints a table, writes JSON and markdown (the
latest run) and appends the run to a JSONL history.

    .venv/bin/python benchmarks/decode.py [--model-shape dbrx|qwen3-moe] [--tokens 16] [--rounds 11] [--skip-hf]
    .venv/bin/python benchmarks/decode.py --engine mlx [--model DIR]   # the MLX engine (decode_mlx.py); vs mlx-lm

dbrx: 16 experts of 3 x [4096, 2048], top-4, 6 layers (1.47 GB/token). qwen3-moe: Qwen3-30B-A3B's
layer (128 experts of 3 x [768, 2048], top-8, 32/4 heads, q/k norms), 10 layers (1.26 GB/token):
many small experts, the hard case for streaming.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from results_io import keep_history  # a sibling module: benchmarks run as scripts

from moecluster.builtin import (
    PRESETS,
    QWEN3_MOE_PRESETS,
    build_dbrx_checkpoint,
    build_qwen3_moe_checkpoint,
)
from moecluster.engine.generate import Engine
from moecluster.engine.sampling import SamplingParams
from moecluster.loading import load_model

RESULTS = Path(__file__).parent / "results"
PROMPT = "Decoding one token reads the weights of the selected experts once"


# --model-shape -> (cache dir name, builder, preset dims, description, result file stem)
SHAPES = {
    "dbrx": ("bench-dbrx", build_dbrx_checkpoint, PRESETS["bench"], "DBRX-shaped bf16", "decode"),
    "qwen3-moe": (
        "bench-qwen3-moe",
        build_qwen3_moe_checkpoint,
        QWEN3_MOE_PRESETS["bench"],
        "Qwen3-MoE-shaped bf16",
        "decode_qwen3-moe",
    ),
}


def bench_model_dir(shape: str) -> Path:
    root = Path(os.environ.get("MOECLUSTER_CACHE", Path.home() / ".cache" / "moecluster"))
    name, build, _, _, _ = SHAPES[shape]
    path = root / name
    if not (path / "config.json").is_file():  # config.json is written last
        print(f"building the benchmark checkpoint in {path} (once) ...", flush=True)
        build(path, "bench", dtype=torch.bfloat16)
    return path


def streaming_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """Best-of and median GB/s of reading a buffer much larger than cache: fp32 sum and bf16 mat-vec."""
    n = int(gib * 2**30)
    buf = torch.empty(n // 4, dtype=torch.float32).normal_()
    mat = buf.view(torch.bfloat16).view(-1, 4096)
    vec = torch.ones(4096, dtype=torch.bfloat16)
    out = {}
    for name, fn in (("fp32 sum", lambda: buf.sum()), ("bf16 mv", lambda: torch.mv(mat, vec))):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = {"best_gbs": n / min(times) / 1e9, "median_gbs": n / statistics.median(times) / 1e9}
    return out


def decode_times(engine: Engine, prompt_ids: list[int], tokens: int) -> list[float]:
    """Seconds between consecutive decode tokens (excludes prefill and the first token)."""
    stamps = []
    for _ in engine.stream(prompt_ids, SamplingParams(max_tokens=tokens, ignore_eos=True)):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_ours(model_dir: Path, tokens: int, rounds: int) -> dict:
    """`rounds` times: bandwidth, a decode run of `tokens` tokens, bandwidth again. Each round's ratio
    compares the decode with the mean of the two bandwidth measurements around it, taken within ~2 s
    (this machine's bandwidth drifts by 30% and more within a minute: other VMs share it)."""
    engine = Engine(load_model(model_dir, "bf16"), max_seq_len=512)
    prompt = engine.tokenizer.encode(PROMPT)
    decode_times(engine, prompt, 4)  # warm-up
    engine.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    bytes_per_token = engine.dense_bytes + engine.expert_bytes_last_step()
    runs = []
    after = streaming_bandwidth(repeats=3)
    for _ in range(rounds):
        before = after
        s_per_token = statistics.median(decode_times(engine, prompt, tokens))
        after = streaming_bandwidth(repeats=3)
        ref = (max(v["median_gbs"] for v in before.values()) + max(v["median_gbs"] for v in after.values())) / 2
        achieved = bytes_per_token / s_per_token / 1e9
        runs.append(
            {
                "reference_gbs": ref,
                "bandwidth_after": after,
                "s_per_token": s_per_token,
                "achieved_gbs": achieved,
                "ratio": achieved / ref,
            }
        )
    del engine
    gc.collect()
    return {
        "bytes_per_token": bytes_per_token,
        "rounds": runs,
        "median_s_per_token": statistics.median(r["s_per_token"] for r in runs),
        "median_ratio": statistics.median(r["ratio"] for r in runs),
        "reference_gbs": statistics.median(r["reference_gbs"] for r in runs),
    }


def run_hf(model_dir: Path, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    from moecluster.loading import read_config
    from moecluster.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir, read_config(model_dir)[1])
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        times = []
        for n in (2, tokens + 2):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            times.append(time.perf_counter() - t0)
    return {"s_per_token": (times[1] - times[0]) / tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="dbrx", help="benchmark model (default dbrx)")
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens per round")
    ap.add_argument("--rounds", type=int, default=11, help="bandwidth / decode / bandwidth rounds")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--engine", choices=["torch", "mlx"], default="torch", help="mlx: compared with mlx-lm's decoding")
    ap.add_argument("--model", default=None, help="any checkpoint directory instead of the benchmark model")
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer of the bandwidth measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else bench_model_dir(args.model_shape)
    _, _, dims, description, stem = SHAPES[args.model_shape]
    if args.model:
        dims, description, stem = {}, f"{model_dir.name} (--model)", "decode_" + model_dir.name
    if args.engine == "mlx":
        from decode_mlx import run_mlx_lm, run_ours_mlx

        ours = run_ours_mlx(model_dir, args.tokens, args.rounds, PROMPT, args.bandwidth_gib)
        hf = None if args.skip_hf else {"engine": "mlx-lm", **run_mlx_lm(model_dir, 24, PROMPT)}
        description, stem = f"{description}, MLX engine ({ours.pop('dtype')})", stem + "_mlx"
    else:
        ours = run_ours(model_dir, args.tokens, args.rounds)
        hf = None if args.skip_hf else run_hf(model_dir, 24)
    tps = 1 / ours["median_s_per_token"]
    achieved = ours["bytes_per_token"] * tps / 1e9
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "engine": args.engine,
            "mlx": package_version("mlx"),
            "mlx_lm": package_version("mlx-lm"),
            "threads": args.threads,
        },
        "command": "python " + " ".join(sys.argv),
        "model_shape": model_dir.name if args.model else args.model_shape,
        "model": {
            "preset": None if args.model else "bench",
            **dims,
            **({"dtype": "bf16"} if args.engine == "torch" else {}),
            "description": description,
        },
        "reference_gbs": ours["reference_gbs"],
        "ours": {**ours, "tok_s": tps, "achieved_gbs": achieved, "ratio_to_bandwidth": ours["median_ratio"]},
        "transformers": None if hf is None else {**hf, "tok_s": 1 / hf["s_per_token"]},
    }
    report(result, stem)
    return 0


def git_commit() -> str:
    """HEAD's short hash, with -dirty when the work tree has uncommitted changes to tracked files."""

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def report(r: dict, stem: str) -> None:
    o = r["ours"]
    model = {k: v for k, v in r["model"].items() if k != "description"}
    lines = [
        f"model: {r['model']['description']} {model}",
        f"streaming read bandwidth (best method; median of {len(o['rounds'])} rounds): {r['reference_gbs']:.1f} GB/s",
        f"weights read per decode token: {o['bytes_per_token'] / 1e9:.3f} GB",
        f"moecluster decode (batch 1): {o['tok_s']:.2f} tok/s  -> {o['achieved_gbs']:.1f} GB/s",
        "per round, decode / bandwidth around it: "
        + ", ".join(f"{x['achieved_gbs']:.1f}/{x['reference_gbs']:.1f}" for x in o["rounds"])
        + " GB/s",
        f"median ratio to measured bandwidth: {o['ratio_to_bandwidth'] * 100:.0f}% (target >= 85%)",
    ]
    if r["transformers"]:
        t = r["transformers"]
        lines.append(
            f"{t.get('engine', 'transformers')} generate (same weights): {t['tok_s']:.2f} tok/s "
            f"(moecluster is {o['tok_s'] / t['tok_s']:.1f}x)"
        )
    if r["machine"]["engine"] == "mlx" and not r["machine"]["platform"].startswith("macOS"):
        lines.append("MLX's Linux CPU build: a correctness run only; these numbers say nothing about a Mac")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    latest = RESULTS / f"{stem}.json"
    keep_history(latest, r)  # every run to <stem>_history.jsonl; the latest to <stem>.json / .md
    latest.write_text(json.dumps(r, indent=2))
    md = (
        f"# Decode benchmark ({r['model_shape']})\n\nDate: {r['date']}  \nCommit: {r['commit']}  \n"
        f"Machine: {r['machine']}\n\nCommand: `{r['command']}`\n\n```\n{text}\n```\n\n"
        f"Bandwidth after each round: {json.dumps([x['bandwidth_after'] for x in r['ours']['rounds']])}\n"
    )
    (RESULTS / f"{stem}.md").write_text(md)
    print(f"wrote {latest.name} and {stem}.md (latest run); appended the run to {stem}_history.jsonl")


if __name__ == "__main__":
    sys.exit(main())
