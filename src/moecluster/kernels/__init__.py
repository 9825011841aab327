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
from typing import Any

import torch

_GLUE_SOURCE = Path(__file__).with_name("glue.c")  # built into both libraries
_SOURCES = [Path(__file__).with_name("moe_gemv.c"), _GLUE_SOURCE]
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
_lock = threading.Lock()
_fn: Any = None  # the loaded library once built; False once it proved unavailable
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


def _compile(sources: list[Path], flags: tuple[str, ...], cc_flags: list[str]) -> tuple[Path | None, str]:
    """Build `sources` into one shared object cached by their hash (or find it built); (path, "") or (None, why).

    -fopenmp links libgomp.so.1; torch has already loaded its own copy under that soname, so the kernels
    run on torch's OpenMP threads (torch.set_num_threads applies)."""
    if os.environ.get("MOECLUSTER_KERNELS", "1") == "0":
        return None, "disabled by MOECLUSTER_KERNELS=0"
    missing = [f for f in flags if f not in _cpu_flags()]
    if missing:
        return None, f"this CPU lacks {', '.join(missing)}"
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        return None, "no C compiler (gcc) on PATH"
    text = b"".join(source.read_bytes() for source in sources)
    key = hashlib.sha256(text + " ".join(cc_flags).encode() + cc.encode() + torch.__version__.encode()).hexdigest()[:16]
    so = _cache_dir() / f"{sources[0].stem}-{key}.so"
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
        cmd = [cc, "-O3", "-std=c11", *cc_flags, "-fopenmp", "-shared", "-fPIC", *map(str, sources)]
        cmd += ["-o", str(tmp), "-lm"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            return None, f"compiling {', '.join(s.name for s in sources)} failed: {done.stderr.strip()[:300]}"
        os.replace(tmp, so)
    return so, ""


def _build():
    global unavailable_reason
    cc_flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
    so, unavailable_reason = _compile(_SOURCES, _REQUIRED_FLAGS, cc_flags)
    if so is None:
        return None
    lib = ctypes.CDLL(str(so))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.moe_gemm_bf16.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, ptr, i64, ptr, ptr, i64, ptr]
    lib.moe_gemm_bf16.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.attn_decode_bf16.argtypes = [i64, i64, i64, i64, i64, ptr, i64, f32, ptr, ptr, f32, ptr, ptr, i64]
    lib.attn_decode_bf16.argtypes += [ptr, ptr, i64, ptr, ptr, f32, ptr, i64, ptr]
    lib.attn_decode_bf16.restype = ctypes.c_int
    lib.moe_decode_bf16.argtypes = [ptr, ptr, i64, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr]
    lib.moe_decode_bf16.restype = ctypes.c_int
    from moecluster.kernels import glue  # glue.c is built into this library; glue.py imports this module

    glue.declare(lib)
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


def moe_gemv(
    w_eRC: torch.Tensor, experts: list[int], x_kC: torch.Tensor, out_nR: torch.Tensor, out_rows: list[int] | None = None
) -> torch.Tensor:
    """out_nR[out_rows[k]] = w_eRC[experts[k]] @ x_kC[k] for each k (x_kC of one row: the same x for all).

    All bf16; w_eRC contiguous; rows of x_kC and out_nR contiguous. Call only if moe_gemv_available()."""
    K = len(experts)
    x_kC = x_kC[None] if x_kC.dim() == 1 else x_kC
    x_rows = [0] * K if x_kC.shape[0] == 1 else list(range(K))
    return moe_gemm(w_eRC, experts, [1] * K, x_kC, x_rows, out_nR, list(range(K)) if out_rows is None else out_rows)


