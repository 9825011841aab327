"""Issue 15: a forward that raises fails only its request; the scheduler and the other requests go on.
In process, one rank: the real Scheduler over the tiny model, its step made to raise for marked inputs."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from moecluster.engine import batching
from moecluster.engine.batching import Event, Request, Scheduler
from moecluster.engine.generate import Engine
from moecluster.engine.sampling import SamplingParams
from moecluster.loading import load_model

BAD_TOKEN = 5  # a prompt containing it makes the prefill raise
BAD_POS = 14  # a decode row at this cache position makes the decode raise


@pytest.fixture(scope="module")
def engine(tiny_dbrx):
    return Engine(load_model(tiny_dbrx, "fp32"), num_slots=4)


def _run(scheduler: Scheduler, prompts: list[list[int]], max_tokens: list[int]) -> list[list[Event]]:
    """Submit every prompt at once (greedy, no EOS stop); each request's events until its last."""
    inboxes = [queue.Queue() for _ in prompts]
    for ids, n, box in zip(prompts, max_tokens, inboxes):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        scheduler.submit(Request(ids, params, box.put))
    out = []
    for box in inboxes:
        events = [box.get(timeout=60)]
        while events[-1].finish_reason is None:
            events.append(box.get(timeout=60))
        out.append(events)
    return out


def _tokens(events: list[Event]) -> list[int]:
    return [e.token for e in events if e.token is not None]


@pytest.mark.slow
def test_a_failing_forward_fails_its_request_only(engine, monkeypatch):
    real = batching.execute_step
    calls = {"raised": 0}

    def fragile(eng, msg):
        for adm in msg["admit"]:
            if BAD_TOKEN in adm["prompt_ids"]:
                calls["raised"] += 1
                raise RuntimeError("bad input reached the model")
        if BAD_POS in msg["pos"]:
            calls["raised"] += 1
            raise FloatingPointError("decode blew up")
        return real(eng, msg)

    good, bad_prefill, bad_decode = [1, 2, 3], [9, BAD_TOKEN, 4], [3] * 8
    scheduler = Scheduler(engine, max_batch=4, max_queue=8)
    scheduler.start()
    try:
        alone = _tokens(_run(scheduler, [good], [5])[0])
        monkeypatch.setattr(batching, "execute_step", fragile)
        # good reaches positions 3..7 only; bad_decode (8 prompt tokens) decodes at position 14 on its 7th token
        events = _run(scheduler, [good, bad_prefill, bad_decode, good], [5, 4, 10, 5])
        assert _tokens(events[0]) == _tokens(events[3]) == alone
        assert events[0][-1].finish_reason == events[3][-1].finish_reason == "length"
        last = events[1][-1]
        assert last.finish_reason == "error" and last.status == 500 and "bad input reached the model" in str(last.error)
        assert _tokens(events[1]) == []
        last = events[2][-1]
        assert last.finish_reason == "error" and last.status == 500 and "decode blew up" in str(last.error)
        # the prefill samples one token, then decodes at positions 8..13 succeed
        assert len(_tokens(events[2])) == 1 + BAD_POS - len(bad_decode)
        assert calls["raised"] >= 2
        assert scheduler.health() == (True, "ok")
        monkeypatch.setattr(batching, "execute_step", real)
        assert _tokens(_run(scheduler, [good], [5])[0]) == alone  # and it serves on
    finally:
        scheduler.stop()


def test_piecewise_rerun_matches_the_batched_step(engine):
    """After a failure the step runs row by row: the good rows' logits equal the batched forward's."""
    from moecluster.engine.step_guard import run_guarded

    engine.step(torch.tensor([[1, 2, 3]]), torch.tensor([0]), torch.tensor([0]))
    engine.step(torch.tensor([[4, 5, 6]]), torch.tensor([0]), torch.tensor([1]))
    msg = {"op": "step", "admit": [], "tokens": [7, 8], "slots": [0, 1], "pos": [3, 3]}
    batched = batching.execute_step(engine, msg).decode_logits_BV
    fails = {"first": True}

    def once(eng, m):
        if fails.pop("first", False):
            raise RuntimeError("transient")
        return batching.execute_step(eng, m)

    out = run_guarded(once, engine, msg)
    assert out.errors == {} and out.decode_logits_BV is not None and batched is not None
    assert torch.allclose(out.decode_logits_BV, batched, atol=1e-5)


# ---- keep serving on the survivors: 3 ranks, every expert on 2 of them, one rank killed mid-stream ----


def _replicated_placement(path, num_experts: int = 8, num_layers: int = 2):
    """Expert e on ranks e % 3 and (e + 1) % 3: any one rank can go, every expert keeps a copy."""
    import json

    holders = [sorted({e % 3, (e + 1) % 3}) for e in range(num_experts)]
    data = {"format": "moecluster-placement/1", "num_experts": num_experts, "num_layers": num_layers}
    path.write_text(json.dumps({**data, "world_size": 3, "default": holders}))
    return path


