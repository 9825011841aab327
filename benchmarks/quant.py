"""Quantized decode benchmark: bf16 vs int8 / int4 / fp8 / mxfp4 experts on the decode benchmark model, side by side
with llama.cpp (llama-cpp-python) at q8_0 and q4_0 on the same weights, against the streaming bandwidth measured in
the same run.

Per format: batch-1 decode tok/s, bytes read per token (dense weights + the selected experts, scales included),
GB/s and its ratio to the streaming reference (fp32 sum of 512 MiB) measured just before and after each round;
batched decode at 8 streams (tok/s over all streams, GB/s on the bytes a step reads); prefill tok/s of a 256-token
prompt. int8 / int4 are `--quantize` on load (+dense: with `--quantize-dense int8|int4`, the attention in the
experts' format and the lm_head int8, as llama.cpp's q8_0 / q4_0 quantize theirs, q4_0's output at q6_K);
fp8 / mxfp4 are the same bf16 experts converted in memory by the formats' own converters (quant.formats:
128x128 block-scaled e4m3, e8m0-scaled e2m1 per 32), the dense weights bf16.
llama.cpp: the checkpoint converted by its convert_hf_to_gguf.py (bf16 GGUF, cached), quantized by
llama_model_quantize; bytes per token from the GGUF's tensors (dense + top_k / num_experts of the expert tensors).
Without llama-cpp-python (`pip install .[bench]`, it builds llama.cpp) those rows are skipped with a message.
The table's rows run one after another, each in its own bandwidth window (this machine's swings by 30-60% within
minutes), so "vs llama.cpp peer" there compares windows as much as engines; --head-to-head (default: int8+dense
vs q8_0 and int4+dense vs q4_0, the same weights at nearly the same bytes) loads both engines and alternates
them round by round, which compares them in the same windows.

    PYTHONPATH=src .venv/bin/python benchmarks/quant.py [--model-shape dbrx|qwen3-moe] [--rounds 5] [--tokens 16]
        [--formats bf16 int8 int4 int8+dense int4+dense fp8 mxfp4] [--llama q8_0 q4_0] [--llama-cpp-src DIR] [--no-save]
        [--head-to-head int8+dense int4+dense]

--llama-cpp-src: a llama.cpp source tree (for convert_hf_to_gguf.py and gguf-py; default $LLAMA_CPP_SRC, else
the llama-cpp-python sdist of the installed version, fetched once with `pip download`). Results are appended to
benchmarks/results/quant.json and quant.md (machine, commit, date, command, load average).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from decode import bench_model_dir, cpu_model, decode_times, git_commit, package_version  # noqa: E402
from quant_llama import LLAMA_TYPES, gaps, llama_cpp_available, open_llama, run_llama  # noqa: E402

from moecluster.engine.generate import Engine  # noqa: E402
from moecluster.engine.sampling import SamplingParams  # noqa: E402
from moecluster.loading import LoadedModel, load_model, read_config  # noqa: E402
from moecluster.quant.experts import QuantizedRoutedExperts, QuantOptions  # noqa: E402
from moecluster.tokenizer import Tokenizer  # noqa: E402

RESULTS = HERE / "results"
PROMPT = "Decoding one token reads the weights of the selected experts once"
FORMATS = ("bf16", "int8", "int4", "int8+dense", "int4+dense", "fp8", "mxfp4")
STREAMS = 8
PREFILL_TOKENS = 256
SETTLE_S = 1.0
PEER = {"int8": "q8_0", "int4": "q4_0", "int8+dense": "q8_0", "int4+dense": "q4_0"}  # llama.cpp's same-bits type


class Bandwidth:
    """Streaming read reference: GB/s of an fp32 sum over 512 MiB (far beyond the L3), median of 3."""

    def __init__(self) -> None:
        self.buf = torch.empty(2**27, dtype=torch.float32).normal_()

    def __call__(self) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            self.buf.sum()
            times.append(time.perf_counter() - t0)
        return self.buf.nbytes / statistics.median(times) / 1e9


def convert_experts(loaded: LoadedModel, fmt: str) -> None:
    """Replace every layer's bf16 experts by `fmt` ones quantized from them, one layer at a time."""
    for moe in loaded.model.moe_layers():
        old = moe.experts
        new = QuantizedRoutedExperts.like(old, old.expert_ids, fmt)
        for i in range(len(old.expert_ids)):
            new.w13_eGD.quantize_expert(i, old.w13_eGD[i])
            new.w2_eDF.quantize_expert(i, old.w2_eDF[i])
        moe.experts = new
        del old
        gc.collect()


