"""Placement strategies: contiguous, round-robin, replicated groups, and optimized.

Legend: T tokens, K top-k, E experts, L layers, N ranks, S sampled tokens, B batches, R replicated.

"optimized" minimizes, per layer, J = step / ideal + work / ideal, where step = E[max over ranks
of distinct experts / speed in one step of `batch` tokens] (a layer's decode time) and work = max
over ranks of expected pairs per token / speed (the throughput limit with large batches), each
divided by its value if all ranks were loaded in proportion to speed. J is computed by
`placement_metrics.AssignReplay`, an exact numpy replay of `Placement.assign` on the recorded
(or sampled) routings.
Steps: (1) decide copies: replicate the experts with the largest share per copy, over all layers,
while a share exceeds half a rank's ideal load and the replica budget lasts; (2) per layer, pack
the copies largest first onto the rank with the least speed-weighted load (co-activated experts
kept apart), within each rank's memory; (3) local search on J (move one copy, swap two);
(4) spend what is left of the budget on single replicas wherever J drops most.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from moecluster.errors import MoeClusterError
from moecluster.parallel.placement import Placement, contiguous_holders, groups_holders, round_robin_holders
from moecluster.planning.placement_metrics import AssignReplay
from moecluster.planning.routing_stats import RoutingStats, sample_from_frequencies

STRATEGIES = ("contiguous", "round-robin", "groups", "optimized")
DEFAULT_REPLICA_FRACTION = 0.25  # default replica budget: 25% of one copy of all experts
GB = 1e9


@dataclass(frozen=True)
class Cluster:
    """Ranks and what fits on them. memory_N None = unlimited; bytes in bytes."""

    world_size: int
    speeds: tuple[float, ...]
    memory_N: tuple[float, ...] | None = None
    fixed_bytes: float = 0.0  # weights every rank holds (attention, embeddings, lm_head ...)
    bytes_per_expert: float = 1.0  # one expert of one layer
    reserve_bytes: float = 0.0  # kept free per rank (KV cache, activations, runtime)

    def expert_slots(self) -> list[float]:
        """Per rank, how many expert blocks (layer, expert) fit; inf if memory is unlimited."""
        if self.memory_N is None:
            return [math.inf] * self.world_size
        slots = []
        for rank, mem in enumerate(self.memory_N):
            free = mem - self.reserve_bytes - self.fixed_bytes
            if free < 0:
                raise MoeClusterError(
                    f"rank {rank} has {mem / GB:.1f} GB but every rank needs "
                    f"{(self.fixed_bytes + self.reserve_bytes) / GB:.1f} GB for the replicated "
                    f"weights and reserve: give it more memory (--memory-gb) or leave it out"
                )
            slots.append(math.floor(free / self.bytes_per_expert + 1e-9))
        return slots


def check_fits(cluster: Cluster, num_layers: int, num_experts: int) -> list[float]:
    """Expert slots per rank; raises MoeClusterError if one copy of every expert cannot fit."""
    slots = cluster.expert_slots()
    need = num_layers * num_experts
    if sum(slots) < need:
        free = sum(slots) * cluster.bytes_per_expert / GB
        raise MoeClusterError(
            f"the model does not fit: its experts need {need * cluster.bytes_per_expert / GB:.1f} "
            f"GB ({need} blocks of {cluster.bytes_per_expert / GB:.3f} GB) but the ranks have "
            f"only {free:.1f} GB left after the replicated weights "
            f"({cluster.fixed_bytes / GB:.1f} GB each) and reserve; add nodes or memory, or use a "
            f"smaller dtype"
        )
    return slots


def plan(
    strategy: str,
    num_layers: int,
    num_experts: int,
    top_k: int,
    cluster: Cluster,
    stats: RoutingStats | None = None,
    replica_budget_bytes: float | None = None,
    num_groups: int | None = None,
    batch: int = 1,
    seed: int = 0,
) -> Placement:
    """A placement by the named strategy that fits every rank's memory (else MoeClusterError)."""
    slots = check_fits(cluster, num_layers, num_experts)
    n, e = cluster.world_size, num_experts
    if strategy == "contiguous":
        placement = Placement([contiguous_holders(e, n)] * num_layers, n, cluster.speeds)
    elif strategy == "round-robin":
        placement = Placement([round_robin_holders(e, n)] * num_layers, n, cluster.speeds)
    elif strategy == "groups":
        placement = _plan_groups(num_layers, e, cluster, slots, replica_budget_bytes, num_groups)
    elif strategy == "optimized":
        if replica_budget_bytes is None:
            budget = int(DEFAULT_REPLICA_FRACTION * num_layers * e)
        else:
            budget = int(replica_budget_bytes / cluster.bytes_per_expert + 1e-9)
        placement = plan_optimized(num_layers, e, top_k, cluster, slots, stats, budget, batch, seed)
    else:
        raise MoeClusterError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    for rank in range(n):
        held = placement.num_expert_copies(rank)
        if held > slots[rank]:
            raise MoeClusterError(
                f"the {strategy} placement puts {held} expert blocks "
                f"({held * cluster.bytes_per_expert / GB:.1f} GB) on rank {rank}, which has room "
                f"for {slots[rank]}; use --strategy optimized, which respects each node's memory"
            )
    return placement