def moe_gemm(
    w_eRC: torch.Tensor,
    experts: list[int],
    counts: list[int],
    x_nC: torch.Tensor,
    x_rows: list[int],
    out_mR: torch.Tensor,
    out_rows: list[int],
) -> torch.Tensor:
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
    if (
        bad
        or not w_eRC.is_contiguous()
        or x_nC.stride(-1) != 1
        or out_mR.stride(-1) != 1
        or x_nC.shape[-1] != C
        or out_mR.shape[-1] != R
        or len(counts) != K
        or sum(counts) != P
        or len(out_rows) != P
        or min(counts) < 0
        or min(experts) < 0
        or max(experts) >= E
        or (P and (min(x_rows) < 0 or max(x_rows) >= x_nC.shape[0]))
        or (P and (min(out_rows) < 0 or max(out_rows) >= out_mR.shape[0]))
    ):
        raise ValueError(
            "moe_gemm: needs bf16 CPU tensors w [E, R, C] contiguous, x [n, C] and out [m, R] with "
            "contiguous rows, counts summing to the number of pairs, and valid indices"
        )
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    arr = ctypes.c_int64
    fn.moe_gemm_bf16(
        w_eRC.data_ptr(),
        R * C,
        (arr * K)(*experts),
        K,
        (arr * (K + 1))(*starts),
        R,
        C,
        x_nC.data_ptr(),
        x_nC.stride(0),
        (arr * P)(*x_rows),
        out_mR.data_ptr(),
        out_mR.stride(0),
        (arr * P)(*out_rows),
    )
    return out_mR


_ZERO = (ctypes.c_int64 * 1)(0)  # linear's one expert
_STARTS = ctypes.c_int64 * 2


def linear(w_OI: torch.Tensor, x_nI: torch.Tensor, out_nO: torch.Tensor) -> torch.Tensor:
    """out_nO = x_nI @ w_OI.T for few rows (decode), weights read once: moe_gemm with one expert whose pairs are
    the rows, with the least Python per call (a decode step makes a few of these per layer). All bf16, contiguous."""
    fn = _get()
    if fn is None:
        raise RuntimeError(f"moe_gemm is not available: {unavailable_reason}")
    (O, I), n = w_OI.shape, x_nI.shape[0]
    if (
        w_OI.dtype != torch.bfloat16
        or x_nI.dtype != torch.bfloat16
        or out_nO.dtype != torch.bfloat16
        or not (w_OI.is_cpu and x_nI.is_cpu and out_nO.is_cpu)
        or x_nI.shape != (n, I)
        or out_nO.shape != (n, O)
        or not (w_OI.is_contiguous() and x_nI.is_contiguous() and out_nO.is_contiguous())
    ):
        raise ValueError("linear: needs bf16 CPU tensors w [O, I], x [n, I] and out [n, O], all contiguous")
    if n:
        fn.moe_gemm_bf16(
            w_OI.data_ptr(), 0, _ZERO, 1, _STARTS(0, n), O, I, x_nI.data_ptr(), I, None, out_nO.data_ptr(), O, None
        )
    return out_nO


