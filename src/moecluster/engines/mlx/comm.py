"""The mx.distributed group of an MLX job, and where its watchdog (watchdog.py) links to rank 0.

Watchdog address: MOECLUSTER_MLX_WATCHDOG=host:port (the local launcher sets it; with `mlx.launch` pass
`--env MOECLUSTER_MLX_WATCHDOG=<rank 0 ip>:<port>`), else rank 0's first ring address with port + 1000.
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlx.core as mx

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
