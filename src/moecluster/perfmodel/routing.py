"""Expected expert load on the slowest rank under uniform top-k routing.

Legend: T tokens (the batch, B), E experts, K top-k, N ranks, g experts a rank owns.

Each token picks K distinct experts uniformly at random (no replacement); experts are split over
ranks in contiguous groups (`contiguous_groups`). Two quantities matter per MoE layer:

- evaluations: (token, expert) pairs the slowest rank computes -> FLOPs;
- distinct: distinct experts the slowest rank reads -> bytes (each expert's weights are read once
  per step however many tokens use it).

T = 1: both equal the max over ranks of a multivariate hypergeometric count. E[max] is exact:
P(max <= m) = [x^K] prod_i sum_{c<=m} C(g_i, c) x^c / C(E, K), evaluated with binomial pmfs
(q = K/E) in place of the binomial coefficients so nothing overflows for large E.

T > 1 (approximations, checked against Monte Carlo with 10-20k batches: evaluations within
3%, slightly low; distinct within 0.5%):
- evaluations: the same DP on the pooled problem (T*K draws from T*E slots, group sizes T*g),
  which keeps the exact total T*K (ranks compete for it) and is exact at T = 1; for T*K > 64 a
  normal approximation with the multinomial covariance, E[max] = E[max_i N(mu_i, c p_i)] with
  c = T K (E-K)/(E-1), p_i = g_i / E (the shared total cancels out of the max).
  Treating ranks as independent instead underestimates the max by 3-6% (ranks share the total).
- distinct: ranks independent, each Binomial(g, p) with p = 1 - (1 - K/E)^T, the exact
  per-expert activation probability (so the expected total E*(1-(1-K/E)^T) is exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

# Above this many pooled draws (T*K) the DP is replaced by a normal approximation.
_DP_LIMIT = 64


@dataclass(frozen=True)
class RankLoad:
    """Expected per-layer load of the slowest rank."""

    evaluations: float  # (token, expert) pairs computed
    distinct: float  # distinct experts whose weights are read


def contiguous_groups(num_experts: int, world_size: int) -> tuple[int, ...]:
    """Experts per rank for contiguous placement: sizes differ by at most one, larger first."""
    base, extra = divmod(num_experts, world_size)
    return tuple(base + (1 if r < extra else 0) for r in range(world_size))


def _poly_mul(a: list[float], b: list[float], limit: int) -> list[float]:
    out = [0.0] * min(len(a) + len(b) - 1, limit + 1)
    for i, x in enumerate(a):
        if x == 0.0:
            continue
        for j, y in enumerate(b):
            if i + j > limit:
                break
            out[i + j] += x * y
    return out


def _binom_pmf(n: int, q: float, c: int) -> float:
    if q >= 1.0:
        return 1.0 if c == n else 0.0
    log = math.lgamma(n + 1) - math.lgamma(c + 1) - math.lgamma(n - c + 1)
    return math.exp(log + c * math.log(q) + (n - c) * math.log1p(-q))


@lru_cache(maxsize=4096)
def expected_max_count(total: int, draws: int, groups: tuple[int, ...]) -> float:
    """Exact E[max over groups of items drawn] for `draws` items taken without replacement
    from `total` items split into `groups` (sizes summing to `total`)."""
    if draws <= 0:
        return 0.0
    if draws >= total:
        return float(max(groups))
    q = draws / total
    denom = _binom_pmf(total, q, draws)
    pmfs = {g: [_binom_pmf(g, q, c) for c in range(min(g, draws) + 1)] for g in set(groups)}
    lo = -(-draws // len(groups))  # pigeonhole: max >= ceil(draws / N)
    expect = float(lo)
    for m in range(lo, min(max(groups), draws)):  # E[max] = sum_m P(max > m)
        poly = [1.0]
        for g in groups:
            poly = _poly_mul(poly, pmfs[g][: m + 1], draws)
        p_le = (poly[draws] if len(poly) > draws else 0.0) / denom
        if 1.0 - p_le < 1e-12:
            break
        expect += 1.0 - p_le
    return expect


def expected_max_one_token(num_experts: int, top_k: int, groups: tuple[int, ...]) -> float:
    """Exact E[max over ranks of selected experts owned] for one token."""
    return expected_max_count(num_experts, top_k, tuple(groups))


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _expected_max_normal(params: list[tuple[float, float]]) -> float:
    """E[max] of independent integer variables approximated by N(mu, sd), continuity-corrected."""
    lo = max(0, int(min(mu - 10 * sd for mu, sd in params)))
    hi = int(max(mu + 10 * sd for mu, sd in params)) + 1
    expect = float(lo)
    for m in range(lo, hi + 1):
        prod = 1.0
        for mu, sd in params:
            prod *= _normal_cdf((m + 0.5 - mu) / sd) if sd > 0 else (1.0 if m >= mu else 0.0)
        expect += 1.0 - prod
    return expect


def _expected_max_from_cdfs(cdfs: list[tuple[float, ...]]) -> float:
    top = max(len(c) for c in cdfs)
    expect = 0.0
    for m in range(top):
        prod = 1.0
        for c in cdfs:
            prod *= c[m] if m < len(c) else 1.0
        expect += 1.0 - prod
    return expect


def _max_evaluations(num_experts: int, top_k: int, tokens: int, groups: tuple[int, ...]) -> float:
    if tokens == 1 or tokens * top_k <= _DP_LIMIT:
        return expected_max_count(tokens * num_experts, tokens * top_k, tuple(tokens * g for g in groups))
    c = tokens * top_k * (num_experts - top_k) / max(num_experts - 1, 1)
    return _expected_max_normal([(tokens * top_k * g / num_experts, math.sqrt(c * g / num_experts)) for g in groups])


def _binomial_cdf(n: int, p: float) -> tuple[float, ...]:
    cdf, acc = [], 0.0
    for c in range(n + 1):
        acc += math.comb(n, c) * p**c * (1 - p) ** (n - c)
        cdf.append(min(acc, 1.0))
    return tuple(cdf)


def _max_distinct(num_experts: int, top_k: int, tokens: int, groups: tuple[int, ...]) -> float:
    p = 1.0 - (1.0 - top_k / num_experts) ** tokens
    return _expected_max_from_cdfs([_binomial_cdf(g, p) for g in groups])


@lru_cache(maxsize=4096)
def uniform_rank_load(num_experts: int, top_k: int, tokens: int, world_size: int) -> RankLoad:
    """Expected slowest-rank load per MoE layer: uniform routing, contiguous placement."""
    groups = tuple(g for g in contiguous_groups(num_experts, world_size) if g > 0)
    if tokens <= 0:
        return RankLoad(0.0, 0.0)
    if tokens == 1:
        v = expected_max_count(num_experts, top_k, groups)
        return RankLoad(v, v)
    evals = _max_evaluations(num_experts, top_k, tokens, groups)
    distinct = _max_distinct(num_experts, top_k, tokens, groups)
    return RankLoad(evals, min(distinct, evals))


def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts a batch of T tokens activates: E(1-(1-K/E)^T)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def load_from_evaluations(evaluations: float, num_experts: int, world_size: int) -> RankLoad:
    """RankLoad from a placement's expected max-rank evaluations (distinct capped by ownership).

    Without per-expert detail, assume every evaluation may touch a different expert up to the
    number of experts the largest rank owns (conservative: reads more bytes).
    """
    most = max(contiguous_groups(num_experts, world_size))
    return RankLoad(evaluations, min(evaluations, float(most)))
