"""Chunked prefill: a long prompt is prefilled over several scheduler steps, at most `chunk` positions per step,
and the running streams decode one token between chunks, so a long prompt delays them by a chunk's forward
instead of the whole prompt's. Chunk ends are multiples of `chunk` (a multiple of prefix_cache.BLOCK), and every
chunk runs as the same BLOCK-position forwards aligned to 0 that an unchunked prefill runs, so the output is
bit-identical with and without chunking (and with or without a restored prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFILL_CHUNK = 128  # positions per step: the lowest p99 gap of the running streams in benchmarks/serving.py
# --server-cases (0.28 s vs 0.36 s at 256, 0.60 s at 512, 1.75 s unchunked) for +5% on the long prompt's TTFT


@dataclass
class PrefillState:
    """A prompt under prefill: its slots (the first is prefilled, the others get copies at the end), its ids, the
    prefix cache's hit (entry, L) restored with the first chunk, and how many positions are done."""

    slots: list[int]
    ids: list[int]
    hit: tuple[int, int] | None
    done: int = -1

    def next_admit(self, chunk: int) -> dict:
        """The next step's admit: up to `chunk` positions (0: the rest), aligned to multiples of chunk."""
        first = self.done < 0
        if first:
            self.done = self.hit[1] if self.hit else 0
        end = len(self.ids) if chunk <= 0 else min(len(self.ids), (self.done // chunk + 1) * chunk)
        adm: dict = {"slot": self.slots[0], "prompt_ids": self.ids[self.done : end], "pos": self.done}
        if first and self.hit:
            adm["prefix"] = list(self.hit)
        if end < len(self.ids):
            adm["partial"] = True
        elif len(self.slots) > 1:
            adm["copies"] = self.slots[1:]
        self.done = end
        return adm
