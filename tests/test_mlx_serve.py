"""The MLX engine under the scheduler and server (issue 13, item 3): both engines implement the one ServingEngine
interface; continuous batching on MLX gives each request the tokens it gets alone (and the torch engine's);
`serve --engine mlx` answers the official openai client on 1 rank (in process) and 2 ranks (ring backend), and a
killed mlx rank gives 503 naming it within --timeout. Linux CPU: correctness only.
"""

from __future__ import annotations

import threading
import time

import httpx
import openai
import psutil
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from starlette.testclient import TestClient  # noqa: E402

from moecluster.engine.batching import Event, Request, Scheduler  # noqa: E402
from moecluster.engine.generate import Engine  # noqa: E402
from moecluster.engine.interface import ServingEngine  # noqa: E402
from moecluster.engine.sampling import SamplingParams  # noqa: E402
from moecluster.engines.mlx.generate import MlxEngine  # noqa: E402
from moecluster.loading import load_model  # noqa: E402
from moecluster.server.app import create_app  # noqa: E402
from tests.test_server import KEY, ServerProc, _assert_error, _open_stream, _stream_error_within  # noqa: E402

PROMPTS = ["Hello world", "Expert parallelism places experts", "The quick brown fox"]


@pytest.fixture(scope="module")
def mlx_engine(tiny_mixtral) -> MlxEngine:
    return MlxEngine(tiny_mixtral, "fp32", num_slots=4)


def greedy(n: int = 1, max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n).validate()


def _run(scheduler: Scheduler, prompts: list[list[int]], params: SamplingParams) -> list[dict[int, list[int]]]:
    """Submit every prompt at once; per request, choice index -> generated tokens."""
    out: list[dict[int, list[int]]] = [{} for _ in prompts]
    done = threading.Semaphore(0)

    def emitter(i: int):
        finished: set[int] = set()

        def emit(ev: Event) -> None:
            assert ev.error is None, ev.error
            if ev.token is not None:
                out[i].setdefault(ev.index, []).append(ev.token)
            if ev.finish_reason is not None:
                finished.add(ev.index)
                if len(finished) == params.n:
                    done.release()

        return emit

    for i, ids in enumerate(prompts):
        scheduler.submit(Request(ids, params, emitter(i)))
    for _ in prompts:
        assert done.acquire(timeout=120)
    return out


def test_both_engines_implement_the_interface(mlx_engine, tiny_mixtral):
    torch_engine = Engine(load_model(tiny_mixtral, "fp32"), num_slots=2)
    for engine in (mlx_engine, torch_engine):
        assert isinstance(engine, ServingEngine), type(engine)
        assert engine.routing_shape() == (3, 8)
        assert engine.vocab_size == 384 and engine.num_slots in (2, 4)


@pytest.mark.slow
def test_batched_scheduler_equals_each_request_alone(mlx_engine, tiny_mixtral):
    """Three prompts batched together plus n=2 (a copied slot): each gets the tokens of MlxEngine.generate alone,
    which are the torch engine's (fp32)."""
    ids = [mlx_engine.tokenizer.encode(p) for p in PROMPTS]
    alone = [mlx_engine.generate(p, greedy())[1] for p in ids]
    torch_engine = Engine(load_model(tiny_mixtral, "fp32"))
    assert alone == [torch_engine.generate(p, greedy())[1] for p in ids]
    scheduler = Scheduler(mlx_engine, max_batch=4)
    scheduler.start()
    try:
        batched = _run(scheduler, ids, greedy())
        assert [b[0] for b in batched] == alone
        (choices,) = _run(scheduler, ids[:1], greedy(n=2))
        assert choices[0] == choices[1] == alone[0]
        assert mlx_engine.kv_cache_bytes() > 0 and mlx_engine.expert_bytes_last_step() > 0
    finally:
        scheduler.stop()


def test_one_rank_server_answers_the_openai_client(mlx_engine):
    scheduler = Scheduler(mlx_engine, max_batch=4)
    scheduler.start()
    app = create_app(scheduler, "tiny", allowed_hosts=("testserver",))
    want = mlx_engine.tokenizer.decode(mlx_engine.generate(mlx_engine.tokenizer.encode(PROMPTS[0]), greedy())[1])
    try:
        with TestClient(app) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
            kw = dict(model="tiny", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            done = client.completions.create(prompt=PROMPTS[0], **kw)  # type: ignore[arg-type]
            assert done.choices[0].text == want and done.usage is not None and done.usage.completion_tokens == 8
            stream = client.completions.create(prompt=PROMPTS[0], stream=True, **kw)  # type: ignore[arg-type]
            assert "".join(c.choices[0].text for c in stream) == want
            chat = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw)  # type: ignore[arg-type]
            assert chat.choices[0].finish_reason == "length"
            metrics = http.get("/metrics").text
            assert 'moecluster_expert_load_imbalance{level="expert"}' in metrics
            assert "moecluster_decode_weight_bytes_read_total" in metrics
    finally:
        scheduler.stop()


