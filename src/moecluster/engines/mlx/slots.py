"""KV-cache slots for the MLX engine: one mlx-lm prompt cache per slot, so the scheduler's step (rows of different
slots at different positions) runs on mlx-lm's models unchanged.

Rows of one step are forwarded one after another (each its own forward and its own MoE all-reduces, in the same
order on every rank). Target: one batched forward over mlx-lm's BatchKVCache (per-row offsets, left padding).
Forwards run on a thread-local stream, as mlx-lm's generate does: the scheduler runs them on its own thread.
Shape legend: T tokens, V vocab.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from moecluster.errors import MoeClusterError

_STREAM = mx.new_thread_local_stream(mx.default_device())


class SlotCaches:
    """num_slots prompt caches of one mlx-lm model; each holds the positions [0, offset) of one sequence."""

    def __init__(self, model: Any, num_slots: int):
        if num_slots < 1:
            raise MoeClusterError(f"the number of cache slots must be >= 1, got {num_slots}")
        self.model = model
        self.caches: list[list[Any] | None] = [None] * num_slots

    def forward(self, tokens_T: list[int], pos: int, slot: int) -> mx.array:
        """Feed tokens_T at positions pos.. of `slot` (pos 0: a new sequence); fp32 logits_V of the last one."""
        if not 0 <= slot < len(self.caches):
            raise MoeClusterError(f"internal: cache slot {slot} outside 0..{len(self.caches) - 1}")
        cache = self.caches[slot]
        if pos == 0 or cache is None:
            if pos != 0:
                raise MoeClusterError(f"internal: slot {slot} is empty but position {pos} was asked")
            cache = self.caches[slot] = make_prompt_cache(self.model)
        offset = cache[0].offset if cache else 0
        if offset != pos:
            raise MoeClusterError(f"internal: slot {slot} holds {offset} positions but the step is at {pos}")
        with mx.stream(_STREAM):
            logits_V = self.model(mx.array([tokens_T]), cache=cache)[0, -1].astype(mx.float32)
            mx.eval(logits_V, [c.state for c in cache])  # nothing lazy crosses to another thread or step
        return logits_V

    def copy(self, src: int, dsts: list[int]) -> None:
        """Slots dsts become independent copies of slot src."""
        for dst in dsts:
            self.caches[dst] = copy.deepcopy(self.caches[src])  # arrays deep-copied: later writes stay apart

    def nbytes(self) -> int:
        """Bytes the slots' caches hold now (mlx-lm grows them in steps as sequences lengthen)."""
        total = 0
        for cache in self.caches:
            for c in cache or []:
                total += sum(a.nbytes for a in _arrays(c.state))
        return total


def _arrays(state: Any) -> list[mx.array]:
    if isinstance(state, mx.array):
        return [state]
    if isinstance(state, (list, tuple)):
        return [a for s in state for a in _arrays(s)]
    return []
