"""Per-step, per-layer, per-rank timing: attention, router, experts (with evaluation counts), all-reduce,
head, sampling/broadcast. One process-wide tracer; `add` is a no-op unless enabled.

`apply_tracing(model)` is a transformation of a loaded model: it wraps each block's attention, each MoE
layer's router and experts (unless they time themselves, like expert parallelism's) and the lm_head in
timers, so model files stay plain torch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from moecluster.models.layers import DecoderModel

PHASES = ("attention", "router", "experts", "all_reduce", "head", "sample_bcast")
now = time.perf_counter


class Tracer:
    def __init__(self) -> None:
        self.enabled = False
        self.steps: list[dict] = []
        self._cur: dict | None = None

    def reset(self, enabled: bool = True) -> None:
        self.enabled, self.steps, self._cur = enabled, [], None

    def begin_step(self, kind: str, num_tokens: int) -> None:
        if self.enabled:
            self._cur = {
                "kind": kind,
                "tokens": num_tokens,
                "t0": now(),
                "layers": defaultdict(dict),
                "evals": {},
                "events": [],
            }

    def add(self, layer: int, phase: str, seconds: float) -> None:
        """A phase of a layer (-1: outside the layers) that ended just now and took `seconds`."""
        if self._cur is not None:
            slot = self._cur["layers"][layer]
            slot[phase] = slot.get(phase, 0.0) + seconds
            self._cur["events"].append((layer, phase, now() - seconds, seconds))

    def count_evals(self, layer: int, num: int, add: bool = False) -> None:
        """Experts `layer` evaluated this step (add: one of several forwards of the step, as the MLX engine's rows)."""
        if self._cur is not None:
            evals = self._cur["evals"]
            evals[layer] = evals.get(layer, 0) + num if add else num

    def end_step(self) -> None:
        if self._cur is not None:
            cur = self._cur
            cur["start"] = cur.pop("t0")  # perf_counter: CLOCK_MONOTONIC, shared by the ranks of one machine
            cur["total"] = now() - cur["start"]
            cur["layers"] = {int(k): v for k, v in cur["layers"].items()}
            self.steps.append(cur)
            self._cur = None

    def summary(self, kind: str = "decode") -> dict:
        """Mean per step of each phase (seconds), mean per layer, share of step time, mean expert evaluations."""
        steps = [s for s in self.steps if s["kind"] == kind]
        if not steps:
            return {"steps": 0}
        totals = {p: 0.0 for p in PHASES}
        for s in steps:
            for per_layer in s["layers"].values():
                for phase, sec in per_layer.items():
                    totals[phase] = totals.get(phase, 0.0) + sec
        n = len(steps)
        n_layers = max(1, len({layer for s in steps for layer in s["layers"] if layer >= 0}))
        step_time = sum(s["total"] for s in steps) / n
        mean = {p: t / n for p, t in totals.items()}
        mean["other"] = max(0.0, step_time - sum(mean.values()))
        evals = sum(sum(s["evals"].values()) for s in steps) / n
        return {
            "steps": n,
            "step_time": step_time,
            "per_step": mean,
            "num_layers": n_layers,
            "per_layer": {p: v / n_layers for p, v in mean.items() if p not in ("head", "sample_bcast", "other")},
            "share": {p: (v / step_time if step_time else 0.0) for p, v in mean.items()},
            "expert_evals_per_step": evals,
        }


TRACER = Tracer()


def trace_events(ranks: list[dict]) -> list[dict]:
    """Chrome/Perfetto trace-event format ("X" complete events, microseconds) of every rank's steps
    ({"rank", "steps"} as the tracer records them): one process track per rank, steps on thread 0,
    layer phases on thread 1. Times of ranks on different machines are not aligned."""
    starts = [s["start"] for r in ranks for s in r["steps"] if "start" in s]
    t0 = min(starts, default=0.0)
    out: list[dict] = []
    for r in ranks:
        pid = r["rank"]
        out += [
            {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"rank {pid}"}},
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": 0, "args": {"name": "steps"}},
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "layers"}},
        ]
        for i, step in enumerate(r["steps"]):
            if "start" not in step:
                continue
            out.append(
                {
                    "ph": "X",
                    "name": f"{step['kind']} ({step['tokens']} tok)",
                    "pid": pid,
                    "tid": 0,
                    "ts": (step["start"] - t0) * 1e6,
                    "dur": step["total"] * 1e6,
                    "args": {"step": i},
                }
            )
            for layer, phase, start, seconds in step.get("events", []):
                name = phase if layer < 0 else f"{phase} L{layer}"
                out.append(
                    {
                        "ph": "X",
                        "name": name,
                        "cat": phase,
                        "pid": pid,
                        "tid": 1,
                        "ts": (start - t0) * 1e6,
                        "dur": seconds * 1e6,
                        "args": {"layer": layer, "step": i},
                    }
                )
    return out


def format_breakdown(rows: list[tuple[str, dict]]) -> str:
    """A table like the seed paper's breakdown: one row per rank, mean ms per step and share of step time."""
    head = f"{'rank':>6} {'step ms':>8} " + " ".join(f"{p:>14}" for p in PHASES + ("other",)) + f" {'evals/step':>10}"
    lines = [head]
    for name, s in rows:
        if not s.get("steps"):
            continue
        cells = " ".join(
            f"{s['per_step'][p] * 1e3:7.2f} {s['share'][p] * 100:4.0f}%" + " " for p in PHASES + ("other",)
        )
        lines.append(f"{name:>6} {s['step_time'] * 1e3:8.2f} {cells} {s['expert_evals_per_step']:10.1f}")
    return "\n".join(lines)


class SelfTimed:
    """Marker: a module that reports its own phases to TRACER (apply_tracing leaves it unwrapped)."""


class Timed(nn.Module):
    """Times `inner`'s forward as one phase of one layer; other attributes read through to `inner`."""

    inner: Any

    def __init__(self, inner: nn.Module, layer: int, phase: str, counts_evals: bool = False):
        super().__init__()
        self.inner, self.layer, self.phase, self.counts_evals = inner, layer, phase, counts_evals

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args, **kwargs):
        t0 = now()
        out = self.inner(*args, **kwargs)
        TRACER.add(self.layer, self.phase, now() - t0)
        if self.counts_evals:
            TRACER.count_evals(self.layer, self.inner.last_num_evaluated)
        return out


def _wrap(module: nn.Module, layer: int, phase: str, counts_evals: bool = False) -> nn.Module:
    if isinstance(module, (Timed, SelfTimed)):
        return module
    return Timed(module, layer, phase, counts_evals)


def apply_tracing(model: DecoderModel) -> DecoderModel:
    """Wrap attention, routers, experts and the head of a DecoderModel in timers (idempotent)."""
    moes = {id(moe) for moe in model.moe_layers()}
    for i, block in enumerate(model.layers):
        block.attn = _wrap(block.attn, i, "attention")
        moe = block.mlp
        if id(moe) in moes:
            moe.router = _wrap(moe.router, i, "router")
            moe.experts = _wrap(moe.experts, i, "experts", counts_evals=True)
    model.lm_head = _wrap(model.lm_head, -1, "head")
    return model
