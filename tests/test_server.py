"""`moecluster serve` on 2 ranks, driven by the official `openai` client: completions, chat, streaming,
continuous batching (concurrent greedy outputs equal the same requests run alone), every error case,
client disconnects, and dead or stalled ranks (503 + /health)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from moecluster.distributed.launch import free_port
from moecluster.engine.batching import TextTracker
from moecluster.engine.generate import Engine
from moecluster.engine.sampling import SamplingParams
from moecluster.loading import load_model

KEY = "test-key"
PROMPTS = ["Hello world", "Expert parallelism places experts", "The quick brown fox", "a b c d e f"]


class ServerProc:
    """A `moecluster serve` subprocess (the launcher) on a free port."""

    def __init__(self, model: Path, log: Path, *extra: str, nodes: int = 2, backend: str = "mpi"):
        self.port, self.model = free_port(), model
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "moecluster.cli",
            "serve",
            "--model",
            str(model),
            "--model-name",
            "tiny",
            "--port",
            str(self.port),
            "--nodes",
            str(nodes),
            "--backend",
            backend,
            "--dtype",
            "fp32",
            "--api-key",
            KEY,
            *extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{log.read_text()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server did not become healthy:\n{log.read_text()}")

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60, **kw)

    def post(self, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=60, **kw)

    def rank_process(self, rank: int) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                env, cmd = child.environ(), " ".join(child.cmdline())
            except psutil.Error:
                continue
            if (
                "--rank-worker" in cmd
                and env.get("PMI_RANK", env.get("RANK")) == str(rank)
                and "mpiexec" not in cmd
                and "--wrap-rank" not in cmd
            ):  # the rank, not its MPI wrapper
                return child
        raise AssertionError(f"rank {rank} not found")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the launcher stops every rank
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(tiny_dbrx, tmp_path_factory):
    srv = ServerProc(
        tiny_dbrx,
        tmp_path_factory.mktemp("serve") / "server.log",
        "--max-batch",
        "4",
        "--max-queue",
        "2",
        "--timeout",
        "4",
    )
    yield srv
    srv.stop()


def _complete(client: openai.OpenAI, prompt: str, max_tokens: int, **kw):
    return client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}, **kw
    )


def _assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_text_tracker_holds_back_stop_prefixes():
    class Tok:
        eos_ids = [0]

        def decode(self, ids):
            return "".join("_abcdefgh"[i] for i in ids)

    tracker = TextTracker(Tok(), SamplingParams(stop=["cde"]))
    out = [tracker.push(t) for t in (1, 2, 3, 4)]  # a b c d: "cd" may begin "cde"
    assert out == [("a", False), ("b", False), ("", False), ("", False)]
    assert tracker.push(6) == ("cdf", False)  # not a stop after all: released
    assert tracker.push(3) == ("", False) and tracker.push(4) == ("", False)
    assert tracker.push(5) == ("", True)  # "cde" completed: cut before it
    eos = TextTracker(Tok(), SamplingParams(stop=["cde"]))
    assert eos.push(3) == ("", False) and eos.push(0) == ("c", True)  # EOS releases held text


@pytest.mark.multirank
def test_models_completion_chat(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = _complete(client, "Hello world", 8)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens > 0 and out.object == "text_completion"
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 6
    assert chat.choices[0].finish_reason == "length"


@pytest.mark.multirank
def test_streaming_equals_non_streaming(server):
    client = server.client()
    full = _complete(client, "Hello world", 12)
    chunks = list(_complete(client, "Hello world", 12, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    msgs = [{"role": "user", "content": "Hi there"}]
    ref = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == ref.choices[0].message.content
    assert parts[-1].usage.completion_tokens == 10 and parts[-1].choices[0].finish_reason == "length"


@pytest.mark.multirank
def test_concurrent_equals_alone(server):
    client = server.client()
    lengths = [24, 9, 17, 30]
    alone = [_complete(client, p, n).choices[0].text for p, n in zip(PROMPTS, lengths)]
    rows_before = server.metric("moecluster_decode_batch_rows_sum") - server.metric(
        "moecluster_decode_batch_rows_count"
    )
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda a: _complete(client, *a).choices[0].text, zip(PROMPTS, lengths)))
    assert together == alone
    rows_after = server.metric("moecluster_decode_batch_rows_sum") - server.metric("moecluster_decode_batch_rows_count")
    assert rows_after > rows_before  # some decode steps ran several rows at once
    engine = Engine(load_model(server.model, "fp32"))  # one process, no server: the same text
    ids = engine.tokenizer.encode(PROMPTS[3])
    assert engine.generate(ids, SamplingParams(max_tokens=lengths[3], ignore_eos=True))[0] == alone[3]


@pytest.mark.multirank
def test_serve_cli_errors(server, tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "moecluster.cli", "serve", *args], capture_output=True, text=True, timeout=60
        )

    res = serve("--model", str(tmp_path / "nope"))
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = serve("--model", str(server.model), "--port", str(server.port))
    assert res.returncode == 2 and "cannot listen" in res.stderr and "Traceback" not in res.stderr
    res = serve("--model", str(server.model), "--max-batch", "0")
    assert res.returncode == 2 and "--max-batch" in res.stderr


@pytest.mark.multirank
def test_api_key_not_in_rank_command_lines(server):
    ranks = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "--rank-worker" in p.cmdline()]
    assert len(ranks) >= 2 and not [p.cmdline() for p in ranks if any(KEY in a for a in p.cmdline())]
    assert server.client().models.list().data  # the key still reached rank 0 (through the environment)


@pytest.mark.multirank
def test_stop_string(server):
    client = server.client()
    text = _complete(client, "The quick brown fox", 20).choices[0].text
    stop = text[6:9]
    out = _complete(client, "The quick brown fox", 20, stop=[stop])
    assert out.choices[0].text == text[: text.find(stop)] and out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("/v1/completions", "{not json", 400, None, None),
        ("/v1/completions", "[1, 2]", 400, None, None),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt", None),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "guided_json": {}},
            400,
            "guided_json",
            "unsupported_parameter",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": [5, 99999]}, 400, "prompt", None),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", None),
        ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", None),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model", "model_not_found"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "hi", "max_tokens": 300},
            400,
            "max_tokens",
            "context_length_exceeded",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "hi " * 300}, 400, "max_tokens", "context_length_exceeded"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 9}, 400, "n", None),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "echo": True}, 400, "echo", "unsupported_parameter"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": [""]}, 400, "stop", None),
        ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages", None),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", None),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, None, None),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            400,
            "top_logprobs",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tools[0]",
            None,
        ),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
            },
            400,
            "messages[0].content",
            None,
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3.0},
            400,
            "presence_penalty",
            None,
        ),
    ],
)
@pytest.mark.multirank
def test_bad_requests(server, path, body, status, param, code):
    _assert_error(server.post(path, body), status, param, code)


@pytest.mark.multirank
def test_routing_and_auth_errors(server):
    _assert_error(
        server.post("/v1/completions", {"model": "tiny", "prompt": "hi"}, key=None), 401, code="invalid_api_key"
    )
    _assert_error(server.post("/v1/completions", {"model": "tiny", "prompt": "hi"}, key="wrong"), 401)
    _assert_error(httpx.get(server.url + "/v1/nothing", timeout=10), 404)
    _assert_error(httpx.get(server.url + "/v1/completions", timeout=10), 405)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().completions.create(model="tiny", prompt="hi", max_tokens=1000)


def _open_stream(server: ServerProc, max_tokens: int = 240) -> httpx.Response:
    client = httpx.Client(timeout=30)
    req = client.build_request(
        "POST",
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "tiny",
            "prompt": "Hello",
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    return client.send(req, stream=True)


def _wait_idle(server: ServerProc, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = httpx.get(server.url + "/health", timeout=5).json()
        if health["running"] == 0 and health["waiting"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"sequences still running: {health}")


def _queue_full_attempt(server: ServerProc) -> tuple[list[int], int, bool]:
    """Open 8 streams at once on 4 slots + 2 waiting places, read the 429s, close every stream mid-way.
    Returns the status codes, the sequences cancelled, and whether a sequence ran to its end meanwhile
    (then the cluster was not full the whole time and the attempt proves nothing)."""
    finished = 'moecluster_sequences_finished_total{reason="'
    ended_before = server.metric(finished)
    cancelled_before = server.metric(finished + 'cancelled"}')
    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(lambda _: _open_stream(server), range(8)))
    try:
        codes = sorted(r.status_code for r in streams)
        for r in streams:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert json.loads(r.read())["error"]["code"] == "rate_limit_exceeded"
            else:  # admitted: the stream is under way (each response is read once, then closed)
                assert r.status_code == 200 and next(r.iter_lines())
    finally:
        for r in streams:
            r.close()  # the client goes away mid-stream
    _wait_idle(server, 10)
    cancelled = server.metric(finished + 'cancelled"}') - cancelled_before
    return codes, int(cancelled), server.metric(finished) - ended_before > cancelled


@pytest.mark.multirank
def test_queue_full_429_and_disconnect_cancels(server):
    """A sequence of 240 tokens takes ~0.3 s here, about as long as opening 8 streams on a loaded
    machine: an attempt in which one ran to its end before the others were open is tried again."""
    for _ in range(4):
        codes, cancelled, raced = _queue_full_attempt(server)
        if not raced:
            break
    assert not raced, "every attempt had a sequence finish before all 8 streams were open"
    assert codes.count(200) == 6 and codes.count(429) == 2, codes
    assert cancelled == 6


@pytest.mark.multirank
def test_metrics_and_health(server):
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["world_size"] == 2
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in (
        "moecluster_requests_total",
        "moecluster_generation_tokens_total",
        "moecluster_time_to_first_token_seconds_bucket",
        "moecluster_time_per_output_token_seconds_bucket",
        'moecluster_layer_exchange_seconds_bucket{kind="decode",layer="2"',
        'moecluster_expert_load_imbalance{level="rank"}',
        'moecluster_expert_load_imbalance{level="expert"}',
    ):
        assert name in text, name
    assert server.metric("moecluster_time_to_first_token_seconds_count") > 0
    assert server.metric('moecluster_requests_total{endpoint="/v1/completions",status="400"}') > 0


def _stream_error_within(lines, seconds: float) -> dict | None:
    """Read a stream's remaining lines until it ends; return the error it carried."""
    t0, error = time.monotonic(), None
    for line in lines:
        if line.startswith("data: {") and '"error"' in line:
            error = json.loads(line[6:])["error"]
    assert time.monotonic() - t0 < seconds
    return error


