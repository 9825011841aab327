"""The OpenAI-compatible HTTP app on rank 0, over the continuous-batching Scheduler.

The scheduler runs in its own thread; a handler submits a Request and reads that request's events
from an asyncio queue the scheduler fills through loop.call_soon_threadsafe. Every wait is bounded:
a handler polls the scheduler's health while it waits, so a dead or stalled rank ends it with 503.
A client that goes away has its sequence cancelled (its cache slot is freed before the next step).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from moecluster.engine.batching import Event, QueueFull, Request, Scheduler, Unavailable
from moecluster.engine.sampling import SamplingParams
from moecluster.errors import MoeClusterError
from moecluster.server import anthropic, chat_page
from moecluster.server import protocol as P
from moecluster.server import structured as S
from moecluster.server import tools as T
from moecluster.server.metrics import CONTENT_TYPE, Metrics

POLL_S = 0.5  # how often a waiting handler checks the scheduler's health and its client
MAX_BODY_BYTES = 8 << 20
BODY_TIMEOUT_S = 30.0  # a request body must arrive within this (slow clients hold a connection)
LOCAL_HOSTS = ("localhost", "localhost.localdomain", "ip6-localhost")  # plus every IP literal
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ENDPOINTS = (
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/cluster",
    "/health",
    "/metrics",
    "/",
)


class _CountRequests:
    """ASGI middleware: count every response by endpoint and status (streams included)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            endpoint = next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")
            self.metrics.observe_request(endpoint, status[0])


