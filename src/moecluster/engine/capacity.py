"""Will a server fit? Before any weight is read, each rank compares the memory it is about to hold (its weights:
replicated ones plus its experts, and the KV cache of --max-batch x --max-seq-len) with the machine's free
memory (MemAvailable), so that a too large cache fails in a second with numbers, not after a long load.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from moecluster.errors import MoeClusterError
from moecluster.loading import default_dtype, read_config
from moecluster.models.shape import EXPERT_FORMAT_BYTES

MEMINFO = Path("/proc/meminfo")


def mem_available() -> int:
    """The kernel's estimate of memory that can be allocated without swapping (MemAvailable), in bytes."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(psutil.virtual_memory().available)  # not Linux: psutil's equivalent


@dataclass(frozen=True)
class ServingMemory:
    """What one rank will hold while serving, in bytes."""

    weight_bytes: int  # replicated weights plus this rank's experts
    kv_bytes: int  # num_slots x context of KV cache (sliding layers: their window only)
    num_slots: int
    context: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_bytes


def serving_memory(
    model_dir: str | Path,
    dtype: str | None,
    num_slots: int,
    max_seq_len: int | None,
    world_size: int = 1,
    rank: int = 0,
    placement_spec: str = "contiguous",
    quant_fmt: str | None = None,
    quant_dense: str | None = None,
) -> ServingMemory:
    """One rank's weights and KV cache, from config.json alone (nothing is loaded)."""
    raw, cfg = read_config(model_dir)
    dtype = dtype or default_dtype(raw)
    shape = cfg.shape()
    act = 4 if dtype == "fp32" else 2
    shape = shape.with_dtype(quant_fmt) if quant_fmt in EXPERT_FORMAT_BYTES else shape
    shape = shape.with_dense(quant_dense) if quant_dense else shape
    if dtype == "fp32" and shape.expert_weight_bytes is None:
        shape = replace(shape, weight_bytes=4.0)
    context = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
    num_experts = shape.num_moe_layers * shape.num_experts
    if world_size > 1:
        from moecluster.parallel.placement import make_placement

        placement = make_placement(placement_spec, shape.num_experts, shape.num_moe_layers, world_size)
        num_experts = sum(len(placement.experts_of(rank, layer)) for layer in range(shape.num_moe_layers))
    weights = shape.replicated_bytes + num_experts * shape.expert_bytes
    kv = num_slots * shape.kv_bytes(context) * act / shape.act_bytes
    return ServingMemory(int(weights), int(kv), num_slots, context)


def check_fits(need: ServingMemory, available: int | None = None, rank: int = 0) -> None:
    """Refuse (one MoeClusterError with the numbers and what to change) when weights + KV exceed MemAvailable."""
    available = mem_available() if available is None else available
    if need.total <= available:
        return
    gib = 2**30
    fit_slots = (available - need.weight_bytes) * need.num_slots // max(need.kv_bytes, 1)
    hint = (
        f"--max-batch {fit_slots} would fit at this context, or lower --max-seq-len"
        if fit_slots >= 1
        else "the weights alone do not fit: run more ranks (--nodes) or quantize the experts (--quantize)"
    )
    raise MoeClusterError(
        f"rank {rank}: not enough memory to serve: the KV cache of --max-batch {need.num_slots} x --max-seq-len "
        f"{need.context} needs {need.kv_bytes / gib:.2f} GiB and this rank's weights {need.weight_bytes / gib:.2f} "
        f"GiB ({need.total / gib:.2f} GiB together), but only {available / gib:.2f} GiB is free (MemAvailable); "
        f"{hint}"
    )
