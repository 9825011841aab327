"""Issue 16: a request's tokens (greedy and seeded sampling) are bit-identical whether it runs alone or shares
its batch with 1 or 7 other requests of different lengths that join and leave at any phase (its prefill, its
decode), on two architectures' tiny models. In process: one rank, a real Scheduler."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from moecluster.engine.batching import Event, Request, Scheduler
from moecluster.engine.generate import Engine
from moecluster.engine.sampling import SamplingParams
from moecluster.loading import load_model
from tests.tiny_models import build_tiny

PROMPTS = [
    "The quick brown fox",
    "Hello world, this is a longer prompt than the others",
    "a",
    "b c d e f g h",
    "Expert parallelism places experts",
    "one two",
    "x y z w v u t s r q",
    "tokens",
]


@pytest.fixture(scope="module", params=[("dbrx", "bf16"), ("qwen3_moe", "bf16"), ("dbrx", "fp32")], ids=str)
def engine(request, tmp_path_factory) -> Engine:
    arch, dtype = request.param
    path: Path = build_tiny(arch, tmp_path_factory.mktemp(arch))
    return Engine(load_model(path, dtype), num_slots=8)


def _run(engine: Engine, jobs: list[tuple[list[int], SamplingParams, int]]) -> list[list[int]]:
    """Submit each (prompt, params, after) once `after` tokens of request 0 exist; every request's token ids."""
    scheduler = Scheduler(engine, max_batch=8, max_queue=8)
    tokens: list[list[int]] = [[] for _ in jobs]
    done = [threading.Event() for _ in jobs]
    pending = list(range(1, len(jobs)))

    def emit(i: int, ev: Event) -> None:
        if ev.token is not None:
            tokens[i].append(ev.token)
        if ev.finish_reason is not None:
            assert ev.finish_reason == "length", ev
            done[i].set()
        while i == 0 and pending and jobs[pending[0]][2] <= len(tokens[0]):
            j = pending.pop(0)
            scheduler.submit(Request(jobs[j][0], jobs[j][1], lambda e, j=j: emit(j, e)))

    scheduler.start()
    try:
        scheduler.submit(Request(jobs[0][0], jobs[0][1], lambda e: emit(0, e)))
        for j in [j for j in pending if jobs[j][2] == 0]:  # join at request 0's prefill
            pending.remove(j)
            scheduler.submit(Request(jobs[j][0], jobs[j][1], lambda e, j=j: emit(j, e)))
        for d in done:
            assert d.wait(120)
    finally:
        scheduler.stop()
    return tokens


@pytest.mark.parametrize("seed", [None, 7])
def test_tokens_do_not_depend_on_the_batch(engine, seed):
    def params(n: int, s: int | None = seed) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.9 if s is not None else 0.0, seed=s, ignore_eos=True)

    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    alone = _run(engine, [(prompts[0], params(24), 0)])[0]
    assert len(alone) == 24
    for others in (1, 7):
        # others join at request 0's prefill, after its 3rd and 10th tokens; lengths 5..40
        jobs = [(prompts[0], params(24), 0)] + [
            (prompts[1 + k], params(5 + 5 * k), (0, 3, 10)[k % 3]) for k in range(others)
        ]
        together = _run(engine, jobs)
        assert together[0] == alone, f"{others} other requests changed request 0's tokens"
        for k in range(others):  # and each other request equals itself alone
            assert together[1 + k] == _run(engine, [(prompts[1 + k], params(5 + 5 * k), 0)])[0]


def test_decode_logits_bit_identical(engine):
    """The logits of one row decoding alone equal its logits in a batch of 2 and of 8: bit for bit in bf16 (the
    compiled kernels compute each row alone); in fp32 torch's BLAS rounds a 1-row product (gemv) and a k-row one
    (gemm) differently, so there only within 1e-5."""
    model = engine.model
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    for slot, ids in enumerate(prompts):
        engine.step(torch.tensor([ids]), torch.tensor([0]), torch.tensor([slot]))
    tok = torch.tensor([[5]] * 8)
    pos = torch.tensor([len(p) for p in prompts])
    alone = model(tok[:1], pos[:1], torch.tensor([0]), last_only=True)[:, -1]
    for B in (2, 8):
        batch = model(tok[:B], pos[:B], torch.arange(B), last_only=True)[:, -1]
        if engine.model.embed.weight.dtype == torch.bfloat16:
            assert torch.equal(batch[0], alone[0]), f"B={B}: max diff {(batch[0] - alone[0]).abs().max():.3g}"
        else:
            torch.testing.assert_close(batch[0], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt_oss", "deepseek_v3"])
def test_sink_and_latent_attention_rows_bit_identical(tmp_path, arch):
    """gpt-oss (sink attention over sliding rings and full caches) and DeepSeek (latent attention) run each row
    of a batched decode as if alone (models/invariance.rowwise): every row's bf16 logits in a batch of 8 equal
    its logits decoding alone, bit for bit."""
    engine = Engine(load_model(build_tiny(arch, tmp_path / arch), "bf16"), num_slots=8)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    for slot, ids in enumerate(prompts):
        engine.step(torch.tensor([ids]), torch.tensor([0]), torch.tensor([slot]))
    tok, pos = torch.tensor([[5]] * 8), torch.tensor([len(p) for p in prompts])
    alone = torch.cat([engine.step(tok[b : b + 1], pos[b : b + 1], torch.tensor([b])) for b in range(8)])
    assert torch.equal(engine.step(tok, pos, torch.arange(8)), alone)  # a decode step rewrites the same keys
