"""Small helpers the architecture files share: required config keys, rope theta, eos lists."""

from __future__ import annotations

from typing import Callable

import torch

from moecluster.errors import MoeClusterError

# read_rows(on_disk_name, first_row, end_row) -> tensor in the target dtype
ReadRows = Callable[[str, int, int], torch.Tensor]


def get_required(cfg: dict, key: str, where: str = "config.json"):
    if key not in cfg or cfg[key] is None:
        raise MoeClusterError(f"config: required key {key!r} missing from {where}; is this a complete HF config?")
    return cfg[key]


def rope_theta_of(cfg: dict, attn_cfg: dict, default: float) -> float:
    """rope theta from rope_parameters (what transformers uses), top-level rope_theta, or attn_config."""
    params = cfg.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise MoeClusterError(f"config: rope_type {rope_type!r} is not supported (only default RoPE)")
    for source in (params.get("rope_theta"), cfg.get("rope_theta"), attn_cfg.get("rope_theta")):
        if source is not None:
            return float(source)
    return default


def eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
