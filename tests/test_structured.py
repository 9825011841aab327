"""Structured output (issue 17): response_format json_object / json_schema and forced tool calls by constrained
decoding (llguidance). On the built-in trained demo model, every output parses and validates against its schema
(jsonschema), greedy and sampled, n > 1, streamed or not, through the official openai and anthropic clients, in
process and on 2 ranks; schemas the engine cannot compile get a 400."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch
from starlette.testclient import TestClient
from test_server import ServerProc

from moecluster.builtin import DEMO_MODEL_DIR
from moecluster.engine.batching import Scheduler
from moecluster.engine.generate import Engine
from moecluster.engine.sampling import Sampler, SamplingParams
from moecluster.engine.structured import Constraint, json_schema_grammar
from moecluster.loading import load_model

# bounded lengths: a 4M-parameter model would happily write one string until max_tokens otherwise
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "kind": {"enum": ["module", "class", "function"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "ratio": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    },
    "required": ["name", "year", "kind", "tags", "ok", "ratio"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {"$ref": "#/$defs/item"},
        }
    },
    "required": ["items"],
    "additionalProperties": False,
    "$defs": {
        "item": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "label": {"enum": ["a", "b"]}},
            "required": ["id", "label"],
            "additionalProperties": False,
        }
    },
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city for some days",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 12},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["UTC", "CET"]}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]
MESSAGES = [{"role": "user", "content": "Describe the json module as JSON."}]
QUOTE, CLOSE = 4, 95  # the demo vocabulary's '"' and '}'


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def _check_tool_call(call) -> None:
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert call.type == "function" and call.id and call.function.name in params
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


@pytest.fixture(scope="module")
def demo():
    engine = Engine(load_model(DEMO_MODEL_DIR, "fp32"), num_slots=4)
    scheduler = Scheduler(engine, max_batch=4, max_queue=8)
    scheduler.start()
    from moecluster.server.app import create_app

    try:
        with TestClient(create_app(scheduler, "demo", allowed_hosts=("testserver",))) as http:
            yield engine, http, openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)
    finally:
        scheduler.stop()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_mask_on_random_logits(demo, temperature):
    """The mask alone (no model): random logits, a logit_bias and penalties fighting the grammar, and still every
    sequence is valid JSON for the schema and ends exactly when the grammar is complete."""
    engine = demo[0]
    vocab = engine.loaded.shape.vocab_size
    constraint = Constraint(engine.tokenizer, json_schema_grammar(SCHEMA), vocab)
    params = SamplingParams(
        max_tokens=400,
        temperature=temperature,
        seed=3,
        logit_bias={CLOSE: 100.0, 101: 50.0},
        presence_penalty=2.0,
        repetition_penalty=1.5,
        constraint=constraint,
    ).validate()
    gen = torch.Generator().manual_seed(0)
    for index in range(3):  # 3 choices of one request: each with its own grammar state
        sampler, ids = Sampler(params, [1, 2, 3], index), []
        while not sampler.finished:
            assert len(ids) < 400
            ids.append(sampler(torch.randn(vocab, generator=gen) * 5))
        jsonschema.validate(json.loads(engine.tokenizer.decode(ids)), SCHEMA)


@pytest.mark.parametrize(
    "schema, sampling",
    [
        (SCHEMA, {"temperature": 0}),
        pytest.param(NESTED, {"temperature": 1.0, "seed": 5, "n": 3}, marks=pytest.mark.slow),
        pytest.param(SCHEMA, {"temperature": 0.8, "top_p": 0.9, "seed": 6, "n": 2}, marks=pytest.mark.slow),
    ],
    ids=["flat-greedy", "nested-n3", "flat-top_p-n2"],
)
def test_json_schema_chat(demo, schema, sampling):
    client = demo[2]
    fmt = _schema_format(schema)
    r = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=200,
        response_format=fmt,  # type: ignore[arg-type]
        **sampling,
    )
    assert len(r.choices) == sampling.get("n", 1)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
    stream = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=200,
        response_format=fmt,  # type: ignore[arg-type]
        stream=True,
        **sampling,
    )
    texts = [""] * sampling.get("n", 1)
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in r.choices]  # seeded: the same outputs


@pytest.mark.slow
def test_json_object_and_completions(demo):
    _, http, client = demo
    # json_object allows any object; a logit_bias toward '"' and '}' makes the tiny model close its strings soon
    r = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=200,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=1,
        n=2,
        logit_bias={str(QUOTE): 6, str(CLOSE): 6},
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content or ""), dict)
    c = client.completions.create(
        model="demo",
        prompt="Describe the json module as JSON:",
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": _schema_format(SCHEMA)},
    )
    assert c.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(c.choices[0].text), SCHEMA)


@pytest.mark.parametrize(
    "response_format, param, words",
    [
        (_schema_format({"type": "frob"}), "response_format", "frob"),
        (_schema_format({"properties": {"a": {"$ref": "#/$defs/missing"}}}), "response_format", "missing"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema", "schema"),
        ({"type": "xml"}, "response_format", "json_schema"),
    ],
)
def test_uncompilable_schemas_get_400(demo, response_format, param, words):
    http = demo[1]
    r = http.post(
        "/v1/chat/completions", json={"model": "demo", "messages": MESSAGES, "response_format": response_format}
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]
    r = http.post(
        "/v1/chat/completions",
        json={"model": "demo", "messages": MESSAGES, "tools": bad_tool, "tool_choice": "required"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and "frob" in r.json()["error"]["message"]
    r = http.post(
        "/v1/chat/completions",
        json={"model": "demo", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "n": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # the choices' calls would interleave


@pytest.mark.parametrize(
    "choice, temperature",
    [
        ("required", 0.0),
        pytest.param({"type": "function", "function": {"name": "get_weather"}}, 1.0, marks=pytest.mark.slow),
    ],
    ids=["required-greedy", "named-sampled"],
)
def test_forced_tool_calls(demo, choice, temperature):
    """The demo model never learnt tool calls; the grammar makes it write one the parser returns as tool_calls."""
    client = demo[2]
    kw = {"model": "demo", "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice, "max_tokens": 120}
    r = client.chat.completions.create(**kw, temperature=temperature, seed=2)  # type: ignore[call-overload]
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls or []) == 1
    _check_tool_call(msg.tool_calls[0])  # type: ignore[index]
    if isinstance(choice, dict):
        assert msg.tool_calls[0].function.name == "get_weather"  # type: ignore[index, union-attr]
    chunks = list(client.chat.completions.create(**kw, temperature=temperature, seed=2, stream=True))  # type: ignore[call-overload]
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    # incremental: the first delta has the id and name, then fragments of the arguments as they are generated
    first = deltas[0]
    assert first.id and first.function.name == msg.tool_calls[0].function.name and not first.function.arguments  # type: ignore[index, union-attr]
    assert len(deltas) > 3 and all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])  # type: ignore[union-attr]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    arguments = "".join(d.function.arguments or "" for d in deltas)  # type: ignore[union-attr]
    assert json.loads(arguments) == json.loads(msg.tool_calls[0].function.arguments)  # type: ignore[index, union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_anthropic_tool_choice_any_and_tool(demo):
    import anthropic  # here, not at the top: ~2 s of import that every xdist worker would pay to collect

    http = demo[1]
    client = anthropic.Anthropic(base_url="http://testserver", api_key="x", http_client=http, max_retries=0)
    tools = [
        {"name": t["function"]["name"], "input_schema": t["function"]["parameters"]}
        for t in TOOLS  # type: ignore[index]
    ]
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_time"}):
        r = client.messages.create(
            model="demo",
            max_tokens=120,
            messages=[{"role": "user", "content": "What time is it?"}],
            tools=tools,  # type: ignore[arg-type]
            tool_choice=choice,  # type: ignore[arg-type]
        )
        uses = [b for b in r.content if b.type == "tool_use"]
        assert r.stop_reason == "tool_use" and len(uses) == 1
        schema = next(t["input_schema"] for t in tools if t["name"] == uses[0].name)
        jsonschema.validate(uses[0].input, schema)
        if choice["type"] == "tool":
            assert uses[0].name == "get_time"
    # streamed: the tool_use block starts once the name is generated, then its input arrives in fragments
    with client.messages.stream(
        model="demo",
        max_tokens=120,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=tools,  # type: ignore[arg-type]
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    fragments = [e for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(fragments) > 3 and final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather" and json.loads("".join(f.delta.partial_json for f in fragments)) == use.input  # type: ignore[union-attr]
    jsonschema.validate(use.input, TOOLS[0]["function"]["parameters"])  # type: ignore[index]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    srv = ServerProc(DEMO_MODEL_DIR, tmp_path_factory.mktemp("serve") / "server.log", "--max-batch", "4", nodes=2)
    yield srv
    srv.stop()


@pytest.mark.multirank
def test_structured_output_on_two_ranks(demo_server):
    """The mask is computed on rank 0 before sampling; the other ranks follow with the sampled tokens."""
    client = demo_server.client()
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 11, "n": 3}):
        for schema in (SCHEMA, NESTED):
            r = client.chat.completions.create(
                model="tiny",
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=200,
                response_format=_schema_format(schema),  # type: ignore[arg-type]
                **sampling,
            )
            for choice in r.choices:
                assert choice.finish_reason == "stop"
                jsonschema.validate(json.loads(choice.message.content or ""), schema)
    r = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=120,
        temperature=1.0,
        seed=4,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    _check_tool_call(r.choices[0].message.tool_calls[0])  # type: ignore[index]
    bad = demo_server.post(
        "/v1/chat/completions",
        {"model": "tiny", "messages": MESSAGES, "response_format": _schema_format({"type": "frob"})},
    )
    assert bad.status_code == 400 and "frob" in bad.json()["error"]["message"]


@pytest.fixture(autouse=True)
def _threads():
    """One thread (overrides conftest's 2): a model of 4M parameters gains nothing from a second one, and on a
    busy machine a second thread spinning in the OpenMP barrier makes each step many times slower."""
    torch.set_num_threads(1)
