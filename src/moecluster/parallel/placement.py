"""Placement: which ranks hold each expert, and which holder computes each (token, expert) pair.

Legend: T tokens, K top-k, E experts, L layers, N ranks (world_size).

Every rank builds the same Placement and calls `assign` with the same router output, so every
rank agrees, without any exchange, on who computes each pair. Pure Python, no torch, no numpy.

Placement JSON (`moecluster place --out`, `--placement FILE.json`), format "moecluster-placement/1":

    {
      "format": "moecluster-placement/1",
      "num_experts": 16, "num_layers": 40, "world_size": 3,
      "speeds": [1.0, 1.0, 0.5],             # optional, per rank, default all 1.0
      "default": [[0], [0], [1, 2], ...],     # optional: holder ranks of each expert, every layer
      "layers": [null, [[0], [1, 2], ...], ...] # optional: per layer, holder ranks of each expert;
                                               # null (or a missing "layers") = use "default"
    }

`default` / each `layers[l]` is a list of E lists of rank indices (0..N-1); every expert needs at
least one holder. An expert with several holders is replicated: its weights are loaded on each of
them and `assign` balances the work among them. Other keys (e.g. "strategy", "planner") are
informational and ignored when loading.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from moecluster.errors import MoeClusterError

FORMAT = "moecluster-placement/1"
# A replicated expert with more pairs than this in one call (prefill) is split across holders
# in chunks; decode calls (T <= 8) never reach it, so each expert's weights are read once.
SPLIT_CHUNK = 16


def contiguous_holders(num_experts: int, world_size: int) -> list[list[int]]:
    """Rank r holds experts [r*E//N, (r+1)*E//N): block sizes differ by at most one."""
    _check_not_more_ranks(num_experts, world_size, "contiguous")
    rank_E = [0] * num_experts
    for rank in range(world_size):
        for e in range(rank * num_experts // world_size, (rank + 1) * num_experts // world_size):
            rank_E[e] = rank
    return [[r] for r in rank_E]


def round_robin_holders(num_experts: int, world_size: int) -> list[list[int]]:
    """Expert e on rank e % N (with 2 ranks: even experts on rank 0, odd on rank 1)."""
    _check_not_more_ranks(num_experts, world_size, "round-robin")
    return [[e % world_size] for e in range(num_experts)]


def groups_holders(num_experts: int, world_size: int, num_groups: int | None = None) -> list[list[int]]:
    """Experts split into G contiguous groups; rank r serves group r % G, so each group is
    replicated on about N/G ranks. Default G = ceil(N/2): every expert on about 2 ranks."""
    g = num_groups or max(1, math.ceil(world_size / 2))
    g = min(g, world_size, num_experts)
    if g < 1:
        raise MoeClusterError(f"groups: the number of groups must be >= 1, got {num_groups}")
    return [[r for r in range(world_size) if r % g == e * g // num_experts] for e in range(num_experts)]


def _check_not_more_ranks(num_experts: int, world_size: int, name: str) -> None:
    if world_size > num_experts:
        raise MoeClusterError(
            f"{name} placement with {world_size} ranks but only {num_experts} experts would leave "
            f"ranks without experts; use the groups strategy (`--placement groups`, or "
            f"`moecluster place --strategy groups`), which replicates experts across ranks"
        )


class Placement:
    """Immutable map (layer, expert) -> holder ranks, plus per-rank speeds for balancing."""

    __slots__ = (
        "world_size",
        "num_experts",
        "num_layers",
        "speeds",
        "_holders_LE",
        "_owner_LE",
        "_replicated_L",
        "_experts_NL",
        "_inv_speed_N",
    )

    def __init__(
        self, holders_LE: Sequence[Sequence[Sequence[int]]], world_size: int, speeds: Sequence[float] | None = None
    ) -> None:
        """holders_LE[layer][expert] = ranks holding that expert (>= 1, each in 0..N-1)."""
        if world_size < 1:
            raise MoeClusterError(f"world_size must be >= 1, got {world_size}")
        if not holders_LE or not holders_LE[0]:
            raise MoeClusterError("a placement needs at least one layer and one expert")
        speeds = tuple(float(s) for s in speeds) if speeds is not None else (1.0,) * world_size
        if len(speeds) != world_size or any(not s > 0 for s in speeds):
            raise MoeClusterError(f"speeds must be {world_size} positive numbers, got {list(speeds)}")
        num_experts = len(holders_LE[0])
        holders = tuple(
            tuple(_clean_holders(hs, layer, e, world_size) for e, hs in enumerate(layer_h))
            for layer, layer_h in enumerate(holders_LE)
        )
        for layer, layer_h in enumerate(holders):
            if len(layer_h) != num_experts:
                raise MoeClusterError(
                    f"layer {layer} lists {len(layer_h)} experts, layer 0 lists "
                    f"{num_experts}: every layer needs one entry per expert"
                )
        s = object.__setattr__
        s(self, "world_size", world_size)
        s(self, "num_experts", num_experts)
        s(self, "num_layers", len(holders))
        s(self, "speeds", speeds)
        s(self, "_holders_LE", holders)
        # Owner rank of single-holder experts, -1 for replicated ones (the fast path of assign).
        s(self, "_owner_LE", tuple(tuple(hs[0] if len(hs) == 1 else -1 for hs in lh) for lh in holders))
        s(self, "_replicated_L", tuple(any(len(hs) > 1 for hs in lh) for lh in holders))
        s(
            self,
            "_experts_NL",
            tuple(tuple(tuple(e for e, hs in enumerate(lh) if r in hs) for lh in holders) for r in range(world_size)),
        )
        s(self, "_inv_speed_N", tuple(1.0 / x for x in speeds))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Placement is immutable")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Placement)
            and self.world_size == other.world_size
            and self.speeds == other.speeds
            and self._holders_LE == other._holders_LE
        )

    def __hash__(self) -> int:
        return hash((self.world_size, self.speeds, self._holders_LE))

    def __repr__(self) -> str:
        return (
            f"Placement(world_size={self.world_size}, num_experts={self.num_experts}, "
            f"num_layers={self.num_layers}, replicas={self.num_replicas()})"
        )

    # ---- queries -------------------------------------------------------------------------
    def holders(self, layer: int, expert: int) -> tuple[int, ...]:
        """Ranks holding this expert's weights in this layer (sorted)."""
        return self._holders_LE[layer][expert]

    def experts_of(self, rank: int, layer: int) -> list[int]:
        """Sorted experts this rank holds in this layer (may be empty)."""
        return list(self._experts_NL[rank][layer])

    def num_expert_copies(self, rank: int) -> int:
        """Expert weight blocks (over all layers) this rank holds: its expert memory / bytes per expert."""
        return sum(len(x) for x in self._experts_NL[rank])

    def num_replicas(self) -> int:
        """Expert copies beyond one per (layer, expert): the extra expert memory, in experts."""
        return sum(len(hs) - 1 for lh in self._holders_LE for hs in lh)

    # ---- the per-layer decision ----------------------------------------------------------
    def assign(self, layer: int, ids_TK: list[list[int]]) -> list[list[int]]:
        """rank_TK: the rank that computes each (token, k) pair. A pure function of its inputs.

        Single-holder experts go to their holder. Replicated experts, taken per distinct expert
        (most pairs first, then by id), go to the holder with the least (load + pairs) / speed,
        load being pairs already assigned in this call; ties rotate by a salt from the ids.
        """
        owner_E = self._owner_LE[layer]
        if not self._replicated_L[layer]:
            return [[owner_E[e] for e in row] for row in ids_TK]
        counts: dict[int, int] = {}
        for row in ids_TK:
            for e in row:
                counts[e] = counts.get(e, 0) + 1
        load_N = [0.0] * self.world_size
        chosen: dict[int, int] = {}
        replicated = []
        for e, c in counts.items():
            r = owner_E[e]
            if r >= 0:
                load_N[r] += c
                chosen[e] = r
            else:
                replicated.append((-c, e))
        if not replicated:
            return [[chosen[e] for e in row] for row in ids_TK]
        replicated.sort()
        salt = sum(counts)
        split: dict[int, list[int]] = {}
        holders_E = self._holders_LE[layer]
        for neg_c, e in replicated:
            if -neg_c > SPLIT_CHUNK:
                split[e] = self._split_expert(-neg_c, holders_E[e], load_N, e + salt)
                continue
            chosen[e] = self._pick(-neg_c, holders_E[e], load_N, e + salt)
        if split:
            return self._map_split(ids_TK, chosen, split)
        return [[chosen[e] for e in row] for row in ids_TK]

    def _pick(self, c: int, hs: tuple[int, ...], load_N: list[float], rot: int) -> int:
        """The holder with the least (load + c) / speed; ties go to the first from position rot."""
        inv = self._inv_speed_N
        n = len(hs)
        best, best_cost = -1, float("inf")
        for i in range(n):
            h = hs[(rot + i) % n]
            cost = (load_N[h] + c) * inv[h]
            if cost < best_cost:
                best, best_cost = h, cost
        load_N[best] += c
        return best

    def _split_expert(self, c: int, hs: tuple[int, ...], load_N: list[float], rot: int) -> list[int]:
        """Ranks for the expert's pairs in order, in chunks of SPLIT_CHUNK (large prefill calls)."""
        out: list[int] = []
        while c > 0:
            n = min(c, SPLIT_CHUNK)
            out.extend([self._pick(n, hs, load_N, rot)] * n)
            c -= n
        return out

    @staticmethod
    def _map_split(ids_TK: list[list[int]], chosen: dict[int, int], split: dict[int, list[int]]) -> list[list[int]]:
        used = {e: 0 for e in split}
        rank_TK = []
        for row in ids_TK:
            out = []
            for e in row:
                if e in split:
                    out.append(split[e][used[e]])
                    used[e] += 1
                else:
                    out.append(chosen[e])
            rank_TK.append(out)
        return rank_TK

    # ---- JSON ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The documented JSON form (compact "default" when all layers are the same)."""
        data: dict = {
            "format": FORMAT,
            "num_experts": self.num_experts,
            "num_layers": self.num_layers,
            "world_size": self.world_size,
            "speeds": list(self.speeds),
        }
        first = self._holders_LE[0]
        if all(lh == first for lh in self._holders_LE):
            data["default"] = [list(hs) for hs in first]
        else:
            data["layers"] = [[list(hs) for hs in lh] for lh in self._holders_LE]
        return data

    @classmethod
    def from_json(cls, data: dict) -> Placement:
        """Parse the documented JSON form; raises MoeClusterError saying what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MoeClusterError(
                f'not a placement file: expected "format": "{FORMAT}" (write one with `moecluster place`)'
            )
        try:
            num_experts, num_layers = int(data["num_experts"]), int(data["num_layers"])
            world_size = int(data["world_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise MoeClusterError(
                f"placement JSON needs integer num_experts, num_layers and world_size ({e})"
            ) from None
        default, layers = data.get("default"), data.get("layers")
        if layers is None:
            layers = [None] * num_layers
        if not isinstance(layers, list) or len(layers) != num_layers:
            raise MoeClusterError(f'placement JSON: "layers" must list {num_layers} layers')
        holders_LE = []
        for layer, lh in enumerate(layers):
            lh = default if lh is None else lh
            if not isinstance(lh, list) or len(lh) != num_experts:
                raise MoeClusterError(
                    f"placement JSON: layer {layer} needs a list of {num_experts} holder lists "
                    f'(give "default" or an entry in "layers")'
                )
            holders_LE.append(lh)
        return cls(holders_LE, world_size, data.get("speeds"))


def _clean_holders(hs: Sequence[int], layer: int, expert: int, world_size: int) -> tuple[int, ...]:
    if isinstance(hs, (str, bytes)) or not isinstance(hs, Sequence) or len(hs) == 0:
        raise MoeClusterError(
            f"layer {layer} expert {expert} has no holder rank: every expert "
            f"needs at least one rank in 0..{world_size - 1}"
        )
    out = []
    for r in hs:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world_size:
            raise MoeClusterError(
                f"layer {layer} expert {expert}: holder {r!r} is not a rank "
                f"index in 0..{world_size - 1}; re-plan for {world_size} ranks"
            )
        out.append(r)
    if len(set(out)) != len(out):
        raise MoeClusterError(f"layer {layer} expert {expert} lists a rank twice: {list(hs)}")
    return tuple(sorted(out))


def load_placement_file(path: str) -> Placement:
    """Read a placement JSON file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise MoeClusterError(f"cannot read placement file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise MoeClusterError(f"placement file {path} is not valid JSON ({e})") from None
    return Placement.from_json(data)


def make_placement(spec: str, num_experts: int, num_layers: int, world_size: int) -> Placement:
    """spec: "contiguous" | "round-robin" | "groups" | "groups:G" | path to a placement JSON file."""
    if spec == "contiguous":
        return Placement([contiguous_holders(num_experts, world_size)] * num_layers, world_size)
    if spec in ("round-robin", "round_robin"):
        return Placement([round_robin_holders(num_experts, world_size)] * num_layers, world_size)
    if spec == "groups" or spec.startswith("groups:"):
        try:
            num_groups = int(spec.split(":", 1)[1]) if ":" in spec else None
        except ValueError:
            raise MoeClusterError(f"--placement {spec!r}: write groups:G with G an integer") from None
        return Placement([groups_holders(num_experts, world_size, num_groups)] * num_layers, world_size)
    if not os.path.exists(spec):
        raise MoeClusterError(
            f"--placement {spec!r}: expected contiguous, round-robin, groups, "
            f"groups:G or an existing placement JSON file"
        )
    placement = load_placement_file(spec)
    got = (placement.num_experts, placement.num_layers, placement.world_size)
    want = (num_experts, num_layers, world_size)
    if got != want:
        raise MoeClusterError(
            f"placement {spec} is for {got[0]} experts, {got[1]} layers, {got[2]} ranks but this "
            f"run has {want[0]} experts, {want[1]} layers, {want[2]} ranks; re-run "
            f"`moecluster place --nodes {world_size}` for this model"
        )
    return placement
