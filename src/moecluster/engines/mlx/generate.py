"""The MLX engine's decode loop, in lockstep on every rank, and `moecluster generate --engine mlx`.

Every rank runs the same forward (attention, routers, norms, lm_head replicated; routed experts split by
expert parallelism); rank 0 alone samples and decides when to stop, then shares [token, done] with one
small all_sum, so every rank feeds the same token next. Shape legend: T tokens, V vocab.
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from moecluster.engines.mlx.comm import MlxComm
from moecluster.engines.mlx.expert_parallel import apply_expert_parallel, expert_parallel_layers
from moecluster.engines.mlx.loading import load_mlx_model, read_config, switch_layers
from moecluster.engines.mlx.quantize import quantize_experts
from moecluster.engines.mlx.slots import SlotCaches
from moecluster.engines.mlx.stacked import StackedRows
from moecluster.errors import MoeClusterError
from moecluster.parallel.placement import Placement, make_placement
from moecluster.tokenizer import IncrementalDecoder, Tokenizer
from moecluster.tracing import TRACER, now


@dataclass
class MlxStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    finish_reason: str = ""
    logits_digest: str = ""  # sha256 over every step's fp32 logits (rank 0, when asked): checks bit-identity
    bytes_per_token: float = 0.0  # weight bytes this rank read per decode step (dense + its experts evaluated)


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def context_length(config: dict, max_seq_len: int | None) -> int:
    """Positions per cache slot: --max-seq-len, at most the model's max_position_embeddings."""
    limit = int(config.get("max_position_embeddings") or 4096)
    if max_seq_len is not None and not 2 <= max_seq_len <= limit:
        raise MoeClusterError(
            f"a context of {max_seq_len} positions (--max-seq-len) is outside 2..{limit} (this model's "
            "max_position_embeddings); ask for at most that"
        )
    return max_seq_len or limit


def dense_bytes_per_token(model: Any) -> int:
    """Bytes of non-expert weights one decode token reads: all of them but the embedding, plus one row of it."""
    total = 0
    for name, a in tree_flatten(model.parameters()):
        if not isinstance(a, mx.array) or ".switch_mlp." in name or ".experts." in name:
            continue
        total += a.nbytes // a.shape[0] if "embed_tokens." in name else a.nbytes
    return total


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """Our tokenizer (the torch engine's), so both engines turn a prompt into the same ids."""
    cfg = read_config(model_dir)
    eos = cfg.get("eos_token_id")
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return Tokenizer.from_dir(
        Path(model_dir), SimpleNamespace(eos_token_ids=eos_ids, bos_token_id=cfg.get("bos_token_id"))
    )


