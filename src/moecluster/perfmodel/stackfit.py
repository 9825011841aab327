"""Derive a published system's software overheads from its own measurements (the `stacks` presets).

A stack adds two terms to an engine's cost model (docs/perfmodel.md):

- o, seconds per exchange: software time around every all-reduce (serialisation, RPC, Python), and
- e, seconds per distinct expert a rank evaluates in a layer (Python dispatch, per-call RPC work).

Given measured (nodes, tok/s, communication share) points, with M MoE layers, base model predictions
without any overhead (exchange X_N, step T_N) and the slowest rank's distinct experts d_N per layer:

    o = mean over N of (share_N / tok_s_N) / M - X_N / M          (communication per layer, minus the network)
    e = mean over N of (1 / tok_s_N - T_N - (M + 1) o) / (M d_N)   (the rest of the step; +1: token broadcast)

Two parameters from four numbers (two tok/s, two shares), so reproducing them is a check, not a
tautology; a third node count is a prediction.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from moecluster.perfmodel.predict import Workload, predict
from moecluster.perfmodel.presets import NetworkSpec, NodeSpec
from moecluster.perfmodel.shapes import ModelShape

# The seed paper's measurements, as quoted in issue 18 (the paper itself was not available offline).
PAPER_SCENARIO: dict[str, Any] = {
    "paper": "arXiv 2506.23635 (DBRX bf16 on M2 Ultra Mac Studios, 10GbE, Python + gRPC prototype)",
    "source": "issue 18 text: 6.1 tok/s with 23% communication at 2 nodes, 7.0 tok/s with 33% at 4 nodes; "
    "no 3-node number given",
    "model": "dbrx",
    "node": "m2-ultra-192",
    "network": "10gbe",
    "stack": "paper-python-grpc",
    "points": {2: (6.1, 0.23), 4: (7.0, 0.33)},
}


def fit_stack(
    shape: ModelShape,
    node: NodeSpec,
    network: NetworkSpec,
    points: dict[int, tuple[float, float]],
    workload: Workload | None = None,
) -> dict[str, Any]:
    """{'exchange_overhead_s', 'per_expert_overhead_s', 'rows'}: the overheads that explain `points`
    ({nodes: (tok/s, comm share)}) on top of `node`'s engine; rows hold each step of the derivation."""
    base = replace(node, exchange_overhead_s=0.0, per_expert_overhead_s=0.0)
    layers = shape.num_moe_layers
    rows = []
    for n, (toks, share) in sorted(points.items()):
        pred = predict(shape, base, network, n, workload)
        rows.append(
            {
                "nodes": n,
                "tok_s": toks,
                "share": share,
                "step_s": 1 / toks,
                "comm_s": share / toks,
                "model_step_s": pred.step.total,
                "model_exchange_s": pred.step.exchange,
                "distinct": pred.load.distinct,
            }
        )
    o = sum(r["comm_s"] / layers - r["model_exchange_s"] / layers for r in rows) / len(rows)
    for r in rows:
        r["per_expert_s"] = (r["step_s"] - r["model_step_s"] - (layers + 1) * o) / (layers * r["distinct"])
    e = sum(r["per_expert_s"] for r in rows) / len(rows)
    return {"exchange_overhead_s": o, "per_expert_overhead_s": e, "rows": rows}