def _plan_groups(
    num_layers: int,
    num_experts: int,
    cluster: Cluster,
    slots: list[float],
    budget_bytes: float | None,
    num_groups: int | None,
) -> Placement:
    """The fewest groups (most replication) from the default up that fit memory and budget."""
    n = cluster.world_size
    first = num_groups or max(1, math.ceil(n / 2))
    for g in range(min(first, n, num_experts), min(n, num_experts) + 1):
        holders = groups_holders(num_experts, n, g)
        placement = Placement([holders] * num_layers, n, cluster.speeds)
        extra = placement.num_replicas() * cluster.bytes_per_expert
        fits = all(placement.num_expert_copies(r) <= slots[r] for r in range(n))
        within_budget = budget_bytes is None or extra <= budget_bytes + 1e-6
        if num_groups or (fits and within_budget):
            return placement  # an explicit G is kept as given; plan() checks its memory
    return placement  # the least replicated; plan() reports the rank that does not fit


# ---- optimized -------------------------------------------------------------------------
def _layer_samples(
    stats: RoutingStats | None, layer: int, num_experts: int, top_k: int, num_samples: int, seed: int
) -> np.ndarray:
    if stats is not None and len(stats.samples_L[layer]) >= 64:
        return np.array(stats.samples_L[layer][:num_samples], dtype=np.int64)
    freq = stats.frequencies(layer) if stats is not None else [top_k / num_experts] * num_experts
    return sample_from_frequencies(freq, top_k, num_samples, seed + layer)


