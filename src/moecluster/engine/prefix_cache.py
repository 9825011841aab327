"""Prefix caching: the KV of prompts' block-aligned prefixes, kept in an LRU under a byte budget, so that a
prompt starting like an earlier one prefills only its new tokens.

Rank 0's PrefixIndex decides (lookup, store, evict) and names entries by integer ids in the step message;
every rank's PrefixStore holds the tensors of its own KV caches and follows. An entry holds positions
[0, L) of one prompt (L a multiple of BLOCK); since position p's keys depend only on tokens 0..p, it also
serves every shorter block-aligned prefix of that prompt. Plain KV caches, MLA's latent caches (positions [0, L))
and gpt-oss' sliding rings (the ring's state after exactly L positions) are supported.
Shape legend: Hk kv heads, L positions, Hd head dim, C latent width.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from moecluster.models.layers import KVCache, SlidingKVCache

BLOCK = 64  # prefixes are matched and stored in multiples of this many tokens; the scheduler also prefills in
# chunks of BLOCK positions aligned to 0, so a prefix's keys have the same bits whether computed or restored


def attention_caches(model) -> list[torch.nn.Module]:
    """Every layer's cache module (KVCache, gpt-oss' sliding ring, MLA's LatentCache...), once each."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():  # attention may sit inside a transformation's wrapper
        for attr in ("cache", "ring"):  # gpt-oss' sliding layers keep their ring in .ring
            cache = getattr(module, attr, None)
            if isinstance(cache, torch.nn.Module):
                found.setdefault(id(cache), cache)
    return list(found.values())


def _kind(cache: torch.nn.Module) -> str | None:
    """How a cache holds positions: "kv" (KVCache: k, v [slot, Hk, L, Hd]), "latent" (MLA: kv [slot, L, C]),
    "ring" (a sliding window's ring, kept whole), None (unknown: no prefix caching)."""
    from moecluster.models.deepseek_v3 import LatentCache

    return {KVCache: "kv", LatentCache: "latent", SlidingKVCache: "ring"}.get(type(cache))


def _positions(cache: torch.nn.Module, buf: torch.Tensor, slot: int, length: int) -> torch.Tensor:
    """The view of one slot's first `length` positions of a cache buffer (a ring: all of it)."""
    kind = _kind(cache)
    return buf[slot, :, :length] if kind == "kv" else buf[slot, :length] if kind == "latent" else buf[slot]


class PrefixStore:
    """One rank's entries: id -> each cache buffer's saved positions (rings: their state at the entry's length)."""

    def __init__(self, model):
        self.caches = attention_caches(model)
        self.entries: dict[int, list[torch.Tensor]] = {}

    def snapshot_rings(self, slot: int) -> list[torch.Tensor]:
        """The rings of `slot` as they are now (taken when the prefill has done exactly an entry's positions)."""
        return [buf[slot].clone() for c in self.caches if _kind(c) == "ring" for buf in c.buffers()]

    def save(self, entry: int, slot: int, length: int, rings: list[torch.Tensor] | None = None) -> None:
        rings = list(rings if rings is not None else self.snapshot_rings(slot))
        self.entries[entry] = [
            rings.pop(0) if _kind(c) == "ring" else _positions(c, buf, slot, length).clone()
            for c in self.caches
            for buf in c.buffers()
        ]

    def restore(self, entry: int, slot: int, length: int) -> None:
        saved = iter(self.entries[entry])
        for c in self.caches:
            for buf in c.buffers():
                t = next(saved)
                _positions(c, buf, slot, length)[...] = t if _kind(c) == "ring" else _positions(c, t[None], 0, length)

    def evict(self, entries: list[int]) -> None:
        for e in entries:
            self.entries.pop(e, None)


class PrefixIndex:
    """Rank 0: which prompt prefixes are stored, least recently used first, within budget_bytes. A ring holds
    only the last `window` positions, so with sliding layers an entry longer than the smallest ring serves
    only its own length (multi-turn chat: the next turn starts with this one), not its shorter prefixes."""

    def __init__(self, model, budget_bytes: int):
        caches = attention_caches(model)
        kinds = [_kind(c) for c in caches]
        self.enabled = bool(caches) and None not in kinds and budget_bytes > 0
        per_slot = [(_kind(c), buf[0]) for c in caches for buf in c.buffers()]
        self.bytes_per_token = sum(
            b.nbytes // (b.shape[1] if kind == "kv" else b.shape[0]) for kind, b in per_slot if kind != "ring"
        )
        self.fixed_bytes = sum(b.nbytes for kind, b in per_slot if kind == "ring")  # rings: whole, any length
        rings = [b.shape[1] for kind, b in per_slot if kind == "ring"]
        self.ring = min(rings) if rings else None
        self.budget = budget_bytes
        self.lru: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # entry -> its tokens
        self.by_prefix: dict[tuple[int, ...], int] = {}  # every prefix an entry serves -> the entry
        self.used = 0
        self.next_id = 0
        self.hits = self.hit_tokens = 0

    def size(self, length: int) -> int:
        return length * self.bytes_per_token + self.fixed_bytes

    def served(self, length: int) -> range:
        """The prefix lengths an entry of `length` positions serves."""
        exact = self.ring is not None and length > self.ring
        return range(length if exact else BLOCK, length + 1, BLOCK)

    def lookup(self, ids: list[int]) -> tuple[int, int] | None:
        """(entry, L): the longest stored prefix, leaving at least one token to prefill (for the logits)."""
        if not self.enabled:
            return None
        for length in range((len(ids) - 1) // BLOCK * BLOCK, 0, -BLOCK):
            entry = self.by_prefix.get(tuple(ids[:length]))
            if entry is not None:
                self.lru.move_to_end(entry)
                self.hits += 1
                self.hit_tokens += length
                return entry, length
        return None

    def plan_store(self, ids: list[int], have: int) -> tuple[int, int, list[int]] | None:
        """(entry, L, evicted entries) to store this prompt's longest block-aligned prefix, if it is new. With
        rings, only the prompt's whole block-aligned length (its rings are snapshotted there), if it fits."""
        if not self.enabled or self.budget < self.size(BLOCK):
            return None
        length = len(ids) // BLOCK * BLOCK
        if self.ring is None:  # the longest that fits
            length = min(length, (self.budget - self.fixed_bytes) // self.bytes_per_token // BLOCK * BLOCK)
        size = self.size(length)
        if length <= have or size > self.budget or tuple(ids[:length]) in self.by_prefix:
            return None
        evicted = []
        while self.used + size > self.budget:
            old, tokens = self.lru.popitem(last=False)
            for n in self.served(len(tokens)):
                if self.by_prefix.get(tokens[:n]) == old:
                    del self.by_prefix[tokens[:n]]
            self.used -= self.size(len(tokens))
            evicted.append(old)
        entry, self.next_id = self.next_id, self.next_id + 1
        tokens = tuple(ids[:length])
        self.lru[entry] = tokens
        for n in self.served(length):
            self.by_prefix[tokens[:n]] = entry  # the newest entry serves its prefixes
        self.used += size
        return entry, length, evicted
