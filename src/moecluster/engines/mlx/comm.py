"""The mx.distributed group of an MLX job, where its watchdog (watchdog.py) links to rank 0, and MlxComm (the
collectives, under the watchdog).

Watchdog address: MOECLUSTER_MLX_WATCHDOG=host:port (the local launcher sets it; with `mlx.launch` pass
`--env MOECLUSTER_MLX_WATCHDOG=<rank 0 ip>:<port>`), else rank 0's first ring address with port + 1000.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import mlx.core as mx
import numpy as np

from moecluster.errors import MoeClusterError


def init_group() -> Any:
    """The job's group: ring (MLX_HOSTFILE, as written by `mlx.launch` or our launcher), jaccl
    (MLX_JACCL_COORDINATOR), else a single-rank group."""
    if os.environ.get("MLX_JACCL_COORDINATOR"):
        backend = "jaccl"
    elif os.environ.get("MLX_HOSTFILE"):
        backend = "ring"
    else:
        return mx.distributed.init()
    try:
        return mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise MoeClusterError(f"mx.distributed could not start the {backend} backend: {e}") from None


def watchdog_address() -> tuple[str, int] | None:
    spec = os.environ.get("MOECLUSTER_MLX_WATCHDOG")
    if not spec and os.environ.get("MLX_HOSTFILE"):
        try:
            with open(os.environ["MLX_HOSTFILE"]) as f:
                host, port = json.load(f)[0][0].rsplit(":", 1)
            spec = f"{host}:{int(port) + 1000}"
        except (OSError, ValueError, IndexError, KeyError):
            spec = None
    if not spec:
        return None
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        raise MoeClusterError(f"MOECLUSTER_MLX_WATCHDOG={spec!r}: expected host:port")
    return host, int(port)


FAILURE_WAIT_S = 2.0  # after a collective raised, how long to wait for the watchdog to name the rank


class MlxComm:
    """The collectives of an MLX job, each evaluated under the watchdog: the scheduler's StepComm
    (engine/interface.py) and the expert-parallel exchange. A collective that fails (the ring backend raises when
    a peer's connection is lost) or a failure the watchdog reports raises one MoeClusterError naming the rank."""

    def __init__(self, group: Any, watchdog: Any = None):
        self.group, self.watchdog = group, watchdog
        self.rank, self.world_size = group.rank(), group.size()
        self.failed = False

    def failure(self) -> str:
        """The watchdog's message once a peer failed or a wait timed out, else ""."""
        return self.watchdog.failure() if self.watchdog is not None else ""

    def evaluate(self, array: mx.array, what: str) -> None:
        """mx.eval(array), which contains a collective, named `what` for the watchdog and in errors."""
        if self.failed:
            raise MoeClusterError(self.failure() or f"rank {self.rank}: the job has failed")
        try:
            if self.watchdog is None:
                mx.eval(array)
                return
            with self.watchdog.waiting(what):
                mx.eval(array)
        except RuntimeError as e:
            self.failed = True
            deadline = time.monotonic() + FAILURE_WAIT_S
            while not self.failure() and self.watchdog is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            raise MoeClusterError(self.failure() or f"rank {self.rank}: {what} failed ({e})") from None

    def all_sum(self, array: mx.array, what: str) -> mx.array:
        if self.world_size == 1:
            return array
        out = mx.distributed.all_sum(array, group=self.group)
        self.evaluate(out, what)
        return out

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """src's bytes on every rank: its length, then its bytes, each by an all_sum the others add zeros to."""
        if self.world_size == 1:
            assert data is not None
            return data
        mine = self.rank == src
        if mine and data is None:
            raise MoeClusterError("internal: broadcast_bytes from this rank without data")
        n = self.all_sum(mx.array([len(data) if mine and data is not None else 0], dtype=mx.int32), "a broadcast")
        size = int(n.item())  # type: ignore[arg-type]
        payload = np.frombuffer(data, dtype=np.uint8) if mine and data is not None else np.zeros(size, np.uint8)
        out = self.all_sum(mx.array(payload.astype(np.int32)), "a broadcast")  # int32: sums of bytes stay exact
        return np.array(out).astype(np.uint8).tobytes()

    def broadcast(self, x: Any, src: int = 0) -> Any:
        """Copy the integer tensor x (torch, CPU) from rank src to every rank, in place, as the torch Comm's
        broadcast (calibrate's token broadcast): an all_sum the other ranks add zeros to. Returns x."""
        if self.world_size == 1:
            return x
        view = x.numpy()  # shares x's memory: the copy below writes into x
        mine = view.astype(np.int32) if self.rank == src else np.zeros(view.shape, np.int32)
        view[...] = np.array(self.all_sum(mx.array(mine), "a broadcast"))
        return x

    def barrier(self) -> None:
        self.all_sum(mx.array([1], dtype=mx.int32), "a barrier")

    def mark_failed(self) -> None:
        self.failed = True

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
