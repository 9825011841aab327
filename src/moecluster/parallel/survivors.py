"""A placement restricted to the ranks that survive a failure (issue 15: keep serving on the survivors).

Legend: L layers, E experts, N ranks.
"""

from __future__ import annotations

from moecluster.parallel.placement import Placement


def lost_experts(placement: Placement, gone: list[int]) -> dict[int, list[int]]:
    """{MoE layer: experts} whose every holder is in `gone` (empty: the others hold a copy of each)."""
    out: dict[int, list[int]] = {}
    for layer in range(placement.num_layers):
        lost = [e for e in range(placement.num_experts) if set(placement.holders(layer, e)) <= set(gone)]
        if lost:
            out[layer] = lost
    return out


def describe_lost(lost: dict[int, list[int]], max_layers: int = 4) -> str:
    """'experts [1, 3] of MoE layer 0, [2] of layer 1 (and 5 more layers) have no copy left'."""
    parts = [f"{lost[layer]} of {'MoE layer' if i == 0 else 'layer'} {layer}" for i, layer in enumerate(lost)]
    more = f" (and {len(parts) - max_layers} more layers)" if len(parts) > max_layers else ""
    return f"experts {', '.join(parts[:max_layers])}{more} have no copy left"


def restrict(placement: Placement, survivors: list[int]) -> Placement:
    """The placement over `survivors` (old ranks, renumbered 0..k-1 in this order); every expert must
    keep a holder (check lost_experts first). Each survivor keeps exactly the experts it holds."""
    new_rank = {r: i for i, r in enumerate(survivors)}
    holders_LE = [
        [[new_rank[h] for h in placement.holders(layer, e) if h in new_rank] for e in range(placement.num_experts)]
        for layer in range(placement.num_layers)
    ]
    return Placement(holders_LE, len(survivors), [placement.speeds[r] for r in survivors])
