"""Predict decode step time, prefill / TTFT, memory per node and cost for an expert-parallel cluster.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, L layers, V vocab,
N ranks (one per node), B batch (sequences decoded together), C context (KV length).

One decode step (B tokens, one per sequence), as in the engine (see docs/design.md):

    step = sum over layers of (attention + router + dense/shared MLP
                               + slowest rank's expert work + exchange [MoE layers only])
           + head (final norm, lm_head, embedding rows) + sampling

Every compute term is a roofline: max(bytes read / (mem_bw x mem_efficiency),
FLOPs / (peak x compute_efficiency)). Attention reads its weights and the KV cache (B x C
tokens); the slowest rank reads the distinct experts it owns that the batch selects and computes
its (token, expert) pairs (`routing.uniform_rank_load`, or a placement's load). The exchange is
one all-reduce of B x D activations per MoE layer (`network.allreduce_time`; a profile may give
the engine's real bytes per token), with per-step latency = network latency + the node's extra
TCP-stack latency (TCP transports only), plus the node's fixed per-exchange overhead (device
sync). Sampling includes rank 0's broadcast of the B sampled tokens (timed as an all-reduce of
8 x (B + 1) bytes) when N > 1: the other ranks start the next step that much later. Terms a
calibrated `Profile` measured replace the analytic ones.

Prefill of P prompt tokens is the same sum with T = P (attention FLOPs ~ P^2/2), usually
compute-bound; TTFT = prefill (head on the last position only) + sampling.

Assumed efficiency factors (node presets, each with its source): Apple GPUs stream weights at
0.69 of peak bandwidth and reach 0.62 of estimated peak FLOPs (llama.cpp on M2 Ultra); the
2-core Linux box 0.65 (measured here); H100 0.8 / 0.6 (estimates). Exchange costs: network
latency per step (10GbE TCP 25 us), + 100 us per step for the macOS TCP stack, + 50 us per
exchange for the Metal sync (both estimates). With these, DBRX bf16 on M2 Ultras over 10GbE
predicts 10.1 tok/s at 2 nodes (comm 7.5%) and 11.8 tok/s at 4 (comm 15%) at batch 1; the
paper measured single-digit to low-teens tok/s with comm 23% / 33%, so its MLX/MPI stack paid
about 2-3x more per exchange than these presets assume. `calibrate` measures the real cost.
Not modelled: overlap of communication with compute, kernel-launch overheads beyond the
efficiency factors, prefill chunking, speculative decoding, and non-uniform (real) routing
unless a placement's load is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from moecluster.errors import MoeClusterError
from moecluster.perfmodel.network import allreduce_time
from moecluster.perfmodel.presets import NetworkSpec, NodeSpec
from moecluster.perfmodel.profile import Profile
from moecluster.perfmodel.routing import (
    RankLoad,
    contiguous_groups,
    load_from_evaluations,
    uniform_rank_load,
)
from moecluster.perfmodel.shapes import ModelShape

SAMPLING_PASSES = 3  # softmax, top-p/top-k selection, draw: passes over fp32 logits
TERMS = ("attention", "router", "dense_mlp", "experts", "exchange", "head", "sampling")


@dataclass(frozen=True)
class Workload:
    """What is asked of the cluster: B sequences, KV context C per sequence, prompt length P."""

    batch: int = 1
    context: int = 2048
    prompt: int = 512

    def __post_init__(self) -> None:
        if self.batch < 1 or self.context < 1 or self.prompt < 1:
            raise MoeClusterError("batch, context and prompt must be >= 1")


@dataclass
class Breakdown:
    """Seconds per step for each term, summed over layers."""

    attention: float = 0.0
    router: float = 0.0
    dense_mlp: float = 0.0
    experts: float = 0.0
    exchange: float = 0.0
    head: float = 0.0
    sampling: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, t) for t in TERMS)

    def shares(self) -> dict[str, float]:
        total = self.total or 1.0
        return {t: getattr(self, t) / total for t in TERMS}


@dataclass
class Memory:
    """Bytes one node holds (the node with the most experts) and whether it fits."""

    replicated: float
    experts: float
    kv_cache: float
    overhead: float
    limit: float

    @property
    def total(self) -> float:
        return self.replicated + self.experts + self.kv_cache + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.limit


@dataclass
class Prediction:
    """Everything plan reports for one (node kind, node count, network) configuration."""

    model: str
    node: str
    network: str
    nodes: int
    workload: Workload
    step: Breakdown
    prefill: Breakdown
    memory: Memory
    load: RankLoad
    algorithm: str
    price_usd: float
    notes: list[str] = field(default_factory=list)
    engine: str = ""
    parallelism: str = "ep"

    @property
    def tokens_per_s(self) -> float:
        """Aggregate decode throughput: B tokens per step."""
        return self.workload.batch / self.step.total

    @property
    def ttft_s(self) -> float:
        return self.prefill.total

    @property
    def comm_share(self) -> float:
        return self.step.shares()["exchange"]

    @property
    def tokens_per_s_per_1000usd(self) -> float:
        return self.tokens_per_s / (self.price_usd / 1000.0) if self.price_usd > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        gb = 1e9
        return {
            "model": self.model,
            "node": self.node,
            "network": self.network,
            "nodes": self.nodes,
            "engine": self.engine,
            "parallelism": self.parallelism,
            "workload": asdict(self.workload),
            "fits": self.memory.fits,
            "decode_tok_s": self.tokens_per_s,
            "per_sequence_tok_s": 1.0 / self.step.total,
            "step_ms": self.step.total * 1e3,
            "breakdown_ms": {t: getattr(self.step, t) * 1e3 for t in TERMS},
            "shares": self.step.shares(),
            "comm_share": self.comm_share,
            "exchange_algorithm": self.algorithm,
            "slowest_rank_expert_evals_per_layer": self.load.evaluations,
            "slowest_rank_distinct_experts_per_layer": self.load.distinct,
            "prefill_s": self.prefill.total,
            "ttft_s": self.ttft_s,
            "prefill_tok_s": self.workload.prompt / self.prefill.total,
            "memory_gb": {
                "replicated": self.memory.replicated / gb,
                "experts": self.memory.experts / gb,
                "kv_cache": self.memory.kv_cache / gb,
                "overhead": self.memory.overhead / gb,
                "total": self.memory.total / gb,
                "usable": self.memory.limit / gb,
            },
            "price_usd": self.price_usd,
            "tok_s_per_1000usd": self.tokens_per_s_per_1000usd,
            "notes": list(self.notes),
        }


def roofline(node: NodeSpec, num_bytes: float, flops: float) -> float:
    """Seconds for an op that reads `num_bytes` and does `flops` on one node."""
    return max(num_bytes / node.effective_bandwidth, flops / node.effective_flops)


def _attention(shape: ModelShape, node: NodeSpec, tokens: int, kv_read: float, score_pairs: float) -> float:
    """One layer's attention: weights + KV read; projection FLOPs + score FLOPs."""
    num_bytes = shape.attn_params * shape.dense_bytes_per_weight + kv_read * shape.kv_elems_per_token * shape.act_bytes
    flops = 2 * shape.attn_params * tokens + 2 * shape.num_heads * shape.attn_score_dim * score_pairs
    return roofline(node, num_bytes, flops)


