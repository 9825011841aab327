"""Node, network, system and model presets, loaded from presets.json (every number has a source).

A user file in the same format (`plan --presets FILE`) adds entries or replaces built-in ones
by name. Numbers are stored as {"value": x, "source": "..."}; loading converts them to SI units
(bytes, bytes/s, FLOP/s, seconds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError

PRESETS_PATH = Path(__file__).with_name("presets.json")
GIB = float(1024**3)

# json field -> (attribute, factor to SI or None for integer counts, required)
_NODE_FIELDS = {
    "memory_gib": ("memory_bytes", GIB, True),
    "usable_memory_fraction": ("usable_memory_fraction", 1.0, True),
    "mem_bandwidth_gbs": ("mem_bandwidth", 1e9, True),
    "mem_efficiency": ("mem_efficiency", 1.0, True),
    "peak_tflops": ("peak_flops", 1e12, True),
    "compute_efficiency": ("compute_efficiency", 1.0, True),
    "price_usd": ("price_usd", 1.0, True),
    "runtime_overhead_gb": ("runtime_overhead_bytes", 1e9, True),
    "exchange_overhead_us": ("exchange_overhead_s", 1e-6, True),
    "tcp_extra_latency_us": ("tcp_extra_latency_s", 1e-6, True),
    "thunderbolt_version": ("thunderbolt_version", None, False),
    "thunderbolt_ports": ("thunderbolt_ports", None, False),
}
_NET_FIELDS = {
    "latency_us": ("latency_s", 1e-6, True),
    "bandwidth_gbit": ("bandwidth", 1e9 / 8, True),
    "price_per_node_usd": ("price_per_node_usd", 1.0, True),
    "price_per_link_usd": ("price_per_link_usd", 1.0, True),
    "requires_thunderbolt": ("requires_thunderbolt", None, False),
    "max_nodes": ("max_nodes", None, False),
}
SECTIONS = ("nodes", "networks", "systems", "models", "engines", "stacks")
ALGORITHMS = ("auto", "ring", "recursive_doubling", "rabenseifner")


@dataclass(frozen=True)
class NodeSpec:
    """One machine (one rank): memory, bandwidth, compute, price and comm overheads (SI units)."""

    name: str
    description: str
    memory_bytes: float
    usable_memory_fraction: float
    mem_bandwidth: float
    mem_efficiency: float
    peak_flops: float
    compute_efficiency: float
    price_usd: float
    runtime_overhead_bytes: float
    exchange_overhead_s: float
    tcp_extra_latency_s: float
    thunderbolt_version: int = 0
    thunderbolt_ports: int = 0
    os: str = "linux"
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    default_engine: str = ""
    engine: str = ""  # the engine whose efficiency terms this spec carries ("" = the preset's own)
    per_expert_overhead_s: float = 0.0  # software time per distinct expert evaluated per layer

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * self.usable_memory_fraction

    @property
    def effective_bandwidth(self) -> float:
        """Achieved weight-streaming bandwidth, bytes/s."""
        return self.mem_bandwidth * self.mem_efficiency

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.compute_efficiency


@dataclass(frozen=True)
class NetworkSpec:
    """Interconnect: per-step latency, effective bandwidth per direction, algorithm, price."""

    name: str
    description: str
    transport: str  # tcp | rdma | nvlink
    topology: str  # switched | mesh (direct cables between every pair)
    algorithm: str  # auto | ring | recursive_doubling | rabenseifner
    latency_s: float
    bandwidth: float  # bytes/s per direction
    price_per_node_usd: float
    price_per_link_usd: float
    requires_thunderbolt: int = 0
    max_nodes: int = 0
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def price(self, num_nodes: int) -> float:
        """Network cost for N nodes: per-node part plus cables (a mesh needs N(N-1)/2)."""
        if num_nodes <= 1:
            return 0.0
        links = num_nodes * (num_nodes - 1) // 2 if self.topology == "mesh" else 0
        return num_nodes * self.price_per_node_usd + links * self.price_per_link_usd


@dataclass(frozen=True)
class SystemSpec:
    """A reference system (e.g. 8xH100): node kind x count on a network, with a total price."""

    name: str
    description: str
    node: str
    nodes: int
    network: str
    price_usd: float
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    typical_batch: int = 1  # the batch the system is normally run at (sourced)


_EFF_FIELDS: dict[str, tuple[str, float | None, bool]] = {
    "mem_efficiency": ("mem_efficiency", 1.0, True),
    "compute_efficiency": ("compute_efficiency", 1.0, True),
    "peak_tflops": ("peak_flops", 1e12, False),
}
_OVERHEAD_FIELDS: dict[str, tuple[str, float | None, bool]] = {
    "exchange_overhead_us": ("exchange_overhead_s", 1e-6, True),
    "per_expert_overhead_us": ("per_expert_overhead_s", 1e-6, True),
}


@dataclass(frozen=True)
class EngineSpec:
    """An inference engine (or a published system's stack): efficiency per node kind + software overheads.

    efficiency: node preset name, node os or "default" -> {attribute: SI value} replacing the node's.
    """

    name: str
    description: str
    exchange_overhead_s: float
    per_expert_overhead_s: float
    efficiency: dict[str, dict[str, float]]
    base: str = ""  # a stack: the engine it runs on
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def on(self, node: NodeSpec) -> NodeSpec:
        """`node` with this engine's efficiency terms and overheads (error if it does not run there)."""
        eff = next((self.efficiency[k] for k in (node.name, node.os, "default") if k in self.efficiency), None)
        if eff is None:
            raise MoeClusterError(
                f"engine {self.name!r} has no efficiency terms for node {node.name!r} ({node.os}); it has them "
                f"for {', '.join(sorted(self.efficiency))} (add a calibration with --presets FILE)"
            )
        return replace(
            node,
            engine=self.name,
            exchange_overhead_s=self.exchange_overhead_s,
            per_expert_overhead_s=self.per_expert_overhead_s,
            **eff,
        )

    def source_lines(self, node: NodeSpec) -> list[str]:
        """Where this engine's numbers for `node` come from, one line per term."""
        key = next((k for k in (node.name, node.os, "default") if k in self.efficiency), "")
        return [f"{k}: {v}" for k, v in self.sources.items() if k.startswith(key + ".") or "." not in k]


@dataclass
class Presets:
    nodes: dict[str, NodeSpec]
    networks: dict[str, NetworkSpec]
    systems: dict[str, SystemSpec]
    models: dict[str, Any]
    engines: dict[str, EngineSpec] = field(default_factory=dict)
    stacks: dict[str, EngineSpec] = field(default_factory=dict)

    def node(self, name: str) -> NodeSpec:
        return _lookup(self.nodes, name, "node")

    def engine(self, name: str) -> EngineSpec:
        return _lookup(self.engines, name, "engine")

    def stack(self, name: str) -> EngineSpec:
        return _lookup(self.stacks, name, "stack")

    def resolve(self, node: NodeSpec, engine: str | None = None, stack: str | None = None) -> NodeSpec:
        """The node as run by `stack` (its engine + its overheads), else by `engine`, else its default engine."""
        if stack:
            spec = self.stack(stack)
            if engine and engine != spec.base:
                raise MoeClusterError(f"--stack {stack} runs on engine {spec.base}; drop --engine {engine}")
            base = self.engine(spec.base).on(node)
            return replace(
                base,
                engine=f"{spec.base}+{spec.name}",
                exchange_overhead_s=spec.exchange_overhead_s,
                per_expert_overhead_s=spec.per_expert_overhead_s,
            )
        name = engine or node.default_engine
        return self.engine(name).on(node) if name else node

    def network(self, name: str) -> NetworkSpec:
        return _lookup(self.networks, name, "network")


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    if name not in table:
        raise MoeClusterError(
            f"unknown {kind} preset {name!r}; choose one of: {', '.join(sorted(table))} (or add it with --presets FILE)"
        )
    return table[name]


def _numbers(entry: dict[str, Any], spec: dict[str, tuple[str, float | None, bool]], where: str):
    """Convert {"value", "source"} fields to SI attributes; returns (attrs, sources)."""
    attrs: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (attr, factor, required) in spec.items():
        if key not in entry:
            if required:
                raise MoeClusterError(f"{where}: missing '{key}' ({{'value': x, 'source': '...'}})")
            continue
        item = entry[key]
        if not isinstance(item, dict) or "value" not in item or not item.get("source"):
            raise MoeClusterError(f"{where}: '{key}' must be {{'value': number, 'source': 'text'}}")
        value = item["value"]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise MoeClusterError(f"{where}: '{key}' value must be a non-negative number")
        if factor is None and value != int(value):
            raise MoeClusterError(f"{where}: '{key}' must be a whole number")
        attrs[attr] = int(value) if factor is None else value * factor
        sources[key] = str(item["source"])
    return attrs, sources


def _node(name: str, entry: dict[str, Any]) -> NodeSpec:
    attrs, sources = _numbers(entry, _NODE_FIELDS, f"node preset {name!r}")
    return NodeSpec(
        name=name,
        description=entry.get("description", ""),
        sources=sources,
        os=str(entry.get("os", "linux")),
        default_engine=str(entry.get("default_engine", "")),
        **attrs,
    )


def _engine(name: str, entry: dict[str, Any], kind: str = "engine") -> EngineSpec:
    where = f"{kind} preset {name!r}"
    attrs, sources = _numbers(entry, _OVERHEAD_FIELDS, where)
    efficiency: dict[str, dict[str, float]] = {}
    raw = entry.get("efficiency", {})
    if kind == "engine" and (not isinstance(raw, dict) or not raw):
        raise MoeClusterError(f"{where}: needs 'efficiency': {{node name | os | 'default': {{mem_efficiency, ...}}}}")
    for key, terms in raw.items():
        eff, src = _numbers(terms, _EFF_FIELDS, f"{where} efficiency.{key}")
        efficiency[key] = eff
        sources.update({f"{key}.{k}": v for k, v in src.items()})
    return EngineSpec(
        name=name,
        description=entry.get("description", ""),
        efficiency=efficiency,
        base=str(entry.get("engine", "")),
        sources=sources,
        **attrs,
    )


def _stack(name: str, entry: dict[str, Any], engines: dict[str, EngineSpec]) -> EngineSpec:
    spec = _engine(name, entry, "stack")
    if spec.base not in engines:
        raise MoeClusterError(f"stack preset {name!r}: 'engine' must name an engine preset ({', '.join(engines)})")
    return spec


def _network(name: str, entry: dict[str, Any]) -> NetworkSpec:
    where = f"network preset {name!r}"
    attrs, sources = _numbers(entry, _NET_FIELDS, where)
    algorithm = entry.get("algorithm", "auto")
    if algorithm not in ALGORITHMS:
        raise MoeClusterError(f"{where}: algorithm must be one of {', '.join(ALGORITHMS)}")
    if attrs["bandwidth"] <= 0:
        raise MoeClusterError(f"{where}: bandwidth_gbit must be > 0")
    return NetworkSpec(
        name=name,
        description=entry.get("description", ""),
        sources=sources,
        transport=entry.get("transport", "tcp"),
        topology=entry.get("topology", "switched"),
        algorithm=algorithm,
        **attrs,
    )


def _system(name: str, entry: dict[str, Any]) -> SystemSpec:
    spec: dict[str, tuple[str, float | None, bool]] = {
        "price_usd": ("price_usd", 1.0, True),
        "nodes": ("nodes", None, True),
        "typical_batch": ("typical_batch", None, False),
    }
    attrs, sources = _numbers(entry, spec, f"system preset {name!r}")
    if "node" not in entry or "network" not in entry:
        raise MoeClusterError(f"system preset {name!r}: needs 'node' and 'network' preset names")
    return SystemSpec(
        name=name,
        description=entry.get("description", ""),
        node=str(entry["node"]),
        network=str(entry["network"]),
        sources=sources,
        **attrs,
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoeClusterError(f"cannot read presets file {path}: {e}") from e
    if not isinstance(data, dict):
        raise MoeClusterError(f"presets file {path}: expected a JSON object")
    return data


def load_presets(extra: str | Path | None = None) -> Presets:
    """Built-in presets, with entries from `extra` (same format) added or replacing by name."""
    raw = _read(PRESETS_PATH)
    if extra is not None:
        for section, entries in _read(Path(extra)).items():
            if section.startswith("_"):
                continue
            if section not in SECTIONS or not isinstance(entries, dict):
                raise MoeClusterError(f"presets file {extra}: unknown section {section!r}; use {', '.join(SECTIONS)}")
            raw.setdefault(section, {}).update(entries)
    engines = {k: _engine(k, v) for k, v in raw.get("engines", {}).items() if not k.startswith("_")}
    return Presets(
        engines=engines,
        stacks={k: _stack(k, v, engines) for k, v in raw.get("stacks", {}).items() if not k.startswith("_")},
        nodes={k: _node(k, v) for k, v in raw.get("nodes", {}).items()},
        networks={k: _network(k, v) for k, v in raw.get("networks", {}).items()},
        systems={k: _system(k, v) for k, v in raw.get("systems", {}).items()},
        models=dict(raw.get("models", {})),
    )
