"""Expert, tensor and pipeline parallelism (and hybrids) under one cost model (docs/perfmodel.md).

A layout splits N nodes into PP stages x EP groups x TP shards (N = P x E x T):

- PP: each stage holds L/P consecutive layers; a token passes every stage in turn, so a decode step
  costs the whole model's compute plus P - 1 point-to-point hops of B x D activations (no speedup at
  batch 1, memory scales; no overlap of sequences across stages is modelled, as llama.cpp RPC).
- EP (ours): every rank runs attention/router/norms/head; routed experts are split over E groups;
  one all-reduce of B x D per MoE layer.
- TP (exo, mlx-lm): each of T shards reads 1/T of attention (and its KV cache, except MLA's
  shared latent), of shared/dense MLPs and of every active expert; two all-reduces of B x D per
  layer (after attention, after the MLP/MoE). Embedding, lm_head and router are not split.
- EP x TP: experts split over E groups and each expert over the T shards of its group; one
  all-reduce over the E x T ranks after each MoE layer (both are partial sums), plus TP's
  all-reduce after attention over T. PP x EP: stages of E expert-parallel ranks.

Every term is the same roofline as `predict` (bytes / effective bandwidth vs FLOPs / effective
FLOPs, with the engine's per-exchange and per-expert overheads); pure EP is `predict` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from moecluster.errors import MoeClusterError
from moecluster.perfmodel.network import allreduce_time
from moecluster.perfmodel.predict import (
    Breakdown,
    Memory,
    Prediction,
    Workload,
    _experts,
    _head,
    _notes,
    _sampling,
    message_time,
    predict,
    roofline,
)
from moecluster.perfmodel.presets import NetworkSpec, NodeSpec
from moecluster.perfmodel.profile import Profile
from moecluster.perfmodel.routing import contiguous_groups, uniform_rank_load
from moecluster.perfmodel.shapes import ModelShape

KINDS: tuple[str, ...] = ("ep", "tp", "pp", "ep+tp", "pp+ep")


@dataclass(frozen=True)
class Layout:
    """P pipeline stages x E expert-parallel groups x T tensor-parallel shards."""

    pp: int = 1
    ep: int = 1
    tp: int = 1

    @property
    def nodes(self) -> int:
        return self.pp * self.ep * self.tp

    @property
    def name(self) -> str:
        parts = [(k, v) for k, v in (("pp", self.pp), ("ep", self.ep), ("tp", self.tp)) if v > 1]
        if len(parts) <= 1:
            return parts[0][0] if parts else "single"
        return "x".join(f"{k}{v}" for k, v in parts)


def parse_parallelism(spec: str) -> list[str]:
    """'ep,tp,pp' -> kinds; 'all' -> every kind."""
    kinds = list(KINDS) if spec.strip() == "all" else [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise MoeClusterError(f"bad --parallelism {spec!r}: use a comma list of {', '.join(KINDS)} (or all)")
    return kinds


def layouts(kinds: list[str], nodes: int) -> list[Layout]:
    """Layouts of `nodes` for each kind; hybrids take every split with both factors > 1."""
    if nodes == 1:
        return [Layout()]
    out: list[Layout] = []
    splits = [f for f in range(2, nodes) if nodes % f == 0]
    for kind in kinds:
        if kind == "ep":
            out.append(Layout(ep=nodes))
        elif kind == "tp":
            out.append(Layout(tp=nodes))
        elif kind == "pp":
            out.append(Layout(pp=nodes))
        elif kind == "ep+tp":
            out += [Layout(ep=nodes // t, tp=t) for t in splits]
        else:
            out += [Layout(pp=p, ep=nodes // p) for p in splits]
    return out


def _mla(shape: ModelShape) -> bool:
    """MLA caches one latent per token shared by all heads: tensor parallelism cannot split it."""
    return shape.model_type.startswith("deepseek")


def _attention(shape: ModelShape, node: NodeSpec, tp: int, tokens: int, kv_read: float, pairs: float) -> float:
    kv_split = 1 if _mla(shape) else tp
    kv_bytes = kv_read * shape.kv_elems_per_token * shape.act_bytes / kv_split
    num_bytes = shape.attn_params * shape.dense_bytes_per_weight / tp + kv_bytes
    flops = (2 * shape.attn_params * tokens + 2 * shape.num_heads * shape.attn_score_dim * pairs) / tp
    return roofline(node, num_bytes, flops)


def _allreduce(node: NodeSpec, network: NetworkSpec, ranks: int, message: float) -> float:
    return message_time(node, network, ranks, message)[0]


def _hop(node: NodeSpec, network: NetworkSpec, message: float) -> float:
    """One point-to-point send of `message` bytes between pipeline stages."""
    latency = network.latency_s + (node.tcp_extra_latency_s if network.transport == "tcp" else 0.0)
    return allreduce_time(2, message, latency, network.bandwidth, "recursive_doubling")[0] + node.exchange_overhead_s


def layout_step(
    shape: ModelShape,
    node: NodeSpec,
    network: NetworkSpec,
    lay: Layout,
    tokens: int,
    kv_read: float,
    pairs: float,
    head_positions: int,
) -> Breakdown:
    """One forward over `tokens` tokens (a decode step of B, or a prefill of P) under layout `lay`."""
    t, group = lay.tp, lay.ep * lay.tp
    load = uniform_rank_load(shape.num_experts, shape.top_k, tokens, lay.ep)
    msg = shape.exchange_bytes(tokens)
    mlp = (shape.num_moe_layers * shape.shared_params + shape.num_dense_layers * shape.dense_mlp_params) / t
    moe_exchange = _allreduce(node, network, group, msg) + (_allreduce(node, network, t, msg) if t > 1 else 0.0)
    dense_exchange = 2 * _allreduce(node, network, t, msg) if t > 1 else 0.0
    hops = (lay.pp - 1) * _hop(node, network, msg)
    return Breakdown(
        attention=shape.num_layers * _attention(shape, node, t, tokens, kv_read, pairs),
        router=shape.num_moe_layers
        * roofline(node, shape.router_params * shape.weight_bytes, 2 * shape.router_params * tokens),
        dense_mlp=roofline(node, mlp * shape.dense_bytes_per_weight, 2 * mlp * tokens) if mlp else 0.0,
        experts=shape.num_moe_layers * _experts(shape, node, load, shards=t),
        exchange=shape.num_moe_layers * moe_exchange + shape.num_dense_layers * dense_exchange + hops,
        head=_head(shape, node, head_positions),
        sampling=_sampling(shape, node, head_positions) + message_time(node, network, lay.nodes, 8 * (tokens + 1))[0],
    )


def profiled_step(
    shape: ModelShape, node: NodeSpec, network: NetworkSpec, lay: Layout, wl: Workload, profile: Profile
) -> Breakdown:
    """A decode step of B tokens under `lay` from an expert-parallel calibration: its measured per-layer
    terms split as the layout splits them (attention, dense MLPs and each expert's work by T; every stage
    of a pipeline runs its layers in turn), the layout's messages through the profile's all-reduce table
    (a point-to-point hop timed as a 2-rank all-reduce), analytic terms where the profile has none."""
    b, t = wl.batch, lay.tp
    base = layout_step(shape, node, network, lay, b, b * wl.context, b * wl.context, b)

    def measured(key: str, x: float, fallback: float, scale: float) -> float:
        value = profile.time(key, x)
        return fallback if value is None else scale * value

    def exchange(ranks: int, message: float) -> float:
        seconds, algo = message_time(node, network, ranks, message, profile)
        return seconds + (profile.exchange_overhead_s if algo == "measured" else 0.0)

    load = uniform_rank_load(shape.num_experts, shape.top_k, b, lay.ep)
    ratio = load.evaluations / load.distinct if load.distinct else 1.0
    per_eval = profile.time("expert_eval", ratio)
    experts = base.experts if per_eval is None else shape.num_moe_layers * load.distinct * per_eval / t
    msg = shape.exchange_bytes(b)
    ep_msg = profile.exchange_bytes_per_token * b if profile.exchange_bytes_per_token else msg
    moe_ex = (exchange(lay.ep * t, ep_msg if lay.ep > 1 else msg) if lay.ep * t > 1 else 0.0) + (
        exchange(t, msg) if t > 1 else 0.0
    )
    dense_ex = 2 * exchange(t, msg) if t > 1 else 0.0
    return Breakdown(
        attention=measured("attention_per_layer", b, base.attention, shape.num_layers / t),
        router=measured("router_per_layer", b, base.router, shape.num_moe_layers),
        dense_mlp=measured("dense_mlp_per_layer", b, base.dense_mlp, shape.num_layers / t),
        experts=experts,
        exchange=shape.num_moe_layers * moe_ex + shape.num_dense_layers * dense_ex + (lay.pp - 1) * exchange(2, msg),
        head=measured("head", b, base.head, 1.0),
        sampling=measured("sampling", b, _sampling(shape, node, b), 1.0)
        + message_time(node, network, lay.nodes, 8 * (b + 1), profile)[0],
    )


def layout_memory(shape: ModelShape, node: NodeSpec, lay: Layout, wl: Workload) -> Memory:
    """Bytes on the fullest node: its stage's layers (sharded by TP), its experts, KV, embedding/head."""
    t, stages = lay.tp, lay.pp
    layers, moe = math.ceil(shape.num_layers / stages), math.ceil(shape.num_moe_layers / stages)
    dense = min(shape.num_dense_layers, layers)
    quantizable = layers * shape.attn_params / t + moe * shape.shared_params / t + dense * shape.dense_mlp_params / t
    params = layers * 2 * shape.d_model + moe * shape.router_params
    head = 0 if shape.tie_embeddings else shape.head_params * shape.head_bytes_per_weight
    embed = shape.embed_params * shape.weight_bytes
    ends = embed + head if stages == 1 else max(embed, head)
    most = max(contiguous_groups(shape.num_experts, lay.ep))
    kv_split = 1 if _mla(shape) else t
    return Memory(
        replicated=params * shape.weight_bytes + quantizable * shape.dense_bytes_per_weight + ends,
        experts=most * moe * shape.expert_bytes / t,
        kv_cache=wl.batch
        * wl.context
        * shape.num_layers
        * shape.kv_elems_per_token
        * shape.act_bytes
        * layers
        / shape.num_layers
        / kv_split,
        overhead=node.runtime_overhead_bytes,
        limit=node.usable_memory_bytes,
    )


