"""Routing statistics: which experts the router picks, per layer; plus synthetic Zipf traces.

Legend: T tokens, K top-k, E experts, L layers, S sampled tokens.

The engine calls `RoutingStats.record(layer, ids_TK)` once per MoE layer per step (ids as plain
lists: call `.tolist()` on a tensor first); `moecluster profile-routing` saves the result and
`moecluster place --stats` reads it. `record` is pure Python; the samplers below use numpy.

Stats JSON, format "moecluster-routing-stats/1":

    {
      "format": "moecluster-routing-stats/1",
      "num_layers": 40, "num_experts": 16, "top_k": 4, "model": "dbrx-instruct" | null,
      "layers": [                          # one entry per layer
        {"tokens": 5120,                   # tokens seen in this layer
         "counts": [E ints],               # activations of each expert (sum = tokens * top_k)
         "coactivation": [[E ints] * E],   # tokens that selected both i and j (diagonal = counts)
         "samples": [[K ids], ...]},       # up to max_samples recorded tokens (reservoir sample)
        ...]
    }
"""

from __future__ import annotations

import json
import random
from typing import TYPE_CHECKING

from moecluster.errors import MoeClusterError

if TYPE_CHECKING:
    import numpy as np

FORMAT = "moecluster-routing-stats/1"


