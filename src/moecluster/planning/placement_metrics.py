"""Placement metrics: per-rank expert work under the real `assign` rule, memory per rank.

Legend: T tokens, K top-k, E experts, L layers, N ranks, B batches.

Work is counted two ways. "Experts": distinct experts a rank evaluates in a step; in decode this
is what costs time (each evaluated expert's weights are read once per step). "Pairs": (token,
expert) pairs a rank computes; this is what costs time when compute-bound (prefill, big batches).
With batch 1 the two are equal. All loads are speed-weighted (load / speed), i.e. in units of
expert evaluations on a speed-1.0 rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moecluster.parallel.placement import Placement
from moecluster.planning.routing_stats import RoutingStats, sample_from_frequencies


@dataclass(frozen=True)
class LayerMetrics:
    """One layer's work under a placement, over a routing trace."""

    step_max_experts: float  # mean over steps of max over ranks of distinct experts / speed
    step_max_pairs: float  # mean over steps of max over ranks of pairs / speed
    work_N: tuple[float, ...]  # mean pairs per token computed by each rank (not speed-weighted)
    imbalance: float  # max_r(work_r / speed_r) / (sum work / sum speed); 1.0 = ideal


def trace_from_stats(
    stats: RoutingStats, num_tokens: int = 2048, seed: int = 0, top_k: int | None = None, recorded: bool = True
) -> list[list[list[int]]]:
    """trace_LTK: the recorded samples of each layer if any (and recorded=True), else num_tokens
    routings sampled from the layer's activation frequencies."""
    top_k = top_k or stats.top_k
    if top_k is None:
        raise ValueError("top_k unknown: the stats recorded nothing; pass top_k")
    trace = []
    for layer in range(stats.num_layers):
        if recorded and stats.samples_L[layer]:
            trace.append(stats.samples_L[layer])
        else:
            ids = sample_from_frequencies(stats.frequencies(layer), top_k, num_tokens, seed + layer)
            trace.append(ids.tolist())
    return trace


