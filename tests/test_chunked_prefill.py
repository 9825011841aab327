"""Issue 16 item 5, chunked prefill: a long prompt is prefilled `prefill_chunk` positions per step while the
running streams decode between its chunks; every request's tokens equal those without chunking (greedy and
seeded); a prompt cancelled between its chunks stores no prefix and frees its slot. In process, one rank."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from moecluster.engine.batching import Event, Request, Scheduler, StepObserver
from moecluster.engine.generate import Engine
from moecluster.engine.sampling import SamplingParams
from moecluster.errors import MoeClusterError
from moecluster.loading import load_model
from tests.tiny_models import build_tiny

LONG = "Expert parallelism places the routed experts of every layer on the ranks of a small cluster " * 6


@pytest.fixture(scope="module", params=[("dbrx", "fp32"), ("qwen3_moe", "bf16")], ids=str)
def engine(request, tmp_path_factory) -> Engine:
    arch, dtype = request.param
    path: Path = build_tiny(arch, tmp_path_factory.mktemp(arch))
    return Engine(load_model(path, dtype), num_slots=4)


class Kinds(StepObserver):
    """The kind of every forward, in order ('prefill' per chunk, 'decode:B' per decode step)."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    def on_step(self, kind, num_rows, seconds, bytes_read, trace) -> None:
        self.kinds.append(kind if kind == "prefill" else f"decode:{num_rows}")


def _run(engine: Engine, chunk: int, seed: int | None) -> tuple[list[list[int]], list[str]]:
    """Two streams decode; once each has 2 tokens, a long prompt arrives. Every request's tokens, the steps."""
    prompts = [engine.tokenizer.encode(t) for t in ("The quick brown fox", "Hello world", LONG)]
    assert 3 * 64 < len(prompts[2]) < engine.max_seq_len - 16
    kinds = Kinds()
    scheduler = Scheduler(engine, max_batch=4, observer=kinds, prefill_chunk=chunk)
    tokens: list[list[int]] = [[], [], []]
    done = [threading.Event() for _ in prompts]

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.8 if seed else 0.0, seed=seed, ignore_eos=True)

    def emit(i: int, ev: Event) -> None:
        if ev.token is not None:
            tokens[i].append(ev.token)
            if i < 2 and min(len(tokens[0]), len(tokens[1])) >= 2 and not started.is_set():
                started.set()
                scheduler.submit(Request(prompts[2], params(4), lambda e: emit(2, e)))
        if ev.finish_reason is not None:
            assert ev.finish_reason == "length", ev
            done[i].set()

    started = threading.Event()
    scheduler.start()
    try:
        for i in (0, 1):
            scheduler.submit(Request(prompts[i], params(30), lambda e, i=i: emit(i, e)))
        for d in done:
            assert d.wait(60)
    finally:
        scheduler.stop()
    return tokens, kinds.kinds


@pytest.mark.slow
@pytest.mark.parametrize("seed", [None, 5])
def test_chunked_prefill_interleaves_and_changes_no_token(engine, seed):
    whole, whole_kinds = _run(engine, 0, seed)
    n_long = len(engine.tokenizer.encode(LONG))
    for chunk in (64, 128):
        got, kinds = _run(engine, chunk, seed)
        assert got == whole, f"chunk {chunk} changed the tokens"
        # the long prompt's chunks, each followed by a decode step of the 2 running streams
        chunks = -(-n_long // chunk)
        assert kinds.count("prefill") == 2 + chunks
        long_at = [i for i, k in enumerate(kinds) if k == "prefill"][2:]
        assert all(kinds[i + 1] == "decode:2" for i in long_at[:-1]), kinds
    # unchunked: the whole long prompt in one forward step, no decode in between
    assert whole_kinds.count("prefill") == 3


def test_cancel_between_chunks(engine):
    """Cancelled after its first chunk: its slot is freed, nothing is stored in the prefix cache, and the
    same prompt afterwards gives the tokens it gives on a fresh scheduler."""
    prompt = engine.tokenizer.encode(LONG)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    holder: dict = {}

    class CancelAfterFirstChunk(StepObserver):
        def on_step(self, kind, num_rows, seconds, bytes_read, trace) -> None:
            if kind == "prefill" and "req" in holder and not holder["req"].cancelled:
                scheduler.cancel(holder["req"])

    scheduler = Scheduler(
        engine, max_batch=2, observer=CancelAfterFirstChunk(), prefix_cache_bytes=1 << 30, prefill_chunk=64
    )
    finished = threading.Event()
    reasons: list[str] = []

    def emit(ev: Event) -> None:
        if ev.finish_reason is not None:
            reasons.append(ev.finish_reason)
            finished.set()

    scheduler.start()
    try:
        holder["req"] = Request(prompt, params, emit)
        scheduler.submit(holder["req"])
        assert finished.wait(60)
        assert reasons == ["cancelled"] and scheduler.load() == (0, 0)
        assert scheduler.prefix.next_id == 0 and not scheduler.prefix.lru  # stored with the last chunk only
    finally:
        scheduler.stop()
    assert engine.prefix_store is None or not engine.prefix_store.entries


def test_bad_chunk_is_refused(engine):
    with pytest.raises(MoeClusterError, match="multiple of 64"):
        Scheduler(engine, max_batch=4, prefill_chunk=100)
