"""Only this rank's rows of stacked expert tensors, read straight from the safetensors files.

mlx-community conversions (and any checkpoint saved after mlx-lm's sanitize) store each MoE layer's experts
stacked: `...switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` [E, ...] (quantized: packed uint32 weights,
per-group scales and biases). `mx.load` reads a tensor whole when it is evaluated, so the loader instead puts a lazy
placeholder of the same shape in the weights mlx-lm loads (never evaluated), and expert parallelism reads this
rank's rows with pread (consecutive experts in one read) into [e, ...] arrays. Shape legend: E experts, e local.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

from moecluster.checkpoint_io import TensorInfo, parse_header
from moecluster.errors import MoeClusterError

# the parameter names of a SwitchGLU's stacked arrays: "<...>layers.{layer}.<path>.{proj}.{array}"
_STACKED = re.compile(r"(?:^|\.)(layers\.(\d+)\.(.+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases|bias))$")
_MX_DTYPES = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
    torch.uint32: mx.uint32,
    torch.int32: mx.int32,
    torch.uint16: mx.uint16,
    torch.int16: mx.int16,
    torch.uint8: mx.uint8,
    torch.int8: mx.int8,
}


class StackedRows:
    """The safetensors headers of a checkpoint directory; `defer` and `read` (see the module docstring)."""

    def __init__(self, model_dir: str | Path):
        self.infos: dict[str, TensorInfo] = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            self.infos.update(parse_header(path))
        self.deferred: dict[str, str] = {}  # "layers.{layer}.<path>.{proj}.{array}" -> on-disk name
        self.transforms: dict[str, Callable[[mx.array], mx.array] | None] = {}  # of the rows read (defer_as)
        self.bytes_read = 0
        # rows read for several arrays (gpt-oss's gate_up_proj: gate and up), kept until the last of them took them
        self._shared: dict[tuple[str, tuple[int, ...]], tuple[mx.array, int]] = {}

    def defer_as(self, suffix: str, name: str, transform: Callable[[mx.array], mx.array] | None) -> bool:
        """Rows of the array named `suffix` (as in `read`) are `transform` of the same rows of on-disk tensor
        `name` (a layout conversion, e.g. gpt_oss.py's). False if `name` cannot be read row-wise."""
        info = self.infos.get(name)
        if info is None or info.dtype not in _MX_DTYPES or not info.shape:
            return False
        self.deferred[suffix], self.transforms[suffix] = name, transform
        return True

    def defer(self, weights: dict[str, mx.array], switch_paths: dict[int, str], num_experts: int) -> None:
        """Replace every stacked expert array that is on disk as mlx-lm wants it (same name and shape) by a lazy
        placeholder; switch_paths: decoder layer -> its SwitchGLU's path inside the layer."""
        for key, w in weights.items():
            m = _STACKED.search(key)
            info = self.infos.get(key)
            if m is None or info is None or switch_paths.get(int(m[2])) != m[3]:
                continue
            if tuple(w.shape) != info.shape or info.shape[0] != num_experts or info.dtype not in _MX_DTYPES:
                continue  # transformed by sanitize (e.g. split, transposed): read whole, sliced later
            weights[key] = mx.zeros(w.shape, w.dtype)  # lazy: never evaluated, replaced by read()
            self.deferred[m[1]] = key

    def read(self, suffix: str, experts: list[int]) -> mx.array | None:
        """Rows `experts` of the deferred array named "layers.{layer}.<path>.{proj}.{array}", or None if it was
        not deferred."""
        name = self.deferred.get(suffix)
        if name is None:
            return None
        key = (name, tuple(experts))
        out, left = self._shared.pop(key, (None, 0))
        if out is None:
            out, left = self._read_rows(name, experts), sum(n == name for n in self.deferred.values())
        if left > 1:
            self._shared[key] = (out, left - 1)
        transform = self.transforms.get(suffix)
        return transform(out) if transform is not None else out

    def _read_rows(self, name: str, experts: list[int]) -> mx.array:
        info = self.infos[name]
        row = info.nbytes // info.shape[0]
        buf = bytearray(len(experts) * row)
        with open(info.path, "rb") as f:
            i = 0
            while i < len(experts):  # one pread per run of consecutive experts
                j = i + 1
                while j < len(experts) and experts[j] == experts[j - 1] + 1:
                    j += 1
                _pread_into(f.fileno(), memoryview(buf)[i * row : j * row], info.start + experts[i] * row, name)
                i = j
        self.bytes_read += len(buf)
        out = mx.array(np.frombuffer(buf, dtype=np.uint8)).view(_MX_DTYPES[info.dtype])
        return out.reshape(len(experts), *info.shape[1:])


def _pread_into(fd: int, out: memoryview, offset: int, name: str) -> None:
    """Fill `out` from the file at `offset` (os.pread: also on macOS, where os.preadv may be missing)."""
    done = 0
    while done < len(out):
        data = os.pread(fd, min(len(out) - done, 1 << 30), offset + done)
        if not data:
            raise MoeClusterError(f"the checkpoint ends inside {name}; re-download it")
        out[done : done + len(data)] = data
        done += len(data)