def load(model_dir: Path, fmt: str) -> LoadedModel:
    experts, _, dense = fmt.partition("+")
    if experts in ("int8", "int4"):  # "+dense": --quantize-dense in the experts' format (the head: int8)
        return load_model(model_dir, "bf16", quant=QuantOptions(experts, dense=experts if dense == "dense" else None))
    loaded = load_model(model_dir, "bf16")
    if fmt != "bf16":
        convert_experts(loaded, fmt)
    return loaded


def batched(engine: Engine, prompts: list[list[int]], tokens: int) -> dict:
    """STREAMS sequences decoding in lockstep (one step = one token of each): median s per step, bytes per step."""
    for slot, ids in enumerate(prompts):
        engine.step(torch.tensor([ids]), torch.tensor([0]), torch.tensor([slot]))
    n = len(prompts)
    pos = torch.tensor([len(ids) for ids in prompts])
    slots = torch.arange(n)
    tok = torch.zeros(n, 1, dtype=torch.long)
    times, nbytes = [], []
    for _ in range(tokens):
        t0 = time.perf_counter()
        logits = engine.step(tok, pos, slots)
        tok = logits.argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
        nbytes.append(engine.dense_bytes + engine.expert_bytes_last_step())
        pos = pos + 1
    s = statistics.median(times[1:])
    return {"s_per_step": s, "tok_s": n / s, "bytes_per_step": statistics.median(nbytes)}


def prefill_tok_s(engine: Engine, prompt: list[int]) -> float:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.step(torch.tensor([prompt]), torch.tensor([0]), torch.tensor([0]))
        times.append(time.perf_counter() - t0)
    return len(prompt) / statistics.median(times)


def run_ours(model_dir: Path, fmt: str, bw: Bandwidth, tokens: int, rounds: int) -> dict:
    """Batch-1 rounds (bandwidth, decode, bandwidth), then 8 streams and prefill."""
    t0 = time.perf_counter()
    engine = Engine(load(model_dir, fmt), num_slots=STREAMS, max_seq_len=512)
    load_s = time.perf_counter() - t0
    prompt = engine.tokenizer.encode(PROMPT)
    vocab = engine.loaded.shape.vocab_size
    decode_times(engine, prompt, 4)  # warm-up (builds the kernels on first use)
    engine.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    bytes_per_token = engine.dense_bytes + engine.expert_bytes_last_step()
    runs, after = [], bw()
    for _ in range(rounds):
        before = after
        s = statistics.median(decode_times(engine, prompt, tokens))
        after = bw()
        ref = (before + after) / 2
        runs.append({"s_per_token": s, "reference_gbs": ref, "ratio": bytes_per_token / s / 1e9 / ref})
    prompts = [[(7 * i + 3) % vocab, *prompt] for i in range(STREAMS)]  # different first tokens: different routing
    b8 = batched(engine, prompts, tokens)
    long_prompt = [(31 * i + 11) % vocab for i in range(PREFILL_TOKENS)]
    pre = prefill_tok_s(engine, long_prompt)
    del engine
    gc.collect()
    s = statistics.median(r["s_per_token"] for r in runs)
    ref = statistics.median(r["reference_gbs"] for r in runs)
    return {
        "engine": "moecluster",
        "format": fmt,
        "load_s": load_s,
        "bytes_per_token": bytes_per_token,
        "tok_s": 1 / s,
        "gbs": bytes_per_token / s / 1e9,
        "reference_gbs": ref,
        "ratio": statistics.median(r["ratio"] for r in runs),
        "rounds": runs,
        "batch8": {**b8, "gbs": b8["bytes_per_step"] / b8["s_per_step"] / 1e9},
        "prefill_tok_s": pre,
    }


