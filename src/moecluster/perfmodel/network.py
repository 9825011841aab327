"""Latency-bandwidth (alpha-beta) cost of one all-reduce over N ranks, and table interpolation.

Legend: N ranks, M message bytes, a per-step latency (s), b bandwidth per direction (bytes/s).

Algorithms (the classic MPICH/Open MPI set, Thakur, Rabenseifner & Gropp 2005):
- ring: reduce-scatter + all-gather, 2(N-1) steps of a + (M/N)/b. Bandwidth-optimal.
- recursive_doubling: ceil-ish log2(N) steps of a + M/b (non-powers of two add 2 steps, as
  MPICH does). Latency-optimal; MPI libraries pick it for small messages.
- rabenseifner: recursive-halving reduce-scatter + recursive-doubling all-gather,
  2 log2(N) steps of a plus 2(N-1)/N * M/b. MPICH's choice for long messages.
- direct (full-mesh topologies only): every rank sends M to every peer over its own cable in
  one step, a + M/b (what MLX's JACCL does over Thunderbolt meshes).
- auto: the cheapest of the above under the model, which is what a library's size-based
  selection approximates (small -> recursive doubling, large -> ring/Rabenseifner).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from moecluster.errors import MoeClusterError


def _rd_steps(num_ranks: int) -> int:
    """Recursive-doubling steps; non-powers of two fold the extra ranks in and out (+2)."""
    p2 = 1 << (num_ranks.bit_length() - 1)
    return int(math.log2(p2)) + (0 if p2 == num_ranks else 2)


def recursive_doubling_steps(num_ranks: int) -> int:
    """Latency steps of a recursive-doubling all-reduce over N ranks (0 for one rank)."""
    return _rd_steps(num_ranks) if num_ranks > 1 else 0


def algorithm_times(
    num_ranks: int, message_bytes: float, latency_s: float, bandwidth: float, mesh: bool = False
) -> dict[str, float]:
    """Time of each all-reduce algorithm for M bytes over N ranks (seconds)."""
    n, m, a, b = num_ranks, float(message_bytes), latency_s, bandwidth
    p2 = 1 << (n.bit_length() - 1)
    fold = 0.0 if p2 == n else 2 * (a + m / b)
    times = {
        "ring": 2 * (n - 1) * (a + m / n / b),
        "recursive_doubling": _rd_steps(n) * (a + m / b),
        "rabenseifner": fold + 2 * math.log2(p2) * a + 2 * (p2 - 1) / p2 * m / b,
    }
    if mesh:
        times["direct"] = a + m / b
    return times


def allreduce_time(
    num_ranks: int,
    message_bytes: float,
    latency_s: float,
    bandwidth: float,
    algorithm: str = "auto",
    mesh: bool = False,
) -> tuple[float, str]:
    """(seconds, algorithm used) for one all-reduce; N = 1 or M = 0 costs nothing."""
    if num_ranks <= 1 or message_bytes <= 0:
        return 0.0, "none"
    if bandwidth <= 0:
        raise MoeClusterError("network bandwidth must be > 0")
    times = algorithm_times(num_ranks, message_bytes, latency_s, bandwidth, mesh)
    if algorithm == "auto":
        name = min(times, key=times.__getitem__)
        return times[name], name
    if algorithm not in times:
        raise MoeClusterError(f"all-reduce algorithm {algorithm!r} not available here; choose from {', '.join(times)}")
    return times[algorithm], algorithm


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Piecewise-linear y(x) through sorted (x, y) points.

    Below the first point: the first y (a latency floor). Above the last: extend the last
    segment's slope (the bandwidth regime); a single point is used as a constant.
    """
    if not points:
        raise MoeClusterError("cannot interpolate an empty table")
    pts = sorted(points)
    if x <= pts[0][0] or len(pts) == 1:
        return pts[0][1] if x <= pts[0][0] else pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
    return max(y1 + slope * (x - x1), y1)
