"""No input breaks the server (issue 15): numerically safe sampling at every accepted parameter, linear
stop matching, one failing request fails alone, hostile JSON and bodies get 4xx, and a schemathesis
fuzz run over /openapi.json finds no 5xx. In process: one rank, the app over a real Scheduler."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from starlette.testclient import TestClient

from moecluster.engine import batching
from moecluster.engine.batching import Scheduler
from moecluster.engine.generate import Engine, TextTracker
from moecluster.engine.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, Sampler, SamplingError, SamplingParams
from moecluster.errors import MoeClusterError
from moecluster.loading import load_model
from moecluster.server.app import MAX_BODY_BYTES, create_app

NAN_TOKEN = 7  # a prompt starting with this token gets NaN logits (see nan_on_marker)


@pytest.fixture(scope="module")
def engine(tiny_dbrx):
    return Engine(load_model(tiny_dbrx, "fp32"), num_slots=4)


@pytest.fixture(scope="module")
def served(engine):
    """(TestClient, Scheduler) over the tiny model; prompts beginning with NAN_TOKEN sample NaN logits."""
    real = batching.execute_step

    def nan_on_marker(eng, msg):
        out = real(eng, msg)
        for i, adm in enumerate(msg["admit"]):
            if adm["prompt_ids"][0] == NAN_TOKEN:
                out.prefill_logits[i] = out.prefill_logits[i].clone().fill_(float("nan"))
        return out

    batching.execute_step = nan_on_marker
    scheduler = Scheduler(engine, max_batch=4, max_queue=64)
    scheduler.start()
    app = create_app(scheduler, "tiny", allowed_hosts=("testserver",))
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, scheduler
    finally:
        scheduler.stop()
        batching.execute_step = real


def _body(**kw) -> dict:
    return {"model": "tiny", "prompt": "Hello", "max_tokens": 3, **kw}


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-40, 1e-38, 1e-7, 0.5, 2.0, 100.0])
@pytest.mark.parametrize("top_p", [5e-324, 1e-40, 0.3, 1.0])
def test_sampler_is_safe_at_the_limits(temperature, top_p):
    sampler = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=1).validate())
    logits_V = torch.randn(64) * 30
    for x in (logits_V, logits_V.bfloat16(), torch.full((64,), -3e38), torch.zeros(64)):
        assert 0 <= sampler(x) < 64
    with pytest.raises(SamplingError, match="NaN"):
        sampler(torch.tensor([0.0, float("nan")]))


def test_stop_limits_and_linear_matching():
    with pytest.raises(MoeClusterError, match="stop strings"):
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1)).validate()
    with pytest.raises(MoeClusterError, match="stop strings"):
        SamplingParams(stop=["x" * (MAX_STOP_CHARS + 1)]).validate()

    class Tok:
        eos_ids = [0]

        def decode(self, ids):
            return "a" * len(ids)

    stops = ["a" * (MAX_STOP_CHARS - 1) + "b"] * MAX_STOP_STRINGS
    tracker = TextTracker(Tok(), SamplingParams(stop=stops))  # pyright: ignore[reportArgumentType]
    t0 = time.perf_counter()
    for _ in range(4000):
        tracker.push(1)
    assert time.perf_counter() - t0 < 2.0  # quadratic matching took ~minutes for such stops


def test_tiny_temperature_and_top_p_serve(served):
    client, _ = served
    for extra in ({"temperature": 1e-40}, {"top_p": 5e-324}, {"temperature": 1e-38, "top_p": 1e-300}):
        r = client.post("/v1/completions", json=_body(**extra))
        assert r.status_code == 200, r.text
    assert client.get("/health").status_code == 200


def test_nan_logits_fail_only_that_request(served, engine):
    client, scheduler = served
    bad = client.post("/v1/completions", json=_body(prompt=[NAN_TOKEN, 5], temperature=1.0))
    assert bad.status_code == 500 and "NaN" in bad.json()["error"]["message"], bad.text
    assert bad.json()["error"]["code"] == "request_failed"
    stream = client.post("/v1/completions", json=_body(prompt=[NAN_TOKEN, 5], stream=True))
    assert stream.status_code == 200 and "NaN" in stream.text
    assert client.post("/v1/completions", json=_body()).status_code == 200
    assert client.get("/health").status_code == 200 and scheduler.health()[0]


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError in json
        '{"a": ' * 40 + "1" + "}" * 40,  # deeper than MAX_JSON_DEPTH
        '{"model": "tiny", "prompt": "\\ud800"}',
        '{"model": "tiny", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}",
        '{"model": "tiny", "prompt": "x", "max_tokens": ' + "9" * 4000 + "}",
        '{"model": "tiny", "prompt": "x", "temperature": NaN}',
        '{"model": "tiny", "prompt": "x", "top_p": Infinity}',
        '{"model": "tiny", "prompt": "x", "stop": "' + "s" * 1_000_000 + '"}',
        '{"model": "tiny", "prompt": "x", "stop": ' + '["s"]' * 0 + str(["s"] * 100).replace("'", '"') + "}",
        b'{"model": "tiny", "prompt": "\xff"}',
    ],
)
def test_hostile_json_gets_400(served, raw):
    client, _ = served
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["message"]


def test_body_limit_while_reading(served):
    client, _ = served
    r = client.post(
        "/v1/completions",
        content=b"x",
        headers={"Content-Length": str(MAX_BODY_BYTES + 1), "Content-Type": "application/json"},
    )
    assert r.status_code == 413

    def chunks():  # no Content-Length: refused once the streamed bytes pass the limit
        for _ in range(20):
            yield b" " * (1 << 20)

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


@pytest.mark.slow  # ~10 s of CPU, nearly all in schemathesis generating the cases
def test_fuzz_openapi_no_5xx(served):
    """schemathesis over the published /openapi.json, positive and negative cases, bounded count."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    client, _ = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    sent, errors, codes = [0], [], Counter()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=60,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                body = case.body
                if isinstance(body, dict):  # keep generation short: a request without a limit decodes to the context
                    for key in ("max_tokens", "max_completion_tokens"):
                        if isinstance(body.get(key), int) or (key == "max_tokens" and key not in body):
                            body[key] = min(body.get(key, 8), 8)
                r = case.call()  # through the ASGI app, with the case's own body encoding and headers
                sent[0] += 1
                codes[r.status_code] += 1
                if r.status_code >= 500:
                    errors.append((case.method, case.path, body, r.status_code, r.text[:200]))

            try:
                run()
            except Unsatisfiable:  # no negative case exists (GET /v1/models has no parameters)
                pass
    print(f"fuzz: {sent[0]} requests, {len(errors)} 5xx, status codes {dict(codes)}")
    assert not errors, errors[:5]
    assert client.get("/health").status_code == 200
    assert client.post("/v1/completions", json=_body()).status_code == 200