class RoutingStats:
    """Per-layer activation counts, co-activation counts, tokens seen and sampled routings."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int | None = None,
        max_samples: int = 2048,
        model: str | None = None,
    ) -> None:
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.max_samples, self.model = max_samples, model
        self.tokens_L = [0] * num_layers
        self.counts_LE = [[0] * num_experts for _ in range(num_layers)]
        self.coact_LEE = [[[0] * num_experts for _ in range(num_experts)] for _ in range(num_layers)]
        self.samples_L: list[list[list[int]]] = [[] for _ in range(num_layers)]
        # Deterministic reservoir sampling: same inputs, same stored samples.
        self._rng_L = [random.Random(layer) for layer in range(num_layers)]

    def record(self, layer: int, ids_TK: list[list[int]]) -> None:
        """Add one batch of router choices for one layer (ids_TK: T tokens x K expert ids)."""
        counts_E, coact_EE, samples = self.counts_LE[layer], self.coact_LEE[layer], self.samples_L[layer]
        for row in ids_TK:
            row = [int(e) for e in row]
            if self.top_k is None:
                self.top_k = len(row)
            for e in row:
                counts_E[e] += 1
                coact_e = coact_EE[e]
                for f in row:
                    coact_e[f] += 1
            seen = self.tokens_L[layer]
            if len(samples) < self.max_samples:
                samples.append(row)
            else:
                j = self._rng_L[layer].randrange(seen + 1)
                if j < self.max_samples:
                    samples[j] = row
            self.tokens_L[layer] = seen + 1

    def frequencies(self, layer: int) -> list[float]:
        """freq_E: mean activations per token of each expert in this layer (sums to top_k)."""
        tokens = self.tokens_L[layer]
        if tokens == 0:
            return [(self.top_k or 1) / self.num_experts] * self.num_experts
        return [c / tokens for c in self.counts_LE[layer]]

    # ---- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "model": self.model,
            "layers": [
                {
                    "tokens": self.tokens_L[i],
                    "counts": self.counts_LE[i],
                    "coactivation": self.coact_LEE[i],
                    "samples": self.samples_L[i],
                }
                for i in range(self.num_layers)
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> RoutingStats:
        """Parse and validate the documented JSON form."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MoeClusterError(
                f'not a routing stats file: expected "format": "{FORMAT}" (write one with `moecluster profile-routing`)'
            )
        try:
            num_layers, num_experts = int(data["num_layers"]), int(data["num_experts"])
            top_k = None if data.get("top_k") is None else int(data["top_k"])
            layers = data["layers"]
        except (KeyError, TypeError, ValueError) as e:
            raise MoeClusterError(f"routing stats JSON needs num_layers, num_experts, top_k and layers ({e})") from None
        if not isinstance(layers, list) or len(layers) != num_layers:
            raise MoeClusterError(f'routing stats: "layers" must list {num_layers} layers')
        stats = cls(num_layers, num_experts, top_k, model=data.get("model"))
        samples_max = 0
        for i, entry in enumerate(layers):
            _validate_layer(entry, i, num_experts)
            stats.tokens_L[i] = int(entry["tokens"])
            stats.counts_LE[i] = [int(c) for c in entry["counts"]]
            coact = entry.get("coactivation")
            if coact is not None:
                stats.coact_LEE[i] = [[int(c) for c in row] for row in coact]
            stats.samples_L[i] = [[int(e) for e in row] for row in entry.get("samples") or []]
            samples_max = max(samples_max, len(stats.samples_L[i]))
        stats.max_samples = max(stats.max_samples, samples_max)
        return stats

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, separators=(",", ":"))

    @classmethod
    def load(cls, path: str) -> RoutingStats:
        try:
            with open(path) as f:
                data = json.load(f)
        except OSError as e:
            raise MoeClusterError(f"cannot read routing stats {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise MoeClusterError(f"routing stats {path} is not valid JSON ({e})") from None
        return cls.from_json(data)

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """Raise if these stats were recorded for a model of another shape."""
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise MoeClusterError(
                f"routing stats are for {self.num_layers} layers x {self.num_experts} experts but "
                f"the model has {num_layers} x {num_experts}; record them with "
                f"`moecluster profile-routing` on this model"
            )


def _validate_layer(entry: dict, layer: int, num_experts: int) -> None:
    where = f"routing stats layer {layer}"
    if not isinstance(entry, dict) or "tokens" not in entry or "counts" not in entry:
        raise MoeClusterError(f'{where}: needs "tokens" and "counts"')
    counts = entry["counts"]
    if (
        not isinstance(counts, list)
        or len(counts) != num_experts
        or any(not isinstance(c, int) or c < 0 for c in counts)
    ):
        raise MoeClusterError(f'{where}: "counts" must be {num_experts} non-negative integers')
    coact = entry.get("coactivation")
    if coact is not None and (
        not isinstance(coact, list)
        or len(coact) != num_experts
        or any(not isinstance(r, list) or len(r) != num_experts for r in coact)
    ):
        raise MoeClusterError(f'{where}: "coactivation" must be {num_experts}x{num_experts}')
    for row in entry.get("samples") or []:
        if not isinstance(row, list) or any(not isinstance(e, int) or not 0 <= e < num_experts for e in row):
            raise MoeClusterError(f"{where}: samples must be lists of expert ids 0..{num_experts - 1}")


# ---- synthetic traces and sampling (numpy) -----------------------------------------------
def sample_routing(weights_E: np.ndarray, top_k: int, num_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """ids_SK: for each token, top_k distinct experts drawn without replacement with probability
    proportional to weights_E (Plackett-Luce, by the Gumbel top-k trick)."""
    import numpy as np

    logw_E = np.log(np.maximum(np.asarray(weights_E, dtype=np.float64), 1e-12))
    keys_SE = logw_E[None, :] + rng.gumbel(size=(num_tokens, len(logw_E)))
    return np.argsort(-keys_SE, axis=1, kind="stable")[:, :top_k]


def sample_from_frequencies(freq_E: list[float], top_k: int, num_tokens: int, seed: int = 0) -> np.ndarray:
    """ids_SK whose per-expert activation frequencies approximate freq_E (sum top_k).

    Plackett-Luce marginals are flatter than its weights; a few multiplicative corrections make
    the sampled frequencies match freq_E (co-activation beyond popularity is not modelled).
    """
    import numpy as np

    num_experts = len(freq_E)
    target_E = np.minimum(np.asarray(freq_E, dtype=np.float64), 1.0)
    target_E = target_E * (top_k / max(target_E.sum(), 1e-12))
    weights_E = np.maximum(target_E, 1e-9)
    for it in range(6):
        rng = np.random.default_rng(seed + 1000 * it)
        ids = sample_routing(weights_E, top_k, 4096, rng)
        got_E = np.bincount(ids.ravel(), minlength=num_experts) / 4096
        weights_E = weights_E * np.clip(target_E / np.maximum(got_E, 1e-4), 0.5, 2.0)
        weights_E = np.maximum(weights_E, 1e-9)
    return sample_routing(weights_E, top_k, num_tokens, np.random.default_rng(seed))


def zipf_popularity(num_experts: int, alpha: float, rng: np.random.Generator, permute: bool = True) -> np.ndarray:
    """weights_E proportional to 1 / rank^alpha, ranks randomly permuted over the experts so that
    popular experts are not adjacent ids (else contiguous placement is trivially the worst)."""
    import numpy as np

    weights_E = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** alpha
    if permute:
        weights_E = weights_E[rng.permutation(num_experts)]
    return weights_E / weights_E.sum()


def zipf_trace(
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_tokens: int,
    alpha: float = 1.2,
    seed: int = 0,
    popularity_seed: int | None = None,
) -> list[list[list[int]]]:
    """trace_LTK: per layer, num_tokens routings drawn with Zipf(alpha) expert weights.

    popularity_seed fixes which experts are popular (per layer) independently of `seed`, so a
    held-out trace (another seed) has the same popular experts as the profiled one.
    """
    import numpy as np

    pop_rng = np.random.default_rng(seed if popularity_seed is None else popularity_seed)
    rng = np.random.default_rng([seed, 7])
    trace = []
    for _ in range(num_layers):
        weights_E = zipf_popularity(num_experts, alpha, pop_rng)
        trace.append(sample_routing(weights_E, top_k, num_tokens, rng).tolist())
    return trace


def stats_from_trace(
    trace_LTK: list[list[list[int]]], num_experts: int, max_samples: int = 2048, model: str | None = None
) -> RoutingStats:
    """RoutingStats recorded from a trace (one record call per layer)."""
    top_k = len(trace_LTK[0][0]) if trace_LTK and trace_LTK[0] else None
    stats = RoutingStats(len(trace_LTK), num_experts, top_k, max_samples, model)
    for layer, ids_TK in enumerate(trace_LTK):
        stats.record(layer, ids_TK)
    return stats
