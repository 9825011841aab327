"""Prefix caching: the KV of prompts' block-aligned prefixes, kept in an LRU under a byte budget, so that a
prompt starting like an earlier one prefills only its new tokens.

Rank 0's PrefixIndex decides (lookup, store, evict) and names entries by integer ids in the step message;
every rank's PrefixStore holds the tensors of its own KV caches and follows. An entry holds positions
[0, L) of one prompt (L a multiple of BLOCK); since position p's keys depend only on tokens 0..p, it also
serves every shorter block-aligned prefix of that prompt. Only plain KVCache layers are supported (a sliding
ring or a latent cache: prefix caching is off). Shape legend: Hk kv heads, L positions, Hd head dim.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from moecluster.models.layers import KVCache

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


def kv_caches(model) -> list[KVCache] | None:
    """Every layer's KVCache, or None if some layer has another kind of cache."""
    caches = attention_caches(model)
    return [c for c in caches if isinstance(c, KVCache)] if caches and all(type(c) is KVCache for c in caches) else None


class PrefixStore:
    """One rank's entries: id -> [(k_HkLHd, v_HkLHd) per layer]."""

    def __init__(self, model):
        self.caches = kv_caches(model) or []
        self.entries: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def save(self, entry: int, slot: int, length: int) -> None:
        self.entries[entry] = [(c.k[slot, :, :length].clone(), c.v[slot, :, :length].clone()) for c in self.caches]

    def restore(self, entry: int, slot: int, length: int) -> None:
        for c, (k, v) in zip(self.caches, self.entries[entry], strict=True):
            c.k[slot, :, :length] = k[:, :length]
            c.v[slot, :, :length] = v[:, :length]

    def evict(self, entries: list[int]) -> None:
        for e in entries:
            self.entries.pop(e, None)


class PrefixIndex:
    """Rank 0: which prompt prefixes are stored, least recently used first, within budget_bytes."""

    def __init__(self, model, budget_bytes: int):
        caches = kv_caches(model) or []
        self.enabled = bool(caches) and budget_bytes > 0
        self.bytes_per_token = sum(2 * c.k.shape[1] * c.k.shape[3] * c.k.element_size() for c in caches)
        self.budget = budget_bytes
        self.lru: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # entry -> its tokens
        self.by_prefix: dict[tuple[int, ...], int] = {}  # every block-aligned prefix of an entry -> the entry
        self.used = 0
        self.next_id = 0
        self.hits = self.hit_tokens = 0

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
        """(entry, L, evicted entries) to store this prompt's longest block-aligned prefix, if it is new."""
        if not self.enabled:
            return None
        length = min(len(ids), self.budget // self.bytes_per_token) // BLOCK * BLOCK  # the longest that fits
        size = length * self.bytes_per_token
        if length <= have or tuple(ids[:length]) in self.by_prefix:
            return None
        evicted = []
        while self.used + size > self.budget:
            old, tokens = self.lru.popitem(last=False)
            for n in range(BLOCK, len(tokens) + 1, BLOCK):
                if self.by_prefix.get(tokens[:n]) == old:
                    del self.by_prefix[tokens[:n]]
            self.used -= len(tokens) * self.bytes_per_token
            evicted.append(old)
        entry, self.next_id = self.next_id, self.next_id + 1
        tokens = tuple(ids[:length])
        self.lru[entry] = tokens
        for n in range(BLOCK, length + 1, BLOCK):
            self.by_prefix[tokens[:n]] = entry  # the newest entry serves its prefixes
        self.used += size
        return entry, length, evicted