def layer_metrics(placement: Placement, layer: int, ids_TK: list[list[int]], batch: int = 1) -> LayerMetrics:
    """Metrics of one layer, calling `assign` on consecutive batches of `batch` tokens."""
    n = placement.world_size
    inv_N = [1.0 / s for s in placement.speeds]
    work_N = [0.0] * n
    sum_max_experts = sum_max_pairs = 0.0
    num_batches = max(len(ids_TK) // batch, 1)
    for b in range(num_batches):
        chunk = ids_TK[b * batch : (b + 1) * batch]
        rank_TK = placement.assign(layer, chunk)
        pairs_N = [0] * n
        held: set[tuple[int, int]] = set()
        for ids, ranks in zip(chunk, rank_TK):
            for e, r in zip(ids, ranks):
                pairs_N[r] += 1
                held.add((r, e))
        experts_N = [0] * n
        for r, _ in held:
            experts_N[r] += 1
        sum_max_experts += max(x * i for x, i in zip(experts_N, inv_N))
        sum_max_pairs += max(x * i for x, i in zip(pairs_N, inv_N))
        for r in range(n):
            work_N[r] += pairs_N[r]
    tokens = max(num_batches * batch, 1)
    work_N = [w / tokens for w in work_N]
    total = sum(work_N)
    ideal = total / sum(placement.speeds)
    worst = max(w * i for w, i in zip(work_N, inv_N))
    return LayerMetrics(
        sum_max_experts / num_batches, sum_max_pairs / num_batches, tuple(work_N), worst / ideal if ideal > 0 else 1.0
    )


def placement_metrics(placement: Placement, trace_LTK: list[list[list[int]]], batch: int = 1) -> list[LayerMetrics]:
    """Per-layer metrics over a trace (trace_LTK[layer] = the layer's ids_TK)."""
    return [layer_metrics(placement, layer, ids_TK, batch) for layer, ids_TK in enumerate(trace_LTK)]


def expected_max_rank_load(
    placement: Placement,
    stats: RoutingStats,
    top_k: int | None = None,
    batch: int = 1,
    num_tokens: int = 2048,
    seed: int = 0,
) -> list[float]:
    """Per layer: expected max over ranks of distinct experts evaluated / speed, per step of
    `batch` tokens, with routings sampled from the stats' activation frequencies.

    This is the number the performance model multiplies by one expert's time on a speed-1 rank.
    """
    trace = trace_from_stats(stats, max(num_tokens, batch), seed, top_k, recorded=False)
    return [m.step_max_experts for m in placement_metrics(placement, trace, batch)]


def observed_max_rank_load(placement: Placement, stats: RoutingStats, batch: int = 1) -> list[float] | None:
    """Like expected_max_rank_load but over the recorded samples; None if none were recorded."""
    if not all(stats.samples_L):
        return None
    trace = trace_from_stats(stats, recorded=True)
    return [m.step_max_experts for m in placement_metrics(placement, trace, batch)]


def bytes_per_rank(placement: Placement, fixed_bytes: float, bytes_per_expert: float) -> list[float]:
    """Weight bytes each rank loads: replicated weights + its expert copies over all layers."""
    return [fixed_bytes + placement.num_expert_copies(r) * bytes_per_expert for r in range(placement.world_size)]


def fits_memory(bytes_N: list[float], memory_N: list[float] | None, reserve_bytes: float = 0.0) -> list[bool]:
    """Whether each rank's bytes plus the reserve fit its memory (all True if memory unknown)."""
    if memory_N is None:
        return [True] * len(bytes_N)
    return [b + reserve_bytes <= m for b, m in zip(bytes_N, memory_N)]


def summarize(metrics_L: list[LayerMetrics]) -> dict:
    """Means and worst layers of a per-layer metrics list."""
    n = len(metrics_L)
    return {
        "step_max_experts_mean": sum(m.step_max_experts for m in metrics_L) / n,
        "step_max_pairs_mean": sum(m.step_max_pairs for m in metrics_L) / n,
        "imbalance_mean": sum(m.imbalance for m in metrics_L) / n,
        "imbalance_worst": max(m.imbalance for m in metrics_L),
    }


# ---- vectorized replay of assign, for the planner ----------------------------------------
class AssignReplay:
    """Replays Placement.assign (exactly, for batch <= 16) on fixed routings of one layer, in
    numpy, to score many candidate holder lists of that layer fast (the planner's objective)."""

    def __init__(
        self, ids_SK: np.ndarray, batch: int, num_experts: int, speeds_N: np.ndarray, freq_E: np.ndarray | None = None
    ):
        """ids_SK: routings, grouped into steps of `batch` tokens. freq_E: activations per token
        over all recorded tokens (default: from ids_SK), for the expected work, so that the
        planner does not fit the noise of a small sample."""
        num_b = max(len(ids_SK) // batch, 1)
        ids_BTK = np.asarray(ids_SK)[: num_b * batch].reshape(num_b, -1)
        counts_BE = np.zeros((num_b, num_experts))
        np.add.at(counts_BE, (np.repeat(np.arange(num_b), ids_BTK.shape[1]), ids_BTK.ravel()), 1)
        self.counts_BE, self.present_BE = counts_BE, (counts_BE > 0).astype(np.float64)
        self.counts_EB = np.ascontiguousarray(counts_BE.T)
        self.salt_B = (self.present_BE * np.arange(num_experts)).sum(1).astype(np.int64)
        self.rows_E = [np.flatnonzero(counts_BE[:, e]) for e in range(num_experts)]
        self.inv_N = 1.0 / np.asarray(speeds_N, dtype=np.float64)
        self.batch, self.num_experts = batch, num_experts
        self.freq_E = counts_BE.mean(0) / batch if freq_E is None else np.asarray(freq_E, dtype=np.float64)
        self._tie_cache: dict[tuple[int, int], np.ndarray] = {}
        # ideals: every rank loaded in proportion to its speed (J adds the two relative excesses)
        speed_sum = float(np.sum(speeds_N))
        self.work_ideal = float(self.freq_E.sum()) / speed_sum
        self.step_ideal = max(float(self.present_BE.sum(1).mean()) / speed_sum, 1.0 / float(np.max(speeds_N)))

    def objective(self, holders_E: list[tuple[int, ...]]) -> float:
        """J = mean step max of distinct experts / speed, over its ideal, + max expected pairs per
        token / speed, over its ideal. holders_E: sorted holder tuples of each expert."""
        experts_NB, work_N = self.loads(holders_E)
        step = (experts_NB * self.inv_N[:, None]).max(0).mean()
        return float(step / self.step_ideal + (work_N * self.inv_N).max() / self.work_ideal)

    def loads(self, holders_E: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """(experts_NB: distinct experts each rank evaluates in each step, work_N: expected pairs
        per token of each rank, replicated experts split as the replay splits them)."""
        single_EN = np.zeros((self.num_experts, len(self.inv_N)))
        rep = [e for e, hs in enumerate(holders_E) if len(hs) > 1]
        for e, hs in enumerate(holders_E):
            if len(hs) == 1:
                single_EN[e, hs[0]] = 1.0
        work_N = self.freq_E @ single_EN
        if self.batch == 1:  # one token per step: pairs are distinct experts
            pairs_NB = single_EN.T @ self.counts_EB
            self._replicated_b1(rep, holders_E, pairs_NB, work_N)
            return pairs_NB, work_N
        pairs_NB = single_EN.T @ self.counts_EB
        experts_NB = single_EN.T @ self.present_BE.T
        if rep:
            self._replicated(rep, holders_E, pairs_NB, experts_NB, work_N)
        return experts_NB, work_N

    def _replicated_b1(
        self, rep: list[int], holders_E: list[tuple[int, ...]], pairs_NB: np.ndarray, work_N: np.ndarray
    ) -> None:
        """Batch 1: each present expert has one pair, so assign takes them in id order."""
        for e in rep:
            rows = self.rows_E[e]
            if len(rows) == 0:
                continue
            hs = np.array(holders_E[e])
            nh = len(hs)
            cost_HB = (pairs_NB[np.ix_(hs, rows)] + 1.0) * self.inv_N[hs][:, None]
            pick_B = np.where(cost_HB == cost_HB.min(0), self._tie_order(e, nh), nh).argmin(0)
            pairs_NB[hs[pick_B], rows] += 1.0
            work_N[hs] += np.bincount(pick_B, minlength=nh) * (self.freq_E[e] / len(rows))

    def _tie_order(self, e: int, nh: int) -> np.ndarray:
        """pos_HB: assign's tie order of the nh holders of e in each step where e is present."""
        key = (e, nh)
        if key not in self._tie_cache:
            rot_B = (e + self.salt_B[self.rows_E[e]]) % nh
            self._tie_cache[key] = (np.arange(nh)[:, None] - rot_B[None, :]) % nh
        return self._tie_cache[key]

    def _replicated(
        self,
        rep: list[int],
        holders_E: list[tuple[int, ...]],
        pairs_NB: np.ndarray,
        experts_NB: np.ndarray,
        work_N: np.ndarray,
    ) -> None:
        """Any batch: replicated experts of each step in assign's order (most pairs, then id)."""
        num_b = pairs_NB.shape[1]
        rep_R = np.array(rep)
        counts_BR = self.counts_BE[:, rep_R]
        order_BR = np.lexsort((np.broadcast_to(rep_R, counts_BR.shape), -counts_BR), axis=1)
        max_h = max(len(holders_E[e]) for e in rep)
        hold_RH = np.full((len(rep), max_h), -1)
        for i, e in enumerate(rep):
            hold_RH[i, : len(holders_E[e])] = holders_E[e]
        nh_R = (hold_RH >= 0).sum(1)
        cols, inv_pad = np.arange(num_b), np.append(self.inv_N, 0.0)
        rep_pairs_RN = np.zeros((len(rep), len(self.inv_N)))
        for j in range(len(rep)):
            i_B = order_BR[:, j]
            c_B = counts_BR[cols, i_B]
            live = c_B > 0
            if not live.any():
                break  # present experts sort first: later columns are absent everywhere
            hs_BH, nh_B = hold_RH[i_B], nh_R[i_B]
            valid = hs_BH >= 0
            cost_BH = np.where(valid, (pairs_NB[hs_BH, cols[:, None]] + c_B[:, None]) * inv_pad[hs_BH], np.inf)
            rot_B = (rep_R[i_B] + self.salt_B) % nh_B
            pos_BH = (np.arange(max_h)[None, :] - rot_B[:, None]) % nh_B[:, None]
            pick_B = np.where(cost_BH == cost_BH.min(1, keepdims=True), pos_BH, max_h).argmin(1)
            r_B = hs_BH[cols, pick_B]
            pairs_NB[r_B[live], cols[live]] += c_B[live]
            np.add.at(rep_pairs_RN, (i_B[live], r_B[live]), c_B[live])
            experts_NB[r_B[live], cols[live]] += 1.0
        # expected work of replicated experts: their exact frequency, split as replayed
        total_R = np.maximum(counts_BR.sum(0), 1.0)
        work_N += (rep_pairs_RN / total_R[:, None] * self.freq_E[rep_R][:, None]).sum(0)
