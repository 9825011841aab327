"""Issue 16: sampling parameters on both endpoints, each checked against an independent reference: logprobs
equal log_softmax of the model's logits; presence/frequency/repetition penalties and logit_bias follow vLLM's
formulas; n shares one prefill (greedy choices all equal the n=1 text; seeded choice 0 equals the n=1 run);
min_p never samples below its threshold; unknown harmless fields are accepted, meaning-changing ones refused.
Driven by the official `openai` client against a real `moecluster serve` (one rank)."""

from __future__ import annotations

import math
import re

import httpx
import openai
import pytest
import torch

import moecluster
from moecluster.engine.generate import Engine
from moecluster.engine.sampling import Sampler, SamplingParams
from moecluster.loading import load_model
from tests.test_server import KEY, ServerProc

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def engine(tiny_dbrx):
    return Engine(load_model(tiny_dbrx, "fp32"), num_slots=1)


@pytest.fixture(scope="module")
def server(tiny_dbrx, tmp_path_factory):
    srv = ServerProc(
        tiny_dbrx, tmp_path_factory.mktemp("serve") / "server.log", "--max-batch", "8", nodes=1, backend="torch"
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def _reference(engine: Engine, prompt_ids: list[int], steps: int, process=None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the model's raw logits at each step; process(logits_V, out_ids) -> logits to argmax."""
    logits_V = engine.step(torch.tensor([prompt_ids]), torch.tensor([0]), torch.tensor([0]))[0]
    tokens, logits = [], []
    for i in range(steps):
        logits.append(logits_V)
        chosen = process(logits_V.double(), tokens) if process else logits_V
        tokens.append(int(torch.argmax(chosen)))
        pos = len(prompt_ids) + i
        logits_V = engine.step(torch.tensor([[tokens[-1]]]), torch.tensor([pos]), torch.tensor([0]))[0]
    return tokens, logits


def test_penalties_follow_vllm_formulas():
    torch.manual_seed(0)
    V, prompt, out = 50, [1, 2, 3], [3, 4, 4, 9]
    params = SamplingParams(
        presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.7, logit_bias={5: 3.0, 6: -2.0}
    )
    sampler = Sampler(params, prompt)
    sampler.sample(torch.randn(V))  # builds the state; record a known output instead of its choice
    assert sampler.counts_V is not None
    sampler.counts_V.zero_()
    for t in out:
        sampler.counts_V[t] += 1
    logits = torch.randn(V, dtype=torch.float64) * 3
    ref = logits.clone()
    ref[5] += 3.0
    ref[6] -= 2.0
    for t in set(prompt) | set(out):  # repetition: divide positive, multiply negative (prompt + output)
        ref[t] = ref[t] / 1.7 if ref[t] > 0 else ref[t] * 1.7
    for t in set(out):
        ref[t] -= 0.5 + 0.3 * out.count(t)  # presence once, frequency per occurrence (output only)
    torch.testing.assert_close(sampler._process(logits), ref, rtol=0, atol=1e-12)


def test_min_p_never_samples_below_threshold():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.08]))
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=0.2, seed=1))
    drawn = {sampler(logits) for _ in range(300)}
    assert drawn == {0, 1, 2}  # 0.08 < 0.2 * 0.5


def test_logprobs_equal_log_softmax(client, engine):
    ids = engine.tokenizer.encode(PROMPT)
    tokens, logits = _reference(engine, ids, 5)
    out = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    text_of = lambda t: engine.tokenizer.tok.decode([t], skip_special_tokens=False)  # noqa: E731
    assert lp.tokens == [text_of(t) for t in tokens]
    for step, (tok, logits_V) in enumerate(zip(tokens, logits, strict=True)):
        ref = torch.log_softmax(logits_V.float(), dim=-1)
        assert math.isclose(lp.token_logprobs[step], float(ref[tok]), abs_tol=1e-4)
        top = torch.topk(ref, 3)  # as a dict keyed by token text (two tokens may share a text, as in OpenAI's)
        want = {text_of(t): v for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)}
        assert lp.top_logprobs[step] == pytest.approx(want, abs=1e-4)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-6) for c in content)  # greedy = top-1
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    streamed = [
        c
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for c in choice.logprobs.content
    ]
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [(c.token, round(c.logprob, 5)) for c in content]


