"""step -> stream -> generate over a loaded model, on one process or in lockstep on every rank.

On several ranks every rank runs the same forward; rank 0 alone samples and decides when to stop,
then broadcasts [token, done] so all ranks feed the same token next (same seed -> same output on any
rank count). Shape legend: B batch rows, T tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

from moecluster.engine.sampling import Sampler, SamplingParams
from moecluster.errors import MoeClusterError
from moecluster.kernels.apply import apply_kernels
from moecluster.loading import LoadedModel, peak_rss_bytes
from moecluster.memory import SAMPLER
from moecluster.tokenizer import IncrementalDecoder, Tokenizer
from moecluster.tracing import TRACER, apply_tracing, now


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    decode_time_s: float = 0.0
    bytes_per_token: float = 0.0  # weight bytes this process read per decode token
    bandwidth_gbs: float = 0.0  # bytes_per_token * decode tok/s
    peak_rss_bytes: int = 0
    peak_anon_bytes: int = 0  # sampled peaks of RssAnon / RssFile (when the memory sampler runs)
    peak_file_bytes: int = 0
    finish_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Delta:
    text: str
    token: int | None = None
    stats: GenerationStats | None = None  # set on the last delta


class StopMatcher:
    """Knuth-Morris-Pratt automaton of one stop string, fed the text one character at a time:
    O(1) amortized per character, so matching is linear in the text (and the held-back prefix is
    the automaton's state, not a search)."""

    def __init__(self, stop: str):
        self.stop, self.state = stop, 0  # state: the longest prefix of stop that ends the text so far
        self.fail = [0] * len(stop)  # fail[i]: longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            k += stop[i] == stop[k]
            self.fail[i] = k

    def feed(self, ch: str) -> bool:
        """Advance by one character; True when the text now ends with the whole stop string."""
        stop, k = self.stop, self.state
        if k == len(stop):
            k = self.fail[k - 1]
        while k and ch != stop[k]:
            k = self.fail[k - 1]
        k += ch == stop[k]
        self.state = k
        return k == len(stop)


class TextTracker:
    """Token ids -> text deltas, cut at the first stop string; text that may begin a stop string is
    held back until it is clear that it does not. Stop matching is linear in the text
    (MAX_STOP_STRINGS x MAX_STOP_CHARS bound the automata's setup)."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.detok = IncrementalDecoder(tokenizer)
        self.matchers = [StopMatcher(s) for s in params.stop]
        self.eos_ids = set() if params.ignore_eos else set(tokenizer.eos_ids)
        self.text, self.sent = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text to send now, stopped by EOS or a stop string)."""
        if token in self.eos_ids:
            return self.flush(), True
        new = self.detok.push(token)
        start = len(self.text)
        self.text += new
        cut = -1  # where the earliest stop string completed in the new text begins
        for m in self.matchers:
            for i, ch in enumerate(new):
                if m.feed(ch):
                    begin = start + i + 1 - len(m.stop)
                    cut = begin if cut < 0 else min(cut, begin)
                    break
        if cut >= 0:
            end = max(cut, self.sent)
            delta, self.sent = self.text[self.sent : end], len(self.text)
            return delta, True
        hold = max((m.state for m in self.matchers), default=0)
        end = max(len(self.text) - hold, self.sent)
        delta, self.sent = self.text[self.sent : end], end
        return delta, False

    def flush(self) -> str:
        self.text += self.detok.flush()  # text the decoder held back (an unfinished character or byte run)
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


class Engine:
    """Owns the model, its KV cache and the lockstep protocol between ranks."""

    def __init__(self, loaded: LoadedModel, comm=None, num_slots: int = 1, max_seq_len: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.comm: Any = comm
        self.rank = comm.rank if comm is not None else 0
        self.world_size = comm.world_size if comm is not None else 1
        apply_kernels(self.model)  # transformations of the loaded model: fast products, then timers
        apply_tracing(self.model)
        check_cache(self.model, num_slots, max_seq_len)
        self.model.setup_cache(num_slots, max_seq_len)
        self.max_seq_len = self.model.cache_len
        self.dense_bytes = dense_bytes_per_token(self.model)

    @torch.inference_mode()
    def step(self, tokens_BT: torch.Tensor, pos_B: torch.Tensor, slots_B: torch.Tensor) -> torch.Tensor:
        """One forward over a batch; returns fp32 logits of each row's last token, logits_BV."""
        return self.model(tokens_BT, pos_B, slots_B, last_only=True)[:, -1]

    def expert_bytes_last_step(self) -> int:
        return sum(moe.experts.last_num_evaluated * moe.experts.expert_bytes() for moe in self.model.moe_layers())

    # ---- the rest of the ServingEngine interface (engine/interface.py) ----
    @property
    def num_slots(self) -> int:
        return self.model.num_slots

    @property
    def vocab_size(self) -> int:
        return self.loaded.shape.vocab_size

    def copy_slot(self, src: int, dsts: list[int]) -> None:
        from moecluster.engine.batching import copy_slot  # batching imports this module

        copy_slot(self.model, src, dsts)

    def kv_cache_bytes(self) -> int:
        from moecluster.engine.batching import kv_cache_bytes

        return kv_cache_bytes(self.model)

    def expert_bytes(self) -> int:
        moes = self.model.moe_layers()
        return moes[0].experts.expert_bytes() if moes else 0

    def routing_shape(self) -> tuple[int, int]:
        moes = self.model.moe_layers()
        return len(moes), (moes[0].experts.num_experts if moes else 0)

    def set_routing_recorder(self, recorder: Any) -> None:
        for moe in self.model.moe_layers():
            moe.recorder = recorder

    def decide(self, token: int, done: bool) -> tuple[int, bool]:
        """Rank 0's decision, broadcast to every rank."""
        if self.world_size == 1:
            return token, done
        msg = torch.tensor([token, int(done)], dtype=torch.int64)
        self.comm.broadcast(msg, src=0)
        return int(msg[0]), bool(msg[1])

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise MoeClusterError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_seq_len:
            raise MoeClusterError(
                f"prompt has {len(prompt_ids)} tokens but the context holds {self.max_seq_len}; shorten the prompt"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.loaded.shape.vocab_size]
        if bad:
            raise MoeClusterError(
                f"prompt token ids {bad[:3]} are outside the vocabulary of {self.loaded.shape.vocab_size}"
            )

    def stream(self, prompt_ids: list[int], params: SamplingParams, slot: int = 0) -> Iterator[Delta]:
        """Prefill then decode one sequence, yielding text deltas; the last delta carries stats."""
        params.validate()
        self.check_prompt(prompt_ids, params)
        max_new = min(params.max_tokens, self.max_seq_len - len(prompt_ids))
        sampler = Sampler(params, prompt_ids) if self.rank == 0 else None
        tracker = TextTracker(self.tokenizer, params) if self.rank == 0 else None
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        slots_B = torch.tensor([slot])
        t_start = now()
        TRACER.begin_step("prefill", len(prompt_ids))
        logits_1V = self.step(torch.tensor([prompt_ids]), torch.tensor([0]), slots_B)
        pos, decode_start, bytes_read = len(prompt_ids), 0.0, 0
        while True:
            t0 = now()
            token, done, reason, delta = -1, False, "", ""
            if sampler is not None and tracker is not None:  # rank 0
                token = sampler(logits_1V[0])
                delta, stopped = tracker.push(token)
                reason = "stop" if stopped else "length" if stats.generated_tokens + 1 >= max_new else ""
                delta += tracker.flush() if reason == "length" else ""
                done = bool(reason)
            token, done = self.decide(token, done)
            TRACER.add(-1, "sample_bcast", now() - t0)
            TRACER.end_step()
            if stats.generated_tokens == 0:
                stats.ttft_s = now() - t_start
                decode_start = now()
            stats.generated_tokens += 1
            if done:
                stats.finish_reason = reason or "stop"
                break
            yield Delta(delta, token)
            TRACER.begin_step("decode", 1)
            logits_1V = self.step(torch.tensor([[token]]), torch.tensor([pos]), slots_B)
            bytes_read += self.dense_bytes + self.expert_bytes_last_step()
            pos += 1
        self._finish_stats(stats, decode_start, bytes_read)
        yield Delta(delta, token, stats)

    def _finish_stats(self, stats: GenerationStats, decode_start: float, bytes_read: int) -> None:
        stats.decode_time_s = now() - decode_start
        steps = stats.generated_tokens - 1  # decode forwards run after the first token
        stats.prefill_tok_s = stats.prompt_tokens / stats.ttft_s if stats.ttft_s else 0.0
        stats.decode_tok_s = steps / stats.decode_time_s if steps > 0 and stats.decode_time_s > 0 else 0.0
        stats.bytes_per_token = bytes_read / steps if steps > 0 else 0.0
        stats.bandwidth_gbs = stats.bytes_per_token * stats.decode_tok_s / 1e9
        stats.peak_rss_bytes = peak_rss_bytes()
        if SAMPLER.running:
            peaks = SAMPLER.snapshot()
            stats.peak_anon_bytes, stats.peak_file_bytes = peaks.anon_bytes, peaks.file_bytes

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, list[int], GenerationStats]:
        """Run stream to the end; returns (text, generated token ids, stats)."""
        text: list[str] = []
        tokens: list[int] = []
        stats = GenerationStats()
        for delta in self.stream(prompt_ids, params):
            text.append(delta.text)
            if delta.token is not None:
                tokens.append(delta.token)
            stats = delta.stats or stats
        return "".join(text), tokens, stats


def check_cache(model, num_slots: int, max_seq_len: int | None) -> None:
    """Refuse a context above the model's limit, and a KV cache that cannot fit in this machine's memory
    (sized on the meta device: nothing is allocated)."""
    limit = int(model.max_seq_len)
    if max_seq_len is not None and max_seq_len > limit:
        raise MoeClusterError(
            f"a context of {max_seq_len} positions (--max-seq-len) is above this model's limit "
            f"of {limit} (max_position_embeddings); ask for at most {limit}"
        )
    seq = min(max_seq_len or limit, limit)
    # the KV buffers only, as setup_cache makes them: the RoPE tables' ops on meta tensors would import
    # torch's Python meta kernels (torch._dynamo: 70 MB that stay resident)
    with torch.device("meta"):
        for block in model.layers:
            block.attn.make_cache(num_slots, seq, model.embed.weight.dtype)
    need = sum(b.numel() * b.element_size() for b in model.buffers() if b.is_meta)
    available = psutil.virtual_memory().available
    if need > available:
        raise MoeClusterError(
            f"a KV cache of {num_slots} sequence(s) x {seq} positions needs {need / 2**30:.1f} GiB, "
            f"but {available / 2**30:.1f} GiB of memory is available; pass --max-seq-len (and "
            "--max-batch) small enough, or fix max_position_embeddings/max_seq_len in config.json"
        )


def dense_bytes_per_token(model) -> int:
    """Bytes of non-expert weights one decode token reads: all of them but the embedding, plus one row."""
    total = 0
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        if name == "embed.weight":
            total += p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total