def head_to_head(model_dir: Path, fmt: str, qtype: str, prompt: list[int], args) -> dict:
    """Both engines loaded; `args.rounds` rounds of one decode each, the order alternating round by round, so
    each round's two runs are seconds apart in the same bandwidth window: per round tok/s ours / llama.cpp."""
    engine = Engine(load(model_dir, fmt), num_slots=1, max_seq_len=512)
    llm, _, llama_bytes, _ = open_llama(model_dir, qtype, args)
    decode_times(engine, prompt, 4)  # warm-up
    gaps(llm, prompt, 4)
    ours_bytes = engine.dense_bytes + engine.expert_bytes_last_step()
    rounds = []
    for r in range(args.rounds):
        order = ("ours", "llama") if r % 2 == 0 else ("llama", "ours")
        s = {}
        for who in order:
            time.sleep(SETTLE_S)  # the other engine's threads stop spinning (both spin-wait between work)
            times = decode_times(engine, prompt, args.tokens) if who == "ours" else gaps(llm, prompt, args.tokens)
            s[who] = statistics.median(times)
        rounds.append({"ours_tok_s": 1 / s["ours"], "llama_tok_s": 1 / s["llama"], "speedup": s["llama"] / s["ours"]})
    del engine, llm
    gc.collect()
    return {
        "format": fmt,
        "peer": qtype,
        "ours_bytes_per_token": ours_bytes,
        "llama_bytes_per_token": llama_bytes,
        "ours_tok_s": statistics.median(r["ours_tok_s"] for r in rounds),
        "llama_tok_s": statistics.median(r["llama_tok_s"] for r in rounds),
        "speedup": statistics.median(r["speedup"] for r in rounds),
        "rounds": rounds,
    }


