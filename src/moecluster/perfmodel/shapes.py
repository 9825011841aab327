"""Model shapes for the performance model: presets and config files -> `ModelShape`.

The one parser of configs is `moecluster.models.configs` (pure Python); this module only resolves a
`--model` argument (a preset name, a config.json, or a checkpoint directory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError
from moecluster.models.configs import CONFIGS, shape_of
from moecluster.models.shape import DTYPE_BYTES, ModelShape

SUPPORTED_TYPES = tuple(CONFIGS)
__all__ = ["DTYPE_BYTES", "SUPPORTED_TYPES", "ModelShape", "from_hf_config", "load_model"]


def from_hf_config(cfg: dict[str, Any], name: str = "model", source: str = "") -> ModelShape:
    """Parse an HF config dict (keys verbatim) into a ModelShape with bf16 weights (models/configs.py)."""
    return shape_of(cfg, name, source)


def load_model(spec: str, presets: dict[str, Any]) -> ModelShape:
    """A preset name (see presets.json "models"), a config.json path, or a model directory."""
    if spec in presets:
        entry = presets[spec]
        return from_hf_config(entry["config"], name=spec, source=entry.get("source", ""))
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MoeClusterError(
            f"unknown model {spec!r}: not a preset ({', '.join(sorted(presets))}) "
            "and not a config.json file or a model directory containing one"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoeClusterError(f"cannot read {path}: {e}; pass a valid HF config.json") from e
    if not isinstance(cfg, dict):
        raise MoeClusterError(f"{path}: expected a JSON object (an HF config.json)")
    return from_hf_config(cfg, name=path.parent.name or str(path), source=str(path))