@pytest.mark.multirank
def test_stalled_rank_gives_503_and_health(server):
    """Runs last on the module's server: rank 1 stops answering (SIGSTOP); with --timeout 4 the
    in-flight stream ends with a 503 error and /health says which rank."""
    resp = _open_stream(server)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    next(lines)
    server.rank_process(1).suspend()
    error = _stream_error_within(lines, 30)
    assert error and error["code"] == "cluster_unavailable" and "rank 1" in error["message"], error
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 503 and "rank 1" in health.json()["reason"]
    with pytest.raises(openai.InternalServerError) as exc:
        _complete(server.client(), "Hello", 4)
    assert exc.value.status_code == 503


@pytest.mark.parametrize("backend", ["mpi", "torch"])
@pytest.mark.multirank
def test_killed_rank_gives_503_and_health(tiny_dbrx, tmp_path, backend):
    """Rank 1 is SIGKILLed mid-stream: the stream ends with a 503 error naming rank 1 (--timeout 4),
    /health says so and rank 0 keeps answering; stopping the server leaves no process behind.
    (MPI: each rank runs under a wrapper that ends normally for the process manager, see launch_mpi._wrap_rank.)"""
    srv = ServerProc(tiny_dbrx, tmp_path / "server.log", "--timeout", "4", backend=backend)
    try:
        lines = _open_stream(srv).iter_lines()
        next(lines)
        everyone = psutil.Process(srv.proc.pid).children(recursive=True)
        srv.rank_process(1).kill()
        error = _stream_error_within(lines, 30)
        assert error and error["code"] == "cluster_unavailable" and "rank 1" in error["message"], error
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503 and "rank 1" in health.json()["reason"]
        _assert_error(
            srv.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
            503,
            code="cluster_unavailable",
        )
        assert srv.proc.poll() is None, srv.log.read_text()
    finally:
        srv.stop()
    assert srv.proc.returncode is not None
    time.sleep(0.5)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
