"""What the scheduler, the server, metrics and tracing need from an engine: the one interface the torch Engine
(engine/generate.py) and the MLX engine (engines/mlx/engine.py) both implement.

A structural Protocol: the MLX engine does not import this module (engine | engines must not import each other);
`runtime.open_serving_engine` returns either behind it, and tests check both against it.

Lockstep contract: rank 0's Scheduler decides every step and broadcasts it with `comm.broadcast_bytes`; every
rank then calls `step` with the same arguments, so every rank runs the same forward (expert parallelism inside).
Shape legend: B batch rows, T tokens, V vocab.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from moecluster.tokenizer import Tokenizer


@runtime_checkable
class StepComm(Protocol):
    """The collectives the scheduler uses; each call fails with one MoeClusterError naming a missing rank
    instead of waiting forever."""

    rank: int
    world_size: int

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes: ...

    def barrier(self) -> None: ...

    def mark_failed(self) -> None:
        """A peer failed: never wait for the other ranks again (at exit included)."""
        ...


@runtime_checkable
class ServingEngine(Protocol):
    """A loaded model with `num_slots` KV-cache slots, in lockstep with the other ranks of its job."""

    tokenizer: Tokenizer
    comm: Any  # a StepComm, or None on a single process
    rank: int
    world_size: int
    max_seq_len: int  # positions per slot
    dense_bytes: int  # non-expert weight bytes one decode step reads

    @property
    def num_slots(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def model(self) -> Any:
        """The engine's model (torch: prefix caching reads its KV caches; other models disable prefix caching)."""
        ...

    def step(self, tokens_BT: torch.Tensor, pos_B: torch.Tensor, slots_B: torch.Tensor) -> torch.Tensor:
        """One forward: row b's tokens at positions pos_B[b].. of cache slot slots_B[b]; returns fp32 logits of
        each row's last token, logits_BV (a torch tensor on every engine: sampling is shared)."""
        ...

    def expert_bytes_last_step(self) -> int:
        """Expert weight bytes this rank read in the last step."""
        ...

    def copy_slot(self, src: int, dsts: list[int]) -> None:
        """Copy slot src's cache to slots dsts (the n choices of one prompt share its prefill)."""
        ...

    def expert_bytes(self) -> int:
        """Bytes of one routed expert as this engine holds it (weights, scales and biases; 0 without experts)."""
        ...

    def kv_cache_bytes(self) -> int:
        """Bytes this rank holds (or reserved) for KV caches."""
        ...

    def routing_shape(self) -> tuple[int, int]:
        """(MoE layers, routed experts per layer)."""
        ...

    def set_routing_recorder(self, recorder: Any) -> None:
        """Every MoE layer calls recorder.record(moe_layer_index, ids_NK as lists) with each step's routing
        (None: stop). Expert load for /metrics and profile-routing."""
        ...