def test_penalties_and_logit_bias_greedy_match_reference(client, engine):
    ids = engine.tokenizer.encode(PROMPT)
    greedy, _ = _reference(engine, ids, 8)
    bias = {str(greedy[0]): -100.0, "7": 5.0}

    def process(logits_V: torch.Tensor, out: list[int]) -> torch.Tensor:
        x = logits_V.clone()
        x[greedy[0]] -= 100.0
        x[7] += 5.0
        for t in set(ids) | set(out):
            x[t] = x[t] / 1.3 if x[t] > 0 else x[t] * 1.3
        for t in set(out):
            x[t] -= 0.7 + 0.9 * out.count(t)
        return x

    tokens, _ = _reference(engine, ids, 8, process)
    for stream in (False, True):
        kw = dict(
            model="tiny",
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            presence_penalty=0.7,
            frequency_penalty=0.9,
            logit_bias=bias,
            logprobs=0,
            stream=stream,
            extra_body={"ignore_eos": True, "repetition_penalty": 1.3},
        )
        if stream:
            got = [
                t
                for chunk in client.completions.create(**kw)
                for c in chunk.choices
                if c.logprobs
                for t in c.logprobs.tokens or []
            ]
        else:
            got = client.completions.create(**kw).choices[0].logprobs.tokens  # type: ignore[union-attr]
        assert got == [engine.tokenizer.tok.decode([t], skip_special_tokens=False) for t in tokens]
    assert tokens[0] != greedy[0]


def test_n_shares_prefill_and_seeds(client):
    one = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    many = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, n=3, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert all(c.text == one.choices[0].text for c in many.choices)
    assert many.usage is not None and many.usage.completion_tokens == 18
    kw = dict(
        model="tiny",
        prompt=PROMPT,
        max_tokens=8,
        temperature=1.0,
        seed=42,
        extra_body={"ignore_eos": True, "min_p": 0.01, "top_k": 20},
    )
    seeded = client.completions.create(**kw)
    n3 = client.completions.create(n=3, **kw)
    assert n3.choices[0].text == seeded.choices[0].text == client.completions.create(**kw).choices[0].text
    assert len({c.text for c in n3.choices}) > 1  # seed + index: the choices differ
    texts = ["", "", ""]
    for chunk in client.completions.create(n=3, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in n3.choices]
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        seed=3,
        max_completion_tokens=3,
        temperature=0.8,
        extra_body={"ignore_eos": True},
    )
    assert len(chat.choices) == 2 and chat.usage is not None and chat.usage.completion_tokens == 6


def test_unknown_fields_ignored_meaningful_ones_refused(server):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok = server.post(
        "/v1/chat/completions",
        {
            **base,
            "user": "u",
            "metadata": {"a": "b"},
            "reasoning_effort": "low",
            "store": False,
            "parallel_tool_calls": True,
            "bogus_field": 1,
        },
    )
    assert ok.status_code == 200, ok.text
    assert "ignoring request fields ['bogus_field', 'reasoning_effort']" in server.log.read_text()
    bad = server.post("/v1/chat/completions", {**base, "guided_json": {"type": "object"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_json"
    for body, param in [
        ({"n": 9}, "n"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"99999": 1.0}}, "logit_bias"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
    ]:
        r = server.post("/v1/chat/completions", {**base, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200


def test_request_log_lines_kv_cache_line_and_version(server, client):
    client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, n=2, extra_body={"ignore_eos": True}
    )
    list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    server.post("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 9})
    log = server.log.read_text()
    assert re.search(r"moecluster: KV cache: \d+\.\d+ GiB reserved per rank \(8 slots x \d+ positions\)", log)
    lines = re.findall(
        r"moecluster: request cmpl-\w+ status=200 prompt_tokens=\d+ completion_tokens=8 "
        r"ttft=[\d.]+s decode_tok_s=[\d.]+ finish=length,length",
        log,
    )
    assert lines, log
    assert re.search(r"request chatcmpl-\w+ status=200 .* completion_tokens=3 .* finish=length\n", log), log
    assert re.search(r"request - /v1/completions status=400 param=n", log), log
    from cli_runner import run_cli

    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"moecluster {moecluster.__version__}"
