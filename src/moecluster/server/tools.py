"""Tool calling for /v1/chat/completions (and /v1/messages): request checks, messages as chat templates
want them, and the model's output split into content and OpenAI `tool_calls`, whole or streamed.

Tools reach the model only through its own chat template (apply_chat_template(tools=...)), and calls are
parsed in the format that template teaches (tool_parsers.detect_format). tool_choice "required" or a named
function appends the opening of a call to the prompt (tool_parsers.call_prefix), so the model continues
inside one, and constrained decoding (server/structured.py) forces the rest to be one well-formed call whose
arguments match the tool's parameters.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moecluster.server import protocol as P
from moecluster.server.tool_parsers import (
    START_MARKERS,
    Parsed,
    ToolCall,
    call_parts,
    call_prefix,
    detect_format,
    parse,
)

if TYPE_CHECKING:
    from moecluster.engine.batching import Event
    from moecluster.tokenizer import Tokenizer

MAX_TOOLS = 128


@dataclass
class ToolPlan:
    """How one request's output is read: the call format, the call opening added to the prompt, and
    whether calls are parsed at all (not for tool_choice "none")."""

    fmt: str
    prefix: str = ""
    parse_calls: bool = True
    grammar: str | None = None  # tool_choice "required" / named: the rest of the call, enforced by decoding
    heads: dict[str, str] | None = None  # with a grammar: each possible call's text before its arguments...
    tail: str = ""  # ...and after them (what follows the prompt's prefix; see ArgumentStream)


def check_tools(tools: list[Any] | None, param: str = "tools") -> list[dict] | None:
    """OpenAI tool definitions: {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if tools is None:
        return None
    if len(tools) > MAX_TOOLS:
        raise P.ApiError(400, f"at most {MAX_TOOLS} tools per request", param=param)
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise P.ApiError(
                400, f'{param}[{i}] must be {{"type": "function", "function": {{...}}}}', param=f"{param}[{i}]"
            )
        if not isinstance(fn.get("name"), str) or not fn["name"] or len(fn["name"]) > 64:
            raise P.ApiError(
                400,
                f"{param}[{i}].function.name must be a string of 1 to 64 characters",
                param=f"{param}[{i}].function.name",
            )
        if not isinstance(fn.get("parameters", {}), dict):
            raise P.ApiError(
                400,
                f"{param}[{i}].function.parameters must be a JSON Schema object",
                param=f"{param}[{i}].function.parameters",
            )
    return tools


def check_choice(choice: Any, tools: list[dict] | None) -> tuple[str, str | None]:
    """tool_choice as (mode, function name): "auto" | "none" | "required" | ("named", name)."""
    if choice is None:
        return ("auto" if tools else "none"), None
    if choice in ("auto", "none", "required"):
        if choice != "none" and not tools:
            raise P.ApiError(400, f"tool_choice {choice!r} needs tools", param="tool_choice")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise P.ApiError(
            400,
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in {t["function"]["name"] for t in tools or []}:
        raise P.ApiError(400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
    return "named", name


def template_message(message: dict, index: int) -> dict:
    """An OpenAI chat message as chat templates read it: tool call arguments as objects, not JSON strings
    (transformers' convention; templates apply tojson to them), and no content key beside tool calls."""
    out = {k: v for k, v in message.items() if v is not None}
    calls = out.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls
        ):
            raise P.ApiError(
                400,
                f'messages[{index}].tool_calls must be a list of {{"id", "type": "function", '
                '"function": {"name", "arguments"}}',
                param=f"messages[{index}].tool_calls",
            )
        fixed = []
        for call in calls:
            fn = dict(call["function"])
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
                except ValueError:
                    raise P.ApiError(
                        400,
                        f"messages[{index}].tool_calls: arguments must be a JSON object",
                        param=f"messages[{index}].tool_calls",
                    ) from None
            fixed.append({**call, "function": fn})
        out["tool_calls"] = fixed
        if not out.get("content"):
            out.pop("content", None)
    return out


def plan(tokenizer: Tokenizer, tools: list[dict] | None, mode: str, name: str | None) -> ToolPlan | None:
    """The plan for a request with tools (None without); the format comes from the template in use."""
    if not tools:
        return None
    templates = tokenizer.chat_templates
    template = templates.get("tool_use") or templates.get("default") or ""
    fmt = detect_format(template)
    if mode == "none":
        return ToolPlan(fmt, parse_calls=False)
    if mode not in ("required", "named"):
        return ToolPlan(fmt)
    from moecluster.server.structured import tool_grammar

    prefix = call_prefix(fmt, template, name)
    parts = {n: call_parts(fmt, template, n) for n in ([name] if name else [t["function"]["name"] for t in tools])}
    heads = {n: head[len(prefix) :] for n, (head, _) in parts.items()}
    tail = next(iter(parts.values()))[1]
    return ToolPlan(fmt, prefix, grammar=tool_grammar(tools, fmt, template, name, prefix), heads=heads, tail=tail)


class ArgumentStream:
    """A forced call (its text fixed by the grammar up to the arguments) streamed as OpenAI deltas while it is
    generated: first {"index", "id", "type", "function": {"name", "arguments": ""}} once the name is known, then
    fragments of the arguments' JSON as they come (text that may begin the call's closing is held back)."""

    def __init__(self, tool_plan: ToolPlan):
        self.heads, self.tail, self.fmt = tool_plan.heads or {}, tool_plan.tail, tool_plan.fmt
        self.name: str | None = None
        self.start = self.sent = 0  # where the arguments begin / how far they were sent, in the generated text

    def feed(self, text: str, final: bool = False) -> list[dict]:
        """Deltas for the generated text so far (after the prompt's prefix); final: the output is complete."""
        out = []
        if self.name is None:
            self.name = next((n for n, head in self.heads.items() if text.startswith(head)), None)
            if self.name is None:
                return []
            self.start = self.sent = len(self.heads[self.name])
            fn = {"name": self.name, "arguments": ""}
            out.append({"index": 0, "id": new_call_id(self.fmt), "type": "function", "function": fn})
        end = len(text)
        if final and self.tail and text.endswith(self.tail):
            end -= len(self.tail)
        elif not final:  # hold back what may be the beginning of the tail
            end -= next((k for k in range(min(len(self.tail), end), 0, -1) if text.endswith(self.tail[:k])), 0)
        if end > self.sent:
            out.append({"index": 0, "function": {"arguments": text[self.sent : end]}})
            self.sent = end
        return out


class OutputText:
    """The generated text with the special tokens that mark tool calls kept ([TOOL_CALLS], <|channel|>...):
    events carry text decoded without special tokens, so their text is re-inserted from the token ids.
    The content before a call's start marker is released as it comes (stream()); the rest waits for finish().
    (A special token arriving while text is held back for a stop string lands before that text.)"""

    def __init__(self, tokenizer: Tokenizer, tool_plan: ToolPlan):
        self.tokenizer, self.plan = tokenizer, tool_plan
        self.text = tool_plan.prefix
        self.sent = 0  # characters of text already released as content
        # streams release content only before a start marker; harmony has none (content is a channel)
        self.marker = START_MARKERS.get(tool_plan.fmt) if tool_plan.parse_calls else None
        self.hold_all = tool_plan.parse_calls and (self.marker is None or bool(tool_plan.prefix))

    def push(self, event: Event) -> None:
        self.text += event.text
        tok = self.tokenizer
        if event.token is not None and event.token in tok.special_ids and event.token not in tok.eos_ids:
            self.text += tok.tok.id_to_token(event.token) or ""

    def stream(self) -> str:
        """Content that can be sent now."""
        if self.hold_all:
            return ""
        if self.marker is None:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out
        at = self.text.find(self.marker, self.sent)
        if at >= 0:
            self.hold_all = True
            out, self.sent = self.text[self.sent : at], at
            return out
        hold = next(
            (k for k in range(min(len(self.marker) - 1, len(self.text)), 0, -1) if self.text.endswith(self.marker[:k])),
            0,
        )  # a marker may be starting
        end = max(len(self.text) - hold, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out

    def finish(self) -> Parsed:
        return parse(self.plan.fmt, self.text) if self.plan.parse_calls else Parsed(self.text)


def new_call_id(fmt: str) -> str:
    # Mistral's templates require 9 alphanumeric characters
    return uuid.uuid4().hex[:9] if fmt == "mistral" else f"call_{uuid.uuid4().hex[:24]}"


def openai_calls(calls: list[ToolCall], fmt: str) -> list[dict]:
    return [
        {"id": new_call_id(fmt), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def _message(parsed: Parsed, fmt: str) -> tuple[dict, bool]:
    message: dict = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning is not None:
        message["reasoning_content"] = parsed.reasoning
    if parsed.calls:
        message["content"] = parsed.content.strip() or None
        message["tool_calls"] = openai_calls(parsed.calls, fmt)
    return message, bool(parsed.calls)


async def respond(srv, http, req: P.ChatRequest, ids: list[int], params, tool_plan: ToolPlan):
    """/v1/chat/completions with tools: the response or stream with `tool_calls`."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from moecluster.server.app import _failed, _Generation

    if params.n > 1:  # one OutputText per request: the choices' texts would interleave
        raise P.ApiError(400, "n > 1 is not supported together with tools; send n = 1", param="n")
    gen = _Generation(srv.scheduler, ids, params)
    gen.submit()
    rid, out = P.new_id("chatcmpl"), OutputText(srv.engine.tokenizer, tool_plan)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream(srv, gen, rid, out, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    last = None
    try:
        async for event in gen.events(http):
            out.push(event)
            last = event
    finally:
        gen.cancel()
    if last is None or last.finish_reason in ("cancelled", None):
        return Response(status_code=499)
    if last.finish_reason == "error":
        raise _failed(last)
    message, called = _message(out.finish(), tool_plan.fmt)
    body = P.chat_body(
        rid,
        srv.model_name,
        "",
        "tool_calls" if called else last.finish_reason,
        P.usage(last.prompt_tokens, last.completion_tokens),
    )
    body["choices"][0]["message"] = message
    return JSONResponse(body)


async def _stream(srv, gen, rid: str, out: OutputText, include_usage: bool) -> AsyncIterator[str]:
    from moecluster.server.app import _failed, _sse

    created, name = int(time.time()), srv.model_name

    def chunk(delta: dict, finish: str | None = None, use: dict | None = None) -> str:
        return _sse(P.chat_chunk(rid, name, delta, finish, use, created))

    args = ArgumentStream(out.plan) if out.plan.heads else None
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in gen.events():
            if ev.finish_reason == "error":
                yield _sse(_failed(ev).body())
                return
            if ev.finish_reason == "cancelled":
                return
            out.push(ev)
            if text := out.stream():
                yield chunk({"content": text})
            if args is not None:  # a forced call: its arguments stream as they are generated
                for delta in args.feed(out.text[len(out.plan.prefix) :], final=ev.finish_reason is not None):
                    yield chunk({"tool_calls": [delta]})
            if ev.finish_reason is None:
                continue
            parsed = out.finish()
            sent = out.text[: out.sent]
            rest = parsed.content[len(sent) :] if parsed.content.startswith(sent) else ""
            if parsed.calls:
                rest = rest.rstrip() if sent else rest.strip()
            if rest and (args is None or args.name is None):  # (a streamed call is no content, even cut short)
                yield chunk({"content": rest})
            if parsed.reasoning:
                yield chunk({"reasoning_content": parsed.reasoning})
            for i, call in enumerate(openai_calls(parsed.calls, out.plan.fmt) if args is None else []):
                yield chunk({"tool_calls": [{"index": i, **call}]})
            use = P.usage(ev.prompt_tokens, ev.completion_tokens)
            yield chunk({}, "tool_calls" if parsed.calls else ev.finish_reason, None if include_usage else use)
            if include_usage:
                yield _sse(P.chat_chunk(rid, name, {}, None, use, created, with_choice=False))
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()
