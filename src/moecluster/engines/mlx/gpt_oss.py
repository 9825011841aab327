"""gpt-oss on mlx-lm: transformers' checkpoint layout and the two config values mlx-lm's model file ignores.

Layout. mlx-lm's `gpt_oss.sanitize` reads OpenAI's layout (`gate_up_proj` [E, 2F, D] rows interleaved gate/up,
`down_proj` [E, D, F], or their MXFP4 `_blocks`/`_scales`); transformers saves `gate_up_proj` [E, D, 2F] (columns
interleaved: gate = 0::2, up = 1::2) and `down_proj` [E, F, D]. `transformers_layout` turns the latter into the
SwitchGLU's own arrays (`gate_proj/up_proj/down_proj.{weight,bias}`, [E, out, in]), so mlx-lm's sanitize sees
them as already done. With a StackedRows reader the arrays become placeholders whose rows expert parallelism reads
from disk: each rank reads, de-interleaves and transposes only its experts. A layer is in transformers' layout when
its gate_up_proj is [E, D, 2F] (with D == 2F both read alike; transformers' is assumed: its saves are the bf16 ones).

Config. mlx-lm's SwigluOAI has alpha 1.702 and limit 7.0 fixed, and its YarnRoPE always truncates the correction
range (floor/ceil), where transformers reads `swiglu_limit` and `rope_parameters.truncate` (false for gpt-oss):
`apply_config` sets both on the built model. Shape legend: E experts, e local, D model dim, F expert hidden.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.rope_utils import YarnRoPE

from moecluster.engines.mlx.stacked import StackedRows

# "<...>layers.{layer}.mlp.experts.{gate_up_proj|down_proj}[_bias]"
_KEY = re.compile(r"^((?:.*\.)?(layers\.\d+\.mlp\.experts))\.(gate_up_proj|down_proj)(_bias)?$")
Transform = Callable[[mx.array], mx.array]


def _gate(v: mx.array) -> mx.array:  # [e, D, 2F] -> [e, F, D]
    return mx.contiguous(v[..., ::2].swapaxes(1, 2))


def _up(v: mx.array) -> mx.array:
    return mx.contiguous(v[..., 1::2].swapaxes(1, 2))


def _down(v: mx.array) -> mx.array:  # [e, F, D] -> [e, D, F]
    return mx.contiguous(v.swapaxes(1, 2))


# (on-disk kind, bias?) -> [(SwitchGLU array, transform of rows)]
_TARGETS: dict[tuple[str, bool], list[tuple[str, Transform | None]]] = {
    ("gate_up_proj", False): [("gate_proj.weight", _gate), ("up_proj.weight", _up)],
    ("gate_up_proj", True): [("gate_proj.bias", lambda v: v[:, ::2]), ("up_proj.bias", lambda v: v[:, 1::2])],
    ("down_proj", False): [("down_proj.weight", _down)],
    ("down_proj", True): [("down_proj.bias", None)],
}


def transformers_layout(config: dict, weights: dict[str, mx.array], stacked: StackedRows | None) -> dict:
    """weights with every transformers-layout gpt-oss expert tensor replaced by the SwitchGLU arrays mlx-lm
    builds (lazy transforms of the loaded tensors, or, with `stacked`, placeholders read row-wise later)."""
    if config.get("model_type") != "gpt_oss":
        return weights
    d_model, hidden = int(config["hidden_size"]), int(config["intermediate_size"])
    ours = {
        m[1]
        for k, v in weights.items()
        if (m := _KEY.match(k)) and m[3] == "gate_up_proj" and not m[4] and v.shape[1:] == (d_model, 2 * hidden)
    }
    out: dict[str, mx.array] = {}
    for key, v in weights.items():
        m = _KEY.match(key)
        if m is None or m[1] not in ours:
            out[key] = v
            continue
        for name, fn in _TARGETS[(m[3], bool(m[4]))]:
            rows = fn(v) if fn is not None else v
            if stacked is not None and stacked.defer_as(f"{m[2]}.{name}", key, fn):
                rows = mx.zeros(rows.shape, rows.dtype)  # lazy placeholder: never evaluated, rows read later
            out[f"{m[1]}.{name}"] = rows
    return out


def apply_config(model: Any, config: dict) -> None:
    """Set what mlx-lm's gpt_oss ignores: the SwiGLU's alpha/limit and YaRN's untruncated correction range."""
    if config.get("model_type") != "gpt_oss":
        return
    alpha, limit = float(config.get("swiglu_alpha", 1.702)), float(config.get("swiglu_limit", 7.0))
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    for layer in model.layers:
        layer.mlp.experts.activation = SwigluOAI(alpha=alpha, limit=limit)
        attn_rope = layer.self_attn.rope
        if isinstance(attn_rope, YarnRoPE) and not rope.get("truncate", True):
            theta = rope.get("rope_theta", config.get("rope_theta", 150000))
            attn_rope._freqs = yarn_freqs(attn_rope.dims, float(theta), rope)


def yarn_freqs(dims: int, base: float, rope: dict) -> mx.array:
    """YarnRoPE's per-pair periods with the correction range not rounded (transformers' truncate=False)."""
    factor, orig = float(rope["factor"]), float(rope["original_max_position_embeddings"])

    def correction_dim(rotations: float) -> float:
        return dims * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(correction_dim(float(rope.get("beta_fast", 32))), 0.0)
    high = min(correction_dim(float(rope.get("beta_slow", 1))), dims - 1.0)
    high = high + 0.001 if low == high else high
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extra = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inter = factor * extra
    mask = 1.0 - ramp
    return (inter * extra) / (inter * mask + extra * (1 - mask))
