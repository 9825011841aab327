"""Calibration profiles: from the results of `moecluster calibrate`'s measuring jobs to the profile
JSON that `plan --profile` reads (format: `perfmodel.profile`), and the model's self-check on it.

The jobs run the real engine on N ranks with the tracer on: B sequences decoded in lockstep for
every --batch B. From each rank's trace this module takes, per B, attention and router seconds per
layer, seconds per expert evaluation at the measured tokens per expert, head (+ embedding and
per-step framework time), and rank 0's sampling. The jobs also measure each rank's streaming
memory bandwidth and all-reduce latency against message size for every world size 2..N, at the
engine's exchange dtype and at the sizes the engine sends (`message_sizes`). The rank side is
`moecluster.calibration`; this module stays torch-free.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError
from moecluster.perfmodel.predict import Workload, predict
from moecluster.perfmodel.presets import load_presets
from moecluster.perfmodel.profile import FORMAT, VERSION, profile_from_dict
from moecluster.perfmodel.shapes import load_model

BASE_SIZES = [16, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


def parse_batches(spec: str) -> list[int]:
    """'1,4' -> [1, 4] (sorted, unique, each >= 1)."""
    try:
        batches = sorted({int(b) for b in str(spec).split(",") if b.strip()})
    except ValueError:
        raise MoeClusterError(f"bad --batch {spec!r}: use sizes like 1,4") from None
    if not batches or batches[0] < 1 or batches[-1] > 64:
        raise MoeClusterError(f"bad --batch {spec!r}: sizes must be between 1 and 64")
    return batches


def message_sizes(model_dir: str, batches: list[int], exchange: str, dtype: str | None) -> list[int]:
    """All-reduce sizes to time: a spread, the engine's exchange for each B, the token broadcasts."""
    shape = load_model(model_dir, {})
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    fp32 = (
        dtype or ("fp32" if str(cfg.get("dtype") or cfg.get("torch_dtype")) in ("float32", "fp32") else "bf16")
    ) == "fp32"
    per_token = shape.d_model * 4 if exchange == "sum" or fp32 else shape.top_k * shape.d_model * 2
    return sorted(set(BASE_SIZES + [b * per_token for b in batches] + [8 * (b + 1) for b in batches]))


def _median(values: list[float]) -> float:
    """Despite the name: the mean. Per-term medians do not add up to the median step when stalls (a
    rank descheduled on a shared machine) hit a different term in each step; means do, exactly."""
    return statistics.fmean(values) if values else 0.0


def batch_terms(res: dict, layers: int, top_k: int) -> dict[str, float]:
    """Per-term seconds of one batch size from every rank's decode probe (medians over steps)."""
    ranks, b = res["ranks"], res["ranks"][0]["batch"]
    if "attention_SL" not in ranks[0]:
        raise MoeClusterError("the calibration run has no trace (it ran with --no-trace)")

    def per_layer(key: str) -> float:  # median over steps of the layer sum, mean over ranks, per layer
        return statistics.fmean(_median([sum(row) for row in r[key]]) for r in ranks) / layers

    evals = sum(sum(sum(row) for row in r["evals_SL"]) for r in ranks)
    per_eval = [
        e / n for r in ranks for es, ns in zip(r["experts_SL"], r["evals_SL"]) for e, n in [(sum(es), sum(ns))] if n
    ]
    r0 = ranks[0]
    traced = [
        sum(map(sum, rows)) + h
        for rows, h in zip(
            zip(r0["attention_SL"], r0["router_SL"], r0["experts_SL"], r0["all_reduce_SL"]), r0["head_s"]
        )
    ]
    other = [f - t for f, t in zip(r0["forward_s"], traced)]
    steps = len(r0["step_s"])
    return {
        "batch": b,
        "attention_per_layer": per_layer("attention_SL"),
        "router_per_layer": per_layer("router_SL"),
        "experts_per_layer": per_layer("experts_SL"),
        # the slowest rank waits least in the all-reduce: the cost on the critical path
        "all_reduce_per_layer": min(_median([sum(row) for row in r["all_reduce_SL"]]) for r in ranks) / layers,
        "experts_max_rank_per_layer": _median(
            [max(sum(r["experts_SL"][s]) for r in ranks) for s in range(len(r0["step_s"]))]
        )
        / layers,
        "expert_eval": _median(per_eval),
        "tokens_per_expert": b * top_k * layers * steps / evals if evals else 1.0,
        "distinct_max_rank_per_layer": statistics.fmean(
            max(r["evals_SL"][s][layer] for r in ranks) for s in range(steps) for layer in range(layers)
        ),
        "head": _median(r0["head_s"]) + max(0.0, _median(other)),
        "sampling": _median(r0["sample_s"]),
        "broadcast": _median(r0["bcast_s"]),
        "step": _median(r0["step_s"]),
        "tok_s": b / _median(r0["step_s"]),
    }