def _variant(src, tmp_path, name, config=None, index=None, nan=False):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / name
    shutil.copytree(src, d)
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(config(cfg)))
    if index is not None:
        (d / "model.safetensors.index.json").write_text(index)
    if nan:
        state = load_file(d / "model.safetensors")
        name = next(k for k in state if "experts" in k)
        state[name].view(-1)[0] = float("nan")
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize(
    "name, config, index, nan, message",
    [
        ("config_list", lambda c: [c], None, False, "expected a JSON object"),
        ("size_string", lambda c: {**c, "d_model": "big"}, None, False, "d_model must be an integer"),
        ("size_float", lambda c: {**c, "vocab_size": 100.5}, None, False, "vocab_size must be an integer"),
        ("nested_list", lambda c: {**c, "attn_config": [1]}, None, False, "attn_config must be a JSON object"),
        ("huge_context", lambda c: {**c, "max_seq_len": 1e9}, None, False, "GiB of memory is available"),
        ("index_garbage", None, "{not json", False, "index.json is malformed"),
        ("index_list", None, '{"weight_map": [1]}', False, "index.json is malformed"),
        ("nan_weights", None, None, True, "NaN/Inf values"),
    ],
)
def test_bad_checkpoints_one_error_line(tiny_dbrx, tmp_path, name, config, index, nan, message):
    from cli_runner import run_cli

    d = _variant(tiny_dbrx, tmp_path, name, config, index, nan)
    res = run_cli("generate", "--model", str(d), "--prompt", "hi", "--max-tokens", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert message in res.stderr.strip().splitlines()[-1], res.stderr[-500:]
    if nan:  # the scan can be skipped; a NaN reaching the logits then fails the request, not the process
        engine = Engine(load_model(d, "fp32", check_weights=False))
        try:
            engine.generate(engine.tokenizer.encode("hello there"), SamplingParams(max_tokens=3, ignore_eos=True))
        except SamplingError as e:
            assert "NaN" in str(e)


def test_max_seq_len_above_the_model_is_refused(tiny_dbrx):
    loaded = load_model(tiny_dbrx, "fp32")
    with pytest.raises(MoeClusterError, match="above this model's limit of 256"):
        Engine(loaded, max_seq_len=257)
    assert Engine(loaded, max_seq_len=256).max_seq_len == 256


def _app_client(scheduler, **kw) -> TestClient:
    return TestClient(create_app(scheduler, "tiny", **kw), raise_server_exceptions=False)


def test_content_type_host_cors_and_status_auth(served):
    client, scheduler = served
    r = client.post(
        "/v1/completions", content=b'{"model": "tiny", "prompt": "hi"}', headers={"Content-Type": "text/plain"}
    )  # what a web page may send without a preflight
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json=_body(), headers={"Host": "evil.example"}).status_code == 421
    assert client.get("/health", headers={"Host": "attacker.example:8000"}).status_code == 421
    for host in ("127.0.0.1:8000", "[::1]:8000", "localhost", "10.1.2.3", "testserver"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/v1/completions", headers=preflight).headers
    with _app_client(scheduler, allowed_hosts=["*"], cors_origins=["https://app.example"]) as cors:
        r = cors.options("/v1/completions", headers={**preflight, "Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert cors.get("/health", headers={"Host": "any.example"}).status_code == 200
    with _app_client(scheduler, api_key="k", allowed_hosts=["testserver"], open_status=False) as closed:
        assert closed.get("/health").status_code == 401 and closed.get("/metrics").status_code == 401
        assert closed.get("/health", headers={"Authorization": "Bearer k"}).status_code == 200
    with _app_client(scheduler, api_key="k", allowed_hosts=["testserver"]) as local:
        assert local.get("/metrics").status_code == 200


def test_idle_and_slow_connections_are_closed(served):
    """A connection that sends nothing, or headers slowly, is closed; a long request is not."""
    import socket
    import threading

    import uvicorn

    from moecluster.server.connections import ReapingH11Protocol

    class Fast(ReapingH11Protocol):
        header_timeout_s = 0.5

    client, scheduler = served
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(scheduler, "tiny"), http=Fast, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)

        def closed_after(payload: bytes) -> float:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(payload)
                t0 = time.monotonic()
                while c.recv(65536):
                    pass
                return time.monotonic() - t0

        assert closed_after(b"") < 3
        assert closed_after(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n") < 3
        body = b'{"model": "tiny", "prompt": "Hello", "max_tokens": 200, "ignore_eos": true}'
        request = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        ) + body
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(request)
            data = b""
            while chunk := c.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    finally:
        server.should_exit = True
        thread.join(10)


def _proc_address(hex_addr: str) -> str:
    """'0100007F:CA91' (/proc/net/tcp) -> '127.0.0.1:51857'; IPv6 as '[::1]:port'."""
    import ipaddress

    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host-endian
    ip = ipaddress.ip_address(raw)
    return f"{ip}:{int(port, 16)}" if ip.version == 4 else f"[{ip}]:{int(port, 16)}"


def _listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every listening TCP socket and bound UDP socket held by these processes,
    from /proc/PID/fd (socket inodes) and /proc/PID/net/{tcp,tcp6,udp,udp6}."""
    import os

    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owner.setdefault(target[8:-1], pid)
        except OSError:  # ended meanwhile
            continue
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/{min(pids)}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                listening = state == "0A" if table.startswith("tcp") else not local.endswith(":0000")
                if listening and inode in owner:
                    found.append((_proc_address(local), owner[inode]))
    return found


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_proc_net_addresses_parse():
    assert _proc_address("0100007F:CA91") == "127.0.0.1:51857"
    assert _proc_address("00000000:0016") == "0.0.0.0:22"
    assert _proc_address("00000000000000000000000001000000:0050") == "[::1]:80"
    assert _is_loopback("127.0.0.1:5") and _is_loopback("[::1]:80") and _is_loopback("[::ffff:127.0.0.1]:1")
    assert not _is_loopback("0.0.0.0:22") and not _is_loopback("192.0.2.2:1") and not _is_loopback("[::]:8")


@pytest.mark.multirank
@pytest.mark.parametrize("backend", ["mpi", "torch", "mlx"])
def test_loopback_only_and_no_orphans_after_kill9(request, tmp_path, backend):
    """A one-machine 2-rank job: every socket that any process of the job (launcher, MPICH's process
    manager, ranks) listens on is bound to loopback, none to 0.0.0.0/:: or eth0; kill -9 of the launcher
    ends every rank and frees the port."""
    import signal
    import socket

    import psutil
    from test_server import ServerProc

    if backend == "mlx":
        pytest.importorskip("mlx.core")
        pytest.importorskip("mlx_lm")
        model = request.getfixturevalue("tiny_mixtral")
        srv = ServerProc(model, tmp_path / "server.log", "--engine", "mlx", "--timeout", "4")
    else:
        model = request.getfixturevalue("tiny_dbrx")
        srv = ServerProc(model, tmp_path / "server.log", "--timeout", "4", backend=backend)
    try:
        resp = srv.post("/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert resp.status_code == 200, resp.text  # the ranks have talked to each other
        tree = psutil.Process(srv.proc.pid).children(recursive=True)
        assert sum("--rank-worker" in " ".join(p.cmdline()) for p in tree) >= 2
        listeners = _listeners({p.pid for p in tree} | {srv.proc.pid})
        assert any(addr.endswith(f":{srv.port}") for addr, _ in listeners), listeners  # the HTTP port is seen
        exposed = [(addr, psutil.Process(pid).cmdline()[:4]) for addr, pid in listeners if not _is_loopback(addr)]
        assert not exposed, listeners
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
            time.sleep(0.1)
        assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        deadline = time.monotonic() + 10  # "free within seconds": the kernel may take a moment after the exits
        while True:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as any server does (TIME_WAIT)
                try:
                    s.bind(("127.0.0.1", srv.port))  # the HTTP port is free again
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(0.2)
    finally:
        srv.stop()


@pytest.mark.multirank
def test_trace_is_chrome_trace_events_one_track_per_rank(tiny_dbrx, tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "trace.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "moecluster.cli",
            "generate",
            "--model",
            str(tiny_dbrx),
            "--prompt",
            "hi",
            "--max-tokens",
            "4",
            "--nodes",
            "2",
            "--trace",
            str(path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    trace = json.loads(path.read_text())
    assert trace["world_size"] == 2 and len(trace["ranks"]) == 2  # the summary, as before
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    assert all(e["ts"] >= 0 and e["dur"] >= 0 and e["name"] for e in spans)
    for rank in (0, 1):
        names = {e["name"] for e in spans if e["pid"] == rank}
        assert "all_reduce L0" in names and any(n.startswith("decode") for n in names), names
    assert {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"} == {"rank 0", "rank 1"}