def host_allowed(host_header: str, allowed: Iterable[str]) -> bool:
    """DNS rebinding: a browser sends the attacker's domain name as Host, so refuse names that are not
    ours. IP literals and localhost names are always fine; `allowed` adds names ("*" allows any)."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    names = {h.lower() for h in allowed}
    return "*" in names or host in LOCAL_HOSTS or host in names or host.rstrip(".") in names


class _CheckHost:
    """ASGI middleware: 421 for a Host header that is not this server's (DNS rebinding)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if not host_allowed(host, self.allowed):
                body = json.dumps(
                    P.error_body(
                        f"Host {host[:100]!r} is not served here; start the server with --allowed-host NAME to "
                        "accept it",
                        code="host_not_allowed",
                    )
                ).encode()
                await send(
                    {"type": "http.response.start", "status": 421, "headers": [(b"content-type", b"application/json")]}
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class _Generation:
    """One request's link to the scheduler: submit, read events (bounded waits), cancel."""

    def __init__(self, scheduler: Scheduler, prompt_ids: list[int], params: SamplingParams):
        self.scheduler = scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.request = Request(prompt_ids, params, self._emit)
        self.finished = False
        self.choices_left = params.n  # the request ends when each of its n choices has ended
        self.started, self.first_at, self.last_at = time.monotonic(), 0.0, 0.0
        self.tokens, self.reasons = 0, []  # for the request's log line

    def _emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    def submit(self) -> None:
        try:
            self.scheduler.submit(self.request)
        except QueueFull as e:
            raise P.ApiError(
                429,
                f"the server is busy: {e}",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from None
        except Unavailable as e:
            raise _unavailable(str(e)) from None
        except MoeClusterError as e:
            raise P.ApiError(400, str(e), param="n") from None

    def cancel(self) -> None:
        if not self.finished:
            self.scheduler.cancel(self.request)

    def log(self, rid: str, status: int) -> None:
        """The request's one log line: tokens, time to first token, decode speed, finish reasons, HTTP status."""
        n = self.request.params.n
        ttft = f"{self.first_at - self.started:.3f}s" if self.first_at else "-"
        span = self.last_at - self.first_at
        decode = f"{(self.tokens - n) / span:.1f}" if self.tokens > n and span > 0 else "-"
        print(
            f"moecluster: request {rid} status={status} prompt_tokens={len(self.request.prompt_ids)} "
            f"completion_tokens={self.tokens} ttft={ttft} decode_tok_s={decode} "
            f"finish={','.join(self.reasons) or '-'}",
            file=sys.stderr,
            flush=True,
        )

    async def events(self, http: HttpRequest | None = None) -> AsyncIterator[Event]:
        """Events until the last one; an error event if the scheduler fails or stalls meanwhile."""
        while not self.finished:
            try:
                event = await asyncio.wait_for(self.queue.get(), POLL_S)
            except TimeoutError:
                ok, reason = self.scheduler.health()
                if not ok:
                    self.cancel()
                    self.finished = True
                    yield Event(finish_reason="error", error=reason)
                elif http is not None and await http.is_disconnected():
                    self.cancel()
                    self.finished = True
                continue
            if event.token is not None:
                self.last_at = time.monotonic()
                self.first_at = self.first_at or self.last_at
                self.tokens += 1
            if event.finish_reason is not None:
                self.choices_left -= 1
                self.reasons.append(event.finish_reason)
            self.finished = self.choices_left == 0 or event.finish_reason in ("error", "cancelled")
            yield event


def _unavailable(reason: str) -> P.ApiError:
    return P.ApiError(
        503,
        f"the cluster cannot serve requests: {reason}",
        type="service_unavailable_error",
        code="cluster_unavailable",
    )


def _failed(event: Event) -> P.ApiError:
    """503 when the cluster failed; 500 naming the cause when only this request did."""
    if event.status == 503:
        return _unavailable(event.error or "unknown error")
    return P.ApiError(event.status, f"this request failed: {event.error}", type="server_error", code="request_failed")


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _read_body(http: HttpRequest) -> bytes:
    """The body, refused with 413 as soon as Content-Length or the bytes received pass MAX_BODY_BYTES."""
    too_big = P.ApiError(413, f"the request body exceeds {MAX_BODY_BYTES >> 20} MiB")
    media_type = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":  # also: a web page cannot send this cross-origin without a preflight
        raise P.ApiError(
            415, f"the request body must be JSON with 'Content-Type: application/json' (got {media_type[:60]!r})"
        )
    length = http.headers.get("content-length")
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise P.ApiError(400, f"invalid Content-Length header {length[:40]!r}")
        if int(length) > MAX_BODY_BYTES:
            raise too_big
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in http.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_big
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except TimeoutError:
        raise P.ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    return b"".join(chunks)


class Server:
    """Request handling shared by the endpoints (validation, prompt encoding, response shapes)."""

    def __init__(self, scheduler: Scheduler, model_name: str, api_key: str | None, metrics: Metrics):
        self.scheduler, self.engine = scheduler, scheduler.engine
        self.model_name, self.api_key, self.metrics = model_name, api_key, metrics
        self.created = int(time.time())

    def check_auth(self, http: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = http.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise P.ApiError(
                401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key"
            )

    async def read(self, http: HttpRequest, model: type[P.RequestT]) -> P.RequestT:
        self.check_auth(http)
        req = P.parse(model, P.decode_json(await _read_body(http)))
        if req.ignored_fields():  # as vLLM: accepted, ignored, named once in the log
            print(
                f"moecluster: {http.url.path}: ignoring request fields {req.ignored_fields()}",
                file=sys.stderr,
                flush=True,
            )
        if req.model != self.model_name:
            raise P.ApiError(
                404,
                f"the model {req.model!r} does not exist; this server serves {self.model_name!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return req

    def prompt_ids(self, prompt) -> list[int]:
        """A completion prompt: text or token ids; one prompt per request."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise P.ApiError(400, f"got {len(prompt)} prompts; send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt)
        vocab = self.engine.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise P.ApiError(400, f"prompt token ids {bad[:3]} are outside the vocabulary of {vocab}", param="prompt")
        return list(prompt)

    def chat_ids(self, req: P.ChatRequest, tool_plan: T.ToolPlan | None = None) -> list[int]:
        messages = [
            T.template_message(
                {
                    **(m.model_extra or {}),
                    "role": m.role,
                    "content": m.text(i)
                    if m.content is not None or not (m.model_extra or {}).get("tool_calls")
                    else None,
                },
                i,
            )
            for i, m in enumerate(req.messages)
        ]
        return self.template_ids(messages, req.tools, tool_plan)

    def template_ids(self, messages: list[dict], tools: list | None, tool_plan: T.ToolPlan | None) -> list[int]:
        """The prompt: messages (and tools) through the chat template, plus a tool call's opening if planned."""
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, tools=tools or None)
        except MoeClusterError as e:
            raise P.ApiError(400, str(e), param="messages") from None
        return self.engine.tokenizer.encode(text + (tool_plan.prefix if tool_plan else ""))

    def params(self, req, max_tokens: int | None, prompt_len: int, default: int | None) -> SamplingParams:
        """SamplingParams; 400 if the prompt plus max_tokens does not fit in the context."""
        ctx = self.engine.max_seq_len
        if prompt_len == 0:
            raise P.ApiError(400, "the prompt is empty; give at least one token", param="prompt")
        if prompt_len >= ctx or (max_tokens is not None and prompt_len + max_tokens > ctx):
            raise P.ApiError(
                400,
                f"this model's maximum context length is {ctx} tokens, but the prompt has "
                f"{prompt_len} tokens and max_tokens is {max_tokens}; shorten the prompt or "
                "lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(default or ctx, ctx - prompt_len)
        vocab = self.engine.vocab_size
        bias = req.logit_bias_ids()
        if any(t >= vocab for t in bias):
            raise P.ApiError(
                400,
                f"logit_bias token ids {[t for t in bias if t >= vocab][:3]} are outside the vocabulary of {vocab}",
                param="logit_bias",
            )
        if isinstance(req, P.ChatRequest):
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
        else:
            logprobs = req.logprobs
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=req.min_p,
            seed=req.seed,
            stop=req.stop_list(),
            ignore_eos=req.ignore_eos,
            n=req.n,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            logit_bias=bias,
            logprobs=logprobs,
        )
        try:
            return params.validate()
        except MoeClusterError as e:
            raise P.ApiError(400, str(e)) from None

    async def run(self, http: HttpRequest, req, prompt_ids: list[int], params: SamplingParams, chat: bool):
        gen = _Generation(self.scheduler, prompt_ids, params)
        gen.submit()
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self._stream(gen, rid, chat, include_usage)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        n = params.n
        parts: list[list[str]] = [[] for _ in range(n)]
        samples: list[list] = [[] for _ in range(n)]
        finals: list[Event | None] = [None] * n
        status = 500
        try:
            async for event in gen.events(http):
                if event.finish_reason in ("error", "cancelled"):
                    finals = [event]
                    break
                parts[event.index].append(event.text)
                if event.sample is not None:
                    samples[event.index].append(event.sample)
                if event.finish_reason is not None:
                    finals[event.index] = event
            if any(f is None or f.finish_reason in ("cancelled", None) for f in finals):
                status = 499
                return Response(status_code=499)  # the client went away; nobody reads this
            if finals[0] is not None and finals[0].finish_reason == "error":
                error = _failed(finals[0])
                status = error.status
                raise error
            status = 200
        finally:
            gen.cancel()
            gen.log(rid, status)
        use = P.usage(
            finals[0].prompt_tokens if finals[0] else 0,
            sum(f.completion_tokens for f in finals if f),
            finals[0].cached_tokens if finals[0] else 0,
        )
        choices = []
        for i, last in enumerate(finals):
            assert last is not None
            text, lps = "".join(parts[i]), self._logprobs(samples[i], chat) if params.logprobs is not None else None
            body = (
                P.chat_body(rid, self.model_name, text, last.finish_reason, use, index=i, logprobs=lps)
                if chat
                else P.completion_body(rid, self.model_name, text, last.finish_reason, use, index=i, logprobs=lps)
            )
            choices.extend(body["choices"])
        body["choices"] = choices
        return JSONResponse(body)

    def token_text(self, token: int) -> str:
        return self.engine.tokenizer.tok.decode([token], skip_special_tokens=False)

    def _logprobs(self, samples: list, chat: bool, offset: int = 0) -> dict:
        return (
            P.chat_logprobs(samples, self.token_text)
            if chat
            else P.completion_logprobs(samples, self.token_text, offset)
        )

    async def _stream(self, gen: _Generation, rid: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created, name, n = int(time.time()), self.model_name, gen.request.params.n
        want_lps = gen.request.params.logprobs is not None
        offsets, completion_tokens = [0] * n, 0
        status = 499  # until the stream ends (else the client went away)
        try:
            if chat:
                for i in range(n):
                    yield _sse(
                        P.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None, None, created, index=i)
                    )
            async for ev in gen.events():
                if ev.finish_reason == "error":
                    status = _failed(ev).status
                    yield _sse(_failed(ev).body())
                    return
                if ev.finish_reason == "cancelled":
                    return
                if ev.finish_reason:
                    completion_tokens += ev.completion_tokens
                last = gen.finished
                use = (
                    P.usage(ev.prompt_tokens, completion_tokens, ev.cached_tokens)
                    if last and not include_usage
                    else None
                )
                samples = [ev.sample] if want_lps and ev.sample is not None else []
                if ev.text or ev.finish_reason or samples:
                    lps = self._logprobs(samples, chat, offsets[ev.index]) if samples else None
                    offsets[ev.index] += sum(len(self.token_text(s.token)) for s in samples)
                    if chat:
                        delta = {"content": ev.text} if ev.text else {}
                        yield _sse(
                            P.chat_chunk(rid, name, delta, ev.finish_reason, use, created, index=ev.index, logprobs=lps)
                        )
                    else:
                        yield _sse(
                            P.completion_body(
                                rid,
                                name,
                                ev.text,
                                ev.finish_reason,
                                use,
                                created,
                                chunk=True,
                                index=ev.index,
                                logprobs=lps,
                            )
                        )
                if last and include_usage:
                    use = P.usage(ev.prompt_tokens, completion_tokens, ev.cached_tokens)
                    yield _sse(
                        P.chat_chunk(rid, name, {}, None, use, created, with_choice=False)
                        if chat
                        else {**P.completion_body(rid, name, "", None, use, created), "choices": []}
                    )
            status = 200
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()  # no-op when finished; else the client went away
            gen.log(rid, status)


def create_app(
    scheduler: Scheduler,
    model_name: str,
    api_key: str | None = None,
    metrics: Metrics | None = None,
    *,
    allowed_hosts: Iterable[str] = (),
    cors_origins: Iterable[str] = (),
    open_status: bool = True,
) -> FastAPI:
    """The FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics.

    allowed_hosts: Host names accepted besides IP literals and localhost; cors_origins: browser
    origins allowed to call the API (none: no CORS headers); open_status: /health and /metrics
    without the API key (the CLI sets it for loopback binds only)."""
    metrics = metrics or Metrics(scheduler.engine)
    srv = Server(scheduler, model_name, api_key, metrics)
    app = FastAPI(title="moecluster", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.add_middleware(_CountRequests, metrics=metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(_CheckHost, allowed=tuple(allowed_hosts))  # outermost: before anything else
    _add_error_handlers(app)
    app.openapi = lambda: app.openapi_schema or P.openapi_schema(app, model_name)  # pyright: ignore[reportAttributeAccessIssue]

    @app.get("/v1/models")
    async def list_models(http: HttpRequest):
        srv.check_auth(http)
        return {"object": "list", "data": [P.model_card(model_name, srv.created, srv.engine.max_seq_len)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, http: HttpRequest):
        srv.check_auth(http)
        if model != model_name:
            raise P.ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        return P.model_card(model_name, srv.created, srv.engine.max_seq_len)

    @app.post("/v1/completions", openapi_extra=P.request_body("CompletionRequest"))
    async def completions(http: HttpRequest):
        req = await srv.read(http, P.CompletionRequest)
        ids = srv.prompt_ids(req.prompt)
        params = srv.params(req, req.max_tokens, len(ids), COMPLETION_DEFAULT_MAX_TOKENS)
        S.constrain(srv, params, S.response_format_grammar(req.response_format))
        return await srv.run(http, req, ids, params, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=P.request_body("ChatRequest"))
    async def chat_completions(http: HttpRequest):
        req = await srv.read(http, P.ChatRequest)
        tool_plan = T.plan(srv.engine.tokenizer, T.check_tools(req.tools), *T.check_choice(req.tool_choice, req.tools))
        ids = srv.chat_ids(req, tool_plan)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = srv.params(req, max_tokens, len(ids), None)
        forced = tool_plan.grammar if tool_plan is not None else None  # a forced tool call wins over response_format
        S.constrain(srv, params, forced or S.response_format_grammar(req.response_format), "tools" if forced else None)
        if tool_plan is not None and tool_plan.parse_calls:
            return await T.respond(srv, http, req, ids, params, tool_plan)
        return await srv.run(http, req, ids, params, chat=True)

    anthropic.mount(app, srv)  # POST /v1/messages

    def info() -> dict:  # the placement and world size as they are now (they change when the cluster re-forms)
        placement, members = metrics.placement, metrics.members
        world_size = placement.world_size if placement is not None else scheduler.engine.world_size
        members = members if members is not None and len(members) == world_size else None
        return chat_page.cluster_info(scheduler.engine, placement, world_size, members)

    chat_page.mount(app, srv, info)  # GET /: the web chat page; GET /v1/cluster: its side panel

    @app.get("/health")
    async def health(http: HttpRequest):
        if not open_status:
            srv.check_auth(http)
        ok, reason = scheduler.health()
        running, waiting = scheduler.load()
        body = {
            "status": ("degraded" if reason.startswith("degraded") else "ok") if ok else "unavailable",
            "reason": reason,
            "model": model_name,
            "world_size": scheduler.engine.world_size,
            "running": running,
            "waiting": waiting,
        }
        if not ok:
            body.update(_unavailable(reason).body())
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(http: HttpRequest):
        if not open_status:
            srv.check_auth(http)
        ok, _ = scheduler.health()
        return Response(metrics.render(*scheduler.load(), ok), media_type=CONTENT_TYPE)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, including routing errors and bugs, answers with an OpenAI error body."""

    @app.exception_handler(P.ApiError)
    async def api_error(http: HttpRequest, exc: P.ApiError):
        if exc.status < 500 and http.method == "POST":  # the request's log line (generations log their own)
            print(
                f"moecluster: request - {http.url.path} status={exc.status} param={exc.param} "
                f"error={exc.message[:160]!r}",
                file=sys.stderr,
                flush=True,
            )
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http: HttpRequest, exc: StarletteHTTPException):
        message = f"{http.method} {http.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message = f"no such endpoint {http.url.path}; see /v1/models, /v1/completions, /v1/chat/completions"
        return JSONResponse(P.error_body(message), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        return JSONResponse(P.error_body(f"internal error: {exc!r}", type="server_error"), status_code=500)