def _mlp(node: NodeSpec, params: int, weight_bytes: float, tokens: int) -> float:
    return roofline(node, params * weight_bytes, 2 * params * tokens) if params else 0.0


def _experts(shape: ModelShape, node: NodeSpec, load: RankLoad, shards: int = 1) -> float:
    """Slowest rank's routed experts in one layer (each expert split `shards` ways by tensor parallelism),
    plus the engine's software time per distinct expert."""
    work = roofline(
        node, load.distinct * shape.expert_bytes / shards, 2 * shape.expert_params * load.evaluations / shards
    )
    return work + load.distinct * node.per_expert_overhead_s


def _head(shape: ModelShape, node: NodeSpec, positions: int) -> float:
    """Final norm + lm_head on `positions` rows + embedding rows for them."""
    num_bytes = shape.head_params * shape.head_bytes_per_weight + 2 * positions * shape.d_model * shape.weight_bytes
    return roofline(node, num_bytes, 2 * shape.head_params * positions)


def _sampling(shape: ModelShape, node: NodeSpec, positions: int) -> float:
    return SAMPLING_PASSES * positions * shape.vocab_size * 4 / node.effective_bandwidth


def exchange_time(
    shape: ModelShape,
    node: NodeSpec,
    network: NetworkSpec,
    num_nodes: int,
    tokens: int,
    profile: Profile | None = None,
) -> tuple[float, str]:
    """(seconds, algorithm) for one MoE layer's all-reduce of T x D activations."""
    if num_nodes <= 1:
        return 0.0, "none"
    message = shape.exchange_bytes(tokens)
    if profile is not None and profile.exchange_bytes_per_token is not None:
        message = profile.exchange_bytes_per_token * tokens
    seconds, algo = message_time(node, network, num_nodes, message, profile)
    if algo == "measured" and profile is not None:  # the bare table is warm; the engine's exchange is not
        seconds += profile.exchange_overhead_s
    return seconds, algo


