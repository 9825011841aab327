"""Per-token cost of structured output in decode: ms/token with and without a json_schema constraint on the
built-in demo model, through the continuous-batching scheduler (the mask is computed on rank 0 between the
forward and the sampling), batch 1 and batch 4, plus the mask's own time per token (compute + apply + advance).

    python benchmarks/structured.py [--rounds 5] [--tokens 230]

Writes benchmarks/results/structured.json and .md (machine, commit, date, command, load average).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from results_io import keep_history  # a sibling module: benchmarks run as scripts

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from decode import cpu_model, git_commit, package_version  # noqa: E402

from moecluster.builtin import DEMO_MODEL_DIR  # noqa: E402
from moecluster.engine import structured  # noqa: E402
from moecluster.engine.batching import Event, Request, Scheduler, StepObserver  # noqa: E402
from moecluster.engine.generate import Engine  # noqa: E402
from moecluster.engine.sampling import SamplingParams  # noqa: E402
from moecluster.loading import load_model  # noqa: E402

RESULTS = HERE / "results"
NOTE = (
    "The mask's mean and p90 are dominated by rare slow tokens: llguidance builds lexer states lazily the first time "
    "a grammar reaches them (shared by later requests), and on a loaded machine a descheduled thread adds 10-20 ms "
    "to whatever it was doing; the median is the steady cost. Decode columns: the median step time, which includes "
    "the mask on rank 0 (tokens/round: the constrained runs stop when the JSON is complete)."
)
# a long, fully bounded answer: 24 short strings (about 5 tokens each) in an object
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "words": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 24, "maxItems": 24},
    },
    "required": ["title", "words"],
    "additionalProperties": False,
}


class _Gaps(StepObserver):
    """Decode steps' wall time (forward + sampling of every row, masks included) between consecutive tokens."""

    def __init__(self):
        self.gaps: list[float] = []

    def on_token(self, first: bool, seconds: float) -> None:
        if not first:
            self.gaps.append(seconds)


class _MaskTimer:
    """Wall time on the scheduler thread in TokenMask.apply (waiting for the mask, unpacking, masking the logits)
    plus TokenMask.accept (advancing the grammar), per token."""

    def __init__(self):
        self.per_token: list[float] = []
        apply, accept = structured.TokenMask.apply, structured.TokenMask.accept

        def timed_apply(mask, logits_V):
            t0 = time.perf_counter()
            out = apply(mask, logits_V)
            mask.bench_t = time.perf_counter() - t0
            return out

        def timed_accept(mask, token):
            t0 = time.perf_counter()
            accept(mask, token)
            self.per_token.append(getattr(mask, "bench_t", 0.0) + time.perf_counter() - t0)

        structured.TokenMask.apply = timed_apply  # type: ignore[method-assign]
        structured.TokenMask.accept = timed_accept  # type: ignore[method-assign]


def run(engine: Engine, prompt: list[int], rows: int, tokens: int, constrained: bool, seed: int) -> dict:
    """`rows` concurrent requests; returns the median decode gap (ms per token of each sequence) and counts."""
    observer = _Gaps()
    scheduler = Scheduler(engine, max_batch=rows, max_queue=0, observer=observer)
    scheduler.start()
    constraint = (
        structured.Constraint(engine.tokenizer, structured.json_schema_grammar(SCHEMA), engine.loaded.shape.vocab_size)
        if constrained
        else None
    )
    done, outputs = threading.Semaphore(0), [[] for _ in range(rows)]

    def emit(i: int):
        def on(event: Event) -> None:
            outputs[i].append(event.text)
            if event.finish_reason is not None:
                done.release()

        return on

    try:
        for i in range(rows):
            params = SamplingParams(
                max_tokens=tokens, temperature=1.0, seed=seed + i, ignore_eos=not constrained, constraint=constraint
            )
            scheduler.submit(Request(prompt, params.validate(), emit(i)))
        for _ in range(rows):
            assert done.acquire(timeout=600), "a request did not finish"
    finally:
        scheduler.stop()
    if constrained:
        for text in outputs:
            json.loads("".join(text))  # the benchmark measures valid output only
    return {"ms_per_token": 1e3 * statistics.median(observer.gaps), "tokens": len(observer.gaps) + rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=230, help="max tokens per sequence (unconstrained: exactly)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = Engine(load_model(DEMO_MODEL_DIR, "fp32"), num_slots=4)
    prompt = engine.tokenizer.encode("Write the words of the json module as JSON:")
    timer = _MaskTimer()
    rows_out = []
    load_before = os.getloadavg()
    for rows in (1, 4):
        for constrained in (False, True):
            runs, first = [], len(timer.per_token)
            for r in range(args.rounds):
                runs.append(run(engine, prompt, rows, args.tokens, constrained, seed=100 * r))
            mask = timer.per_token[first:]
            row = {
                "batch": rows,
                "constraint": "json_schema" if constrained else "none",
                "decode_ms_per_token": statistics.median(x["ms_per_token"] for x in runs),
                "tokens_per_round": statistics.median(x["tokens"] for x in runs),
                "mask_us_median": 1e6 * statistics.median(mask) if mask else None,
                "mask_us_p90": 1e6 * statistics.quantiles(mask, n=10)[-1] if len(mask) > 1 else None,
                "mask_us_mean": 1e6 * statistics.mean(mask) if mask else None,
            }
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": package_version("torch"),
            "llguidance": package_version("llguidance"),
        },
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "command": "python " + " ".join(sys.argv),
        "model": "built-in demo model (Qwen3-MoE 4x8 experts, vocab 4096), fp32, 1 rank, 1 thread",
        "schema": SCHEMA,
        "rows": rows_out,
    }
    RESULTS.mkdir(exist_ok=True)
    keep_history(RESULTS / "structured.json", result)
    (RESULTS / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "structured.md").write_text(report(result))
    print(report(result))
    return 0


def report(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Structured output: the mask's cost in decode",
        "",
        f"- date: {r['date']}, commit: {r['commit']}",
        f"- machine: {m['cpus']} CPUs, {m['cpu']}, {m['platform']}; Python {m['python']}, torch {m['torch']}, "
        f"llguidance {m['llguidance']}",
        f"- load average (1, 5, 15 min) before: {r['load_average']['before']}, after: {r['load_average']['after']} "
        "(a shared machine: absolute times are noisy, compare rows of the same run)",
        f"- command: `{r['command']}`",
        f"- model: {r['model']}; sampling at temperature 1; schema: 24 bounded strings in an object",
        "",
        "| batch | constraint | decode ms/token (median step) | tokens/round | mask µs/token median | p90 | mean |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        mask = (
            f"{row['mask_us_median']:.0f} | {row['mask_us_p90']:.0f} | {row['mask_us_mean']:.0f}"
            if row["mask_us_median"] is not None
            else "- | - | -"
        )
        lines.append(
            f"| {row['batch']} | {row['constraint']} | {row['decode_ms_per_token']:.2f} | "
            f"{row['tokens_per_round']:.0f} | {mask} |"
        )
    lines += ["", NOTE]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