class MlxEngine:
    """An mlx-lm model with expert parallelism applied (always, also on one rank: same computation on any rank
    count), its comm (group + watchdog), placement and `num_slots` KV-cache slots. Implements the scheduler's
    ServingEngine interface (engine/interface.py), so `serve` batches and serves it as it does the torch Engine."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str | None = None,
        comm: MlxComm | None = None,
        placement_spec: str = "contiguous",
        num_slots: int = 1,
        max_seq_len: int | None = None,
        quantize: str | None = None,
        quant_group_size: int = 128,
    ):
        if dtype is None and not mx.metal.is_available():
            dtype = "fp32"  # MLX's CPU gather_mm (the experts' product) takes only fp32
        self.mlx_comm = comm if comm is not None else MlxComm(mx.distributed.init())
        self.rank, self.world_size = self.mlx_comm.rank, self.mlx_comm.world_size
        self.comm: Any = self.mlx_comm if self.world_size > 1 else None  # the scheduler's: None on one process
        probe, _ = load_mlx_model(model_dir, experts_of=lambda layer: [], dtype=dtype)  # lazy: shapes only
        moes = switch_layers(probe)
        if not moes:
            raise MoeClusterError(f"{model_dir} has no MoE layers the MLX engine recognizes")
        num_experts = moes[0][2].gate_proj.weight.shape[0]  # type: ignore[union-attr]
        del probe
        self.placement: Placement = make_placement(placement_spec, num_experts, len(moes), self.world_size)
        self.stacked = StackedRows(model_dir)  # stacked expert arrays: this rank's rows only, read with pread
        self.model, self.config = load_mlx_model(
            model_dir, lambda layer: self.placement.experts_of(self.rank, layer), dtype, self.stacked
        )
        apply_expert_parallel(self.model, self.mlx_comm, self.placement, self.stacked)
        if quantize is not None:  # MLX affine int8/int4 of this rank's experts only (quantize.py)
            quantize_experts(expert_parallel_layers(self.model), quantize, quant_group_size)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_seq_len = context_length(self.config, max_seq_len)
        self.slots = SlotCaches(self.model, num_slots)
        self.dense_bytes = dense_bytes_per_token(self.model)
        self._expert_bytes_last = 0

    def logits(self, ids: list[int]) -> np.ndarray:
        """fp32 logits_TV of a full forward over `ids` (no cache)."""
        out = self.model(mx.array([ids]))[0].astype(mx.float32)
        return np.array(out)

    def held(self) -> list[list[int]]:
        return [m.expert_ids for m in expert_parallel_layers(self.model)]

    def share_counts(self, count: int) -> list[int]:
        """Every rank's `count`, on every rank (one all_sum)."""
        msg = mx.array([count if r == self.rank else 0 for r in range(self.world_size)], dtype=mx.int32)
        return list(self.mlx_comm.all_sum(msg, "a count exchange").tolist())  # type: ignore[arg-type]

    def _share(self, values: list[int], what: str) -> list[int]:
        """Rank 0's integers on every rank (an all_sum where the other ranks add zeros)."""
        msg = mx.array(values if self.rank == 0 else [0] * len(values), dtype=mx.int32)
        return list(self.mlx_comm.all_sum(msg, what).tolist())  # type: ignore[arg-type]

    # ---- the ServingEngine interface (engine/interface.py) ----
    @property
    def num_slots(self) -> int:
        return len(self.slots.caches)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    def step(self, tokens_BT: Any, pos_B: Any, slots_B: Any) -> Any:
        """One step over cache slots (torch tensors in and out, as the torch Engine): fp32 logits_BV."""
        import torch

        layers = expert_parallel_layers(self.model)
        rows, self._expert_bytes_last = [], 0
        for tokens_T, pos, slot in zip(tokens_BT.tolist(), pos_B.tolist(), slots_B.tolist(), strict=True):
            rows.append(np.array(self.slots.forward(tokens_T, pos, slot)))
            self._expert_bytes_last += sum(m.last_num_evaluated * m.expert_bytes() for m in layers)
        return torch.from_numpy(np.stack(rows))

    def expert_bytes_last_step(self) -> int:
        return self._expert_bytes_last

    def _expert_bytes_evaluated(self) -> int:
        """Expert bytes the last forward read on this rank (its distinct local experts per layer)."""
        return sum(m.last_num_evaluated * m.expert_bytes() for m in expert_parallel_layers(self.model))

    def copy_slot(self, src: int, dsts: list[int]) -> None:
        self.slots.copy(src, dsts)

    def kv_cache_bytes(self) -> int:
        return self.slots.nbytes()

    def expert_bytes(self) -> int:
        layers = expert_parallel_layers(self.model)
        return layers[0].expert_bytes() if layers else 0

    def routing_shape(self) -> tuple[int, int]:
        return self.placement.num_layers, self.placement.num_experts

    def set_routing_recorder(self, recorder: Any) -> None:
        for m in expert_parallel_layers(self.model):
            m.recorder = recorder

    def generate(self, prompt_ids: list[int], params: Any, digest: bool = False) -> tuple[str, list[int], MlxStats]:
        """Prefill then decode; params: SamplingParams (max_tokens, temperature, top_k, top_p, seed, stop,
        ignore_eos). Returns (text, generated ids, stats); the text only on rank 0 (target: streaming)."""
        if not prompt_ids:
            raise MoeClusterError("the prompt is empty; give at least one token")
        sample = self._sampler(params) if self.rank == 0 else None
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_ids)
        decoder = IncrementalDecoder(self.tokenizer)
        cache = make_prompt_cache(self.model)
        stats, tokens, text = MlxStats(prompt_tokens=len(prompt_ids)), [], ""
        t0 = time.perf_counter()
        TRACER.begin_step("prefill", len(prompt_ids))
        logits = self.model(mx.array([prompt_ids]), cache=cache)[0, -1]
        t_first, bytes_read = t0, 0
        sha = hashlib.sha256() if digest and self.rank == 0 else None
        for i in range(params.max_tokens):
            if sha is not None:
                sha.update(np.array(logits.astype(mx.float32)).tobytes())
            token, done = 0, 0
            if sample is not None:
                token = int(sample(logits.astype(mx.float32)[None])[0].item())  # type: ignore[arg-type]
                if token in eos:
                    done, stats.finish_reason = 1, "stop"
                else:
                    text += decoder.push(token)
                    cut = [text.index(s) for s in params.stop if s in text]
                    if cut:
                        text, done, stats.finish_reason = text[: min(cut)], 1, "stop"
            t_share = now()
            token, done = self._share([token, done], f"the token broadcast of step {i}")
            TRACER.add(-1, "sample_bcast", now() - t_share)
            TRACER.end_step()
            if i > 0:
                bytes_read += self.dense_bytes + self._expert_bytes_evaluated()
            if i == 0:
                t_first = time.perf_counter()
            if done:
                break
            tokens.append(token)
            if i + 1 < params.max_tokens:  # the last token needs no forward (as the torch engine)
                TRACER.begin_step("decode", 1)
                logits = self.model(mx.array([[token]]), cache=cache)[0, -1]
        else:
            stats.finish_reason = "length"
        if self.rank == 0 and stats.finish_reason == "length":
            text += decoder.flush()
        end = time.perf_counter()
        stats.logits_digest = sha.hexdigest() if sha is not None else ""
        stats.generated_tokens, stats.ttft_s = len(tokens), t_first - t0
        stats.bytes_per_token = bytes_read / (len(tokens) - 1) if len(tokens) > 1 else 0.0
        stats.decode_tok_s = (len(tokens) - 1) / (end - t_first) if len(tokens) > 1 and end > t_first else 0.0
        return text, tokens, stats

    def _sampler(self, params: Any):
        if params.temperature == 0:
            return lambda logits_1V: mx.argmax(logits_1V, axis=-1)
        from mlx_lm.sample_utils import make_sampler

        if params.seed is not None:
            mx.random.seed(params.seed)
        top_p = params.top_p if params.top_p < 1.0 else 0.0  # mlx-lm: 0 disables top-p
        return make_sampler(temp=params.temperature, top_p=top_p, top_k=params.top_k)

    def close(self) -> None:
        self.mlx_comm.close()