def attn_decode(
    qkv_BX: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    cos_BR: torch.Tensor,
    sin_BR: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: list[int],
    pos: list[int],
    *,
    clip: float | None = None,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Decode attention of one new token per row after the fused qkv projection (moe_gemv.c, attn_decode_bf16):
    clip, per-head q/k RMSNorm, RoPE on the first R dims, the new k/v written to the caches [slots, Hk, S, Hd]
    at each row's (slot, pos), attention over positions 0..pos of the row's slot. -> out_BX [B, H * Hd] bf16."""
    fn = _get()
    if fn is None:
        raise RuntimeError(f"attn_decode is not available: {unavailable_reason}")
    B = qkv_BX.shape[0]
    H, Hk, Hd = n_heads, n_kv_heads, head_dim
    R, S = cos_BR.shape[-1], k_cache.shape[2]
    bf = torch.bfloat16
    norms = [t for t in (q_norm, k_norm) if t is not None]
    if (
        any(t.dtype != bf or not t.is_cpu or not t.is_contiguous() for t in (qkv_BX, cos_BR, sin_BR, *norms))
        or any(t.dtype != bf or not t.is_cpu or not t.is_contiguous() for t in (k_cache, v_cache))
        or qkv_BX.shape != (B, (H + 2 * Hk) * Hd)
        or cos_BR.shape != (B, R)
        or sin_BR.shape != (B, R)
        or k_cache.shape != v_cache.shape
        or tuple(k_cache.shape[1:]) != (Hk, S, Hd)
        or any(t.shape != (Hd,) for t in norms)
        or len(norms) == 1
        or len(slots) != B
        or len(pos) != B
        or (B and (min(slots) < 0 or max(slots) >= k_cache.shape[0] or min(pos) < 0 or max(pos) >= S))
        or Hd > 1024
        or R > Hd
        or R % 2
        or H % Hk
    ):
        raise ValueError("attn_decode: tensor shapes, dtypes (bf16, CPU, contiguous) or rows do not fit")
    out = qkv_BX.new_empty(B, H * Hd)
    if not B:
        return out
    scratch = torch.empty(B * Hk * (S + Hd), dtype=torch.float32)
    arr = ctypes.c_int64
    rc = fn.attn_decode_bf16(
        B, H, Hk, Hd, R,
        qkv_BX.data_ptr(), qkv_BX.stride(0), float(clip or 0.0),
        q_norm.data_ptr() if q_norm is not None else None,
        k_norm.data_ptr() if k_norm is not None else None,
        float(eps),
        cos_BR.data_ptr(), sin_BR.data_ptr(), R,
        k_cache.data_ptr(), v_cache.data_ptr(), S, (arr * B)(*slots), (arr * B)(*pos),
        float(Hd**-0.5), out.data_ptr(), H * Hd, scratch.data_ptr(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError("attn_decode: unsupported head sizes")
    return out


# ---- quantized experts: moe_gemm_q (moe_gemm_q.c), a separate shared object with its own CPU requirements ----

_Q_SOURCE = Path(__file__).with_name("moe_gemm_q.c")
_Q_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni")
_Q_FORMAT_IDS = {"int8": 0, "int4": 1, "fp8": 2, "mxfp4": 3}
_q_lib: Any = None  # the loaded library once built; False once it proved unavailable
q_unavailable_reason = ""


def _build_q():
    """Compile moe_gemm_q.c like moe_gemv.c (cached by source hash, linked to torch's OpenMP runtime)."""
    global q_unavailable_reason
    # -ffp-contract=off: no fused multiply-adds beyond the written ones, so every path rounds alike
    so, q_unavailable_reason = _compile(
        [_Q_SOURCE, _GLUE_SOURCE],  # moe_decode_q uses glue.c
        _Q_REQUIRED_FLAGS,
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-ffp-contract=off"],
    )
    if so is None:
        return None
    lib = ctypes.CDLL(str(so))
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.moe_gemm_q.argtypes = [
        cint,
        ptr,
        ptr,
        i64,
        i64,
        i64,
        ptr,
        i64,
        ptr,
        ptr,
        cint,
        i64,
        i64,
        ptr,
        ptr,
        cint,
        i64,
        ptr,
        ptr,
    ]
    lib.moe_gemm_q.restype = cint
    lib.moe_gemm_q_scratch_row_bytes.argtypes = [cint, i64, i64]
    lib.moe_gemm_q_scratch_row_bytes.restype = i64
    lib.moe_decode_q.argtypes = [cint, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr]
    lib.moe_decode_q.restype = cint
    from moecluster.kernels import glue  # glue.c is built into this library too

    glue.declare(lib)
    return lib


def _get_q():
    global _q_lib, q_unavailable_reason
    if _q_lib is None:
        with _lock:
            if _q_lib is None:
                try:
                    _q_lib = _build_q() or False
                except OSError as e:
                    q_unavailable_reason = f"kernel unavailable: {e}"
                    _q_lib = False
    return _q_lib or None


_q_row_bytes: dict[tuple[int, int, int], int] = {}  # (format id, inputs, group size) -> scratch bytes per x row
_scratch = threading.local()


def q_row_bytes(lib, fmt: int, inputs: int, group_size: int) -> int:
    """Scratch bytes moe_gemm_q needs per activation row (its prepared copy of x), cached."""
    key = (fmt, inputs, group_size)
    row = _q_row_bytes.get(key)
    if row is None:
        row = _q_row_bytes[key] = lib.moe_gemm_q_scratch_row_bytes(*key)
    return row


def scratch_ptr(nbytes: int) -> int:
    """A 64-byte aligned address of `nbytes` of this thread's scratch, reused from call to call (allocating it
    was ~10% of a quantized decode call); valid until this thread's next call."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < nbytes + 64:
        buf = _scratch.buf = torch.empty(nbytes + 64, dtype=torch.uint8)
    return buf.data_ptr() + (-buf.data_ptr()) % 64


def moe_gemm_q_available() -> bool:
    """True when the compiled quantized kernel can run here (else moe_gemm_q uses the torch path)."""
    return _get_q() is not None


def _kernel_takes(stack) -> bool:
    """The compiled kernel's shape limits (the torch path takes the rest): fp8 rows of whole 32-input steps."""
    return stack.fmt != "fp8" or stack.I % 32 == 0


def _check_q_args(stack, local, counts, x_nI, x_rows, out_nO, out_rows) -> None:
    def fail(what: str):
        raise ValueError(
            f"moe_gemm_q ({stack.fmt} stack of {stack.num_experts} experts [{stack.O}, {stack.I}]): {what}"
        )

    if stack.fmt not in _Q_FORMAT_IDS:
        fail(f"unknown format {stack.fmt!r}; known: {', '.join(_Q_FORMAT_IDS)}")
    if not (stack.data.is_contiguous() and stack.scales.is_contiguous()) or stack.data.device.type != "cpu":
        fail("stack data and scales must be contiguous CPU tensors")
    for name, t, n in (("x", x_nI, stack.I), ("out", out_nO, stack.O)):
        if t.dtype not in (torch.bfloat16, torch.float32) or t.device.type != "cpu" or t.dim() != 2:
            fail(f"{name} must be a 2-D bf16 or fp32 CPU tensor, got {t.dtype} {list(t.shape)} on {t.device}")
        if t.shape[1] != n or t.stride(1) != 1:
            fail(f"{name} must have contiguous rows of {n}, got shape {list(t.shape)} strides {t.stride()}")
    P = len(x_rows)
    if len(counts) != len(local) or sum(counts) != P or len(out_rows) != P or (counts and min(counts) < 0):
        fail(
            f"counts ({len(counts)}, summing to {sum(counts)}) must give each of the {len(local)} experts its "
            f"pairs; x_rows and out_rows ({P}, {len(out_rows)}) one entry per pair"
        )
    if local and (min(local) < 0 or max(local) >= stack.num_experts):
        fail(f"local expert indices {local} out of range 0..{stack.num_experts - 1}")
    if P and (min(x_rows) < 0 or max(x_rows) >= x_nI.shape[0] or min(out_rows) < 0 or max(out_rows) >= out_nO.shape[0]):
        fail("x_rows / out_rows index past the rows of x / out")


def moe_gemm_q(
    stack,
    local: list[int],
    counts: list[int],
    x_nI: torch.Tensor,
    x_rows: list[int],
    out_nO: torch.Tensor,
    out_rows: list[int],
) -> torch.Tensor:
    """moe_gemm for a moecluster.quant.QuantizedStack: pairs grouped by expert, the first counts[0] use local
    expert local[0], ...; pair p computes out_nO[out_rows[p]] = W[local of p] @ x_nI[x_rows[p]] (fp32
    accumulation, out bf16 or fp32). x_nI [n, I] and out_nO [m, O] bf16 or fp32 with contiguous rows.

    Compiled kernel when available (int8/int4 quantize x to int8 per group; fp8/mxfp4 use x in bf16), else
    `moe_gemm_q_torch`. Either way a pair's output bits do not depend on the thread count or other pairs."""
    _check_q_args(stack, local, counts, x_nI, x_rows, out_nO, out_rows)
    lib = _get_q()
    if lib is None or not _kernel_takes(stack):
        return moe_gemm_q_torch(stack, local, counts, x_nI, x_rows, out_nO, out_rows)
    K, P = len(local), len(x_rows)
    if not P:
        return out_nO
    fmt = _Q_FORMAT_IDS[stack.fmt]
    n_x = x_nI.shape[0]
    base = scratch_ptr(n_x * q_row_bytes(lib, fmt, stack.I, stack.group_size))
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    arr = ctypes.c_int64
    rc = lib.moe_gemm_q(
        fmt,
        stack.data.data_ptr(),
        stack.scales.data_ptr(),
        stack.O,
        stack.I,
        stack.group_size,
        (arr * K)(*local),
        K,
        (arr * (K + 1))(*starts),
        x_nI.data_ptr(),
        int(x_nI.dtype == torch.float32),
        x_nI.stride(0),
        n_x,
        (arr * P)(*x_rows),
        out_nO.data_ptr(),
        int(out_nO.dtype == torch.float32),
        out_nO.stride(0),
        (arr * P)(*out_rows),
        base,
    )
    if rc != 0:
        raise RuntimeError(f"moe_gemm_q failed with code {rc}")
    return out_nO


def moe_gemm_q_torch(
    stack,
    local: list[int],
    counts: list[int],
    x_nI: torch.Tensor,
    x_rows: list[int],
    out_nO: torch.Tensor,
    out_rows: list[int],
) -> torch.Tensor:
    """The torch path of moe_gemm_q (same arguments): each selected expert dequantized exactly to fp32 and
    applied to its pairs' rows in fp32. Slow (it writes the fp32 weights); for CPUs without the kernel."""
    _check_q_args(stack, local, counts, x_nI, x_rows, out_nO, out_rows)
    start = 0
    for e, c in zip(local, counts):
        if c:
            xs = x_nI[x_rows[start : start + c]].float()
            out_nO[out_rows[start : start + c]] = (xs @ stack.dequantize(e).T).to(out_nO.dtype)
        start += c
    return out_nO


def linear_q(stack, x_nI: torch.Tensor) -> torch.Tensor:
    """x_nI @ W.T for a one-weight QuantizedStack (QuantizedLinear.linear): moe_gemm_q's kernel with one expert
    whose pairs are the rows, with the least Python per call (a decode step makes a few per layer); the bits of
    moe_gemm_q(stack, [0], [n], x_nI, rows, out, rows). x_nI: contiguous bf16 or fp32 [n, I] -> out [n, O]."""
    lib = _get_q()
    n = x_nI.shape[0]
    if (
        lib is None
        or not _kernel_takes(stack)
        or x_nI.dtype not in (torch.bfloat16, torch.float32)
        or not x_nI.is_cpu
        or not x_nI.is_contiguous()
        or x_nI.shape != (n, stack.I)
        or stack.num_experts != 1
    ):
        rows = list(range(n))
        return moe_gemm_q(stack, [0], [n], x_nI, rows, x_nI.new_empty(n, stack.O), rows)
    out_nO = x_nI.new_empty(n, stack.O)
    if not n:
        return out_nO
    fmt = _Q_FORMAT_IDS[stack.fmt]
    base = scratch_ptr(n * q_row_bytes(lib, fmt, stack.I, stack.group_size))
    f32 = int(x_nI.dtype == torch.float32)
    rc = lib.moe_gemm_q(
        fmt, stack.data.data_ptr(), stack.scales.data_ptr(), stack.O, stack.I, stack.group_size, _ZERO, 1,
        _STARTS(0, n), x_nI.data_ptr(), f32, stack.I, n, None, out_nO.data_ptr(), f32, stack.O, None,
        base,
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"moe_gemm_q failed with code {rc}")
    return out_nO