def _stream(client, max_tokens: int, on_chunk=None) -> str:
    text = []
    stream = client.completions.create(
        model="tiny", prompt="Hello", max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for i, chunk in enumerate(stream):
        text.append(chunk.choices[0].text if chunk.choices else "")
        if on_chunk is not None:
            on_chunk(i)
    return "".join(text)


@pytest.mark.multirank
@pytest.mark.parametrize("how", ["kill", "stall"])
def test_one_of_three_replicated_ranks_lost_mid_stream(tiny_dbrx, tmp_path, how):
    """kill -9 (noticed at once) or SIGSTOP (noticed after --timeout) of rank 1 mid-stream: the cluster
    re-forms on ranks 0 and 2, the stream completes with the same greedy text, /health says degraded."""
    import httpx
    import psutil
    from test_server import KEY, ServerProc

    from moecluster.loading import load_model as _load

    layers = len(_load(tiny_dbrx, "fp32").model.moe_layers())
    placement = _replicated_placement(tmp_path / "placement.json", num_layers=layers)
    srv = ServerProc(
        tiny_dbrx, tmp_path / "server.log", "--timeout", "10", "--placement", str(placement), nodes=3, backend="torch"
    )
    try:
        client = srv.client()
        expected = _stream(client, 200)
        cluster = httpx.get(srv.url + "/v1/cluster", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        assert [r["rank"] for r in cluster["ranks"]] == [0, 1, 2] and srv.metric("moecluster_world_size") == 3
        everyone = psutil.Process(srv.proc.pid).children(recursive=True)
        victim = srv.rank_process(1)
        killed_at = {}

        def kill_after_a_few(i: int) -> None:
            if i == 5:
                victim.kill() if how == "kill" else victim.suspend()
                killed_at["t"] = time.monotonic()

        got = _stream(client, 200, kill_after_a_few)
        took = time.monotonic() - killed_at["t"]
        print(f"{how}: the stream ended {took:.1f} s after rank 1 was lost")
        log = srv.log.read_text()
        assert got == expected, log
        assert took < 60, took
        assert "re-formed without rank 1" in log, log
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert health["status"] == "degraded" and health["world_size"] == 2 and "rank 1 lost" in health["reason"]
        assert srv.metric("moecluster_world_size") == 2  # /metrics and /v1/cluster: the survivors' placement
        cluster = httpx.get(srv.url + "/v1/cluster", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        held = [(r["rank"], r["experts_layer0"]) for r in cluster["ranks"]]
        assert held == [(0, [0, 2, 3, 5, 6]), (2, [1, 2, 4, 5, 7])], held  # launch ranks 0 and 2
        assert _stream(client, 20) == expected[: len(_stream(client, 20))]  # and it serves on
        assert srv.proc.poll() is None
    finally:
        srv.stop()
    time.sleep(0.5)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_restart_supervises_the_job(tiny_dbrx, tmp_path):
    """serve --restart 2: the killed job is started again (same port) and answers; SIGTERM ends it all."""
    import httpx
    import psutil
    from test_server import ServerProc

    srv = ServerProc(tiny_dbrx, tmp_path / "server.log", "--restart", "2", nodes=1)
    try:
        first = psutil.Process(srv.proc.pid).children()
        assert len(first) == 1 and "serve" in first[0].cmdline() and "--restart" not in first[0].cmdline()
        first[0].kill()
        t0, healthy = time.monotonic(), False
        while time.monotonic() - t0 < 90 and not healthy:
            time.sleep(0.5)
            children = psutil.Process(srv.proc.pid).children()
            try:
                healthy = bool(children) and children[0].pid != first[0].pid
                healthy = healthy and httpx.get(srv.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                healthy = False
        assert healthy, srv.log.read_text()
        assert "restart 1 of 2 in 1 s" in srv.log.read_text()
        assert _stream(srv.client(), 4)
        everyone = psutil.Process(srv.proc.pid).children(recursive=True)
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.log.read_text()
    time.sleep(0.5)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_metrics_and_cluster_panel_follow_the_survivors_placement():
    """After a re-forming (Survival.on_reform -> Metrics.set_placement): the world size gauge, the per-rank
    imbalance over the restricted placement, and /v1/cluster's ranks by launch number."""
    from moecluster.parallel.placement import Placement
    from moecluster.parallel.survivors import restrict
    from moecluster.server import chat_page
    from moecluster.server.metrics import Metrics

    class OneLayerEngine:
        dense_bytes = 100

        def routing_shape(self):
            return 1, 3

        def expert_bytes(self):
            return 10

        def set_routing_recorder(self, recorder):
            pass

    placement = Placement([[[0, 1], [1, 2], [2, 0]]], 3)
    metrics = Metrics(OneLayerEngine(), placement, 3)
    metrics.record(0, [[0], [1], [2], [0]])
    assert "moecluster_world_size 3.0" in metrics.render(0, 0, True).decode()
    survivors = restrict(placement, [0, 2])  # rank 1 lost: expert 0 on (old) 0, expert 1 on 2, expert 2 on both
    metrics.set_placement(survivors, [0, 2])
    assert "moecluster_world_size 2.0" in metrics.render(0, 0, True).decode()
    assert metrics.imbalance_now()["rank"] == pytest.approx(2.5 / 2)  # loads 2 + 0.5 and 1 + 0.5
    info = chat_page.cluster_info(OneLayerEngine(), metrics.placement, 2, metrics.members)
    assert [(r["rank"], r["experts_layer0"], r["weight_bytes"]) for r in info["ranks"]] == [
        (0, [0, 2], 120),
        (2, [1, 2], 120),
    ]
