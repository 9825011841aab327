"""A model's shape and weight bytes as the placement planner needs them, from its HF config.json.

Legend: E experts, L layers, K top-k, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from moecluster.errors import MoeClusterError
from moecluster.models.configs import shape_of

DTYPE_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "bf16": 2,
    "fp16": 2,
    "half": 2,
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "float8_e4m3fn": 1,
    "fp8": 1,
}


@dataclass(frozen=True)
class ModelSizes:
    """What the planner needs from a model config: a view of its `ModelShape` (models/configs.py, the one
    config parser) in bytes. `num_layers` counts MoE layers only: placement places their experts."""

    arch: str
    num_layers: int
    num_experts: int
    top_k: int
    bytes_per_expert: float  # 3 * D * F * bytes_per_param: one expert of one layer
    fixed_bytes: float  # every rank's weights: embeddings, attention, norms, routers, lm_head

    @classmethod
    def from_hf_config(cls, cfg: dict, bytes_per_param: float | None = None) -> ModelSizes:
        """Sizes from a HF config (every model_type models/configs.py reads)."""
        nbytes = bytes_per_param or DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"), 2)
        shape = shape_of(cfg)  # a quantized checkpoint's experts: its format's bytes, scales included
        expert = (
            shape.expert_params * nbytes if bytes_per_param or shape.expert_weight_bytes is None else shape.expert_bytes
        )
        return cls(
            shape.model_type,
            shape.num_moe_layers,
            shape.num_experts,
            shape.top_k,
            float(expert),
            float(shape.replicated_params * nbytes),
        )


def read_model_sizes(model: str, bytes_per_param: float | None = None) -> ModelSizes:
    """From a checkpoint directory (its config.json) or a config.json path."""
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise MoeClusterError(
            f"cannot read model config {path}: {e.strerror}; pass a checkpoint directory or its config.json"
        ) from None
    except json.JSONDecodeError as e:
        raise MoeClusterError(f"{path} is not valid JSON ({e})") from None
    return ModelSizes.from_hf_config(cfg, bytes_per_param)
