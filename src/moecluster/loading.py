"""HF checkpoint directory -> model: config, tokenizer, lazy strict safetensors loading, only owned experts.

Tensors are read one at a time from safetensors shards (checkpoint_io: pread into fresh tensors, no
mapping kept resident) into their final (prestacked, converted) storage, so the process never holds two
copies of the weights. Expert tensors are read by row slices: a rank that holds 4 of 16 experts touches
only those rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moecluster.checkpoint_io import CheckpointReader, LoadProgress
from moecluster.errors import MoeClusterError
from moecluster.models.configs import ArchConfig, parse_config
from moecluster.models.hub import ReadRows
from moecluster.models.layers import DecoderModel, check_dims
from moecluster.models.moe import RoutedExperts
from moecluster.models.registry import architecture
from moecluster.models.shape import ModelShape
from moecluster.quant import dequantize_fp8_block, format_from_quantization_config
from moecluster.quant.experts import QuantizedRoutedExperts, QuantOptions, quantize_dense_linears
from moecluster.quant.formats import FP8_BLOCK
from moecluster.quant.stack import QuantizedStack
from moecluster.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# MoE layer index (position among the model's MoE layers) -> global expert ids this process holds
ExpertFilter = Callable[[int], list[int]]


@dataclass
class LoadedModel:
    model: DecoderModel
    config: ArchConfig
    shape: ModelShape
    tokenizer: Tokenizer
    raw_config: dict
    dtype: torch.dtype
    model_dir: Path
    load: LoadProgress | None = None  # bytes read and seconds (when loaded with progress)


def read_config(model_dir: str | Path) -> tuple[dict, ArchConfig]:
    """Parse config.json into its architecture's config (checked), and check the engine can run it."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MoeClusterError(
            f"model directory {str(model_dir)!r} does not exist; pass --model DIR with a HF checkpoint"
        )
    path = model_dir / "config.json"
    if not path.is_file():
        raise MoeClusterError(f"{path} not found; a HF checkpoint directory needs config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoeClusterError(f"{path} is not valid JSON: {e}") from None
    cfg = parse_config(raw, str(path))
    architecture(cfg)
    checkpoint_format(raw, cfg)
    return raw, cfg


def checkpoint_format(raw: dict, cfg: ArchConfig) -> str | None:
    """The quantized format the checkpoint ships ("fp8", "mxfp4"), None when unquantized; one clear error
    otherwise. mxfp4 is gpt-oss's own layout: read where the architecture has a `read_expert_mxfp4`."""
    fmt = format_from_quantization_config(raw.get("quantization_config"))
    if fmt == "mxfp4" and _mxfp4_reader(architecture(cfg)[1]) is None:
        raise MoeClusterError(
            f"mxfp4 checkpoints are read for gpt-oss (the layout it ships), not for model_type "
            f"{cfg.model_type!r}; use an fp8 or unquantized checkpoint"
        )
    return fmt


def _mxfp4_reader(arch) -> Callable | None:
    """The architecture's optional hook for experts shipped in MXFP4 (see models/gpt_oss.py)."""
    return getattr(arch, "read_expert_mxfp4", None)


def _expert_reader(arch, fmt: str | None) -> Callable:
    """read_expert(read_rows, cfg, layer, expert) for the checkpoint's expert format."""
    reader = _mxfp4_reader(arch) if fmt == "mxfp4" else arch.read_expert
    if reader is None:
        raise MoeClusterError("internal: no mxfp4 expert reader for this architecture")
    return reader


def default_dtype(cfg: dict) -> str:
    """fp32 for fp32 checkpoints, else bf16."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return "fp32" if name in ("float32", "fp32") else "bf16"


def _check_names(reader: CheckpointReader, arch, cfg: ArchConfig, fmt: str | None = None) -> None:
    """Strict: every expected tensor present with its shape, nothing unexpected."""
    expected: dict[str, tuple[int, ...]] = {}
    for names, _ in arch.dense_weights(cfg).values():
        for name in names:
            expected[name] = ()
    for layer in cfg.moe_layer_ids():
        expected |= arch.expert_weights(cfg, layer)
    if fmt == "fp8":
        expected |= _fp8_scale_names(reader, arch, cfg)
    missing = sorted(set(expected) - set(reader.shapes))
    if missing:
        raise MoeClusterError(
            f"checkpoint is missing {len(missing)} tensors (first: {missing[0]}); "
            "a shard may be missing or the config may not match the weights"
        )
    ignored = getattr(arch, "ignored_on_disk", None)
    extra = set(reader.shapes) - set(expected)
    skipped = sorted(n for n in extra if ignored is not None and ignored(cfg, n))
    if skipped:
        log.warning(
            "not loading %d checkpoint tensors the model does not run (%s, ...: the multi-token-prediction layer)",
            len(skipped),
            skipped[0],
        )
    unexpected = sorted(extra - set(skipped))
    if unexpected:
        raise MoeClusterError(
            f"checkpoint has {len(unexpected)} unexpected tensors (first: {unexpected[0]}); "
            "config.json does not describe these weights"
        )
    for name, shape in expected.items():
        if shape:
            check_dims(name, reader.shapes[name], shape)


def load_model(
    model_dir: str | Path,
    dtype: str | None = None,
    expert_filter: ExpertFilter | None = None,
    num_threads: int | None = None,
    quant: QuantOptions | None = None,
    progress: str | None = None,
    check_weights: bool = True,
    progress_rank: int | None = None,
    progress_live: bool | None = None,
) -> LoadedModel:
    """Load a HF checkpoint. `expert_filter(moe_layer)` gives the experts to hold (default: all); `quant`
    quantizes a bf16/fp32 checkpoint's experts on load (an fp8 checkpoint's experts stay fp8 regardless).
    progress: None (silent) or a line prefix; then a live progress line on a terminal stderr, and
    LoadedModel.load has the totals for the one summary line the caller prints once it succeeded.
    check_weights: refuse NaN/Inf weights (one pass over what this process holds). progress_rank: this process's
    rank, to share progress with rank 0's line; progress_live: False keeps the line off (None: on a terminal)."""
    model_dir = Path(model_dir)
    # the user's wait starts here
    meter = LoadProgress(0, progress, progress_live, rank=progress_rank) if progress is not None else None
    raw, cfg = read_config(model_dir)
    quant = (quant or QuantOptions()).check()
    fmt = checkpoint_format(raw, cfg)
    if fmt is not None and quant.fmt is not None:
        raise MoeClusterError(f"this checkpoint is already quantized ({fmt}); drop --quantize {quant.fmt}")
    fmt = fmt or quant.fmt
    dtype_name = dtype or default_dtype(raw)
    if dtype_name not in DTYPES:
        raise MoeClusterError(f"dtype {dtype_name!r} not supported; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype_name]
    tokenizer = Tokenizer.from_dir(model_dir, cfg)
    model_class, arch = architecture(cfg)
    shape = cfg.shape(model_dir.name, str(model_dir))
    reader = CheckpointReader(model_dir, torch_dtype)
    held = [
        list(range(shape.num_experts)) if expert_filter is None else sorted(expert_filter(index))
        for index in range(len(cfg.moe_layer_ids()))
    ]
    threads = torch.get_num_threads()
    try:
        _check_names(reader, arch, cfg, fmt)
        plan = _read_plan(reader, _expert_reader(arch, fmt), arch, cfg, held, fmt)
        if meter is not None:
            meter.total, reader.progress = sum(n for _, _, n in plan), meter
        reader.prefetch(plan)
        # copies of a few MB each: one thread is as fast on a quiet machine and much faster on a busy one
        # (measured 4.5 s vs 7-10 s for 0.8 GB with 2 threads on 2 shared cores)
        torch.set_num_threads(1)
        with torch.device("meta"), _no_embedding_init():
            model = model_class(cfg)
        _load_dense(model, reader, arch, cfg)
        if quant.dense:
            quantize_dense_linears(model, quant.dense, quant.group_size)
        for index, (layer, moe) in enumerate(zip(cfg.moe_layer_ids(), model.moe_layers(), strict=True)):
            experts = held[index]
            if fmt is None:
                moe.experts = _load_experts(reader, arch, cfg, moe.experts, layer, index, experts, torch_dtype)
            else:
                moe.experts = _load_quantized_experts(
                    reader, arch, cfg, moe.experts, layer, index, experts, fmt, quant.group_size
                )
            moe.index = index
    finally:
        torch.set_num_threads(threads)
        reader.close()
        if meter is not None:
            meter.finish()
    model.eval().requires_grad_(False)
    if check_weights:
        check_finite(model)
    return LoadedModel(model, cfg, shape, tokenizer, raw, torch_dtype, model_dir, meter)


@contextlib.contextmanager
def _no_embedding_init() -> Iterator[None]:
    """nn.Embedding's random init, which the checkpoint overwrites: on meta tensors it runs through torch._refs,
    which imports torch._dynamo (70 MB of Python objects that would stay resident)."""
    reset = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Embedding.reset_parameters = reset  # type: ignore[method-assign]


def _read_plan(
    reader: CheckpointReader, read_expert: Callable, arch, cfg: ArchConfig, held: list[list[int]], fmt: str | None
) -> list[tuple[Path, int, int]]:
    """The byte ranges this load reads, in order (dense tensors, then each held expert's rows), found by running
    the architecture's read_expert on meta tensors: for the page-cache prefetch and the progress total. The
    experts are read into meta `out` views as the load does (a torch.cat on meta tensors would import ~800
    modules, 70 MB, of torch's Python meta kernels)."""
    plan = [reader.byte_range(n) for names, _ in arch.dense_weights(cfg).values() for n in names]

    def record(name: str, start: int, end: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        plan.append(reader.byte_range(name, start, end))
        return torch.empty((end - start, *reader.shapes[name][1:]), device="meta")

    shape = cfg.shape()
    dim, hidden = shape.d_model, shape.expert_ffn
    meta = {"device": "meta", "dtype": torch.uint8}
    out: tuple = (torch.empty(2 * hidden, dim, **meta), torch.empty(dim, hidden, **meta))
    if fmt == "mxfp4":
        out = tuple(
            (torch.empty(rows, cols // 32, 16, **meta), torch.empty(rows, cols // 32, **meta))
            for rows, cols in ((2 * hidden, dim), (dim, hidden))
        )
    for experts, layer in zip(held, cfg.moe_layer_ids(), strict=True):
        for expert in experts:
            read_expert(record, cfg, layer, expert, out=out)
    return plan


def _load_dense(model: DecoderModel, reader: CheckpointReader, arch, cfg: ArchConfig) -> None:
    state = {}
    # buffers keep the dtype the model declares (GLM-4.5's fp32 router correction bias, as transformers does)
    buffer_dtype = {name: b.dtype for name, b in model.named_buffers()}
    for ours, (names, shape) in arch.dense_weights(cfg).items():
        # the reader returns fresh contiguous tensors in this process's own (anonymous) memory: no copy needed
        t = _read_stacked(reader, names, shape, buffer_dtype.get(ours, reader.dtype))
        if t is None:
            parts = [_read_dense(reader, n, buffer_dtype.get(ours, reader.dtype)) for n in names]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        check_dims(names[0] if len(names) == 1 else "+".join(names), tuple(t.shape), shape)
        state[ours] = t
    result = model.load_state_dict(state, strict=False, assign=True)
    still_meta = [
        n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta and ".experts." not in n
    ]
    if still_meta:
        raise MoeClusterError(f"internal: parameters not loaded: {still_meta[:3]} ({result})")


def _load_experts(
    reader: CheckpointReader,
    arch,
    cfg: ArchConfig,
    template: RoutedExperts,
    layer: int,
    index: int,
    experts: list[int],
    dtype: torch.dtype,
) -> RoutedExperts:
    """Prestack the held experts of one MoE layer into contiguous w13_eGD / w2_eDF, one expert at a time."""
    bad = [e for e in experts if not 0 <= e < template.num_experts]
    if bad:
        raise MoeClusterError(
            f"placement names experts {bad} in MoE layer {index}, but the model has {template.num_experts}"
        )
    module = template.empty_like(experts, dtype)
    w13_eGD, w2_eDF = module.w13_eGD.detach(), module.w2_eDF.detach()
    for i, expert in enumerate(experts):
        # the weights land in slot i straight from the file; biases (gpt-oss) come back to copy
        _, _, *biases = arch.read_expert(reader.read_rows, cfg, layer, expert, out=(w13_eGD[i], w2_eDF[i]))
        module.set_biases(i, *(biases or (None, None)))
    return module


def _read_stacked(
    reader: CheckpointReader, names: list[str], shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """Tensors concatenated along dim 0 (q/k/v into wqkv) read straight into one tensor, when their shapes add
    up to `shape` and none is fp8 (None otherwise: the caller concatenates, and reports a mismatch)."""
    shapes = [reader.shapes[n] for n in names]
    if len(names) < 2 or any(f"{n}_scale_inv" in reader.shapes for n in names):
        return None
    if not all(s and s[1:] == shape[1:] for s in shapes) or sum(s[0] for s in shapes) != shape[0]:
        return None
    out, first = torch.empty(shape, dtype=dtype), 0
    for name, s in zip(names, shapes, strict=True):
        reader.read(name, out=out[first : first + s[0]])
        first += s[0]
    return out


def _read_dense(reader: CheckpointReader, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A dense tensor in the compute dtype; an fp8 block-scaled one (it has a `_scale_inv` companion)
    dequantized here: only routed experts stay quantized."""
    scale = f"{name}_scale_inv"
    if scale not in reader.shapes:
        return reader.read(name, dtype)
    w = dequantize_fp8_block(reader.read(name, torch.float8_e4m3fn), reader.read(scale, torch.float32))
    return w.to(dtype)


def _fp8_scale_names(reader: CheckpointReader, arch, cfg: ArchConfig) -> dict[str, tuple[int, ...]]:
    """The `weight_scale_inv` tensors an fp8 checkpoint ships beside its weights (expected, not unexpected):
    every expert tensor must have one; dense ones may (router gates, norms, embeddings stay bf16)."""
    out: dict[str, tuple[int, ...]] = {}
    for names, _ in arch.dense_weights(cfg).values():
        out |= {f"{n}_scale_inv": () for n in names if f"{n}_scale_inv" in reader.shapes}
    for layer in cfg.moe_layer_ids():
        for name, (rows, cols) in arch.expert_weights(cfg, layer).items():
            out[f"{name}_scale_inv"] = (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK))
    missing = sorted(n for n in out if n not in reader.shapes)
    if missing:
        raise MoeClusterError(
            f"fp8 checkpoint is missing {len(missing)} weight_scale_inv tensors (first: "
            f"{missing[0]}); every expert weight needs its block scales"
        )
    return out


def _fp8_readers(reader: CheckpointReader, hidden: int) -> tuple[ReadRows, ReadRows]:
    """read_rows for an fp8 checkpoint: (weights as float8_e4m3fn, their 128x128 block scales in fp32).

    The architecture's read_expert concatenates row ranges and transposes; applied to the scales with row
    ranges divided by 128, the same steps give the scales of the result, when ranges fall on block edges."""
    if hidden % FP8_BLOCK:
        raise MoeClusterError(
            f"fp8 experts need a hidden size that is a multiple of {FP8_BLOCK} so gate and up "
            f"blocks stack; this model has {hidden}"
        )

    def weights(name: str, start: int, end: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        return reader.read_rows(name, start, end, None, out=out)  # as on disk (float8_e4m3fn)

    def scales(name: str, start: int, end: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = reader.shapes[name][0]
        if start % FP8_BLOCK or (end % FP8_BLOCK and end != rows):
            raise MoeClusterError(f"fp8 tensor {name}: rows {start}:{end} do not fall on {FP8_BLOCK}-row blocks")
        return reader.read(f"{name}_scale_inv", torch.float32)[start // FP8_BLOCK : -(-end // FP8_BLOCK)]

    return weights, scales


def _mxfp4_rows(reader: CheckpointReader) -> ReadRows:
    """read_rows for an mxfp4 checkpoint: blocks and scales as on disk (uint8; e8m0 scales viewed as uint8),
    everything else (the biases) in the compute dtype."""

    def read(name: str, start: int, end: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        disk = reader.disk_dtype(name)
        if disk == torch.uint8 or disk == getattr(torch, "float8_e8m0fnu", None):
            if out is not None:  # the same bytes: read them into the uint8 slot as the on-disk dtype
                return reader.read_rows(name, start, end, out=out.view(disk)).view(torch.uint8)
            return reader.read_rows(name, start, end, None).view(torch.uint8)
        if name.endswith(("_blocks", "_scales")):
            raise MoeClusterError(f"mxfp4 tensor {name} is {disk}; gpt-oss ships *_blocks and *_scales as uint8")
        return reader.read_rows(name, start, end, out=out)

    return read


def _load_quantized_experts(
    reader: CheckpointReader,
    arch,
    cfg: ArchConfig,
    template: RoutedExperts,
    layer: int,
    index: int,
    experts: list[int],
    fmt: str,
    group_size: int,
) -> QuantizedRoutedExperts:
    """The held experts of one MoE layer in `fmt`, one expert at a time: fp8 and mxfp4 copied as shipped
    (weights and scales), int8/int4 quantized from the checkpoint's floats (peak: the stacks + one expert);
    biases, where the experts have them, in the compute dtype."""
    bad = [e for e in experts if not 0 <= e < template.num_experts]
    if bad:
        raise MoeClusterError(
            f"placement names experts {bad} in MoE layer {index}, but the model has {template.num_experts}"
        )
    module = QuantizedRoutedExperts.like(
        template, experts, fmt, None if fmt in ("fp8", "mxfp4") else group_size, reader.dtype
    )
    fp8 = _fp8_readers(reader, template.hidden) if fmt == "fp8" else None
    mxfp4 = _mxfp4_rows(reader) if fmt == "mxfp4" else None
    w13, w2 = module.w13_eGD, module.w2_eDF
    # int8/int4: one expert in the compute dtype, the same buffers for every expert and layer
    staging = (
        None
        if fp8 or mxfp4
        else (
            reader.scratch("w13", (w13.O, w13.I), reader.dtype),
            reader.scratch("w2", (w2.O, w2.I), reader.dtype),
        )
    )
    for i, expert in enumerate(experts):
        if fp8 is not None:  # fp8 weights straight into the slots, then the (small) block scales
            _, _, *biases = arch.read_expert(fp8[0], cfg, layer, expert, out=(w13.data[i], w2.data[i]))
            s13, s2, *_ = arch.read_expert(fp8[1], cfg, layer, expert)
            w13.scales[i].copy_(s13)
            w2.scales[i].copy_(s2)
        elif mxfp4 is not None:
            out = ((w13.data[i], w13.scales[i]), (w2.data[i], w2.scales[i]))
            _, _, *biases = _expert_reader(arch, fmt)(mxfp4, cfg, layer, expert, out=out)
        else:
            assert staging is not None
            _, _, *biases = arch.read_expert(reader.read_rows, cfg, layer, expert, out=staging)
            for stack, w in ((w13, staging[0]), (w2, staging[1])):
                _quantize_by_rows(stack, i, w)
        module.set_biases(i, *(biases or (None, None)))
    return module


def _quantize_by_rows(stack: QuantizedStack, i: int, w_OI: torch.Tensor, block_bytes: int = 1 << 20) -> None:
    """Quantize one expert into slot i 1 MB of fp32 at a time (quantizing a whole expert at once takes several
    fp32 copies of it)."""
    rows = max(1, block_bytes // (4 * w_OI.shape[1]))
    for first in range(0, w_OI.shape[0], rows):
        stack.quantize_rows(i, first, w_OI[first : first + rows])


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def check_finite(model: torch.nn.Module, chunk: int = 1 << 20) -> None:
    """Refuse NaN/Inf weights, naming the first such tensor (chunked: no full-size temporary)."""
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.is_meta or not p.is_floating_point() or p.element_size() == 1:  # fp8 stacks: checked as scales
            continue
        for part in p.detach().reshape(-1).split(chunk):
            # a float32 sum is NaN/Inf if any element is (23x faster than isfinite; an overflowing sum of
            # finite values falls back to the exact test)
            if not math.isfinite(float(part.sum(dtype=torch.float32))) and not bool(torch.isfinite(part).all()):
                bad = sum(int((~torch.isfinite(q)).sum()) for q in p.detach().reshape(-1).split(chunk))
                raise MoeClusterError(
                    f"weight {name} has {bad} NaN/Inf values: the checkpoint is corrupt "
                    "(re-download it), or pass --no-check-weights to load it anyway"
                )