def head_to_head_table(pairs: list[dict]) -> list[str]:
    out = [
        "",
        "Head to head: both engines loaded, one decode each per round, order alternating (same bandwidth window):",
        "",
        "| moecluster | llama.cpp | MB/token (ours / llama.cpp) | tok/s ours | tok/s llama.cpp "
        "| speedup, median of rounds | per round |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for p in pairs:
        per_round = ", ".join(f"{r['speedup']:.2f}" for r in p["rounds"])
        out.append(
            f"| {p['format']} | {p['peer']} | {p['ours_bytes_per_token'] / 1e6:.0f} / "
            f"{p['llama_bytes_per_token'] / 1e6:.0f} | {p['ours_tok_s']:.2f} | {p['llama_tok_s']:.2f} | "
            f"{p['speedup']:.2f}x | {per_round} |"
        )
    return out


def table(rows: list[dict]) -> list[str]:
    bf16 = next((r for r in rows if r["format"] == "bf16" and r["engine"] == "moecluster"), None)
    llama = {r["format"]: r for r in rows if r["engine"] == "llama.cpp"}
    out = [
        "| engine | format | MB/token | batch-1 tok/s | GB/s | ratio to streaming | streaming GB/s "
        "| vs llama.cpp peer | 8 streams tok/s | 8 streams GB/s | prefill tok/s (256) | prefill vs bf16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = llama.get(PEER.get(r["format"], ""))
        b8 = r.get("batch8")
        out.append(
            f"| {r['engine']} | {r['format']} | {r['bytes_per_token'] / 1e6:.0f} | {r['tok_s']:.2f} | {r['gbs']:.1f} | "
            f"{r['ratio']:.0%} | {r['reference_gbs']:.1f} | "
            + (f"{r['tok_s'] / p['tok_s']:.2f}x {p['format']}" if p and r["engine"] == "moecluster" else "-")
            + (f" | {b8['tok_s']:.2f} | {b8['gbs']:.1f}" if b8 else " | - | -")
            + f" | {r['prefill_tok_s']:.1f} | "
            + (f"{r['prefill_tok_s'] / bf16['prefill_tok_s']:.2f}x |" if bf16 else "- |")
        )
    return out


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-shape", choices=["dbrx", "qwen3-moe"], default="dbrx")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--llama", nargs="*", choices=list(LLAMA_TYPES), default=["q8_0", "q4_0"])
    ap.add_argument("--llama-cpp-src", default=os.environ.get("LLAMA_CPP_SRC"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument(
        "--head-to-head",
        nargs="*",
        choices=list(PEER),
        default=["int8+dense", "int4+dense"],
        help="formats also compared with their llama.cpp peer in alternating rounds (none: skip)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    model_dir = bench_model_dir(args.model_shape)
    bw = Bandwidth()
    rows: list[dict] = []
    pairs: list[dict] = []
    skipped = ""
    ids = Tokenizer.from_dir(model_dir, read_config(model_dir)[1]).encode(PROMPT)  # llama.cpp's prompt, as ours
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped run still reports what it measured
    try:
        if args.llama:  # first: the comparison is the point of the run
            ok, why = llama_cpp_available()
            if not ok:
                skipped = f"llama.cpp rows skipped: {why}"
                print(skipped, flush=True)
            for qtype in args.llama if ok else []:
                rows.append(run_llama(model_dir, qtype, ids, bw, args, PREFILL_TOKENS))
                print(f"llama.cpp {qtype}: {rows[-1]['tok_s']:.2f} tok/s, {rows[-1]['ratio']:.0%}", flush=True)
        for fmt in args.formats:
            rows.append(run_ours(model_dir, fmt, bw, args.tokens, args.rounds))
            print(f"moecluster {fmt}: {rows[-1]['tok_s']:.2f} tok/s, {rows[-1]['ratio']:.0%}", flush=True)
        for fmt in args.head_to_head if args.llama and not skipped else []:
            if PEER[fmt] in args.llama:
                pairs.append(head_to_head(model_dir, fmt, PEER[fmt], ids, args))
                print(f"head to head {fmt} vs {PEER[fmt]}: {pairs[-1]['speedup']:.2f}x", flush=True)
    except KeyboardInterrupt:
        skipped += (" " if skipped else "") + "INTERRUPTED before every row was measured"
    report(args, rows, skipped, load_start, pairs)
    return 0


def report(args, rows: list[dict], skipped: str, load_start: tuple, pairs: list[dict]) -> None:
    run = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "threads": args.threads,
            "torch": torch.__version__,
            "llama_cpp_python": package_version("llama-cpp-python"),
        },
        "command": "python " + " ".join(sys.argv),
        "model_shape": args.model_shape,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "rounds": args.rounds,
        "tokens": args.tokens,
        "skipped": skipped,
        "results": rows,
        "head_to_head": pairs,
    }
    la = run["load_average"]
    lines = [
        f"\n## {run['date']} commit {run['commit']} ({args.model_shape})\n",
        f"Machine: {run['machine']}  \nCommand: `{run['command']}`  \nLoad average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in la['start'])}, at end {'/'.join(f'{x:.1f}' for x in la['end'])}  \n"
        f"{args.rounds} rounds of {args.tokens} tokens per engine and format; medians. Ratio = decode GB/s on the "
        f"format's own bytes / streaming reference measured before and after each round."
        + (f"  \n{skipped}" if skipped else "")
        + "\n",
        *table(rows),
        *(head_to_head_table(pairs) if pairs else []),
    ]
    text = "\n".join(lines)
    print(text)
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    jpath, mpath = RESULTS / "quant.json", RESULTS / "quant.md"
    history = json.loads(jpath.read_text()) if jpath.is_file() else {"version": 1, "runs": []}
    history["runs"].append(run)
    jpath.write_text(json.dumps(history, indent=1) + "\n")
    if not mpath.is_file():
        mpath.write_text("# Quantized decode vs llama.cpp (benchmarks/quant.py)\n")
    with mpath.open("a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
