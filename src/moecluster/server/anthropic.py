"""The Anthropic Messages API: POST /v1/messages (system, text/tool_use/tool_result blocks, tools, stop
sequences, streaming SSE events), over the same scheduler, chat template and tool parsing as
/v1/chat/completions. Errors have Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.requests import Request as HttpRequest

from moecluster.server import protocol as P
from moecluster.server import structured as S
from moecluster.server import tools as T
from moecluster.server.tool_parsers import detect_format

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


class MessagesRequest(P._Strict):  # pyright: ignore[reportPrivateUsage]
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        return []


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined (the content of system, tool_result and simple messages)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in content
    ):
        return "".join(b["text"] for b in content)
    raise P.ApiError(400, f"{where}: expected a string or text blocks")


def _messages(req: MessagesRequest) -> list[dict]:
    """Anthropic messages as OpenAI-style chat messages (what the chat template reads)."""
    out: list[dict] = [{"role": "system", "content": _text(req.system, "system")}] if req.system else []
    for i, m in enumerate(req.messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise P.ApiError(400, f'messages.{i}.role must be "user" or "assistant"')
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise P.ApiError(400, f"messages.{i}.content must be a string or a list of content blocks")
        texts, calls = [], []
        for j, b in enumerate(blocks):
            kind = b.get("type")
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind == "tool_use" and role == "assistant" and isinstance(b.get("name"), str):
                calls.append(
                    {
                        "id": str(b.get("id", "")),
                        "type": "function",
                        "function": {"name": b["name"], "arguments": b.get("input") or {}},
                    }
                )
            elif kind == "tool_result" and role == "user":
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": str(b.get("tool_use_id", "")),
                        "content": _text(b.get("content", ""), f"messages.{i}.content.{j}.content"),
                    }
                )
            else:
                raise P.ApiError(400, f"messages.{i}.content.{j}: unsupported block type {kind!r} for role {role}")
        if texts or calls:
            out.append({"role": role, "content": "".join(texts) or None, **({"tool_calls": calls} if calls else {})})
    return [T.template_message(m, i) for i, m in enumerate(out)]


def _tools(req: MessagesRequest) -> tuple[list[dict] | None, str, str | None]:
    """Anthropic tools and tool_choice as OpenAI tools and a (mode, name) pair."""
    tools = None
    if req.tools:
        tools = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "parameters": t.get("input_schema", {}),
                    **({"description": t["description"]} if "description" in t else {}),
                },
            }
            for t in req.tools
        ]
        T.check_tools(tools)
    choice = req.tool_choice or {"type": "auto"}
    mode = {"auto": "auto", "any": "required", "tool": "named", "none": "none"}.get(choice.get("type", ""))
    if mode is None:
        raise P.ApiError(400, "tool_choice.type must be auto, any, tool or none")
    if mode != "none" and not tools:
        mode = "none"
    name = choice.get("name") if mode == "named" else None
    if mode == "named" and name not in {t["function"]["name"] for t in tools or []}:
        raise P.ApiError(400, f"tool_choice names the tool {name!r}, which is not in tools")
    return tools, mode, name


def _error(exc: P.ApiError) -> JSONResponse:
    kind = ERROR_TYPES.get(exc.status, "api_error")
    return JSONResponse(
        {"type": "error", "error": {"type": kind, "message": exc.message}}, status_code=exc.status, headers=exc.headers
    )


def _event(name: str, body: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **body}, separators=(',', ':'))}\n\n"


def _blocks(parsed, fmt: str) -> list[dict]:
    blocks = [{"type": "text", "text": parsed.content.strip() if parsed.calls else parsed.content}]
    blocks = [b for b in blocks if b["text"] or not parsed.calls]
    return blocks + [
        {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": c.name, "input": json.loads(c.arguments)}
        for c in parsed.calls
    ]


class _Stop:
    """Which stop sequence ended the output (events only say "stop"): the earliest one in the full decode."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops, self.ids = tokenizer, stops, []

    def push(self, token: int | None) -> None:
        if token is not None and token not in self.tokenizer.eos_ids:
            self.ids.append(token)

    def reason(self, finish: str, called: bool) -> tuple[str, str | None]:
        if called:
            return "tool_use", None
        if finish == "stop" and self.stops:
            text = self.tokenizer.decode(self.ids)
            found = sorted((text.find(s), s) for s in self.stops if s in text)
            if found:
                return "stop_sequence", found[0][1]
        return STOP_REASONS.get(finish, "end_turn"), None