def predict_layout(
    shape: ModelShape,
    node: NodeSpec,
    network: NetworkSpec,
    lay: Layout,
    workload: Workload | None = None,
    profile: Profile | None = None,
    price_usd: float | None = None,
    **ep_kwargs,
) -> Prediction:
    """Predict one layout; pure expert parallelism (and one node) is `predict` (profile, placements)."""
    wl = workload or Workload()
    if lay.pp == 1 and lay.tp == 1:
        pred = predict(shape, node, network, lay.nodes, wl, profile, price_usd=price_usd, **ep_kwargs)
        pred.parallelism = lay.name
        return pred
    b, c, p = wl.batch, wl.context, wl.prompt
    if profile is not None:  # as predict does: the profile's memory terms replace the node's
        node = replace(
            node,
            mem_efficiency=profile.memory_efficiency or node.mem_efficiency,
            mem_bandwidth=profile.memory_bandwidth or node.mem_bandwidth,
        )
    step = (
        layout_step(shape, node, network, lay, b, b * c, b * c, b)
        if profile is None
        else profiled_step(shape, node, network, lay, wl, profile)
    )
    prefill = layout_step(shape, node, network, lay, p, p, p * (p + 1) / 2, 1)
    mem = layout_memory(shape, node, lay, wl)
    n = lay.nodes
    price = n * node.price_usd + network.price(n) if price_usd is None else price_usd
    notes = _notes(shape, node, network, n, mem)
    if lay.pp > 1 and b > 1:
        notes.append("pipeline: sequences are not overlapped across stages (one step passes every stage)")
    if profile is not None:
        notes.append("decode from the expert-parallel profile's terms split by the layout; prefill analytic")
    return Prediction(
        model=shape.name,
        node=node.name,
        network=network.name,
        nodes=n,
        workload=wl,
        step=step,
        prefill=prefill,
        memory=mem,
        load=uniform_rank_load(shape.num_experts, shape.top_k, b, lay.ep),
        algorithm="ring/rd" if lay.tp > 1 or lay.ep > 1 else "p2p",
        price_usd=price,
        notes=notes,
        engine=node.engine or "preset",
        parallelism=lay.name,
    )