def message_time(
    node: NodeSpec,
    network: NetworkSpec,
    num_nodes: int,
    message: float,
    profile: Profile | None = None,
) -> tuple[float, str]:
    """(seconds, algorithm) for one all-reduce of `message` bytes: measured, else modelled."""
    if num_nodes <= 1:
        return 0.0, "none"
    measured = profile.allreduce_time(network.name, num_nodes, message) if profile else None
    if measured is not None:
        return measured, "measured"
    latency = network.latency_s + (node.tcp_extra_latency_s if network.transport == "tcp" else 0.0)
    seconds, algo = allreduce_time(
        num_nodes, message, latency, network.bandwidth, network.algorithm, network.topology == "mesh"
    )
    return seconds + node.exchange_overhead_s, algo


def _per_layer_mean(value: float | Sequence[float], shape: ModelShape, what: str) -> float:
    """One value, or one per MoE layer (averaged: the step sums over layers)."""
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        values = [float(v) for v in value]
        if len(values) != shape.num_moe_layers:
            raise MoeClusterError(f"{what} has {len(values)} values; the model has {shape.num_moe_layers} MoE layers")
        out = sum(values) / len(values)
    if out < 0:
        raise MoeClusterError(f"{what} must be >= 0")
    return out


def rank_load(
    shape: ModelShape,
    num_nodes: int,
    tokens: int,
    expert_load: float | Sequence[float] | None = None,
    expert_distinct: float | Sequence[float] | None = None,
) -> RankLoad:
    """Slowest-rank load per MoE layer; a placement's metrics override uniform routing.

    expert_load: expected max-rank (token, expert) evaluations per layer ("pairs");
    expert_distinct: expected max-rank distinct experts per layer (bytes read). Without the
    latter, distinct = min(evaluations, experts the largest rank owns).
    """
    if expert_load is None and expert_distinct is None:
        return uniform_rank_load(shape.num_experts, shape.top_k, tokens, num_nodes)
    if expert_load is None:
        evals = uniform_rank_load(shape.num_experts, shape.top_k, tokens, num_nodes).evaluations
    else:
        evals = _per_layer_mean(expert_load, shape, "expert_load_per_layer")
    if expert_distinct is None:
        return load_from_evaluations(evals, shape.num_experts, num_nodes)
    distinct = _per_layer_mean(expert_distinct, shape, "expert_distinct_per_layer")
    return RankLoad(evals, min(distinct, evals))


def _decode_step(
    shape: ModelShape,
    node: NodeSpec,
    network: NetworkSpec,
    num_nodes: int,
    workload: Workload,
    load: RankLoad,
    profile: Profile | None,
) -> tuple[Breakdown, str]:
    """One decode step over B sequences; measured profile terms replace analytic ones."""
    b, c = workload.batch, workload.context
    p = profile
    measured = (lambda key, x: p.time(key, x)) if p else (lambda key, x: None)
    attn = measured("attention_per_layer", b)
    attn = _attention(shape, node, b, b * c, b * c) if attn is None else attn
    router = measured("router_per_layer", b)
    router = _mlp(node, shape.router_params, shape.weight_bytes, b) if router is None else router
    per_eval = measured("expert_eval", load.evaluations / load.distinct) if load.distinct > 0 else None
    experts = _experts(shape, node, load) if per_eval is None else load.distinct * per_eval
    dense = measured("dense_mlp_per_layer", b)
    if dense is None:
        moe_shared = shape.num_moe_layers * _mlp(node, shape.shared_params, shape.dense_bytes_per_weight, b)
        dense_layers = shape.num_dense_layers * _mlp(node, shape.dense_mlp_params, shape.dense_bytes_per_weight, b)
        dense_total = moe_shared + dense_layers
    else:
        dense_total = shape.num_layers * dense
    exch, algo = exchange_time(shape, node, network, num_nodes, b, profile)
    head = measured("head", b)
    sampling = measured("sampling", b)
    sampling = _sampling(shape, node, b) if sampling is None else sampling
    sampling += message_time(node, network, num_nodes, 8 * (b + 1), profile)[0]  # token broadcast
    step = Breakdown(
        attention=shape.num_layers * attn,
        router=shape.num_moe_layers * router,
        dense_mlp=dense_total,
        experts=shape.num_moe_layers * experts,
        exchange=shape.num_moe_layers * exch,
        head=_head(shape, node, b) if head is None else head,
        sampling=sampling,
    )
    return step, algo


def _prefill(
    shape: ModelShape,
    node: NodeSpec,
    network: NetworkSpec,
    num_nodes: int,
    workload: Workload,
    profile: Profile | None,
) -> Breakdown:
    """One forward over P prompt tokens (per sequence), head on the last position only."""
    t = workload.prompt
    load = uniform_rank_load(shape.num_experts, shape.top_k, t, num_nodes)
    exch, _ = exchange_time(shape, node, network, num_nodes, t, profile)
    dense = shape.num_moe_layers * _mlp(node, shape.shared_params, shape.dense_bytes_per_weight, t)
    dense += shape.num_dense_layers * _mlp(node, shape.dense_mlp_params, shape.dense_bytes_per_weight, t)
    return Breakdown(
        attention=shape.num_layers * _attention(shape, node, t, t, t * (t + 1) / 2),
        router=shape.num_moe_layers * _mlp(node, shape.router_params, shape.weight_bytes, t),
        dense_mlp=dense,
        experts=shape.num_moe_layers * _experts(shape, node, load),
        exchange=shape.num_moe_layers * exch,
        head=_head(shape, node, 1),
        sampling=_sampling(shape, node, 1),
    )


