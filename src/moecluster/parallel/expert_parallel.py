"""Expert parallelism as a transformation of a loaded single-device model.

`apply_expert_parallel(model, comm, placement)` swaps the RoutedExperts of each MoE layer (the model's
`moe_layers()`) for ExpertParallelExperts: it holds only this rank's experts, computes only the
(token, expert) pairs the placement assigns to this rank, and combines the ranks' outputs with ONE
all-reduce per layer — an explicit call in forward, not a hook. Router, shared experts and the
combine with them stay the model's, replicated on every rank.

Shape legend: N tokens (flattened batch), D model dim, K top-k, E experts, e local experts.
"""

from __future__ import annotations

import torch
from torch import nn

from moecluster.errors import MoeClusterError
from moecluster.models.layers import DecoderModel
from moecluster.models.moe import RoutedExperts
from moecluster.parallel.placement import Placement
from moecluster.tracing import TRACER, SelfTimed, now

EXCHANGES = ("exact", "sum")


class ExpertParallelExperts(nn.Module, SelfTimed):
    """This rank's share of one MoE layer's routed experts + the one exchange. forward(x_ND, ids_NK,
    weights_NK) -> out_ND, like the RoutedExperts it replaces."""

    def __init__(
        self, local: RoutedExperts, comm, placement: Placement, index: int, layer_id: int, exchange: str = "exact"
    ):
        super().__init__()
        self.local = local
        self.comm, self.placement, self.exchange = comm, placement, exchange
        self.index, self.layer_id = index, layer_id  # MoE-layer index (placement's), decoder layer (tracing's)
        self.rank = comm.rank
        self.last_num_evaluated = 0

    @property
    def num_experts(self) -> int:
        return self.local.num_experts

    @property
    def expert_ids(self) -> list[int]:
        return self.local.expert_ids

    def expert_bytes(self) -> int:
        return self.local.expert_bytes()

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        t0 = now()
        ids = ids_NK.tolist()
        owner_NK = self.placement.assign(self.index, ids)
        mine_NK = torch.tensor(owner_NK) == self.rank
        if self.exchange == "exact":
            out_NKD = self.comm.exchange_buffer((*ids_NK.shape, x_ND.shape[1]), x_ND.dtype)
            y_NKD, self.last_num_evaluated = self.local.pairs(x_ND, ids_NK, mine_NK, out_NKD)
            t1 = now()
            y_NKD = self.comm.all_reduce_disjoint(y_NKD)  # the one exchange: one non-zero holder per pair, exact
            t2 = now()
            out_ND = self.local.combine(y_NKD, weights_NK, x_ND.dtype)
        else:
            y_NKD, self.last_num_evaluated = self.local.pairs(x_ND, ids_NK, mine_NK)
            partial_ND = (y_NKD.float() * weights_NK[..., None]).sum(dim=1)
            t1 = now()
            out_ND = self.comm.all_reduce_sum(partial_ND).to(x_ND.dtype)  # the one exchange, fp32 partial sums
            t2 = now()
        TRACER.add(self.layer_id, "experts", t1 - t0)
        TRACER.add(self.layer_id, "all_reduce", t2 - t1)
        TRACER.count_evals(self.layer_id, self.last_num_evaluated)
        return out_ND


def apply_expert_parallel(model: DecoderModel, comm, placement: Placement, exchange: str = "exact") -> DecoderModel:
    """Make `model` compute only this rank's share of every MoE layer and all-reduce the result.

    exchange "exact" all-reduces the per-pair expert outputs y_NKD (K x the bytes; each pair has one
    non-zero contributor, so the sum is exact and output is bit-identical to one process); "sum"
    all-reduces fp32 partial sums out_ND (the smallest message; rounding may differ from one process).

    The model may hold exactly this rank's experts (the normal path: loaded with an expert filter) or
    more (e.g. all, in tests); extra experts are dropped."""
    if exchange not in EXCHANGES:
        raise MoeClusterError(f"exchange {exchange!r} unknown; use one of {', '.join(EXCHANGES)}")
    moes = model.moe_layers()
    num_experts = moes[0].experts.num_experts if moes else 0
    if (placement.num_experts, placement.num_layers, placement.world_size) != (num_experts, len(moes), comm.world_size):
        raise MoeClusterError(
            f"placement is for {placement.num_experts} experts x {placement.num_layers} MoE layers on "
            f"{placement.world_size} ranks, but the model has {num_experts} x {len(moes)} "
            f"and the job has {comm.world_size} ranks; make a placement for this model and rank count"
        )
    layer_of = {id(block.mlp): i for i, block in enumerate(model.layers)}
    for index, moe in enumerate(moes):
        experts = moe.experts
        if not isinstance(experts, RoutedExperts):
            raise MoeClusterError("apply_expert_parallel was already applied to this model")
        want = placement.experts_of(comm.rank, index)
        if experts.expert_ids != want:
            missing = sorted(set(want) - set(experts.expert_ids))
            if missing:
                raise MoeClusterError(
                    f"rank {comm.rank} must hold experts {missing} of MoE layer {index} "
                    "but did not load them; load with the placement's expert filter"
                )
            experts = experts.subset(want)
        moe.experts = ExpertParallelExperts(experts, comm, placement, index, layer_of[id(moe)], exchange)
    return model
