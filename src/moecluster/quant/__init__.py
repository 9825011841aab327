"""Quantized expert weights: the formats as data, with exact dequantize-to-fp32 references.

Pure torch, no kernels (those live in moecluster.kernels and read these layouts). Formats:

- ``fp8``: float8 e4m3 weights with one fp32 ``weight_scale_inv`` per 128x128 block, as DeepSeek-V3 and
  Qwen3-FP8 ship them (``w = fp8 * scale_inv`` per block).
- ``mxfp4``: gpt-oss ``*_blocks`` (two e2m1 nibbles per byte, low nibble first) + ``*_scales`` (e8m0).
- ``int8`` / ``int4``: symmetric group-wise quantization on load along the input dim, fp32 scales.

A layer's local experts live in one `QuantizedStack`; `format_from_quantization_config` maps a checkpoint's
``quantization_config`` to a format name.
"""

from moecluster.quant.formats import (
    DEFAULT_GROUP_SIZE,
    FORMATS,
    FP4_VALUES,
    dequantize_fp8_block,
    dequantize_int4,
    dequantize_int8,
    dequantize_mxfp4,
    format_from_quantization_config,
    quantize_fp8_block,
    quantize_int4,
    quantize_int8,
    quantize_mxfp4,
)
from moecluster.quant.stack import QuantizedStack

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "FORMATS",
    "FP4_VALUES",
    "QuantizedStack",
    "dequantize_fp8_block",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_mxfp4",
    "format_from_quantization_config",
    "quantize_fp8_block",
    "quantize_int4",
    "quantize_int8",
    "quantize_mxfp4",
]
