"""Survivors probe (issue 15): streaming clients against `moecluster serve --backend torch` on a replicated
placement while ranks are killed with SIGKILL one after another.

Every expert is held by `--copies` of the `--ranks` ranks (expert e on ranks e, e+1, ... mod N), so the job
survives the loss of copies - 1 ranks; the probe kills ranks 1, 2, ... until one more loss would leave some
expert without a copy, then kills one more: the server names the lost experts and exits, and its
`--restart 1` supervisor starts the whole job again. Clients stream greedy completions all along.
Reported: requests sent, status counts, 5xx (split into those during a survivable kill, which must be 0,
and those in flight at the fatal one), greedy texts that differ from the reference, and per kill the
longest pause in token delivery to the clients (and the server's own re-forming time).

    .venv/bin/python benchmarks/survive_probe.py [--model DIR (default: the demo model)] [--ranks 4]
        [--copies 3] [--clients 3] [--timeout 10] [--out benchmarks/results/survive_probe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from results_io import keep_history  # a sibling module: benchmarks run as scripts

PROMPTS = ["The function returns", "def add(a, b):", "Expert parallelism", "A list of"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def placement_file(path: Path, model: Path, ranks: int, copies: int) -> Path:
    from moecluster.loading import read_config

    shape = read_config(model)[1].shape()
    holders = [sorted({(e + i) % ranks for i in range(copies)}) for e in range(shape.num_experts)]
    data = {"format": "moecluster-placement/1", "num_experts": shape.num_experts}
    data.update(num_layers=shape.num_moe_layers, world_size=ranks, default=holders)
    path.write_text(json.dumps(data))
    return path


class Probe:
    def __init__(self, url: str, max_tokens: int) -> None:
        self.url, self.max_tokens = url, max_tokens
        self.codes: Counter = Counter()
        self.errors: list[tuple[float, str]] = []  # (time, message) of 5xx answers and error events
        self.token_times: list[float] = []
        self.mismatches = 0
        self.reference: dict[str, str] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def stream(self, prompt: str) -> tuple[int, str]:
        body = {"model": "m", "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}
        body |= {"stream": True, "ignore_eos": True}
        text = []
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                r.read()
                return r.status_code, r.text
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    return 503, json.dumps(data["error"])
                with self.lock:
                    self.token_times.append(time.monotonic())
                text.append(data["choices"][0]["text"] if data["choices"] else "")
        return 200, "".join(text)

    def client(self, index: int) -> None:
        i = index
        while not self.stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            i += 1
            try:
                code, text = self.stream(prompt)
            except httpx.HTTPError as e:
                code, text = 599, repr(e)  # connection refused / dropped (the job restarting)
            with self.lock:
                self.codes[code] += 1
                if code >= 500:
                    self.errors.append((time.monotonic(), f"{code} {text[:160]}"))
                elif self.reference.get(prompt) not in (None, text):
                    self.mismatches += 1
            if code >= 500:
                time.sleep(0.5)

    def longest_pause(self, t: float, window_s: float = 30.0) -> float | None:
        """The longest gap between consecutive tokens (any client) from t to t + window_s: how long the
        clients saw nothing while the cluster noticed the loss and re-formed. Waits for the window."""
        time.sleep(max(0.0, t + window_s - time.monotonic()))
        with self.lock:
            times = sorted(x for x in self.token_times if t <= x <= t + window_s)
        if not times:
            return None
        return max(b - a for a, b in zip([t, *times], times))


def rank_pid(launcher_pid: int, rank: int) -> psutil.Process:
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "--rank-worker" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    raise RuntimeError(f"rank {rank} not found")


def wait_health(url: str, seconds: float, world_size: int | None = None) -> dict | None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200 and (world_size is None or r.json()["world_size"] == world_size):
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return None


def main() -> int:
    from moecluster.builtin import DEMO_MODEL_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--between-s", type=float, default=8.0, help="seconds of serving between kills")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "survive_probe.json")
    args = ap.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"survive_probe_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), work / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "moecluster.cli",
        "serve",
        "--model",
        str(args.model),
        "--port",
        str(port),
        "--model-name",
        "m",
    ]
    cmd += ["--nodes", str(args.ranks), "--backend", "torch", "--timeout", str(args.timeout), "--restart", "1"]
    cmd += ["--placement", str(placement_file(work / "placement.json", args.model, args.ranks, args.copies))]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    result: dict = {"ranks": args.ranks, "copies": args.copies, "clients": args.clients, "timeout_s": args.timeout}
    try:
        if wait_health(url, 180) is None:
            raise SystemExit(f"server did not start:\n{log.read_text()}")
        probe = Probe(url, args.max_tokens)
        probe.reference = {p: probe.stream(p)[1] for p in PROMPTS}
        threads = [threading.Thread(target=probe.client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        kills = []
        for victim in range(1, args.copies + 1):  # the last one is fatal: some expert loses its last copy
            time.sleep(args.between_s)
            launcher = psutil.Process(server.pid).children()[0].pid
            rank_pid(launcher, victim).send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            fatal = victim == args.copies
            if fatal:
                back = wait_health(url, 300, world_size=args.ranks)
                kills.append({"rank": victim, "fatal": True, "seconds_until_restarted": time.monotonic() - t_kill})
                kills[-1]["health_after_restart"] = back
            else:
                health = wait_health(url, 60, world_size=args.ranks - victim)
                pause = probe.longest_pause(t_kill)
                kills.append({"rank": victim, "fatal": False, "longest_token_pause_s": pause, "health": health})
            kills[-1]["errors_before"] = len(probe.errors)
            kills[-1]["t_kill"] = t_kill
        time.sleep(args.between_s)
        probe.stop.set()
        for t in threads:
            t.join(150)
        t_fatal = kills[-1]["t_kill"]
        survivable_5xx = [m for t, m in probe.errors if t < t_fatal]
        text = log.read_text()
        result.update(
            requests_sent=sum(probe.codes.values()) + len(PROMPTS),
            status_codes={str(k): v for k, v in sorted(probe.codes.items())},
            five_xx_during_survivable_kills=len(survivable_5xx),
            five_xx_at_and_after_fatal_kill=len(probe.errors) - len(survivable_5xx),
            fatal_errors_sample=[m for t, m in probe.errors if t >= t_fatal][:3],
            greedy_mismatches=probe.mismatches,
            kills_survived=sum(1 for k in kills if not k["fatal"]),
            reform_seconds_logged=[float(x) for x in re.findall(r"re-formed without rank \d+ in ([\d.]+) s", text)],
            lost_experts_line=next((ln for ln in text.splitlines() if "have no copy left" in ln), "")[:300],
            kills=[{k: v for k, v in kill.items() if k not in ("t_kill", "errors_before")} for kill in kills],
            load_average=os.getloadavg(),
        )
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    keep_history(args.out, result)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if result.get("five_xx_during_survivable_kills") == 0 and result.get("greedy_mismatches") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
