"""GET /: a web chat page (static/chat.html: HTML with its script and style inline, no build step, no
external resources) that streams from /v1/chat/completions. A Content-Security-Policy allows only that
inline script and style (by hash) and requests to this server."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from functools import lru_cache
from importlib import resources

from fastapi import Request
from fastapi.responses import HTMLResponse


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@lru_cache(maxsize=1)
def page() -> tuple[str, str]:
    """(HTML, Content-Security-Policy)."""
    html = resources.files("moecluster.server").joinpath("static/chat.html").read_text(encoding="utf-8")
    scripts = " ".join(_hash(s) for s in re.findall(r"<script>(.*?)</script>", html, re.S))
    styles = " ".join(_hash(s) for s in re.findall(r"<style>(.*?)</style>", html, re.S))
    csp = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, csp


def cluster_info(engine, placement, world_size: int, members: list[int] | None = None) -> dict:
    """What the page's side panel shows of the cluster: per rank, the experts it holds (layer 0 and the count over
    all MoE layers) and the weight bytes that placement gives it (replicated weights + its experts). members: the
    launch rank of each current rank once the cluster re-formed on survivors (ranks are shown by launch number)."""
    num_layers, num_experts = engine.routing_shape()
    expert_bytes = engine.expert_bytes()
    ranks = []
    for rank in range(world_size):
        if placement is not None:
            layer0 = placement.experts_of(rank, 0)
            held = sum(len(placement.experts_of(rank, layer)) for layer in range(placement.num_layers))
        else:  # one process holds every expert
            layer0, held = list(range(num_experts)), num_layers * num_experts
        weights = engine.dense_bytes + held * expert_bytes if expert_bytes else None
        name = members[rank] if members is not None else rank
        ranks.append({"rank": name, "experts_layer0": layer0, "expert_copies": held, "weight_bytes": weights})
    return {"world_size": world_size, "moe_layers": num_layers, "ranks": ranks}


def mount(app, srv=None, info: Callable[[], dict] | None = None) -> None:
    """info(): the cluster now (cluster_info), asked at each GET /v1/cluster: it changes when the cluster re-forms."""
    if srv is not None and info is not None:

        @app.get("/v1/cluster", include_in_schema=False)
        async def cluster(http: Request):
            """The cluster as the page's side panel shows it (same API key as the rest of /v1)."""
            srv.check_auth(http)
            ok, reason = srv.scheduler.health()
            return {**info(), "health": reason if ok else f"unavailable: {reason}"}

    @app.get("/", include_in_schema=False)
    async def chat():
        html, csp = page()
        return HTMLResponse(
            html,
            headers={
                "Content-Security-Policy": csp,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache",
            },
        )
