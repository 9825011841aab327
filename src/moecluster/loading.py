"""HF checkpoint directory -> model: config, tokenizer, lazy strict safetensors loading, only owned experts.

Tensors are read one at a time from safetensors shards (checkpoint_io: pread into fresh tensors, no
mapping kept resident) into their final (prestacked, converted) storage, so the process never holds two
copies of the weights. Expert tensors are read by row slices: a rank that holds 4 of 16 experts touches
only those rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moecluster.checkpoint_io import CheckpointReader, LoadProgress
from moecluster.errors import MoeClusterError
from moecluster.models.configs import ArchConfig, ModelShape, parse_config
from moecluster.models.layers import DecoderModel, check_dims
from moecluster.models.moe import RoutedExperts
from moecluster.models.registry import architecture
from moecluster.tokenizer import Tokenizer

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
        raise MoeClusterError(f"model directory {str(model_dir)!r} does not exist; "
                              "pass --model DIR with a HF checkpoint")
    path = model_dir / "config.json"
    if not path.is_file():
        raise MoeClusterError(f"{path} not found; a HF checkpoint directory needs config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoeClusterError(f"{path} is not valid JSON: {e}") from None
    cfg = parse_config(raw, str(path))
    architecture(cfg)
    return raw, cfg


def default_dtype(cfg: dict) -> str:
    """fp32 for fp32 checkpoints, else bf16."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return "fp32" if name in ("float32", "fp32") else "bf16"


def _check_names(reader: CheckpointReader, arch, cfg: ArchConfig) -> None:
    """Strict: every expected tensor present with its shape, nothing unexpected."""
    expected: dict[str, tuple[int, ...]] = {}
    for names, _ in arch.dense_weights(cfg).values():
        for name in names:
            expected[name] = ()
    for layer in cfg.moe_layer_ids():
        expected |= arch.expert_weights(cfg, layer)
    missing = sorted(set(expected) - set(reader.shapes))
    if missing:
        raise MoeClusterError(f"checkpoint is missing {len(missing)} tensors (first: {missing[0]}); "
                              "a shard may be missing or the config may not match the weights")
    ignored = getattr(arch, "ignored_on_disk", None)
    unexpected = sorted(n for n in set(reader.shapes) - set(expected) if ignored is None or not ignored(cfg, n))
    if unexpected:
        raise MoeClusterError(f"checkpoint has {len(unexpected)} unexpected tensors (first: {unexpected[0]}); "
                              "config.json does not describe these weights")
    for name, shape in expected.items():
        if shape:
            check_dims(name, reader.shapes[name], shape)


def load_model(model_dir: str | Path, dtype: str | None = None, expert_filter: ExpertFilter | None = None,
               num_threads: int | None = None, progress: str | None = None) -> LoadedModel:
    """Load a HF checkpoint. `expert_filter(moe_layer)` gives the experts to hold (default: all).
    progress: None (silent) or a line prefix; then a live progress line on a terminal stderr, and
    LoadedModel.load has the totals for the one summary line the caller prints once it succeeded."""
    model_dir = Path(model_dir)
    meter = LoadProgress(0, progress) if progress is not None else None  # the user's wait starts here
    raw, cfg = read_config(model_dir)
    dtype_name = dtype or default_dtype(raw)
    if dtype_name not in DTYPES:
        raise MoeClusterError(f"dtype {dtype_name!r} not supported; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype_name]
    tokenizer = Tokenizer.from_dir(model_dir, cfg)
    model_class, arch = architecture(cfg)
    shape = cfg.shape(model_dir.name, str(model_dir))
    reader = CheckpointReader(model_dir, torch_dtype)
    held = [list(range(shape.num_experts)) if expert_filter is None else sorted(expert_filter(index))
            for index in range(len(cfg.moe_layer_ids()))]
    threads = torch.get_num_threads()
    try:
        _check_names(reader, arch, cfg)
        plan = _read_plan(reader, arch, cfg, held)
        if meter is not None:
            meter.total, reader.progress = sum(n for _, _, n in plan), meter
        reader.prefetch(plan)
        # copies of a few MB each: one thread is as fast on a quiet machine and much faster on a busy one
        # (measured 4.5 s vs 7-10 s for 0.8 GB with 2 threads on 2 shared cores)
        torch.set_num_threads(1)
        with torch.device("meta"):
            model = model_class(cfg)
        _load_dense(model, reader, arch, cfg)
        for index, (layer, moe) in enumerate(zip(cfg.moe_layer_ids(), model.moe_layers(), strict=True)):
            moe.experts = _load_experts(reader, arch, cfg, moe.experts, layer, index, held[index], torch_dtype)
            moe.index = index
    finally:
        torch.set_num_threads(threads)
        reader.close()
        if meter is not None:
            meter.finish()
    model.eval().requires_grad_(False)
    return LoadedModel(model, cfg, shape, tokenizer, raw, torch_dtype, model_dir, meter)


def _read_plan(reader: CheckpointReader, arch, cfg: ArchConfig, held: list[list[int]]) -> list[tuple[Path, int, int]]:
    """The byte ranges this load reads, in order (dense tensors, then each held expert's rows), found by running
    the architecture's read_expert on meta tensors: for the page-cache prefetch and the progress total."""
    plan = [reader.byte_range(n) for names, _ in arch.dense_weights(cfg).values() for n in names]

    def record(name: str, start: int, end: int) -> torch.Tensor:
        plan.append(reader.byte_range(name, start, end))
        return torch.empty((end - start, *reader.shapes[name][1:]), device="meta")

    for experts, layer in zip(held, cfg.moe_layer_ids(), strict=True):
        for expert in experts:
            arch.read_expert(record, cfg, layer, expert)
    return plan


def _load_dense(model: DecoderModel, reader: CheckpointReader, arch, cfg: ArchConfig) -> None:
    state = {}
    # buffers keep the dtype the model declares (GLM-4.5's fp32 router correction bias, as transformers does)
    buffer_dtype = {name: b.dtype for name, b in model.named_buffers()}
    for ours, (names, shape) in arch.dense_weights(cfg).items():
        # the reader returns fresh contiguous tensors in this process's own (anonymous) memory: no copy needed
        parts = [reader.read(n, buffer_dtype.get(ours, reader.dtype)) for n in names]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        check_dims(names[0] if len(names) == 1 else "+".join(names), tuple(t.shape), shape)
        state[ours] = t
    result = model.load_state_dict(state, strict=False, assign=True)
    still_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
                  if p.is_meta and ".experts." not in n]
    if still_meta:
        raise MoeClusterError(f"internal: parameters not loaded: {still_meta[:3]} ({result})")


def _load_experts(reader: CheckpointReader, arch, cfg: ArchConfig, template: RoutedExperts, layer: int, index: int,
                  experts: list[int], dtype: torch.dtype) -> RoutedExperts:
    """Prestack the held experts of one MoE layer into contiguous w13_eGD / w2_eDF, one expert at a time."""
    bad = [e for e in experts if not 0 <= e < template.num_experts]
    if bad:
        raise MoeClusterError(f"placement names experts {bad} in MoE layer {index}, but the model has "
                              f"{template.num_experts}")
    module = RoutedExperts(template.num_experts, template.dim, template.hidden, experts, dtype=dtype)
    for i, expert in enumerate(experts):
        w13_GD, w2_DF = arch.read_expert(reader.read_rows, cfg, layer, expert)
        module.w13_eGD[i].copy_(w13_GD)
        module.w2_eDF[i].copy_(w2_DF)
    return module


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
