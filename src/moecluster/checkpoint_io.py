"""safetensors shards read straight into their final storage, with load progress a user can see.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets relative to the end of the header) and the raw little-endian tensor bytes. We parse the
header ourselves and `preadv` each tensor's byte range (or a row slice: rows of dim 0 are one contiguous
range) into the buffer of a freshly allocated tensor. Nothing is memory-mapped, so no file-backed pages
stay resident while the weights are copied out: the page cache holds the file, the process holds one
copy of the weights in anonymous memory (the layout decode streams fastest). When the checkpoint dtype
differs from the target, bytes go through a small bounce buffer and are converted chunk by chunk.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from moecluster.errors import MoeClusterError

# safetensors dtype names -> torch dtypes this torch has (float4/complex names only on newer torch)
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}  # not F4 (two values per byte; gpt-oss ships MXFP4 as U8 blocks instead)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if isinstance(getattr(torch, v, None), torch.dtype)
}
MAX_HEADER = 100 << 20  # the format's own limit on the JSON header
CHUNK = 64 << 20  # bytes per read call: progress updates, and well under Linux's 2 GiB per-call limit
BOUNCE = 8 << 20  # bytes of on-disk data converted per step when dtypes differ
KEEP = object()  # read(..., dtype=KEEP) (the default): the reader's target dtype
PREFETCH_WINDOW = 256 << 20  # bytes the page-cache prefetch runs ahead of the reads


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


def parse_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> where its bytes are, checked against the file's size (a truncated shard is an error)."""

    def bad(what: str) -> MoeClusterError:
        return MoeClusterError(f"weight shard {path.name} is unreadable or truncated ({what}); re-download it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("no header")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER, size - 8):
                raise bad(f"header length {n} exceeds the file of {size} bytes")
            header = json.loads(f.read(n))
    except OSError as e:
        raise bad(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    base, out = 8 + n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = (
                entry["dtype"],
                tuple(int(s) for s in entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise bad(f"malformed entry for {name}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise MoeClusterError(
                f"tensor {name} in {path.name} has dtype {dtype_name}, which this torch cannot "
                f"hold (supported: {', '.join(SAFETENSORS_DTYPES)})"
            )
        dtype = SAFETENSORS_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise bad(f"{name} has {end - begin} bytes for shape {list(shape)} {dtype_name}")
        if base + end > size:
            raise bad(f"{name} ends at byte {base + end} of a {size}-byte file")
        out[name] = TensorInfo(path, dtype, shape, base + begin, nbytes)
    return out


class CheckpointReader:
    """Name -> shard index over single-file or sharded safetensors; reads whole tensors or row slices into
    fresh contiguous tensors (target dtype by default, `dtype=None`: the on-disk dtype)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        self.dtype = dtype
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.info: dict[str, TensorInfo] = {}
        self.progress: LoadProgress | None = None
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}
        self._bounce_buf = torch.empty(0, dtype=torch.uint8)
        self._scratch: dict[str, torch.Tensor] = {}
        self._prefetcher: threading.Thread | None = None
        self._stop = threading.Event()
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            shards = _index_shards(index)
        elif (model_dir / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise MoeClusterError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
        for shard in shards:
            path = model_dir / shard
            if not path.is_file():
                raise MoeClusterError(
                    f"weight shard {shard} listed in the index is missing from {model_dir}; re-download the checkpoint"
                )
            for name, info in parse_header(path).items():
                self.files[name], self.shapes[name], self.info[name] = path, info.shape, info

    def disk_dtype(self, name: str) -> torch.dtype:
        return self.info[name].dtype

    def read(self, name: str, dtype=KEEP, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor; dtype: KEEP (the reader's dtype), None (as on disk) or a torch dtype. With `out`
        (a tensor of the right shape, any dtype and strides: e.g. a slice or transposed view of final storage),
        the bytes land there and `out` is returned: no temporary beyond a fixed bounce buffer."""
        info = self.info[name]
        return self._read(info, info.start, info.shape, dtype, out)

    def read_rows(
        self, name: str, start: int, end: int, dtype=KEEP, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows start:end of dim 0 (one contiguous byte range on disk); `out` as in `read`."""
        info = self.info[name]
        if not info.shape or not 0 <= start <= end <= info.shape[0]:
            raise MoeClusterError(f"internal: rows {start}:{end} of {name} with shape {list(info.shape)}")
        row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        return self._read(info, info.start + start * row_bytes, (end - start, *info.shape[1:]), dtype, out)

    def _read(
        self, info: TensorInfo, offset: int, shape: tuple[int, ...], dtype, out: torch.Tensor | None
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty(shape, dtype=self.dtype if dtype is KEEP else info.dtype if dtype is None else dtype)
        elif not shape or out.dim() == 0 or out.shape[0] != shape[0] or out.numel() != math.prod(shape):
            raise MoeClusterError(f"internal: reading {list(shape)} into a tensor of {list(out.shape)}")
        out = out.detach()
        fd = self._fd(info.path)
        if out.dtype == info.dtype and out.is_contiguous():
            self._pread_into(fd, info.path, _bytes_of(out), offset)
        elif out.is_contiguous():  # convert chunk by chunk through the bounce buffer
            flat = out.view(-1)
            step = max(1, BOUNCE // info.dtype.itemsize)
            for first in range(0, flat.numel(), step):
                chunk = self._bounce(info.dtype, (min(step, flat.numel() - first),))
                self._pread_into(fd, info.path, _bytes_of(chunk), offset + first * info.dtype.itemsize)
                flat[first : first + chunk.numel()].copy_(chunk)
        else:  # a strided view of the final storage: blocks of rows through the bounce buffer (rows of `out`
            # may have another shape of the same size, e.g. gpt-oss's interleaved gate/up split in two)
            row_bytes = math.prod(shape[1:]) * info.dtype.itemsize
            step = max(1, BOUNCE // max(row_bytes, 1))
            for first in range(0, shape[0], step):
                dst = out[first : first + step]
                chunk = self._bounce(info.dtype, (dst.shape[0], *shape[1:]))
                self._pread_into(fd, info.path, _bytes_of(chunk), offset + first * row_bytes)
                dst.copy_(chunk.view(dst.shape))
        if self.progress is not None:
            self.progress.tensor_done()
        return out

    def _bounce(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A view of the reader's one bounce buffer (grown on demand, reused: no allocation per read)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._bounce_buf.numel() < nbytes:
            self._bounce_buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._bounce_buf[:nbytes].view(dtype).view(shape)

    def _pread_into(self, fd: int, path: Path, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(fd, [buf[done : done + CHUNK]], offset + done)
            except OSError as e:
                raise MoeClusterError(f"weight shard {path.name} is unreadable ({e}); re-download it") from None
            if n <= 0:
                raise MoeClusterError(
                    f"weight shard {path.name} is truncated (ends before byte {offset + done}); re-download it"
                )
            done += n
            self.bytes_read += n
            if self.progress is not None:
                self.progress.add_bytes(n)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise MoeClusterError(f"weight shard {path.name} is unreadable ({e}); re-download it") from None
            if hasattr(os, "posix_fadvise"):  # a larger readahead window: shards are read mostly in order
                os.posix_fadvise(self._fds[path], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return self._fds[path]

    def scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer kept until `close`: what a loader needs once per expert is allocated once per load, not
        once per expert (freed heap chunks of that size would stay resident, as glibc keeps them)."""
        t = self._scratch.get(name)
        if t is None or tuple(t.shape) != shape or t.dtype != dtype:
            t = self._scratch[name] = torch.empty(shape, dtype=dtype)
        return t

    def byte_range(self, name: str, start: int | None = None, end: int | None = None) -> tuple[Path, int, int]:
        """(file, offset, bytes) of a tensor, or of rows start:end of it."""
        info = self.info[name]
        if start is None or end is None:
            return info.path, info.start, info.nbytes
        row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        return info.path, info.start + start * row_bytes, (end - start) * row_bytes

    def prefetch(self, ranges: list[tuple[Path, int, int]], window: int = PREFETCH_WINDOW) -> None:
        """Ask the kernel to read `ranges` (the coming reads, in order) into the page cache from a background
        thread, staying at most `window` bytes ahead: the disk stays busy while this thread copies and faults
        in the destination memory. Only the page cache grows, not this process."""
        if not hasattr(os, "posix_fadvise") or not ranges:
            return
        fds = [(self._fd(path), offset, n) for path, offset, n in ranges]
        start = self.bytes_read

        def run() -> None:
            issued = 0
            for fd, offset, n in fds:
                while issued - (self.bytes_read - start) > window:
                    if self._stop.wait(0.005):
                        return
                if self._stop.is_set():
                    return
                os.posix_fadvise(fd, offset, n, os.POSIX_FADV_WILLNEED)
                issued += n

        self._prefetcher = threading.Thread(target=run, name="moecluster-prefetch", daemon=True)
        self._prefetcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._prefetcher is not None:
            self._prefetcher.join()
            self._prefetcher = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._scratch.clear()
        self._bounce_buf = torch.empty(0, dtype=torch.uint8)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's storage (any dtype, including bf16 and float8)."""
    if t.numel() == 0:
        return memoryview(bytearray())
    return t.reshape(-1).view(torch.uint8).numpy().data


PROGRESS_DIR_ENV = "MOECLUSTER_PROGRESS_DIR"  # set by the local launcher: ranks share their load progress there


class LoadProgress:
    """Tensors and bytes read, GB/s and ETA: a live line on a terminal (at most `hz` updates a second, erased
    when loading ends); `summary()` is the one line every command prints when loading succeeded.

    With `rank` and the launcher's MOECLUSTER_PROGRESS_DIR, every rank writes its bytes read / to read there
    (a few times a second) and rank 0's live line adds every rank's completion."""

    def __init__(
        self,
        total_bytes: int,
        prefix: str = "",
        live: bool | None = None,
        stream: TextIO | None = None,
        hz: float = 4.0,
        rank: int | None = None,
    ):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.total, self.prefix, self.period = total_bytes, prefix, 1.0 / hz
        self.bytes = self.tensors = 0
        self.t0 = self.last = self.last_shared = time.perf_counter()
        self.seconds = 0.0
        self.t_first: float | None = None  # the rate (and ETA) count from the first byte, not from config parsing
        self._shown = False
        share = os.environ.get(PROGRESS_DIR_ENV)
        self.rank, self.share_dir = rank, Path(share) if share and rank is not None else None

    def add_bytes(self, n: int) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.bytes += n
        self._maybe_show()

    def tensor_done(self) -> None:
        self.tensors += 1
        self._maybe_show()

    def _maybe_show(self) -> None:
        now = time.perf_counter()
        if self.share_dir is not None and now - self.last_shared >= self.period:
            self.last_shared = now
            self._share()
        if not self.live or now - self.last < self.period or self.t_first is None or now - self.t_first < self.period:
            return
        self.last = now
        rate = self.bytes / max(now - self.t_first, 1e-9)
        eta = max(self.total - self.bytes, 0) / rate if rate > 0 else 0.0
        pct = 100.0 * self.bytes / self.total if self.total else 0.0
        self.stream.write(
            f"\r\x1b[K{self.prefix}loading: {self.tensors} tensors, {self.bytes / 1e9:.2f} of "
            f"{self.total / 1e9:.2f} GB ({pct:.0f}%), {rate / 1e9:.2f} GB/s, ETA {eta:.0f} s{self._ranks()}"
        )
        self.stream.flush()
        self._shown = True

    def _share(self) -> None:
        """Write this rank's progress for rank 0 to show (atomically: a reader never sees half a line)."""
        assert self.share_dir is not None
        tmp = self.share_dir / f".rank{self.rank}.tmp"
        try:
            tmp.write_text(f"{self.bytes} {self.total}\n")
            os.replace(tmp, self.share_dir / f"rank{self.rank}")
        except OSError:  # the launcher removed the directory: only the display is lost
            self.share_dir = None

    def _ranks(self) -> str:
        """' | ranks 0 52%, 1 38%' on rank 0 when ranks share progress ('' otherwise)."""
        if self.share_dir is None or self.rank != 0:
            return ""
        done: dict[int, float] = {}
        for f in self.share_dir.glob("rank*"):
            try:
                n, total = (int(x) for x in f.read_text().split())
                done[int(f.name[4:])] = 100.0 * n / total if total else 0.0
            except (OSError, ValueError):
                continue
        done[0] = 100.0 * self.bytes / self.total if self.total else 0.0
        return " | ranks " + ", ".join(f"{r} {pct:.0f}%" for r, pct in sorted(done.items()))

    def finish(self) -> None:
        """Loading ended (either way): erase the live line; other ranks see this one at 100% (or where it failed)."""
        self.seconds = time.perf_counter() - self.t0
        if self.share_dir is not None:
            self._share()
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def summary(self) -> str:
        rate = self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return f"{self.prefix}loaded {self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s ({rate:.2f} GB/s)"


def _index_shards(index: Path) -> list[str]:
    """The shard file names of model.safetensors.index.json; one clear error if it is malformed."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, TypeError, AttributeError) as e:
        raise MoeClusterError(f"{index} is malformed ({e}); re-download the checkpoint") from None
    return sorted(set(weight_map.values()))
