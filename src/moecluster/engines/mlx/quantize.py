"""`--quantize int8|int4` on the MLX engine: MLX's own affine quantization (mx.quantize: per group of `group_size`
inputs a scale and a bias, 8 or 4 bits) of the routed experts this rank holds, after expert parallelism.

Each expert's rows are quantized on their own (groups run along the input dim of one output row), so a rank that
quantizes its e experts holds exactly the rows a one-rank job holds for them: output stays bit-identical across
rank counts and placements. The quantized layers are mlx-lm's QuantizedSwitchLinear (gather_qmm), as in an
`mlx_lm.convert -q` checkpoint; dense weights stay as loaded.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from moecluster.errors import MoeClusterError

BITS = {"int8": 8, "int4": 4}
GROUP_SIZES = (32, 64, 128)  # what MLX's affine quantization takes
PROJS = ("gate_proj", "up_proj", "down_proj")


def check_quantize(layers: list[Any], fmt: str, group_size: int) -> int:
    """The bits of `fmt`, after checking the group size against MLX and the experts' input dims (one error)."""
    if fmt not in BITS:
        raise MoeClusterError(f"--quantize {fmt!r}: the MLX engine takes int8 or int4")
    if any(isinstance(getattr(m, p), QuantizedSwitchLinear) for m in layers for p in PROJS):
        raise MoeClusterError(f"this checkpoint's experts are already quantized (MLX); drop --quantize {fmt}")
    dims = sorted({getattr(m, p).weight.shape[-1] for m in layers for p in PROJS})
    if group_size not in GROUP_SIZES or any(d % group_size for d in dims):
        raise MoeClusterError(
            f"--quant-group-size {group_size}: MLX's affine quantization takes "
            f"{', '.join(map(str, GROUP_SIZES))}, dividing the experts' input dims {dims}; pass one that does"
        )
    return BITS[fmt]


def quantize_experts(layers: list[Any], fmt: str, group_size: int) -> None:
    """Replace each projection of these ExpertParallelSwitch layers by its QuantizedSwitchLinear (MLX affine,
    8/4 bits, `group_size` inputs per scale and bias), layer by layer (one layer's full-precision copy at a time)."""
    bits = check_quantize(layers, fmt, group_size)
    for m in layers:
        for name in PROJS:
            proj = getattr(m, name)
            if proj.weight.shape[0]:  # a rank may hold no expert of a layer (a placement FILE): nothing to do
                setattr(m, name, proj.to_quantized(group_size=group_size, bits=bits))
        mx.eval(m.parameters())