def mount(app, srv) -> None:
    """Add POST /v1/messages to the app (srv: app.Server)."""
    from moecluster.server.app import _failed, _Generation

    def check_auth(http: HttpRequest) -> None:
        key = http.headers.get("x-api-key")
        if key is None or srv.api_key is None:
            return srv.check_auth(http)
        if not hmac.compare_digest(key.encode(), srv.api_key.encode()):
            raise P.ApiError(401, "invalid x-api-key")

    async def handle(http: HttpRequest):
        check_auth(http)
        from moecluster.server.app import _read_body

        req = P.parse(MessagesRequest, P.decode_json(await _read_body(http)))  # pyright: ignore[reportArgumentType]
        if req.model != srv.model_name:
            raise P.ApiError(404, f"model: {req.model!r} does not exist; this server serves {srv.model_name!r}")
        tools, mode, name = _tools(req)
        tokenizer = srv.engine.tokenizer
        tool_plan = T.plan(tokenizer, tools, mode, name)
        ids = srv.template_ids(_messages(req), tools, tool_plan)
        # the OpenAI request fields the server's sampling reads; the Messages API has no penalties, n or logprobs
        sampling = SimpleNamespace(
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=None,
            min_p=0.0,
            n=1,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            repetition_penalty=1.0,
            logprobs=None,
            logit_bias_ids=dict,
            ignore_eos=False,
            stop_list=lambda: P.ChatRequest.stop_list(SimpleNamespace(stop=req.stop_sequences)),  # type: ignore[arg-type]
        )
        params = srv.params(sampling, req.max_tokens, len(ids), None)
        if tool_plan is not None and tool_plan.grammar is not None:  # tool_choice any / tool: a forced call
            S.constrain(srv, params, tool_plan.grammar, "tools")
        if tool_plan is None or not tool_plan.parse_calls:
            tool_plan = T.ToolPlan(detect_format(tokenizer.chat_template or ""), parse_calls=False)
        gen = _Generation(srv.scheduler, ids, params)
        gen.submit()
        out, stop = T.OutputText(tokenizer, tool_plan), _Stop(tokenizer, params.stop)
        rid = f"msg_{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "type": "message", "role": "assistant", "model": srv.model_name}
        if req.stream:
            return StreamingResponse(
                _stream(gen, out, stop, head, len(ids), _failed),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        last = None
        try:
            async for event in gen.events(http):
                out.push(event)
                stop.push(event.token)
                last = event
        finally:
            gen.cancel()
        if last is None or last.finish_reason in ("cancelled", None):
            return Response(status_code=499)
        if last.finish_reason == "error":
            raise _failed(last)
        parsed = out.finish()
        reason, seq = stop.reason(last.finish_reason, bool(parsed.calls))
        return JSONResponse(
            {
                **head,
                "content": _blocks(parsed, tool_plan.fmt),
                "stop_reason": reason,
                "stop_sequence": seq,
                "usage": {"input_tokens": last.prompt_tokens, "output_tokens": last.completion_tokens},
            }
        )

    @app.post("/v1/messages")
    async def messages(http: HttpRequest):
        try:
            return await handle(http)
        except P.ApiError as e:
            return _error(e)


async def _stream(gen, out: T.OutputText, stop: _Stop, head: dict, prompt_tokens: int, failed) -> AsyncIterator[str]:
    """message_start, a text block and tool_use blocks (start/delta/stop), message_delta, message_stop."""
    message = {
        **head,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }
    index, text_open = 0, False
    args = T.ArgumentStream(out.plan) if out.plan.heads else None  # a forced call streams as it is generated
    try:
        yield _event("message_start", {"message": message})
        async for ev in gen.events():
            if ev.finish_reason == "error":
                exc = failed(ev)
                yield _event(
                    "error", {"error": {"type": ERROR_TYPES.get(exc.status, "api_error"), "message": exc.message}}
                )
                return
            if ev.finish_reason == "cancelled":
                return
            out.push(ev)
            stop.push(ev.token)
            if args is not None:
                for delta in args.feed(out.text[len(out.plan.prefix) :], final=ev.finish_reason is not None):
                    if "id" in delta:
                        block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "input": {}}
                        block["name"] = delta["function"]["name"]
                        yield _event("content_block_start", {"index": index, "content_block": block})
                    elif delta["function"]["arguments"]:
                        partial = {"type": "input_json_delta", "partial_json": delta["function"]["arguments"]}
                        yield _event("content_block_delta", {"index": index, "delta": partial})
            pieces = [out.stream()]
            if ev.finish_reason is not None:
                parsed = out.finish()
                sent = out.text[: out.sent]
                if args is None or args.name is None:  # (a streamed call is no text, even cut short)
                    pieces.append(parsed.content[len(sent) :] if parsed.content.startswith(sent) else "")
            for piece in pieces:
                if piece:
                    if not text_open:
                        yield _event(
                            "content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}
                        )
                        text_open = True
                    yield _event(
                        "content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": piece}}
                    )
            if ev.finish_reason is None:
                continue
            if text_open or (args is not None and args.name is not None):
                yield _event("content_block_stop", {"index": index})
                index += 1
            blocks = [b for b in _blocks(parsed, out.plan.fmt) if b["type"] == "tool_use"]
            for block in blocks if args is None or args.name is None else []:
                yield _event("content_block_start", {"index": index, "content_block": {**block, "input": {}}})
                yield _event(
                    "content_block_delta",
                    {
                        "index": index,
                        "delta": {
                            "type": "input_json_delta",
                            "partial_json": json.dumps(block["input"], ensure_ascii=False),
                        },
                    },
                )
                yield _event("content_block_stop", {"index": index})
                index += 1
            reason, seq = stop.reason(ev.finish_reason, bool(blocks))
            yield _event(
                "message_delta",
                {
                    "delta": {"stop_reason": reason, "stop_sequence": seq},
                    "usage": {"output_tokens": ev.completion_tokens},
                },
            )
            yield _event("message_stop", {})
    finally:
        gen.cancel()
