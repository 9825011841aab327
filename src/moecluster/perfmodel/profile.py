"""Measured cluster profile: the JSON that `moecluster calibrate` writes and `plan --profile` reads.

Format (version 1); every field but "format" and "version" is optional, and anything a profile
does not give falls back to the analytic model of the node and network presets::

    {
      "format": "moecluster-profile",
      "version": 1,
      "model": "dbrx",                 # labels, for people (not used by plan)
      "engine": "mlx",                 # the engine calibrate measured (torch or mlx; plan names it)
      "node": "m2-ultra-192",
      "dtype": "bf16",
      "context": 512,                  # KV length at which attention was timed
      "network": "10gbe",              # the all-reduce table applies to this --network name
      "times_s": {                     # seconds; a number, or [[x, seconds], ...] over x
        "attention_per_layer": [[1, 0.00110], [4, 0.00118]],   # x = batch (decode step)
        "router_per_layer": 0.00002,                           # x = batch
        "expert_eval": [[1, 0.00070], [8, 0.00074]],           # one expert, one layer; x = tokens it gets
        "dense_mlp_per_layer": 0.0,                            # shared experts / dense MLP; x = batch
        "head": 0.0021,                                        # final norm + lm_head (+ embedding); x = batch
        "sampling": 0.0001                                     # x = batch
      },
      "memory_efficiency": 0.66,       # achieved / peak weight-streaming bandwidth (for terms not timed)
      "memory_bandwidth_gbs": 15.2,    # measured streaming bandwidth per node (replaces the preset's)
      "exchange_bytes_per_token": 8192,  # all-reduce bytes per decode token (default: the model's D x 2)
      "exchange_overhead_s": 4e-05,    # in-engine exchange minus the bare table (cold caches after streaming)
      "allreduce": {                   # end-to-end seconds per exchange (incl. device sync), per world size
        "2": [[12288, 3.1e-05], [49152, 4.0e-05], [1048576, 0.00042]]
      },
      "allreduce_latency_steps": {     # network latencies in series per all-reduce (the MPI's algorithm)
        "2": [[16, 1], [4096, 2], [16384, 1]]                  # a step table: from this size on
      }
    }

Tables are interpolated piecewise-linearly; below the first x the first value holds, above the
last x the last segment's slope extends (see `network.interpolate`). Per-step expert time on
the slowest rank is distinct_experts x expert_eval(evaluations / distinct_experts). Profile
times apply to decode steps; prefill (TTFT) always uses the roofline of the node preset (with
`memory_efficiency` and `memory_bandwidth_gbs` if given).

`with_added_latency(s)` asks "what if the measured network had s more one-way latency": each
measured all-reduce then costs s x its latency steps more (the steps table, else recursive
doubling's log2 N: the latency-optimal algorithm MPI libraries pick for small messages).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError
from moecluster.perfmodel.network import interpolate, recursive_doubling_steps

FORMAT = "moecluster-profile"
VERSION = 1
TIME_KEYS = (
    "attention_per_layer",
    "router_per_layer",
    "expert_eval",
    "dense_mlp_per_layer",
    "head",
    "sampling",
)
Table = tuple[tuple[float, float], ...]
META_KEYS = ("model", "engine", "node", "dtype", "context", "notes", "measured")  # kept for people, not used


@dataclass(frozen=True)
class Profile:
    """Measured times: tables of (x, seconds) per term, and all-reduce tables per world size."""

    times: dict[str, Table] = field(default_factory=dict)
    allreduce: dict[int, Table] = field(default_factory=dict)
    network: str | None = None
    memory_efficiency: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    memory_bandwidth: float | None = None  # bytes/s
    exchange_bytes_per_token: float | None = None
    latency_steps: dict[int, Table] = field(default_factory=dict)
    added_latency_s: float = 0.0  # what-if extra one-way latency (see with_added_latency)
    exchange_overhead_s: float = 0.0  # in-engine exchange minus the bare all-reduce (cold caches, wake-up)

    def time(self, key: str, x: float) -> float | None:
        """Measured seconds for term `key` at x (batch or tokens), or None if not measured."""
        table = self.times.get(key)
        return None if table is None else interpolate(table, x)

    def allreduce_time(self, network: str, num_ranks: int, message_bytes: float) -> float | None:
        """Measured all-reduce seconds on `network` with N ranks, or None if not measured."""
        if network != self.network or num_ranks not in self.allreduce:
            return None
        seconds = interpolate(self.allreduce[num_ranks], message_bytes)
        return seconds + self.added_latency_s * self.steps(num_ranks, message_bytes)

    def steps(self, num_ranks: int, message_bytes: float) -> float:
        """Latencies in series in one all-reduce of M bytes over N ranks (step table lookup)."""
        table = self.latency_steps.get(num_ranks)
        if not table:
            return float(recursive_doubling_steps(num_ranks))
        below = [steps for size, steps in table if size <= message_bytes]
        return below[-1] if below else table[0][1]

    def with_added_latency(self, seconds: float) -> Profile:
        """This profile as if its network had `seconds` more one-way latency per message."""
        if seconds < 0:
            raise MoeClusterError(f"added latency must be >= 0 s, got {seconds}")
        return replace(self, added_latency_s=float(seconds))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what calibrate writes)."""
        out: dict[str, Any] = {"format": FORMAT, "version": VERSION, **self.meta}
        if self.network is not None:
            out["network"] = self.network
        out["times_s"] = {k: [list(p) for p in v] for k, v in self.times.items()}
        if self.memory_efficiency is not None:
            out["memory_efficiency"] = self.memory_efficiency
        if self.memory_bandwidth is not None:
            out["memory_bandwidth_gbs"] = self.memory_bandwidth / 1e9
        if self.exchange_bytes_per_token is not None:
            out["exchange_bytes_per_token"] = self.exchange_bytes_per_token
        if self.exchange_overhead_s:
            out["exchange_overhead_s"] = self.exchange_overhead_s
        out["allreduce"] = {str(n): [list(p) for p in t] for n, t in sorted(self.allreduce.items())}
        if self.latency_steps:
            out["allreduce_latency_steps"] = {
                str(n): [list(p) for p in t] for n, t in sorted(self.latency_steps.items())
            }
        return out


