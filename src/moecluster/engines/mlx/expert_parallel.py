"""Expert parallelism for mlx-lm models, as a transformation of a loaded model (the torch engine's, in MLX).

`apply_expert_parallel(model, comm, placement)` replaces each MoE layer's SwitchGLU (found by class, see
loading.switch_layers) with ExpertParallelSwitch: it holds only this rank's experts (replicas included),
computes only the (token, expert) pairs `placement.assign` gives this rank, and all-reduces the per-pair
outputs y_NKD with ONE `mx.distributed.all_sum` per layer (MlxComm.all_sum: under the watchdog). Every pair
has exactly one non-zero contributor, so the sum is exact (adding zeros is exact) and the model's own weighted
combine that follows sees the same y_NKD on any rank count and placement: output is bit-identical.

Shape legend: N tokens (flattened batch), D model dim, F expert hidden, K top-k, E experts, e local experts,
P pairs computed here.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from moecluster.engines.mlx.comm import MlxComm
from moecluster.engines.mlx.loading import switch_layers
from moecluster.engines.mlx.stacked import StackedRows
from moecluster.errors import MoeClusterError
from moecluster.parallel.placement import Placement
from moecluster.tracing import TRACER, now


def _keep_rows(proj: nn.Module, experts: list[int], num_experts: int, prefix: str, disk: StackedRows | None) -> None:
    """Keep only rows `experts` of every per-expert array of a (Quantized)SwitchLinear (weight, scales, biases,
    bias): read from disk if the loader deferred it (prefix: its name up to the array), else sliced."""
    rows = mx.array(experts, dtype=mx.uint32)
    for name, value in list(proj.items()):
        if isinstance(value, mx.array) and value.ndim >= 1 and value.shape[0] == num_experts:
            read = disk.read(f"{prefix}.{name}", experts) if disk is not None else None
            proj[name] = value[rows] if read is None else read.astype(value.dtype)  # value: dtype after --dtype


class ExpertParallelSwitch(nn.Module):
    """This rank's share of one SwitchGLU + the one exchange: (x [..., D], indices [..., K]) -> y [..., K, D],
    the SwitchGLU contract, so the model's MoE block (routing and combine) runs unchanged."""

    def __init__(
        self,
        switch: Any,
        experts: list[int],
        placement: Placement,
        index: int,
        layer: tuple[int, str],
        comm: MlxComm,
        disk: StackedRows | None = None,
    ):
        super().__init__()
        self.num_experts = switch.gate_proj.weight.shape[0]
        for name in ("gate_proj", "up_proj", "down_proj"):
            proj = getattr(switch, name)
            _keep_rows(proj, experts, self.num_experts, f"layers.{layer[0]}.{layer[1]}.{name}", disk)
            setattr(self, name, proj)
        layer_id = layer[0]
        self.activation = switch.activation
        self.expert_ids = list(experts)
        self._local_of = {e: i for i, e in enumerate(experts)}
        self._placement, self._index, self._comm = placement, index, comm
        self.layer_id = layer_id  # decoder layer (tracing's); _index is the MoE-layer index (placement's)
        self.rank, self.world_size = comm.rank, comm.world_size
        self.last_num_pairs = 0
        self.last_num_evaluated = 0  # distinct local experts the last call used (bytes read)
        self.recorder: Any = None  # .record(moe index, ids_NK) with every call's routing (metrics, stats)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        K, D = indices.shape[-1], x.shape[-1]
        traced = TRACER.enabled
        t0 = now()
        if traced:  # x: attention and norms of this layer (and all before); then the router alone
            mx.eval(x)
            TRACER.add(self.layer_id, "attention", now() - t0)
            t0 = now()
        ids_NK: list[list[int]] = indices.reshape(-1, K).tolist()  # type: ignore[assignment]  # routing decided on every rank alike: lists for assign()
        if traced:
            TRACER.add(self.layer_id, "router", now() - t0)
            t0 = now()
        if self.recorder is not None:
            self.recorder.record(self._index, ids_NK)
        owner_NK = self._placement.assign(self._index, ids_NK)
        pairs = [n * K + k for n, row in enumerate(owner_NK) for k, r in enumerate(row) if r == self.rank]
        self.last_num_pairs = len(pairs)
        self.last_num_evaluated = len({ids_NK[p // K][p % K] for p in pairs})
        y_PD = self._pairs(x.reshape(-1, D), ids_NK, pairs) if pairs else None
        y_flat = mx.zeros((len(ids_NK) * K, D), dtype=x.dtype if y_PD is None else y_PD.dtype)
        if y_PD is not None:
            y_flat[mx.array(pairs, dtype=mx.uint32)] = y_PD
        t1 = now()
        if traced:
            mx.eval(y_flat)
            t1 = now()
            TRACER.add(self.layer_id, "experts", t1 - t0)
            TRACER.count_evals(self.layer_id, self.last_num_evaluated, add=True)  # a step's rows: one forward each
        # the one exchange, exact; collectives never time out: the comm evaluates it under the watchdog
        y_flat = self._comm.all_sum(y_flat, f"the all-reduce of MoE layer {self._index}")
        if traced and self.world_size > 1:
            TRACER.add(self.layer_id, "all_reduce", now() - t1)
        return y_flat.reshape(*indices.shape, D)

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (quantized: packed weights, scales and biases included)."""
        total = sum(a.nbytes for _, a in tree_flatten(self.parameters()) if isinstance(a, mx.array))
        return total // max(1, len(self.expert_ids))

    def _pairs(self, x_ND: mx.array, ids_NK: list[list[int]], pairs: list[int]) -> mx.array:
        """y_PD: each of this rank's pairs through its expert, one [1, D] row per pair (as SwitchGLU does)."""
        K = len(ids_NK[0])
        try:
            local = [self._local_of[ids_NK[p // K][p % K]] for p in pairs]
        except KeyError as e:
            raise MoeClusterError(
                f"internal: expert {e.args[0]} was assigned to rank {self.rank}, which does "
                f"not hold it (MoE layer {self._index})"
            ) from None
        x_P1D = x_ND[mx.array([p // K for p in pairs], dtype=mx.uint32)][:, None, :]
        rows = mx.array(local, dtype=mx.uint32)
        me: Any = self  # mlx's Module stubs type sub-modules as optional
        h_P1F = me.activation(me.up_proj(x_P1D, rows), me.gate_proj(x_P1D, rows))
        return me.down_proj(h_P1F, rows)[:, 0, :]


def apply_expert_parallel(
    model: Any, comm: MlxComm, placement: Placement, disk: StackedRows | None = None
) -> nn.Module:
    """Swap every SwitchGLU of `model` for this rank's ExpertParallelSwitch and evaluate the kept weights layer
    by layer (a lazily loaded model reads only these experts; disk: the loader's deferred stacked arrays).
    Returns the model."""
    found = switch_layers(model)
    if not found:
        raise MoeClusterError("the model has no SwitchGLU MoE layers (or expert parallelism was already applied)")
    num_experts = found[0][2].gate_proj.weight.shape[0]  # type: ignore[union-attr]
    want = (num_experts, len(found), comm.world_size)
    if (placement.num_experts, placement.num_layers, placement.world_size) != want:
        raise MoeClusterError(
            f"placement is for {placement.num_experts} experts x {placement.num_layers} MoE layers on "
            f"{placement.world_size} ranks, but the model has {want[0]} x {want[1]} and the job has {want[2]} "
            "ranks; make a placement for this model and rank count"
        )
    for index, (layer, path, switch) in enumerate(found):
        *parents, attr = path.split(".")
        parent = model.layers[layer]
        for name in parents:
            parent = parent[int(name)] if isinstance(parent, list) else getattr(parent, name)
        experts = placement.experts_of(comm.rank, index)
        ep = ExpertParallelSwitch(switch, experts, placement, index, (layer, path), comm, disk)
        setattr(parent, attr, ep)
        mx.eval(ep.parameters())
    mx.eval(model.parameters())
    return model


def expert_parallel_layers(model: Any) -> list[ExpertParallelSwitch]:
    """The ExpertParallelSwitch modules of a transformed model, in MoE-layer order."""
    return [m for layer in model.layers for _, m in layer.named_modules() if isinstance(m, ExpertParallelSwitch)]