def _mlx_server(model, log, *extra: str) -> ServerProc:
    return ServerProc(model, log, "--engine", "mlx", "--max-batch", "4", *extra, nodes=2)


@pytest.mark.multirank
def test_two_rank_mlx_server_and_killed_rank(mlx_engine, tiny_mixtral, tmp_path):
    """2 mlx ranks answer the openai client with the 1-rank text; rank 1 SIGKILLed mid-stream: the stream ends
    with a 503 error naming rank 1 well within --timeout, /health says so, new requests get 503; stopping the
    server leaves no process behind."""
    timeout = 8
    want = [
        mlx_engine.tokenizer.decode(mlx_engine.generate(mlx_engine.tokenizer.encode(p), greedy())[1]) for p in PROMPTS
    ]
    srv = _mlx_server(tiny_mixtral, tmp_path / "server.log", "--timeout", str(timeout))
    try:
        client = srv.client()
        for prompt, text in zip(PROMPTS, want, strict=True):
            done = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            assert done.choices[0].text == text
        lines = _open_stream(srv).iter_lines()
        next(lines)
        everyone = psutil.Process(srv.proc.pid).children(recursive=True)
        srv.rank_process(1).kill()
        killed_at = time.monotonic()
        error = _stream_error_within(lines, 30)
        assert time.monotonic() - killed_at < timeout
        assert error and error["code"] == "cluster_unavailable" and "rank 1" in error["message"], error
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and "rank 1" in health.json()["reason"]
        resp = srv.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        _assert_error(resp, 503, code="cluster_unavailable")
        assert srv.proc.poll() is None, srv.log.read_text()
    finally:
        srv.stop()
    time.sleep(0.5)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.multirank
def test_stalled_mlx_rank_gives_503_within_timeout(tiny_mixtral, tmp_path):
    """Rank 1 stops answering (SIGSTOP) while every link is up: the watchdog names the wait within --timeout."""
    timeout = 5
    srv = _mlx_server(tiny_mixtral, tmp_path / "server.log", "--timeout", str(timeout))
    try:
        lines = _open_stream(srv).iter_lines()
        next(lines)
        srv.rank_process(1).suspend()
        stopped_at = time.monotonic()
        error = _stream_error_within(lines, 30)
        assert time.monotonic() - stopped_at < timeout + 3  # the watchdog polls every 0.1 s
        assert error and error["code"] == "cluster_unavailable", error
        health = httpx.get(srv.url + "/health", timeout=10, headers={"Authorization": f"Bearer {KEY}"})
        assert health.status_code == 503 and "rank" in health.json()["reason"], health.text
    finally:
        srv.stop()


def test_profile_routing_on_mlx_equals_torch(mlx_engine, tiny_mixtral):
    """profile-routing's statistics through the MLX engine's routing recorder equal the torch engine's (fp32)."""
    from moecluster.engine.profile_routing import profile

    prompts = ["hello world", "the experts are"]
    ours = profile(mlx_engine, prompts, 4).to_json()
    theirs = profile(Engine(load_model(tiny_mixtral, "fp32")), prompts, 4).to_json()
    assert ours["layers"] == theirs["layers"] and ours["layers"][0]["tokens"] == 16
    from moecluster.engines.mlx.expert_parallel import expert_parallel_layers

    assert [m.recorder for m in expert_parallel_layers(mlx_engine.model)] == [None] * 3  # profile detached itself


def test_macos_paths_are_skipped(monkeypatch):
    """What macOS lacks is not called there: no prctl (PR_SET_PDEATHSIG) preexec for ranks; mlx is the default
    engine on Apple Silicon only."""
    import platform
    import sys

    from moecluster.cli.cluster import default_engine
    from moecluster.distributed.launch import _die_with_parent_fn

    assert _die_with_parent_fn() is not None  # Linux
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _die_with_parent_fn() is None
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert default_engine() == "mlx"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert default_engine() == "torch"


@pytest.mark.multirank
def test_demo_on_mlx(tmp_path):
    """`moecluster demo --engine mlx`: the built-in model's routing, an optimized placement, 2 mlx ranks = 1."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "moecluster.cli", "demo", "--engine", "mlx", "--nodes", "2", "--max-tokens", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "outputs identical: yes (6 tokens)" in done.stderr