def _table(points: list[tuple[float, float]]) -> list[list[float]]:
    """Sorted [x, y] pairs; equal x (to 1e-6) averaged."""
    merged: dict[float, list[float]] = {}
    for x, y in points:
        merged.setdefault(round(x, 6), []).append(y)
    return [[x, statistics.fmean(ys)] for x, ys in sorted(merged.items())]


def build_profile(engines: list[dict], allreduce: dict[int, list[dict]], network: str, node: str) -> dict:
    """The profile JSON dict from engine-phase results (several runs: the median of each term) and
    all-reduce rows per world size (several runs: the median per size)."""
    engine, model = engines[0], engines[0]["model"]
    runs = [
        {int(b): batch_terms(res, model["layers"], model["top_k"]) for b, res in e["batches"].items()} for e in engines
    ]
    terms = [
        {**{k: statistics.median(run[b][k] for run in runs) for k in runs[0][b]}, "batch": b} for b in sorted(runs[0])
    ]
    times = {
        key: _table([(t["batch"], t[key]) for t in terms])
        for key in ("attention_per_layer", "router_per_layer", "head", "sampling")
    }
    times["expert_eval"] = _table([(t["tokens_per_expert"], t["expert_eval"]) for t in terms])
    bandwidth = statistics.median(statistics.fmean(e["bandwidth_gbs"]) for e in engines)
    first = min(terms, key=lambda t: t["tokens_per_expert"])
    efficiency = model["expert_bytes"] / first["expert_eval"] / (bandwidth * 1e9) if first["expert_eval"] else 1.0
    merged = {w: merge_rows(rows) for w, rows in sorted(allreduce.items())}
    cold = exchange_cold_overhead(terms, merged.get(engine["world_size"], []), model["exchange_bytes_per_token"])
    profile: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": Path(str(engine.get("model_dir", model["arch"]))).name,
        "engine": engine.get("engine", "torch"),  # the engine that was measured (torch, mlx)
        "node": node,
        "dtype": model["dtype"],
        "network": network,
        "context": round(statistics.fmean(r["ranks"][0]["context_mean"] for r in engine["batches"].values()), 1),
        "times_s": times,
        "memory_efficiency": round(min(1.0, max(0.01, efficiency)), 4),
        "memory_bandwidth_gbs": round(bandwidth, 3),
        "exchange_bytes_per_token": model["exchange_bytes_per_token"],
        **({"exchange_overhead_s": cold} if cold else {}),
        "allreduce": {str(w): [[r["size_bytes"], r["median_us"] * 1e-6] for r in rows] for w, rows in merged.items()},
        "measured": {
            "ranks": engine["world_size"],
            "backend": engine["backend"],
            "threads": engine["threads"],
            **({"device": engine["device"]} if "device" in engine else {}),
            "placement": engine.get("placement"),
            "exchange": model["exchange"],
            "runs": len(engines),
            "batches": {str(t["batch"]): {k: v for k, v in t.items() if k != "batch"} for t in terms},
        },
    }
    steps = {
        str(w): [[r["size_bytes"], r["latency_steps"]] for r in rows]
        for w, rows in merged.items()
        if rows and all(r.get("latency_steps") for r in rows)
    }
    if steps:
        profile["allreduce_latency_steps"] = steps
    profile_from_dict(profile, where="calibrated profile")  # what we write, plan can read
    return profile


def exchange_cold_overhead(terms: list[dict], rows: list[dict], per_token: float) -> float:
    """Seconds the in-engine exchange costs beyond the bare all-reduce table at the same size: caches
    cold after streaming weights, waking a rank that slept, device sync. Median over batch sizes."""
    if not rows:
        return 0.0
    from moecluster.perfmodel.network import interpolate

    table = [(float(r["size_bytes"]), r["median_us"] * 1e-6) for r in rows]
    extra = [t["all_reduce_per_layer"] - interpolate(table, t["batch"] * per_token) for t in terms]
    return round(max(0.0, statistics.median(extra)), 9)


