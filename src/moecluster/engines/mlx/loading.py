"""HF checkpoint directory -> mlx-lm model (mlx-lm's own model definitions), reading from disk only the routed
experts this rank holds.

How only this rank's experts are read: `mx.load` is lazy (a tensor is read when something that needs it is
evaluated) and mlx-lm's `sanitize()` stacks the per-expert tensors of Hub checkpoints (`...experts.{e}.*`) into
`switch_mlp.*` [E, ...]. Before sanitize, the tensors of experts this rank does not hold are replaced by lazy
zeros of the same shape, so the stack never reads them; expert parallelism then keeps only the local rows and
evaluates layer by layer (transient: one layer's [E, ...] stack). Checkpoints that store experts already
stacked as mlx-lm wants them (mlx-community conversions, quantized included) are read row-wise: only this rank's
experts (stacked.py). Stacked tensors that sanitize transforms (gpt-oss's fused `gate_up_proj`) are read whole and
the other rows freed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU
from mlx_lm.utils import _get_classes
from mlx_lm.utils import load_model as _mlx_lm_load_model

from moecluster.engines.mlx import gpt_oss
from moecluster.engines.mlx.stacked import StackedRows
from moecluster.errors import MoeClusterError

# mlx-lm model files whose MoE block calls its SwitchGLU as `y_NKD = switch(x_ND, inds_NK)` and then combines
# `(y * scores[..., None]).sum(-2)` itself: the contract ExpertParallelSwitch keeps. True = checked by tests here.
SUPPORTED: dict[str, bool] = {
    "mixtral": True,  # block_sparse_moe.switch_mlp(x, inds)
    "qwen3_moe": True,  # mlp.switch_mlp(x, inds); mlp_only_layers are dense
    "qwen2_moe": True,  # mlp.switch_mlp(x, inds) + gated shared expert; keys mlx-lm ignores: check_ignored_keys
    "olmoe": True,  # mlp.switch_mlp(x_flat, inds) on flattened tokens
    "deepseek_v3": True,  # mlp.switch_mlp(x, inds) + shared experts, group-limited sigmoid routing
    "glm4_moe": True,  # mlp.switch_mlp(x, inds) + shared experts; partial_rotary_factor: config_fixups
    "gpt_oss": True,  # mlp.experts(x, inds), biases; transformers' [E, D, 2F] layout and config: gpt_oss.py
}
# per-expert tensors of Hub checkpoints: "model.layers.{layer}.<...>.experts.{expert}.<...>"
_EXPERT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?experts\.(\d+)\.")

ExpertsOf = Callable[[int], list[int]]  # MoE-layer index -> global expert ids this rank holds


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise MoeClusterError(f"cannot read {path}: {e.strerror}; pass --model DIR with a HF checkpoint") from None


def config_fixups(config: dict) -> dict:
    """Keys mlx-lm's ModelArgs read that transformers 5 writes elsewhere (`rope_parameters`, `num_local_experts`).
    Without them mlx-lm silently uses its defaults (Mixtral: rope_theta 1e6) or fails to build the model."""
    fix: dict[str, Any] = {}
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        fix["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        fix["rope_scaling"] = dict(rope)
    elif "rope_scaling" not in config:
        fix["rope_scaling"] = None  # glm4_moe's ModelArgs requires the key (None: plain RoPE, every model's default)
    if "partial_rotary_factor" not in config and "partial_rotary_factor" in rope:  # glm4_moe reads it at top level
        fix["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "num_experts" not in config and "num_local_experts" in config and config.get("model_type") != "mixtral":
        fix["num_experts"] = config["num_local_experts"]
    return fix


# config keys mlx-lm's model file ignores, with the one value it implements (anything else would silently run a
# different model): name -> (value mlx-lm assumes, what it means)
_IGNORED: dict[str, dict[str, tuple[Any, str]]] = {
    "qwen2_moe": {
        "mlp_only_layers": ([], "every layer is an MoE layer"),
        "decoder_sparse_step": (1, "every layer is an MoE layer"),
        "norm_topk_prob": (False, "top-k router weights are not renormalized"),
        "use_sliding_window": (False, "full attention in every layer"),
        "qkv_bias": (True, "q/k/v projections have biases"),
    },
}


def check_ignored_keys(config: dict) -> None:
    """One error naming every config key whose value mlx-lm's model file would ignore (see _IGNORED)."""
    bad = [
        f"{key}={config[key]!r} (mlx-lm assumes {value!r}: {meaning})"
        for key, (value, meaning) in _IGNORED.get(str(config.get("model_type")), {}).items()
        if key in config and config[key] is not None and config[key] != value
    ]
    if bad:
        raise MoeClusterError(
            f"{config.get('model_type')}: mlx-lm's model file ignores {', '.join(bad)}; the MLX engine would "
            "run a different model than this checkpoint: use --engine torch"
        )


