"""Serving cases against a real `moecluster serve` (2 ranks), driven by the official openai client (issue 16):

(a) prefix cache: TTFT of turn 10 of a 10-turn chat, with the cache (--prefix-cache-gb 1) and without (0);
(b) chunked prefill: p99 and max gap between tokens of 4 decoding streams while a 2000-token prompt arrives
    (gaps overlapping the time from its submission to its first token), for --prefill-chunk 0 (off) and a few sizes,
    and that prompt's own TTFT (what chunking costs it);
(c) batch invariance: aggregate decode tok/s of 8 streams (and 1) with it on and off (--no-batch-invariance).

The demo model's context is 256 positions, so the server runs a built-in random Qwen3-MoE of the same family
(the demo's tokenizer and chat template, 4096 positions; built once in $MOECLUSTER_CACHE). Run from
benchmarks/serving.py --server-cases.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SYSTEM = "You are a helpful assistant for a small team of engineers. Answer briefly and precisely."
QUESTIONS = [
    "What is expert parallelism and why does it help on small clusters?",
    "How large is the KV cache of one sequence of 4096 tokens?",
    "Which layers are replicated on every rank, and which are split?",
    "What does an all-reduce cost on a gigabit network for one token?",
    "Why do we read each expert's weights once per step for the whole batch?",
    "How does prefix caching change the time to the first token?",
    "What is chunked prefill and when does it matter?",
    "Why should a request's tokens not depend on its batch?",
    "Which sampling parameters does the server accept?",
    "Summarize our conversation in three sentences.",
]
MODEL_CFG = {  # a mid-size random Qwen3-MoE: prefill of 2000 tokens takes long enough to stall streams visibly
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 16,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
    "intermediate_size": 1024,
    "mlp_only_layers": [],
}


def model_dir() -> Path:
    """The benchmark's random checkpoint (built once), with the demo model's tokenizer and chat template."""
    from safetensors.torch import save_file

    from moecluster.builtin import DEMO_MODEL_DIR, qwen3_moe_config, qwen3_moe_tensors

    root = Path(os.environ.get("MOECLUSTER_CACHE", Path.home() / ".cache" / "moecluster"))
    out = root / "serving-bench-qwen3-moe"
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    demo = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    cfg = qwen3_moe_config("tiny", eos_token_id=demo["eos_token_id"]) | MODEL_CFG | {"vocab_size": demo["vocab_size"]}
    gen = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.ones(shape) if std == 0 else torch.randn(shape, generator=gen) * std
        for name, shape, std in qwen3_moe_tensors(cfg)
    }
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO_MODEL_DIR / name, out / name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))  # written last: marks the build complete
    return out


class Server:
    """`moecluster serve --nodes 2` on a free port, until stop()."""

    def __init__(self, model: Path, log: Path, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.argv = ["moecluster", "serve", "--model", str(model), "--nodes", "2", "--port", str(self.port)]
        self.argv += ["--max-batch", "8", "--max-seq-len", "4096", "--model-name", "bench", *extra]
        env = os.environ | {"OMP_NUM_THREADS": "1"}  # 2 ranks on a 2-core machine: one thread each
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moecluster.cli", *self.argv[1:]],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"server not healthy after 300 s:\n{log.read_text()}")
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", timeout=600)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stream_times(client, t_start: float, times: list[float] | None = None, **kw) -> tuple[list[float], str]:
    """One streaming completion (chat if `messages`): arrival times of its content chunks (appended to `times`
    as they arrive), and its text."""
    create = client.chat.completions.create if "messages" in kw else client.completions.create
    times = [] if times is None else times
    text = []
    for chunk in create(model="bench", stream=True, **kw):
        if not chunk.choices:
            continue
        if "messages" in kw and chunk.choices[0].delta.role is not None and not chunk.choices[0].delta.content:
            continue  # the chat stream's first chunk names the role before any token is sampled
        delta = chunk.choices[0].delta.content if "messages" in kw else chunk.choices[0].text
        if delta or chunk.choices[0].finish_reason is None:
            times.append(time.perf_counter() - t_start)
            text.append(delta or "")
    return times, "".join(text)


def chat_turn10_ttft(server: Server, chats: int, reply_tokens: int) -> list[float]:
    """For each chat (its own system prompt): 10 turns, each sending the whole history; turn 10's TTFT."""
    out = []
    for c in range(chats):
        messages = [{"role": "system", "content": f"Session {c}. {SYSTEM}"}]
        for turn, question in enumerate(QUESTIONS):
            messages.append({"role": "user", "content": question})
            t0 = time.perf_counter()
            times, text = stream_times(server.client, t0, messages=messages, max_tokens=reply_tokens, temperature=0.0)
            if turn == len(QUESTIONS) - 1:
                out.append(times[0])
            messages.append({"role": "assistant", "content": text})
    return out


