"""Expert parallelism as a transformation of a loaded single-device model.

`apply_expert_parallel(model, comm, placement)` swaps each layer's MoEBlock for an
ExpertParallelMoE that keeps the replicated router, holds only this rank's experts, computes only the
(token, expert) pairs the placement assigns to this rank, and combines the ranks' partial outputs
with ONE all_reduce_sum per layer — an explicit call in forward, not a hook.

Shape legend: N tokens (flattened batch), D model dim, K top-k, E experts, e local experts.
"""

from __future__ import annotations

import torch
from torch import nn

from moecluster.errors import MoeClusterError
from moecluster.models.layers import GroupedExperts, MoEBlock, MoETransformer, combine
from moecluster.parallel.placement import Placement
from moecluster.tracing import TRACER, now


class ExpertParallelMoE(nn.Module):
    def __init__(self, router: nn.Module, experts: GroupedExperts, comm, placement: Placement, layer_id: int,
                 exchange: str = "exact"):
        super().__init__()
        self.exchange = exchange
        self.router = router
        self.experts = experts
        self.comm = comm
        self.placement = placement
        self.layer_id = layer_id
        self.rank = comm.rank
        self.last_num_evaluated = 0
        self.recorder = None  # routing statistics / metrics: .record(layer, ids_NK as lists)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        t0 = now()
        ids_NK, weights_NK = self.router(x_ND)
        ids = ids_NK.tolist()
        if self.recorder is not None:
            self.recorder.record(self.layer_id, ids)
        owner_NK = self.placement.assign(self.layer_id, ids)
        mine_NK = torch.tensor(owner_NK) == self.rank
        t1 = now()
        if self.exchange == "exact":
            out_NKD = self.comm.exchange_buffer((*ids_NK.shape, x_ND.shape[1]), x_ND.dtype)
            y_NKD, self.last_num_evaluated = self.experts(x_ND, ids_NK, mine_NK, out_NKD)
            t2 = now()
            y_NKD = self.comm.all_reduce_disjoint(y_NKD)  # the one exchange: one non-zero holder per pair, exact
            t3 = now()
            out_ND = combine(y_NKD, weights_NK, x_ND.dtype)
        else:
            y_NKD, self.last_num_evaluated = self.experts(x_ND, ids_NK, mine_NK)
            partial_ND = (y_NKD.float() * weights_NK[..., None]).sum(dim=1)
            t2 = now()
            out_ND = self.comm.all_reduce_sum(partial_ND).to(x_ND.dtype)  # the one exchange, fp32 partial sums
            t3 = now()
        TRACER.add(self.layer_id, "router", t1 - t0)
        TRACER.add(self.layer_id, "experts", t2 - t1)
        TRACER.add(self.layer_id, "all_reduce", t3 - t2)
        TRACER.count_evals(self.layer_id, self.last_num_evaluated)
        return out_ND


def _subset(experts: GroupedExperts, keep: list[int], args) -> GroupedExperts:
    """A GroupedExperts holding only `keep` (global ids), copied out of a fuller one."""
    rows = [experts.expert_ids.index(e) for e in keep]
    out = GroupedExperts(args, keep, dtype=experts.w13_eGD.dtype)
    if rows:
        out.w13_eGD.copy_(experts.w13_eGD[rows])
        out.w2_eDF.copy_(experts.w2_eDF[rows])
    return out


EXCHANGES = ("exact", "sum")


def apply_expert_parallel(model: MoETransformer, comm, placement: Placement, exchange: str = "exact") -> MoETransformer:
    """Make `model` compute only this rank's share of every MoE layer and all-reduce the result.

    exchange "exact" all-reduces the per-pair expert outputs y_NKD (K x the bytes; each pair has one
    non-zero contributor, so the sum is exact and output is bit-identical to one process); "sum"
    all-reduces fp32 partial sums out_ND (the smallest message; rounding may differ from one process).

    The model may hold exactly this rank's experts (the normal path: loaded with an expert filter) or
    more (e.g. all, in tests); extra experts are dropped."""
    args = model.args
    if exchange not in EXCHANGES:
        raise MoeClusterError(f"exchange {exchange!r} unknown; use one of {', '.join(EXCHANGES)}")
    if (placement.num_experts, placement.num_layers, placement.world_size) != (
            args.num_experts, args.n_layers, comm.world_size):
        raise MoeClusterError(
            f"placement is for {placement.num_experts} experts x {placement.num_layers} layers on "
            f"{placement.world_size} ranks, but the model has {args.num_experts} x {args.n_layers} "
            f"and the job has {comm.world_size} ranks; make a placement for this model and rank count")
    for layer in model.layers:
        moe = layer.moe
        if not isinstance(moe, MoEBlock):
            raise MoeClusterError("apply_expert_parallel was already applied to this model")
        want = placement.experts_of(comm.rank, layer.layer_id)
        held = moe.experts.expert_ids
        if held != want:
            missing = sorted(set(want) - set(held))
            if missing:
                raise MoeClusterError(f"rank {comm.rank} must hold experts {missing} of layer {layer.layer_id} "
                                      "but did not load them; load with the placement's expert filter")
            moe.experts = _subset(moe.experts, want, args)
        layer.moe = ExpertParallelMoE(moe.router, moe.experts, comm, placement, layer.layer_id, exchange)
    return model
