"""Compiled kernels for the hot path, built at first use with the system C compiler.

`moe_gemm` runs the bf16 mat-vecs of all selected experts of a layer, for one or several tokens,
in one parallel region, each expert's weights read once (moe_gemv.c says why); `moe_gemv` is its
one-input-per-expert case. It needs x86-64 with AVX512-BF16 and a C compiler; without them, or with
MOECLUSTER_KERNELS=0, `moe_gemv_available()` is False and the models use torch's mat-vecs.
The shared object is cached under $MOECLUSTER_CACHE (default ~/.cache/moecluster)/kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("moe_gemv.c")
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
_lock = threading.Lock()
_fn = None  # the loaded library once built; False once it proved unavailable
unavailable_reason = ""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dir() -> Path:
    root = os.environ.get("MOECLUSTER_CACHE") or Path.home() / ".cache" / "moecluster"
    return Path(root) / "kernels"


def _build():
    global unavailable_reason
    if os.environ.get("MOECLUSTER_KERNELS", "1") == "0":
        unavailable_reason = "disabled by MOECLUSTER_KERNELS=0"
        return None
    missing = [f for f in _REQUIRED_FLAGS if f not in _cpu_flags()]
    if missing:
        unavailable_reason = f"this CPU lacks {', '.join(missing)}"
        return None
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        unavailable_reason = "no C compiler (gcc) on PATH"
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + cc.encode() + torch.__version__.encode()).hexdigest()[:16]
    so = _cache_dir() / f"moe_gemv-{key}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
        # -fopenmp links libgomp.so.1; torch has already loaded its own copy under that soname,
        # so the kernel runs on torch's OpenMP threads (torch.set_num_threads applies).
        cmd = [cc, "-O3", "-std=c11", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp", "-shared",
               "-fPIC", str(_SOURCE), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            unavailable_reason = f"compiling {_SOURCE.name} failed: {done.stderr.strip()[:300]}"
            tmp.unlink(missing_ok=True)
            return None
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.moe_gemm_bf16.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, ptr, ptr, i64, ptr]
    lib.moe_gemm_bf16.restype = ctypes.c_int
    return lib


def _get():
    global _fn
    if _fn is None:
        with _lock:
            if _fn is None:
                try:
                    _fn = _build() or False
                except OSError as e:  # unwritable cache, unloadable object: fall back
                    global unavailable_reason
                    unavailable_reason = f"kernel unavailable: {e}"
                    _fn = False
    return _fn or None


def moe_gemv_available() -> bool:
    return _get() is not None


def moe_gemv(w_eRC: torch.Tensor, experts: list[int], x_kC: torch.Tensor, out_nR: torch.Tensor,
             out_rows: list[int] | None = None) -> torch.Tensor:
    """out_nR[out_rows[k]] = w_eRC[experts[k]] @ x_kC[k] for each k (x_kC of one row: the same x for all).

    All bf16; w_eRC contiguous; rows of x_kC and out_nR contiguous. Call only if moe_gemv_available()."""
    K = len(experts)
    x_kC = x_kC[None] if x_kC.dim() == 1 else x_kC
    x_rows = [0] * K if x_kC.shape[0] == 1 else list(range(K))
    return moe_gemm(w_eRC, experts, [1] * K, x_kC, x_rows, out_nR, list(range(K)) if out_rows is None else out_rows)


def moe_gemm(w_eRC: torch.Tensor, experts: list[int], counts: list[int], x_nC: torch.Tensor, x_rows: list[int],
             out_mR: torch.Tensor, out_rows: list[int]) -> torch.Tensor:
    """Pairs grouped by expert: the first counts[0] pairs use experts[0], the next counts[1] experts[1], ...;
    pair p computes out_mR[out_rows[p]] = w_eRC[expert of p] @ x_nC[x_rows[p]]. Each expert's weights are
    read once for all its pairs; every output equals what moe_gemv gives for that pair alone (same bits)."""
    fn = _get()
    if fn is None:
        raise RuntimeError(f"moe_gemm is not available: {unavailable_reason}")
    E, R, C = w_eRC.shape
    K, P = len(experts), len(x_rows)
    if not K:
        return out_mR
    bad = [t for t in (w_eRC, x_nC, out_mR) if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() < 2]
    if bad or not w_eRC.is_contiguous() or x_nC.stride(-1) != 1 or out_mR.stride(-1) != 1 \
            or x_nC.shape[-1] != C or out_mR.shape[-1] != R or len(counts) != K or sum(counts) != P \
            or len(out_rows) != P or min(counts) < 0 or not all(0 <= e < E for e in experts) \
            or not all(0 <= r < x_nC.shape[0] for r in x_rows) or not all(0 <= r < out_mR.shape[0] for r in out_rows):
        raise ValueError("moe_gemm: needs bf16 CPU tensors w [E, R, C] contiguous, x [n, C] and out [m, R] with "
                         "contiguous rows, counts summing to the number of pairs, and valid indices")
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    arr = ctypes.c_int64
    fn.moe_gemm_bf16(w_eRC.data_ptr(), R * C, (arr * K)(*experts), K, (arr * (K + 1))(*starts), R, C,
                     x_nC.data_ptr(), x_nC.stride(0), (arr * P)(*x_rows), out_mR.data_ptr(), out_mR.stride(0),
                     (arr * P)(*out_rows))
    return out_mR