def merge_rows(rows: list[dict]) -> list[dict]:
    """commbench rows of several runs -> one row per size with the median of their medians."""
    by_size: dict[int, list[dict]] = {}
    for row in rows:
        by_size.setdefault(int(row["size_bytes"]), []).append(row)
    return [
        {**group[0], "median_us": statistics.median(r["median_us"] for r in group)}
        for _, group in sorted(by_size.items())
    ]


CHECK_TOLERANCE = 0.15


def self_check(profile_dict: dict, model_dir: str, node: str, nodes: int) -> list[dict]:
    """Predict each measured batch from the profile; measured vs predicted per term (seconds per step).

    Terms: attention, router (x layers), experts (slowest rank), exchange, head (+ untraced
    framework time), sampling (+ token broadcast), step. 'warnings' names each term (and the step)
    off by more than CHECK_TOLERANCE, with the term's share of the step.
    """
    presets = load_presets()
    shape = load_model(model_dir, presets.models)
    if profile_dict["dtype"] == "fp32":  # plan's --dtype has no fp32; bytes matter only for untimed terms
        shape = replace(shape, weight_bytes=4.0, act_bytes=4)
    profile = profile_from_dict(profile_dict)
    layers, moe_layers = shape.num_layers, shape.num_moe_layers
    rows = []
    for b, m in profile_dict["measured"]["batches"].items():
        wl = Workload(batch=int(b), context=max(1, int(profile_dict["context"])), prompt=16)
        pred = predict(shape, presets.node(node), presets.network(profile_dict["network"]), nodes, wl, profile)
        measured = {
            "attention": layers * m["attention_per_layer"],
            "router": moe_layers * m["router_per_layer"],
            "experts": moe_layers * m.get("experts_max_rank_per_layer", m["experts_per_layer"]),
            "exchange": moe_layers * m["all_reduce_per_layer"],
            "head": m["head"],
            "sampling": m["sampling"] + m["broadcast"],
            "step": m["step"],
        }
        predicted = {t: getattr(pred.step, t) for t in measured if t != "step"} | {"step": pred.step.total}
        predicted["attention"] += pred.step.dense_mlp
        warnings = [t for t in measured if _off(measured[t], predicted[t], m["step"])]
        rows.append(
            {
                "batch": int(b),
                "measured_tok_s": m["tok_s"],
                "predicted_tok_s": pred.tokens_per_s,
                "measured": measured,
                "predicted": predicted,
                "warnings": warnings,
                # the experts term's usual cause: the model's uniform routing vs the real, skewed one
                "distinct_measured": m.get("distinct_max_rank_per_layer"),
                "distinct_predicted": pred.load.distinct,
            }
        )
    return rows


def _off(measured: float, predicted: float, step: float) -> bool:
    """More than 15% apart, and the gap is worth at least 1% of the step (tiny terms are noise)."""
    gap = abs(predicted - measured)
    return gap > CHECK_TOLERANCE * max(measured, 1e-12) and gap > 0.01 * step


def read_results(paths: list[str]) -> tuple[list[dict], dict[int, list[dict]]]:
    """(engine results, all-reduce rows per world size) from rank-0 result files of calibration jobs."""
    engines: list[dict] = []
    tables: dict[int, list[dict]] = {}
    for path in paths:
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise MoeClusterError(f"cannot read calibration result {path}: {e}") from e
        if not isinstance(res, dict) or res.get("phase") not in ("engine", "allreduce"):
            raise MoeClusterError(f"{path} is not a calibration result (write it with calibrate --rank-worker)")
        if res["phase"] == "engine":
            if engines and res["world_size"] != engines[0]["world_size"]:
                raise MoeClusterError(f"{path}: engine results must all come from the same number of ranks")
            engines.append(res)
        if res.get("allreduce"):
            tables.setdefault(int(res["world_size"]), []).extend(res["allreduce"])
    if not engines:
        raise MoeClusterError("--from-results needs an engine-phase result (calibrate --rank-worker --phase engine)")
    return engines, tables
