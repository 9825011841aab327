"""The Anthropic Messages API at /v1/messages (issue 17), driven by the official `anthropic` client: against a
real `moecluster serve` on the tiny model (text, stop sequences, streaming events, errors), and tool_use
blocks from a scripted model in process (tests/test_tools.py's app)."""

from __future__ import annotations

import pytest
from test_server import KEY, ServerProc
from test_tools import QWEN3_LIKE, _use, app_client  # noqa: F401  (app_client is a fixture)


@pytest.fixture(scope="module")
def server(tiny_dbrx, tmp_path_factory):
    srv = ServerProc(tiny_dbrx, tmp_path_factory.mktemp("serve") / "server.log", nodes=1)
    yield srv
    srv.stop()


def test_messages_text_stop_and_stream(server):
    import anthropic  # here, not at the top: ~2 s of import that every xdist worker would pay to collect

    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
    r = client.messages.create(
        model="tiny",
        max_tokens=8,
        system="Be brief.",
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello world"}]}],
    )
    assert r.type == "message" and r.role == "assistant" and r.content[0].type == "text"
    assert r.stop_reason in ("max_tokens", "end_turn") and r.usage.output_tokens <= 8 and r.usage.input_tokens > 3
    text = r.content[0].text
    if r.stop_reason == "max_tokens" and len(text) > 4:  # stop at a piece of that same greedy output
        stop = text[2:4]
        s = client.messages.create(
            model="tiny",
            max_tokens=8,
            system="Be brief.",
            extra_body={"temperature": 0},
            stop_sequences=[stop],
            messages=[{"role": "user", "content": "Hello world"}],
        )
        assert (s.stop_reason, s.stop_sequence) == ("stop_sequence", stop) and s.content[0].text == text[:2]  # type: ignore[union-attr]
    with client.messages.stream(
        model="tiny",
        max_tokens=8,
        system="Be brief.",
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Hello world"}],
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text and final.stop_reason == r.stop_reason
    assert final.usage.output_tokens == r.usage.output_tokens
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-x", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "robot", "content": "hi"}])  # type: ignore[typeddict-item]
    assert err.value.body["type"] == "error" and "role" in err.value.body["error"]["message"]  # type: ignore[index]


TOOL = {"name": "f", "input_schema": {}}  # short: the tiny model's context is 256 tokens
HISTORY = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "12"}]},
]


def test_tool_use_blocks(app_client):  # noqa: F811
    import anthropic

    http, tok = app_client
    client = anthropic.Anthropic(base_url="http://testserver", api_key="x", http_client=http, max_retries=0)
    _use(tok, QWEN3_LIKE, 'Ok<tool_call>{"name":"f","arguments":{"a":1}}</tool_call>')
    r = client.messages.create(model="tiny", max_tokens=43, tools=[TOOL], messages=HISTORY)  # type: ignore[list-item]
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["text", "tool_use"]
    assert (r.content[0].text, r.content[1].name, r.content[1].input) == ("Ok", "f", {"a": 1})  # type: ignore[union-attr]
    with client.messages.stream(model="tiny", max_tokens=43, tools=[TOOL], messages=HISTORY) as stream:  # type: ignore[list-item]
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[1].input == {"a": 1}  # type: ignore[union-attr]
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