def _table(value: Any, where: str) -> Table:
    """A number (constant) or a list of [x, seconds] pairs -> sorted table."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise MoeClusterError(f"{where}: time must be >= 0 seconds")
        return ((1.0, float(value)),)
    if not isinstance(value, list) or not value:
        raise MoeClusterError(f"{where}: expected seconds or a non-empty list of [x, seconds]")
    pts = []
    for item in value:
        ok = isinstance(item, (list, tuple)) and len(item) == 2
        if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item):
            raise MoeClusterError(f"{where}: each entry must be [x, seconds], got {item!r}")
        if item[0] < 0 or item[1] < 0:
            raise MoeClusterError(f"{where}: x and seconds must be >= 0, got {item!r}")
        pts.append((float(item[0]), float(item[1])))
    xs = [p[0] for p in pts]
    if len(set(xs)) != len(xs):
        raise MoeClusterError(f"{where}: duplicate x values {sorted(xs)}")
    return tuple(sorted(pts))


def profile_from_dict(data: Any, where: str = "profile") -> Profile:
    """Validate a parsed profile JSON object; errors say which field to fix."""
    if not isinstance(data, dict):
        raise MoeClusterError(f"{where}: expected a JSON object")
    if data.get("format") != FORMAT:
        raise MoeClusterError(f"{where}: 'format' must be {FORMAT!r} (write it with moecluster calibrate)")
    if data.get("version") != VERSION:
        raise MoeClusterError(f"{where}: unsupported version {data.get('version')!r}; expected {VERSION}")
    times_raw = data.get("times_s", {})
    if not isinstance(times_raw, dict):
        raise MoeClusterError(f"{where}: 'times_s' must be an object")
    unknown = set(times_raw) - set(TIME_KEYS)
    if unknown:
        raise MoeClusterError(f"{where}: unknown times_s keys {sorted(unknown)}; known: {', '.join(TIME_KEYS)}")
    times = {k: _table(v, f"{where}: times_s.{k}") for k, v in times_raw.items()}
    allreduce = _world_tables(data, "allreduce", "[[bytes, seconds], ...]", where)
    steps = _world_tables(data, "allreduce_latency_steps", "[[bytes, steps], ...]", where)
    network = data.get("network")
    if allreduce and not isinstance(network, str):
        raise MoeClusterError(
            f"{where}: 'network' (the --network name it was measured on) is required with 'allreduce'"
        )
    eff = data.get("memory_efficiency")
    if eff is not None and (not isinstance(eff, (int, float)) or not 0 < eff <= 1):
        raise MoeClusterError(f"{where}: memory_efficiency must be in (0, 1]")
    bandwidth = _positive(data, "memory_bandwidth_gbs", where)
    meta = {k: v for k, v in data.items() if k in META_KEYS}
    return Profile(
        times=times,
        allreduce=allreduce,
        network=network,
        memory_efficiency=eff,
        meta=meta,
        path=where,
        memory_bandwidth=None if bandwidth is None else bandwidth * 1e9,
        exchange_bytes_per_token=_positive(data, "exchange_bytes_per_token", where),
        latency_steps=steps,
        exchange_overhead_s=_positive(data, "exchange_overhead_s", where) or 0.0,
    )


def _world_tables(data: dict[str, Any], key: str, form: str, where: str) -> dict[int, Table]:
    """{"2": table, "4": table} -> {2: table, 4: table}, checked."""
    raw = data.get(key, {})
    if not isinstance(raw, dict):
        raise MoeClusterError(f"{where}: '{key}' must map world size -> {form}")
    out: dict[int, Table] = {}
    for n, value in raw.items():
        if not str(n).isdigit() or int(n) < 2:
            raise MoeClusterError(f"{where}: {key} key {n!r} must be a world size >= 2")
        out[int(n)] = _table(value, f"{where}: {key}.{n}")
    return out


def _positive(data: dict[str, Any], key: str, where: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise MoeClusterError(f"{where}: {key} must be a number > 0")
    return float(value)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise MoeClusterError(f"cannot read profile {p}: {e}") from e
    except json.JSONDecodeError as e:
        raise MoeClusterError(f"profile {p} is not valid JSON ({e}); re-run moecluster calibrate") from e
    return replace(profile_from_dict(data, where=f"profile {p}"), path=str(p))