def long_prompt(server: Server, tokens: int) -> str:
    """A prompt of about `tokens` tokens (the demo tokenizer: measured through the server's usage)."""
    base = " ".join(QUESTIONS) + " "
    probe = server.client.completions.create(model="bench", prompt=base, max_tokens=1)
    per = probe.usage.prompt_tokens if probe.usage else 100
    return (base * (tokens // per + 1))[: int(len(base) * tokens / per)]


def itl_while_long_prompt(server: Server, prompt: str, stream_tokens: int) -> dict:
    """4 streams decode; when each has 8 tokens a long prompt arrives. Their gaps that overlap its prefill."""
    t0 = time.perf_counter()
    results: list[list[float]] = [[] for _ in range(4)]

    def run(i: int) -> None:
        stream_times(
            server.client,
            t0,
            results[i],
            prompt=f"Stream {i}: {QUESTIONS[i]}",
            max_tokens=stream_tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while min(len(r) for r in results) < 8:
        time.sleep(0.005)
    submitted = time.perf_counter() - t0
    long_times, _ = stream_times(server.client, t0, prompt=prompt, max_tokens=1)
    for t in threads:
        t.join()
    first = long_times[0]
    # every gap that overlaps the prefill (unchunked, the stall ends in the step that samples the long prompt's
    # first token: just after it)
    gaps = sorted(b - a for r in results for a, b in zip(r, r[1:]) if a < first and b > submitted)
    if not gaps:
        raise RuntimeError("no stream token during the long prefill: raise --stream-tokens")
    return {
        "gaps": len(gaps),
        "p99_ms": 1e3 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
        "max_ms": 1e3 * gaps[-1],
        "p50_ms": 1e3 * gaps[len(gaps) // 2],
        "long_ttft_s": first - submitted,
    }


def decode_tok_s(server: Server, streams: int, tokens: int) -> float:
    """Aggregate tok/s over the window in which all `streams` decode together."""
    t0 = time.perf_counter()
    results: list[list[float]] = [[] for _ in range(streams)]

    def run(i: int) -> None:
        results[i] = stream_times(
            server.client,
            t0,
            prompt=f"Stream {i}: {QUESTIONS[i % len(QUESTIONS)]}",
            max_tokens=tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = max(r[0] for r in results), min(r[-1] for r in results)
    return sum(start < t <= end for r in results for t in r) / (end - start)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_cases(args, logs: Path) -> dict:
    """Every case; each server configuration started once. Returns the results dict."""
    model = model_dir()
    out: dict = {"model": MODEL_CFG | {"dir": str(model)}, "cases": {}}
    chunks = [int(c) for c in args.chunks.split(",")]
    configs = [("default", [])] + [("no-prefix-cache", ["--prefix-cache-gb", "0"])]
    configs += [(f"chunk-{c}", ["--prefill-chunk", str(c)]) for c in chunks]
    configs += [("no-batch-invariance", ["--no-batch-invariance"])]
    prompt = None
    for name, extra in configs:
        extra = extra if "--prefix-cache-gb" in extra else [*extra, "--prefix-cache-gb", "1"]
        server = Server(model, logs / f"server-{name}.log", "--backend", args.backend, *extra)
        res: dict = {"argv": " ".join(server.argv), "load_before": loadavg()}
        try:
            if name in ("default", "no-prefix-cache"):
                ttft = chat_turn10_ttft(server, args.chats, args.reply_tokens)
                res["turn10_ttft_s"] = {"median": statistics.median(ttft), "runs": ttft}
            if name.startswith("chunk-") or name == "default":
                prompt = prompt or long_prompt(server, args.long_tokens)
                # each run's prompt starts differently: no prefix-cache hit on an earlier run's
                runs = [
                    itl_while_long_prompt(server, f"Run {k}. {prompt}", args.stream_tokens) for k in range(args.repeats)
                ]
                res["itl"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"runs": runs}
            if name in ("default", "no-batch-invariance"):
                res["decode_tok_s"] = {
                    str(n): statistics.median(decode_tok_s(server, n, args.decode_tokens) for _ in range(args.repeats))
                    for n in (1, 8)
                }
        finally:
            server.stop()
        res["load_after"] = loadavg()
        out["cases"][name] = res
        print(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'argv'})}", flush=True)
    return out


def table(res: dict, default_chunk: int) -> str:
    c = res["cases"]
    lines = ["(a) prefix cache: TTFT of turn 10 of a 10-turn chat (median over chats)"]
    for name, label in (("default", "--prefix-cache-gb 1"), ("no-prefix-cache", "--prefix-cache-gb 0")):
        t = c[name]["turn10_ttft_s"]
        lines.append(f"  {label:<24} {1e3 * t['median']:8.1f} ms   load {c[name]['load_before']}")
    lines.append("(b) chunked prefill: gaps between tokens of 4 streams while a ~2000-token prompt is prefilled")
    lines.append(f"  {'--prefill-chunk':<24} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'long TTFT s':>12}  load")
    names = [n for n in c if n.startswith("chunk-")]
    for name in sorted(names, key=lambda n: int(n.split("-")[1])):
        i = c[name]["itl"]
        label = name.split("-")[1] + (" (off)" if name == "chunk-0" else "")
        lines.append(
            f"  {label:<24} {i['p50_ms']:8.1f} {i['p99_ms']:8.1f} {i['max_ms']:8.1f} {i['long_ttft_s']:12.2f}"
            f"  {c[name]['load_before']}"
        )
    i = c["default"]["itl"]
    lines.append(
        f"  {str(default_chunk) + ' (default run)':<24} {i['p50_ms']:8.1f} {i['p99_ms']:8.1f} {i['max_ms']:8.1f} "
        f"{i['long_ttft_s']:12.2f}  {c['default']['load_before']}"
    )
    lines.append("(c) batch invariance: aggregate decode tok/s (median of repeats)")
    for name, label in (("default", "on (default)"), ("no-batch-invariance", "off (--no-batch-invariance)")):
        d = c[name]["decode_tok_s"]
        lines.append(f"  {label:<28} 1 stream {d['1']:7.1f}   8 streams {d['8']:7.1f}   load {c[name]['load_before']}")
    return "\n".join(lines)


def write_results(args, res: dict, results: Path, machine: dict) -> str:
    """Merge into serving.json (key "server_cases") and replace serving.md's section; returns the table."""
    from moecluster.engine.chunked_prefill import DEFAULT_PREFILL_CHUNK

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    res |= {
        "machine": machine,
        "commit": commit + ("+dirty" if dirty.stdout.strip() else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "default_prefill_chunk": DEFAULT_PREFILL_CHUNK,
    }
    text = table(res, DEFAULT_PREFILL_CHUNK)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "serving.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(data | {"server_cases": res}, indent=2))
    md_path = results / "serving.md"
    md = md_path.read_text() if md_path.is_file() else ""
    marker = "\n## Server cases (issue 16)\n"
    about = [
        f"Machine: {machine}; commit {res['commit']}; {res['date']}; load average (1/5/15 min) noted per server.",
        f"Command: `{res['command']}`",
        "A real `moecluster serve --nodes 2` (one thread per rank) per configuration, driven by the official "
        f"openai client with streaming; random Qwen3-MoE {MODEL_CFG['hidden_size']}-dim, "
        f"{MODEL_CFG['num_hidden_layers']} layers, {MODEL_CFG['num_local_experts']} experts top-"
        f"{MODEL_CFG['num_experts_per_tok']}, bf16, the demo model's tokenizer (its context is 256). Every server "
        f"has --prefix-cache-gb 1 unless stated. (a) {args.chats} chats of 10 turns, replies of "
        f"{args.reply_tokens} greedy tokens; (b) 4 streams of {args.stream_tokens} tokens, a "
        f"~{args.long_tokens}-token prompt arrives once each has 8 tokens, the gaps overlapping the time "
        f"from its submission to its first token, median of {args.repeats} runs; (c) {args.decode_tokens} tokens "
        f"per stream, tok/s over the window in which all decode, median of {args.repeats}.",
    ]
    md = md.split(marker)[0].rstrip("\n") + "\n" + marker + "\n" + "\n\n".join(about) + f"\n\n```\n{text}\n```\n"
    md_path.write_text(md)
    return text
