"""Prefix caching (--prefix-cache-gb): prompts sharing a block-aligned prefix prefill only their new tokens,
entries are evicted least recently used first within the byte budget, and greedy and seeded outputs equal
those without the cache. In process: one rank, a real Scheduler, two architectures."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from moecluster.engine.batching import Event, Request, Scheduler
from moecluster.engine.generate import Engine
from moecluster.engine.prefix_cache import BLOCK
from moecluster.engine.sampling import SamplingParams
from moecluster.loading import load_model
from tests.tiny_models import build_tiny

SHARED = "Expert parallelism places the routed experts of every layer on the ranks of a small cluster " * 2


@pytest.fixture(scope="module", params=[("dbrx", "fp32"), ("qwen3_moe", "bf16")], ids=str)
def engine(request, tmp_path_factory) -> Engine:
    arch, dtype = request.param
    path: Path = build_tiny(arch, tmp_path_factory.mktemp(arch))
    return Engine(load_model(path, dtype), num_slots=4)


def _run(scheduler: Scheduler, prompt: list[int], params: SamplingParams) -> list[list[int]]:
    tokens: list[list[int]] = [[] for _ in range(params.n)]
    left = [params.n]
    done = threading.Event()

    def emit(ev: Event) -> None:
        if ev.token is not None:
            tokens[ev.index].append(ev.token)
        if ev.finish_reason is not None:
            assert ev.finish_reason == "length", ev
            left[0] -= 1
            if not left[0]:
                done.set()

    scheduler.submit(Request(prompt, params, emit))
    assert done.wait(120)
    return tokens


@pytest.mark.parametrize("seed", [None, 3])
def test_prefix_cache_output_equals_no_cache(engine, seed):
    tok = engine.tokenizer
    prompts = [tok.encode(SHARED + tail) for tail in ("one", "two three", "", "four five six seven")]
    prompts.append(prompts[0])  # the same prompt again: restores all but its last partial block
    prompts.append(tok.encode("Unrelated short prompt"))
    prompts += [tok.encode("Different words entirely, then more of them " * 8), prompts[1]]  # with a small budget:
    # the first long prefix is evicted, then stored again
    assert len(prompts[0]) > BLOCK
    params = SamplingParams(max_tokens=12, temperature=0.8 if seed else 0.0, seed=seed, ignore_eos=True, n=2)
    plain = Scheduler(engine, max_batch=4)
    plain.start()
    try:
        want = [_run(plain, p, params) for p in prompts]
    finally:
        plain.stop()
    per_token = plain.prefix.bytes_per_token
    for budget in (1 << 30, 3 * BLOCK * per_token // 2):  # plenty; one entry at a time (evictions)
        cached = Scheduler(engine, max_batch=4, prefix_cache_bytes=budget)
        cached.start()
        try:
            got = [_run(cached, p, params) for p in prompts]
        finally:
            cached.stop()
        assert got == want
        assert cached.prefix.hits >= 2 and cached.prefix.hit_tokens >= 2 * BLOCK
        assert cached.prefix.used <= budget
        assert cached.prefix.next_id == (2 if budget == 1 << 30 else 3)  # entries stored (3: after an eviction)
        assert set(engine.prefix_store.entries) == set(cached.prefix.lru)  # rank state follows rank 0's index


@pytest.mark.multirank
def test_two_rank_server_with_prefix_cache_equals_without(tiny_dbrx, tmp_path):
    """2 ranks (MPI): every rank restores and stores the same entries; greedy and seeded texts equal a server
    without the cache; usage reports the cached prompt tokens."""
    from tests.test_server import ServerProc

    prompts = [SHARED + tail for tail in ("one", "two three", "one")]
    outputs, cached = [], []
    for extra in ((), ("--prefix-cache-gb", "0.01")):
        srv = ServerProc(tiny_dbrx, tmp_path / f"server{len(extra)}.log", *extra)
        try:
            client = srv.client()
            outputs.append(
                [
                    client.completions.create(
                        model="tiny",
                        prompt=p,
                        max_tokens=8,
                        temperature=t,
                        seed=5,
                        n=2,
                        extra_body={"ignore_eos": True},
                    )
                    .choices[1]
                    .text
                    for p in prompts
                    for t in (0.0, 0.9)
                ]
            )
            out = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=2)
            details = out.usage.prompt_tokens_details if out.usage else None
            cached.append(details.cached_tokens if details else 0)
        finally:
            srv.stop()
    assert outputs[0] == outputs[1]
    assert cached == [0, BLOCK]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "dtype"), [("gpt_oss", "bf16"), ("deepseek_v3", "fp32")])
def test_sliding_and_latent_caches(tmp_path, arch, dtype):
    """gpt-oss (sliding rings of 8 < BLOCK: an entry serves only its own length, the rings saved as they were
    there, mid-prompt) and DeepSeek (latent cache): a chat's growing prompts hit the cache and the tokens equal
    those without it; prefills chunked by 64 so that the rings are snapshotted in an earlier forward."""
    engine = Engine(load_model(build_tiny(arch, tmp_path / arch), dtype), num_slots=2)
    tok = engine.tokenizer
    turn1 = tok.encode(SHARED + "one")
    prompts = [turn1, turn1 + tok.encode(" and then two more"), turn1 + tok.encode(" and then two more words")]
    prompts.append(tok.encode(SHARED + "two"))  # shares a prefix
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = []
    for budget in (0, 1 << 30):
        scheduler = Scheduler(engine, max_batch=2, prefix_cache_bytes=budget, prefill_chunk=64)
        assert scheduler.prefix.enabled == (budget > 0)
        scheduler.start()
        try:
            got.append([_run(scheduler, p, params) for p in prompts])
        finally:
            scheduler.stop()
    assert got[0] == got[1]
    assert scheduler.prefix.hits >= 2 and scheduler.prefix.hit_tokens >= 2 * BLOCK
    index = scheduler.prefix
    exact = [len(k) == len(index.lru[e]) for k, e in index.by_prefix.items()]
    if arch == "gpt_oss":  # rings of 8 positions: an entry serves only its own length
        assert index.ring == 8 and all(exact)
    else:
        assert index.ring is None and index.fixed_bytes == 0


def test_n_choices_copy_sliding_rings(tmp_path):
    """gpt-oss keeps its sliding layers' rings in `.ring`: the n choices of a prompt get copies of them too
    (before, only `.cache` was copied and choice 1 decoded over another slot's stale ring)."""
    engine = Engine(load_model(build_tiny("gpt_oss", tmp_path / "g"), "bf16"), num_slots=2)
    prompt = engine.tokenizer.encode(SHARED)  # far longer than the window of 8
    scheduler = Scheduler(engine, max_batch=2)
    scheduler.start()
    try:
        _run(scheduler, engine.tokenizer.encode("Unrelated words fill slot one first"), SamplingParams(max_tokens=4))
        one = _run(scheduler, prompt, SamplingParams(max_tokens=8, ignore_eos=True))
        two = _run(scheduler, prompt, SamplingParams(max_tokens=8, ignore_eos=True, n=2))
    finally:
        scheduler.stop()
    assert two == [one[0], one[0]]
