"""HF checkpoint directory -> model: config, tokenizer, lazy strict safetensors loading, only owned experts.

Tensors are read one at a time from memory-mapped safetensors shards straight into their final
(prestacked, converted) storage, so the process never holds two copies of the weights. Expert
tensors are read by row slices: a rank that holds 4 of 16 experts touches only those rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

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


class CheckpointReader:
    """Name -> shard index over single-file or sharded safetensors, with lazy row-sliced reads."""

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        self.dtype = dtype
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._open: dict[Path, Any] = {}
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
                raise MoeClusterError(f"weight shard {shard} listed in the index is missing from {model_dir}; "
                                      "re-download the checkpoint")
            handle = self._handle(path)
            for name in handle.keys():
                self.files[name] = path
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def _handle(self, path: Path):
        if path not in self._open:
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise MoeClusterError(f"weight shard {path.name} is unreadable or truncated ({e}); "
                                      "re-download it") from None
        return self._open[path]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name).to(dtype or self.dtype)

    def read_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        return self._handle(self.files[name]).get_slice(name)[start:end].to(self.dtype)

    def close(self) -> None:
        self._open.clear()


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
               num_threads: int | None = None, check_weights: bool = True) -> LoadedModel:
    """Load a HF checkpoint. `expert_filter(moe_layer)` gives the experts to hold (default: all);
    check_weights: refuse NaN/Inf weights (one pass over what this process holds)."""
    model_dir = Path(model_dir)
    raw, cfg = read_config(model_dir)
    dtype_name = dtype or default_dtype(raw)
    if dtype_name not in DTYPES:
        raise MoeClusterError(f"dtype {dtype_name!r} not supported; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype_name]
    tokenizer = Tokenizer.from_dir(model_dir, cfg)
    model_class, arch = architecture(cfg)
    shape = cfg.shape(model_dir.name, str(model_dir))
    reader = CheckpointReader(model_dir, torch_dtype)
    try:
        _check_names(reader, arch, cfg)
        with torch.device("meta"):
            model = model_class(cfg)
        _load_dense(model, reader, arch, cfg)
        for index, (layer, moe) in enumerate(zip(cfg.moe_layer_ids(), model.moe_layers(), strict=True)):
            experts = list(range(shape.num_experts)) if expert_filter is None else sorted(expert_filter(index))
            moe.experts = _load_experts(reader, arch, cfg, moe.experts, layer, index, experts, torch_dtype)
            moe.index = index
    finally:
        reader.close()
    model.eval().requires_grad_(False)
    if check_weights:
        check_finite(model)
    return LoadedModel(model, cfg, shape, tokenizer, raw, torch_dtype, model_dir)


def _load_dense(model: DecoderModel, reader: CheckpointReader, arch, cfg: ArchConfig) -> None:
    state = {}
    # buffers keep the dtype the model declares (GLM-4.5's fp32 router correction bias, as transformers does)
    buffer_dtype = {name: b.dtype for name, b in model.named_buffers()}
    for ours, (names, shape) in arch.dense_weights(cfg).items():
        parts = [reader.read(n, buffer_dtype.get(ours)) for n in names]
        t = _private_copy(parts[0]) if len(parts) == 1 else torch.cat(parts, dim=0)
        check_dims(names[0] if len(names) == 1 else "+".join(names), tuple(t.shape), shape)
        state[ours] = t
    result = model.load_state_dict(state, strict=False, assign=True)
    still_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
                  if p.is_meta and ".experts." not in n]
    if still_meta:
        raise MoeClusterError(f"internal: parameters not loaded: {still_meta[:3]} ({result})")


def _private_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in this process's own memory: safetensors hands out tensors backed by a
    private file mapping of the shard, which decode streams about a third slower than anonymous
    memory here, and where a token's first embedding lookup page-faults. One tensor at a time."""
    return t.clone(memory_format=torch.contiguous_format)


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


def _index_shards(index: Path) -> list[str]:
    """The shard file names of model.safetensors.index.json; one clear error if it is malformed."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, TypeError, AttributeError) as e:
        raise MoeClusterError(f"{index} is malformed ({e}); re-download the checkpoint") from None
    return sorted(set(weight_map.values()))


def check_finite(model: torch.nn.Module, chunk: int = 1 << 24) -> None:
    """Refuse NaN/Inf weights, naming the first such tensor (chunked: no full-size temporary)."""
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.is_meta or not p.is_floating_point():
            continue
        for part in p.detach().reshape(-1).split(chunk):
            if not bool(torch.isfinite(part).all()):
                bad = sum(int((~torch.isfinite(q)).sum()) for q in p.detach().reshape(-1).split(chunk))
                raise MoeClusterError(f"weight {name} has {bad} NaN/Inf values: the checkpoint is corrupt "
                                      "(re-download it), or pass --no-check-weights to load it anyway")