def switch_layers(model: Any) -> list[tuple[int, str, nn.Module]]:
    """(decoder layer index, path inside the layer, module) of each routed-expert SwitchGLU, in layer order; the
    position in this list is the MoE-layer index placements use."""
    found = []
    for i, layer in enumerate(model.layers):
        mods = [(path, m) for path, m in layer.named_modules() if isinstance(m, SwitchGLU)]
        if len(mods) > 1:
            raise MoeClusterError(f"decoder layer {i} has {len(mods)} SwitchGLU modules; expected at most one")
        found += [(i, path, m) for path, m in mods]
    return found


def _drop_remote_experts(model: Any, weights: dict[str, mx.array], experts_of: ExpertsOf) -> dict:
    """Replace the on-disk tensors of experts this rank does not hold by lazy zeros (never read from disk)."""
    moe_index = {layer: index for index, (layer, _, _) in enumerate(switch_layers(model))}
    keep = {index: set(experts_of(index)) for index in moe_index.values()}
    for key, w in weights.items():
        m = _EXPERT_KEY.search(key)
        if m is None or int(m[1]) not in moe_index:
            continue
        if int(m[2]) not in keep[moe_index[int(m[1])]]:
            weights[key] = mx.zeros(w.shape, w.dtype)
    return weights


def load_mlx_model(
    model_dir: str | Path,
    experts_of: ExpertsOf | None = None,
    dtype: str | None = None,
    stacked: StackedRows | None = None,
) -> tuple[nn.Module, dict]:
    """mlx-lm model + its config. experts_of given: parameters stay lazy (expert parallelism slices and
    evaluates them); otherwise everything is evaluated here. dtype: None (as stored), "fp32" or "bf16".
    stacked: stacked expert arrays on disk become placeholders that expert parallelism reads rows of."""
    config = read_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise MoeClusterError(
            f"model_type {model_type!r} is not supported by the MLX engine (supported: "
            f"{', '.join(SUPPORTED)}); use --engine torch"
        )
    check_ignored_keys(config)

    def classes(config: dict):
        model_class, args_class = _get_classes(config)

        class OnlyLocalExperts(model_class):  # sanitize sees zeros for remote experts, our layouts converted
            def sanitize(self, weights):
                if experts_of is not None:
                    weights = _drop_remote_experts(self, weights, experts_of)
                weights = gpt_oss.transformers_layout(config, weights, stacked if experts_of is not None else None)
                weights = super().sanitize(weights) if hasattr(model_class, "sanitize") else weights
                if stacked is not None and experts_of is not None:
                    found = switch_layers(self)
                    if found:
                        num_experts = found[0][2].gate_proj.weight.shape[0]  # type: ignore[union-attr]
                        stacked.defer(weights, {layer: path for layer, path, _ in found}, num_experts)
                return weights

        return OnlyLocalExperts, args_class

    try:
        model, cfg = _mlx_lm_load_model(
            Path(model_dir), lazy=True, model_config=config_fixups(config), get_model_classes=classes
        )
    except (FileNotFoundError, ValueError) as e:
        raise MoeClusterError(f"mlx-lm cannot load {model_dir}: {e}") from None
    gpt_oss.apply_config(model, config)
    if dtype is not None:
        if dtype not in ("fp32", "bf16"):
            raise MoeClusterError(f"--dtype {dtype!r}: use fp32 or bf16")
        model.set_dtype(mx.float32 if dtype == "fp32" else mx.bfloat16)
    if experts_of is None:
        mx.eval(model.parameters())
    return model, cfg