def _primary_quotas(slots_N: list[float], num_layers: int, num_experts: int) -> list[list[int]]:
    """quota_LN: how many single copies each rank may take per layer, spreading each rank's
    slots evenly over layers (remainders staggered so every layer gets >= num_experts)."""
    quota_LN = [[0] * len(slots_N) for _ in range(num_layers)]
    offset = 0
    for r, s in enumerate(slots_N):
        s = min(s, num_layers * num_experts)
        base, extra = int(s // num_layers), int(s % num_layers)
        for layer in range(num_layers):
            bonus = 1 if (layer - offset) % num_layers < extra else 0
            quota_LN[layer][r] = min(num_experts, base + bonus)
        offset += extra
    return quota_LN


def _allocate_copies(
    freqs: list[np.ndarray], speeds_N: np.ndarray, budget: int, quota_LN: list[list[int]], max_piece: float = 0.5
) -> list[list[int]]:
    """copies_LE: replicate the expert with the largest share per copy (over all layers) while
    that share exceeds max_piece of the fastest rank's ideal load and the budget lasts."""
    n = len(speeds_N)
    copies_LE = [[1] * len(f) for f in freqs]
    spare_L = [sum(q) - len(f) for q, f in zip(quota_LN, freqs)]
    heap = []
    for layer, freq_E in enumerate(freqs):
        ideal = freq_E.sum() * speeds_N.max() / speeds_N.sum()
        for e, f in enumerate(freq_E):
            heap.append((-f / ideal, layer, e, ideal))
    heapq.heapify(heap)
    while budget > 0 and heap:
        neg_piece, layer, e, ideal = heapq.heappop(heap)
        if -neg_piece <= max_piece:
            break
        if spare_L[layer] <= 0 or copies_LE[layer][e] >= n:
            continue
        copies_LE[layer][e] += 1
        spare_L[layer] -= 1
        budget -= 1
        heapq.heappush(heap, (-freqs[layer][e] / copies_LE[layer][e] / ideal, layer, e, ideal))
    return copies_LE


def _pack(
    freq_E: np.ndarray, coact_EE: np.ndarray, copies_E: list[int], quota_N: list[int], speeds_N: np.ndarray
) -> list[tuple[int, ...]]:
    """holders_E: copies, largest share first, onto the rank with the least speed-weighted load
    (co-activation with experts already there counts as load: they would collide in a step)."""
    n = len(speeds_N)
    load_N, left_N = np.zeros(n), list(quota_N)
    holders: list[list[int]] = [[] for _ in freq_E]
    pieces = sorted(((-freq_E[e] / c, e) for e, c in enumerate(copies_E) for _ in range(c)))
    for neg_piece, e in pieces:
        best, best_cost = -1, math.inf
        for r in range(n):
            if left_N[r] <= 0 or r in holders[e]:
                continue
            clash = sum(coact_EE[e, g] / (len(hs) * copies_E[e]) for g, hs in enumerate(holders) if r in hs)
            cost = (load_N[r] - neg_piece + clash) / speeds_N[r]
            if cost < best_cost - 1e-12:
                best, best_cost = r, cost
        if best < 0:
            continue  # no rank with room lacks this expert: keep fewer copies
        holders[e].append(best)
        load_N[best] -= neg_piece
        left_N[best] -= 1
    return [tuple(sorted(hs)) for hs in holders]


def _local_search(
    sim: AssignReplay, holders_E: list[tuple[int, ...]], quota_N: list[int], max_evals: int = 2000
) -> list[tuple[int, ...]]:
    """First-improvement moves (one copy to another rank) and swaps (two copies on two ranks)
    while J drops, within the per-rank quota."""
    n, num_e = len(quota_N), len(holders_E)
    holders = list(holders_E)
    cur = sim.objective(holders)
    count_N = [sum(r in hs for hs in holders) for r in range(n)]
    evals, improved = 0, True

    def replace(hs: tuple[int, ...], old: int, new: int) -> tuple[int, ...]:
        return tuple(sorted([new if h == old else h for h in hs]))

    while improved and evals < max_evals:
        improved = False
        for e in range(num_e):
            for h in holders[e]:
                for r in range(n):
                    if r in holders[e] or count_N[r] >= quota_N[r] or evals >= max_evals:
                        continue
                    trial = list(holders)
                    trial[e] = replace(holders[e], h, r)
                    val, evals = sim.objective(trial), evals + 1
                    if val < cur - 1e-9:
                        count_N[h], count_N[r] = count_N[h] - 1, count_N[r] + 1
                        holders, cur, improved = trial, val, True
                        break
        for e in range(num_e):
            for g in range(e + 1, num_e):
                for h1 in holders[e]:
                    for h2 in holders[g]:
                        if h1 == h2 or h2 in holders[e] or h1 in holders[g] or evals >= max_evals:
                            continue
                        trial = list(holders)
                        trial[e], trial[g] = replace(holders[e], h1, h2), replace(holders[g], h2, h1)
                        val, evals = sim.objective(trial), evals + 1
                        if val < cur - 1e-9:
                            holders, cur, improved = trial, val, True
                            break
    return holders


def _best_replica(
    sim: AssignReplay, holders_E: list[tuple[int, ...]], free_N: list[float], freq_E: np.ndarray
) -> tuple[float, int, int]:
    """(gain in J, expert, rank) of the best single added replica in this layer."""
    cur = sim.objective(holders_E)
    best = (0.0, -1, -1)
    top = np.argsort(-freq_E, kind="stable")[: max(4, len(freq_E) // 2)]
    for e in top:
        for r in range(len(free_N)):
            if free_N[r] < 1 or r in holders_E[e]:
                continue
            trial = list(holders_E)
            trial[e] = tuple(sorted(holders_E[e] + (r,)))
            gain = cur - sim.objective(trial)
            if gain > best[0] + 1e-12:
                best = (gain, int(e), r)
    return best


def plan_optimized(
    num_layers: int,
    num_experts: int,
    top_k: int,
    cluster: Cluster,
    slots_N: list[float],
    stats: RoutingStats | None,
    budget: int,
    batch: int = 1,
    seed: int = 0,
    num_samples: int = 1024,
) -> Placement:
    """The optimized strategy (see the module docstring); budget = max extra expert copies."""
    speeds_N = np.array(cluster.speeds, dtype=np.float64)
    quota_LN = _primary_quotas(slots_N, num_layers, num_experts)
    sims, freqs, coacts = [], [], []
    for layer in range(num_layers):
        ids_SK = _layer_samples(stats, layer, num_experts, top_k, num_samples, seed)
        freq_E = np.array(stats.frequencies(layer) if stats is not None else [top_k / num_experts] * num_experts)
        sims.append(AssignReplay(ids_SK, batch, num_experts, speeds_N, freq_E))
        freqs.append(freq_E)
        coacts.append(_coactivation(ids_SK, num_experts))
    copies_LE = _allocate_copies(freqs, speeds_N, budget, quota_LN)
    holders_LE, free_N = [], list(slots_N)
    for layer in range(num_layers):
        holders = _pack(freqs[layer], coacts[layer], copies_LE[layer], quota_LN[layer], speeds_N)
        holders = _local_search(sims[layer], holders, quota_LN[layer])
        for hs in holders:
            for r in hs:
                free_N[r] -= 1
        holders_LE.append(holders)
    used = sum(len(hs) - 1 for lh in holders_LE for hs in lh)
    _add_replicas(sims, freqs, holders_LE, free_N, budget - used)
    return Placement(holders_LE, cluster.world_size, cluster.speeds)


def _coactivation(ids_SK: np.ndarray, num_experts: int) -> np.ndarray:
    """coact_EE[i, j]: fraction of tokens selecting both i and j (zero diagonal)."""
    onehot_SE = np.zeros((len(ids_SK), num_experts))
    np.put_along_axis(onehot_SE, ids_SK, 1.0, axis=1)
    coact_EE = onehot_SE.T @ onehot_SE / max(len(ids_SK), 1)
    np.fill_diagonal(coact_EE, 0.0)
    return coact_EE


def _add_replicas(
    sims: list[AssignReplay],
    freqs: list[np.ndarray],
    holders_LE: list[list[tuple[int, ...]]],
    free_N: list[float],
    budget: int,
    min_rel_gain: float = 1e-3,
) -> None:
    """Greedy over all layers: add the replica with the largest drop in J until the budget or
    free memory runs out or no replica helps (gain below min_rel_gain of the layer's J)."""
    heap = []
    for layer, sim in enumerate(sims):
        gain, e, r = _best_replica(sim, holders_LE[layer], free_N, freqs[layer])
        heapq.heappush(heap, (-gain, layer, e, r))
    while budget > 0 and heap:
        neg_gain, layer, e, r = heapq.heappop(heap)
        if e < 0 or -neg_gain < min_rel_gain * sims[layer].objective(holders_LE[layer]):
            continue
        if free_N[r] < 1:  # memory taken by another layer's replica since: re-evaluate
            gain, e, r = _best_replica(sims[layer], holders_LE[layer], free_N, freqs[layer])
            heapq.heappush(heap, (-gain, layer, e, r))
            continue
        holders_LE[layer][e] = tuple(sorted(holders_LE[layer][e] + (r,)))
        free_N[r] -= 1
        budget -= 1
        gain, e, r = _best_replica(sims[layer], holders_LE[layer], free_N, freqs[layer])
        heapq.heappush(heap, (-gain, layer, e, r))
