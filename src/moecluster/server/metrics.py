"""Prometheus metrics of the server on rank 0: requests, tokens, time to first token, per-token
latency, step times, per-layer exchange (all-reduce) time from the tracer, expert load imbalance.

Legend: L layers, E experts, R ranks, N tokens, K top-k.

Expert load is counted through each MoE block's routing recorder (rank 0 runs the same router as
every rank, so it sees every token's choice). Counts decay
by DECAY per router call, so the imbalance describes roughly the last 1 / (1 - DECAY) steps.
"""

from __future__ import annotations

import threading

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from moecluster.engine.batching import StepObserver

DECAY = 0.99
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
EXCHANGE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics(StepObserver):
    """The server's metrics; also the scheduler's StepObserver."""

    def __init__(self, engine, placement=None, world_size: int = 1):
        """engine: a ServingEngine (engine/interface.py) of either engine; it feeds record() with the routing."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moecluster_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("moecluster_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("moecluster_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("moecluster_sequences_finished", "Finished sequences by reason", ["reason"], registry=r)
        self.ttft = Histogram(
            "moecluster_time_to_first_token_seconds", "Submission to first token", buckets=TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "moecluster_time_per_output_token_seconds",
            "Gap between consecutive tokens of one sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "moecluster_step_seconds", "Forward time of one step", ["kind"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "moecluster_decode_batch_rows",
            "Rows in one decode step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.weight_bytes = Counter(
            "moecluster_decode_weight_bytes_read",
            "Weight bytes rank 0 read in decode steps (dense + the experts the batch activated)",
            registry=r,
        )
        self.exchange = Histogram(
            "moecluster_layer_exchange_seconds",
            "All-reduce time of one MoE layer in one step, on rank 0",
            ["kind", "layer"],
            buckets=EXCHANGE_BUCKETS,
            registry=r,
        )
        self.imbalance = Gauge(
            "moecluster_expert_load_imbalance",
            "max/mean of (token, expert) pairs per expert or per rank, mean over layers, recent steps",
            ["level"],
            registry=r,
        )
        self.running = Gauge("moecluster_requests_running", "Sequences decoding", registry=r)
        self.waiting = Gauge("moecluster_requests_waiting", "Requests waiting for a slot", registry=r)
        self.healthy = Gauge("moecluster_healthy", "1 if every rank answers, else 0", registry=r)
        self.world_size = Gauge("moecluster_world_size", "Ranks in the job", registry=r)
        self.world_size.set(world_size)
        self.placement = placement
        self.members: list[int] | None = None  # launch rank of each current rank, after a re-forming
        self._lock = threading.Lock()
        num_layers, num_experts = engine.routing_shape()
        self._counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        engine.set_routing_recorder(self)  # each MoE layer calls record() with each step's routing

    def record(self, layer_id: int, ids_NK: list[list[int]]) -> None:
        """Routing of one step in one layer (called by the MoE block on the scheduler thread)."""
        counts_E = torch.bincount(torch.tensor(ids_NK).reshape(-1), minlength=self._counts_LE.shape[1]).double()
        with self._lock:
            self._counts_LE[layer_id].mul_(DECAY).add_(counts_E)

    # ---- StepObserver (scheduler thread) ----
    def on_step(self, kind: str, num_rows: int, seconds: float, bytes_read: int, trace: dict | None) -> None:
        self.step_seconds.labels(kind).observe(seconds)
        if kind == "decode":
            self.batch_rows.observe(num_rows)
            self.weight_bytes.inc(bytes_read)
        for layer, phases in (trace or {}).get("layers", {}).items():
            if int(layer) >= 0 and "all_reduce" in phases:
                self.exchange.labels(kind, str(layer)).observe(phases["all_reduce"])

    def on_token(self, first: bool, seconds: float) -> None:
        self.generation_tokens.inc()
        (self.ttft if first else self.tpot).observe(seconds)

    def on_finish(self, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.finished.labels(finish_reason).inc()

    def set_placement(self, placement, members: list[int]) -> None:
        """After the cluster re-formed on the survivors (engine/survive.py): their placement, renumbered
        0..k-1, and the launch rank of each (for /v1/cluster)."""
        self.placement, self.members = placement, list(members)
        self.world_size.set(len(members))

    # ---- HTTP side ----
    def observe_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def imbalance_now(self) -> dict[str, float]:
        """max/mean load per expert and per rank (mean over layers with traffic); 1.0 is perfect balance."""
        with self._lock:
            counts_LE = self._counts_LE.clone()
        out = {"expert": _mean_ratio(counts_LE)}
        placement = self.placement  # set_placement may swap it (scheduler thread)
        if placement is not None and placement.world_size > 1:
            L, E = counts_LE.shape
            load_LR = torch.zeros(L, placement.world_size, dtype=torch.float64)
            for layer in range(L):
                for expert in range(E):
                    holders = placement.holders(layer, expert)
                    for rank in holders:  # replicas share an expert's pairs (assign balances them)
                        load_LR[layer, rank] += counts_LE[layer, expert] / len(holders)
            out["rank"] = _mean_ratio(load_LR)
        return out

    def render(self, running: int, waiting: int, healthy: bool) -> bytes:
        self.running.set(running)
        self.waiting.set(waiting)
        self.healthy.set(1 if healthy else 0)
        for level, value in self.imbalance_now().items():
            self.imbalance.labels(level).set(value)
        return generate_latest(self.registry)


def _mean_ratio(load_LX: torch.Tensor) -> float:
    """Mean over rows with any load of max/mean along the row."""
    busy = load_LX.sum(dim=1) > 0
    if not bool(busy.any()):
        return 1.0
    rows = load_LX[busy]
    return float((rows.max(dim=1).values / rows.mean(dim=1)).mean())