def memory_per_node(shape: ModelShape, node: NodeSpec, num_nodes: int, workload: Workload) -> Memory:
    """Bytes on the node holding the most experts: replicated + experts + KV cache + overhead."""
    most = max(contiguous_groups(shape.num_experts, num_nodes))
    return Memory(
        replicated=shape.replicated_bytes,
        experts=most * shape.num_moe_layers * shape.expert_bytes,
        kv_cache=workload.batch * shape.kv_bytes(workload.context),  # sliding-window layers: the window only
        overhead=node.runtime_overhead_bytes,
        limit=node.usable_memory_bytes,
    )


def _notes(shape: ModelShape, node: NodeSpec, network: NetworkSpec, n: int, mem: Memory) -> list[str]:
    notes = []
    if not mem.fits:
        notes.append(f"does not fit: needs {mem.total / 1e9:.1f} GB per node, {mem.limit / 1e9:.1f} GB usable")
    if n > shape.num_experts:
        notes.append(f"{n - shape.num_experts} node(s) hold no experts (more nodes than experts)")
    if n > 1 and network.requires_thunderbolt > node.thunderbolt_version:
        notes.append(
            f"{network.name} needs Thunderbolt {network.requires_thunderbolt}; "
            f"{node.name} has {node.thunderbolt_version or 'none'}"
        )
    if n > 1 and network.topology == "mesh" and node.thunderbolt_ports and n - 1 > node.thunderbolt_ports:
        notes.append(
            f"a full mesh of {n} needs {n - 1} Thunderbolt ports per node; {node.name} has {node.thunderbolt_ports}"
        )
    if network.max_nodes and n > network.max_nodes:
        notes.append(f"{network.name} connects at most {network.max_nodes} ranks")
    if n > 1 and node.os == "macos" and network.transport == "rdma" and not network.requires_thunderbolt:
        notes.append(f"hypothetical on macOS: no {network.name} RDMA driver (modelled as in the paper)")
    return notes


def predict(
    shape: ModelShape,
    node: NodeSpec,
    network: NetworkSpec,
    num_nodes: int,
    workload: Workload | None = None,
    profile: Profile | None = None,
    expert_load_per_layer: float | Sequence[float] | None = None,
    price_usd: float | None = None,
    expert_distinct_per_layer: float | Sequence[float] | None = None,
) -> Prediction:
    """Predict one configuration: N nodes of `node` on `network` serving `shape`.

    expert_load_per_layer: expected max-rank expert evaluations per MoE layer for the decode batch
    (one value, or one per MoE layer) from a placement, and optionally the max-rank distinct
    experts per layer (`expert_distinct_per_layer`); default is uniform routing with contiguous
    placement. price_usd overrides nodes x node price + network price.
    """
    if num_nodes < 1:
        raise MoeClusterError(f"number of nodes must be >= 1, got {num_nodes}")
    workload = workload or Workload()
    if profile is not None and profile.memory_efficiency is not None:
        node = replace(node, mem_efficiency=profile.memory_efficiency)
    if profile is not None and profile.memory_bandwidth is not None:
        node = replace(node, mem_bandwidth=profile.memory_bandwidth)
    load = rank_load(shape, num_nodes, workload.batch, expert_load_per_layer, expert_distinct_per_layer)
    step, algo = _decode_step(shape, node, network, num_nodes, workload, load, profile)
    mem = memory_per_node(shape, node, num_nodes, workload)
    price = num_nodes * node.price_usd + network.price(num_nodes) if price_usd is None else price_usd
    notes = _notes(shape, node, network, num_nodes, mem)
    if profile and profile.network == network.name and num_nodes > 1 and algo != "measured":
        sizes = ", ".join(str(n) for n in sorted(profile.allreduce)) or "none"
        notes.append(f"exchange modelled, not measured (profile has all-reduce data for N = {sizes})")
    return Prediction(
        model=shape.name,
        node=node.name,
        network=network.name,
        nodes=num_nodes,
        workload=workload,
        step=step,
        prefill=_prefill(shape, node, network, num_nodes, workload, profile),
        memory=mem,
        load=load,
        algorithm=algo,
        price_usd=price,
        notes=notes,
        engine=node.engine or "preset",
    )
