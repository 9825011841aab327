"""A forward that raises fails only the requests in it, never the scheduler or the cluster.

`run_guarded(execute, engine, msg)` runs one step message. If the step raises (a bad input reaching the
model, a kernel error...), it is run again piece by piece — each admitted prompt alone, then each decode
row alone — and only the pieces that raise again are failed (`StepOutput.errors`: cache slot -> cause).
Re-running a piece is harmless: a prefill or a decode writes the same cache positions again, and a
prefix-cache save/restore/evict is idempotent.

Every rank runs the same message through the same function, so an error of the replicated computation
(embedding, attention, router, lm_head; the same on every rank) is met at the same point everywhere and the
ranks stay in lockstep. An error on one rank only (e.g. inside its own experts) desynchronizes the
collectives: they time out and it is handled like a stalled rank. A CommError is never swallowed.

Shape legend: B batch rows, V vocab.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from moecluster.distributed.comm import CommError
from moecluster.errors import MoeClusterError

if TYPE_CHECKING:
    from moecluster.engine.batching import StepOutput
    from moecluster.engine.interface import ServingEngine

Execute = Callable[["ServingEngine", dict], "StepOutput"]


def describe(exc: BaseException) -> str:
    """The cause for a client: our errors as they are, anything else with its type (and a logged traceback)."""
    if isinstance(exc, MoeClusterError):
        return str(exc)
    traceback.print_exception(exc)
    return f"the forward pass failed: {exc!r}"


def run_guarded(execute: Execute, engine: ServingEngine, msg: dict) -> StepOutput:
    """execute(engine, msg), or its pieces one by one after a failure; errors: cache slot -> cause."""
    try:
        return execute(engine, msg)
    except (CommError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - one request's bad step must not stop the others
        if engine.comm is not None and engine.comm.failed:
            raise  # the comm broke underneath: a cluster failure, not this request's
        print(f"moecluster: a step failed ({e!r}); running its requests one by one", file=sys.stderr, flush=True)
    return _piecewise(execute, engine, msg)


def _piecewise(execute: Execute, engine: ServingEngine, msg: dict) -> StepOutput:
    from moecluster.engine.batching import StepOutput

    out = StepOutput([], None)
    for adm in msg["admit"]:
        slots = [adm["slot"], *adm.get("copies", [])]
        piece = _try(execute, engine, {"op": "step", "admit": [adm], "tokens": [], "slots": [], "pos": []})
        if isinstance(piece, str):
            out.errors.update(dict.fromkeys(slots, piece))
            out.prefill_logits.append(torch.zeros(0))  # never sampled: its slots fail
            out.prefill_seconds.append(0.0)
            out.prefill_traces.append(None)
        else:
            out.prefill_logits += piece.prefill_logits
            out.prefill_seconds += piece.prefill_seconds
            out.prefill_traces += piece.prefill_traces
    rows: list[torch.Tensor | None] = []
    for token, slot, pos in zip(msg["tokens"], msg["slots"], msg["pos"], strict=True):
        piece = _try(execute, engine, {"op": "step", "admit": [], "tokens": [token], "slots": [slot], "pos": [pos]})
        if isinstance(piece, str):
            out.errors[slot] = piece
            rows.append(None)
        else:
            assert piece.decode_logits_BV is not None  # one decode row was asked for
            rows.append(piece.decode_logits_BV[0])
            out.decode_seconds += piece.decode_seconds
            out.decode_bytes += piece.decode_bytes
    good = [r for r in rows if r is not None]
    if good:
        zeros_V = torch.zeros_like(good[0])
        out.decode_logits_BV = torch.stack([zeros_V if r is None else r for r in rows])
    return out


def _try(execute: Execute, engine: ServingEngine, msg: dict) -> StepOutput | str:
    try:
        return execute(engine, msg)
    except (CommError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - this piece's request fails, the rest go on
        if engine.comm is not None and engine.comm.failed:
            raise
        return describe(e)
