"""Continuous batching over Engine.step, in lockstep on every rank.

Rank 0's Scheduler decides everything: which waiting request joins (its prompt is prefilled in its
own cache slot), which rows decode, what each row samples and when it stops. Before every forward it
broadcasts ONE typed JSON message (never pickle), and every rank runs the same forward on it:

    {"op": "step", "admit": [{"slot": 3, "prompt_ids": [..], "copies": [4, 5]}], "tokens": [..], "slots": [..],
     "pos": [..]}
    {"op": "ping"}      # idle heartbeat, followed by a barrier (a dead or stalled rank is noticed)
    {"op": "shutdown"}

A decode step is one forward over all active rows, so each expert's weights are read once per step
for the whole batch. Requests join and leave between steps. A request for n choices is prefilled once
and its cache slot copied to n - 1 more ("copies"). With prefix caching an admit may also carry "prefix":
[entry, L] (restore positions [0, L) and prefill the rest), "store": [entry, L] and "evict": [entries].
An admit's "prompt_ids" start at position "pos" (default 0); with chunked prefill (prefill_chunk > 0) a long
prompt comes in several steps' admits, all but the last "partial" (no logits: its rows do not decode yet), so
running streams decode between the chunks.
Shape legend: B batch rows, T tokens, V vocab.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moecluster.distributed.comm import CommError
from moecluster.engine.chunked_prefill import PrefillState
from moecluster.engine.generate import TextTracker
from moecluster.engine.interface import ServingEngine
from moecluster.engine.prefix_cache import BLOCK, PrefixIndex, PrefixStore, attention_caches
from moecluster.engine.sampling import Sample, Sampler, SamplingParams
from moecluster.engine.step_guard import run_guarded
from moecluster.errors import MoeClusterError
from moecluster.tracing import TRACER, now

HEARTBEAT_S = 1.0  # idle ranks hear from rank 0 at least this often (well inside any comm timeout)
STALL_S = 300.0  # no step finished for this long: report the scheduler as stalled (bounds every wait)


class QueueFull(MoeClusterError):
    """Every slot is busy and the waiting queue is full: retry later."""


class Unavailable(MoeClusterError):
    """The scheduler has failed (e.g. a rank died) or is shutting down."""


@dataclass
class Event:
    """What the scheduler tells a request: a token and its text delta; the last one has finish_reason."""

    text: str = ""
    token: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last event
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # with finish_reason "error": what went wrong
    status: int = 503  # with an error: 503 when the cluster failed, 500 when only this request did
    index: int = 0  # which of the request's n choices
    cached_tokens: int = 0  # on the last event: prompt tokens restored from the prefix cache
    sample: Sample | None = None  # with params.logprobs: the token's log-probability and the top ones


@dataclass
class Request:
    """One sequence to generate. `emit` is called from the scheduler thread: it must be quick and thread-safe."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False
    submitted_at: float = field(default_factory=now)


class StepObserver:
    """Receives per-step and per-token measurements from the scheduler thread (metrics, benchmarks)."""

    def on_step(self, kind: str, num_rows: int, seconds: float, bytes_read: int, trace: dict | None) -> None:
        pass

    def on_token(self, first: bool, seconds: float) -> None:
        """first: time to first token since submission; else the gap since the previous token."""

    def on_finish(self, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        pass


@dataclass
class _Sequence:
    request: Request
    slot: int
    max_new: int
    tracker: TextTracker
    sampler: Sampler
    index: int = 0
    cached_tokens: int = 0
    pos: int = 0  # cache position of next_token
    next_token: int = -1
    generated: int = 0
    last_token_at: float = 0.0
    history: list[int] = field(default_factory=list)  # tokens sampled so far (a re-formed cluster re-prefills them)


@dataclass
class StepOutput:
    prefill_logits: list[torch.Tensor | None]  # one logits_V per admitted request (None: a partial chunk)
    decode_logits_BV: torch.Tensor | None
    prefill_seconds: list[float] = field(default_factory=list)
    prefill_traces: list[dict | None] = field(default_factory=list)
    decode_seconds: float = 0.0
    decode_trace: dict | None = None
    decode_bytes: int = 0  # weight bytes this rank read in the decode forward
    errors: dict[int, str] = field(default_factory=dict)  # cache slot -> why its forward failed (step_guard)


def execute_step(engine: ServingEngine, msg: dict) -> StepOutput:
    """Run one step message on this rank: each admitted prompt's prefill (or chunk of it), then one decode forward."""
    out = StepOutput([], None)
    for adm in msg["admit"]:
        ids, start = adm["prompt_ids"], adm.get("pos", 0)
        t0 = now()
        if "prefix" in adm:
            _prefix_store(engine).restore(adm["prefix"][0], adm["slot"], adm["prefix"][1])
        TRACER.begin_step("prefill", len(ids))
        logits_V: torch.Tensor | None = None
        rings = None  # sliding-window rings as they were after exactly the stored prefix's positions
        # forwards of BLOCK positions aligned to 0 (start is 0, a prefix length or a chunk end: multiples of BLOCK):
        # the same forwards with or without a restored prefix or chunking, so neither changes a bit of the output
        for chunk in range(start, start + len(ids), BLOCK):
            if "store" in adm and chunk == adm["store"][1]:
                rings = _prefix_store(engine).snapshot_rings(adm["slot"])
            logits_V = engine.step(
                torch.tensor([ids[chunk - start : chunk - start + BLOCK]]),
                torch.tensor([chunk]),
                torch.tensor([adm["slot"]]),
            )[0]
        out.prefill_logits.append(None if adm.get("partial") else logits_V)
        if "store" in adm:
            store = _prefix_store(engine)
            store.evict(adm.get("evict", []))
            store.save(adm["store"][0], adm["slot"], adm["store"][1], rings)
        out.prefill_seconds.append(now() - t0)
        out.prefill_traces.append(_take_trace())
        if adm.get("copies"):
            engine.copy_slot(adm["slot"], adm["copies"])
    if msg["slots"]:
        t0 = now()
        TRACER.begin_step("decode", len(msg["slots"]))
        out.decode_logits_BV = engine.step(
            torch.tensor(msg["tokens"])[:, None], torch.tensor(msg["pos"]), torch.tensor(msg["slots"])
        )
        out.decode_seconds = now() - t0
        out.decode_bytes = engine.dense_bytes + engine.expert_bytes_last_step()
        out.decode_trace = _take_trace()
    return out


def _prefix_store(engine: ServingEngine) -> PrefixStore:
    store = getattr(engine, "prefix_store", None)
    if store is None:
        store = PrefixStore(engine.model)
        engine.prefix_store = store  # pyright: ignore[reportAttributeAccessIssue]
    return store


def _caches(model) -> list[torch.nn.Module]:
    """Every layer's KV cache module (whatever its kind: KVCache, SlidingKVCache, LatentCache...), once each."""
    return attention_caches(model)


def copy_slot(model, src: int, dsts: list[int]) -> None:
    """Copy cache slot src to slots dsts in every layer's cache (the n choices of one prompt share its prefill)."""
    for cache in _caches(model):
        for buf in cache.buffers():
            buf[dsts] = buf[src].clone()  # the source is a view of the same storage


def kv_cache_bytes(model) -> int:
    """Bytes this rank reserved for its KV caches (every rank holds the same: attention is replicated)."""
    return sum(buf.nbytes for cache in _caches(model) for buf in cache.buffers())


def _take_trace() -> dict | None:
    """End the tracer's step and hand it over; the tracer keeps no history (a server runs for days)."""
    TRACER.end_step()
    if not TRACER.steps:
        return None
    record = TRACER.steps.pop()
    TRACER.steps.clear()
    return record


def worker_loop(engine: ServingEngine, comm, recover: Callable[[BaseException], bool] | None = None) -> None:
    """Ranks other than 0: receive rank 0's message, run the same forward, until shutdown.
    recover(exc): after a CommError, True if the cluster re-formed (engine.comm is the new comm)."""
    while True:
        try:
            msg = json.loads(comm.broadcast_bytes(None, src=0).decode())
            if _worker_step(engine, comm, msg):
                return
        except CommError as e:
            if recover is None or not recover(e):
                raise
            comm = engine.comm


def _worker_step(engine: ServingEngine, comm, msg: dict) -> bool:
    """Run one message; True on shutdown."""
    op = msg.get("op")
    if op == "shutdown":
        return True
    if op == "ping":
        comm.barrier()
    elif op == "step":
        run_guarded(execute_step, engine, msg)  # a failing request fails on rank 0 only, in step
    else:
        raise MoeClusterError(f"rank {comm.rank}: unknown message {op!r} from rank 0 (version mismatch?)")
    return False


def _describe(exc: Exception) -> str:
    """An error's message for a client: ours as is, anything else with its type (a bug, so logged)."""
    if isinstance(exc, MoeClusterError):
        return str(exc)
    traceback.print_exception(exc)
    return f"internal error: {exc!r}"


class Scheduler:
    """Rank 0: admits, batches, samples and finishes requests; runs in its own thread (`start`)."""

    def __init__(
        self,
        engine: ServingEngine,
        max_batch: int = 8,
        max_queue: int = 64,
        observer: StepObserver | None = None,
        on_failure: Callable[[str], None] | None = None,
        prefix_cache_bytes: int = 0,
        prefill_chunk: int = 0,
    ):
        if not 1 <= max_batch <= engine.num_slots:
            raise MoeClusterError(
                f"max batch {max_batch} must be between 1 and the engine's {engine.num_slots} cache slots"
            )
        if max_queue < 0:
            raise MoeClusterError(f"the queue length must be >= 0, got {max_queue}")
        if prefill_chunk < 0 or prefill_chunk % BLOCK:
            raise MoeClusterError(f"the prefill chunk must be 0 (off) or a multiple of {BLOCK}, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self._prefill: PrefillState | None = None  # the prompt being prefilled chunk by chunk
        self.engine, self.comm = engine, engine.comm
        self.max_batch, self.max_queue = max_batch, max_queue
        self.observer = observer or StepObserver()
        self.on_failure = on_failure
        self.recover: Callable[[BaseException], bool] | None = None  # see engine/survive.py
        self.degraded: Callable[[], str | None] = lambda: None  # what /health reports while healthy
        self._prefix_bytes = prefix_cache_bytes
        self.prefix = PrefixIndex(engine.model, prefix_cache_bytes)
        engine.prefix_store = None  # pyright: ignore[reportAttributeAccessIssue] - entries of an earlier scheduler
        if prefix_cache_bytes > 0 and not self.prefix.enabled:
            print(
                "moecluster: prefix caching is off: this model has attention caches it cannot save",
                file=sys.stderr,
                flush=True,
            )
        self.failed_reason: str | None = None
        self.last_progress = now()
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._waiting: deque[Request] = deque()
        self._active: dict[int, _Sequence] = {}
        self._free = list(range(max_batch - 1, -1, -1))
        self._num_in_system = 0  # submitted and not finished (under _cond)
        self._stopping = False
        self._last_collective = now()
        self._thread: threading.Thread | None = None

    # ---- called from other threads ----
    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull past max_batch + max_queue, Unavailable after a failure."""
        with self._cond:
            if self.failed_reason is not None:
                raise Unavailable(self.failed_reason)
            if self._stopping:
                raise Unavailable("the server is shutting down")
            n = request.params.n
            if n > self.max_batch:
                raise MoeClusterError(f"n = {n} choices exceed the {self.max_batch} sequences that run at once")
            if self._num_in_system + n > self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} sequences are running and {self.max_queue} are waiting; retry later")
            self._num_in_system += n
            self._inbox.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (e.g. its client went away); its slot is freed before the next step."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        with self._cond:
            running = len(self._active)
            return running, self._num_in_system - running

    def health(self) -> tuple[bool, str]:
        """(healthy, reason): a failed collective, a dead scheduler thread or no progress for STALL_S."""
        if self.failed_reason is not None:
            return False, self.failed_reason
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            return False, "the scheduler thread stopped"
        idle_for = now() - self.last_progress
        if idle_for > STALL_S:
            return False, f"no step finished for {idle_for:.0f} s: a rank or the scheduler is stalled"
        return True, self.degraded() or "ok"

    def fail(self, reason: str) -> None:
        """From another thread, when a rank is known lost (the MLX watchdog): fail every request, refuse new ones."""
        if self.failed_reason is None:
            self._fail(MoeClusterError(reason))

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="moecluster-scheduler", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish: fail what is left, tell the other ranks to shut down, join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ---- the scheduler thread ----
    def run(self) -> None:
        resume = False
        while True:
            try:
                if resume:
                    self._resume()
                self._serve()
                return
            except BaseException as e:  # noqa: BLE001 - any failure must reach every waiting client
                try:
                    resume = self.recover is not None and self.recover(e)
                except BaseException as why:  # noqa: BLE001 - it could not: that is the failure to report
                    e, resume = why, False
                if not resume:
                    self._fail(e)
                    return
                self.comm = self.engine.comm

    def _resume(self) -> None:
        """After the cluster re-formed: prefill every running sequence again from its prompt and the tokens it
        sampled (all but the last, which the next decode feeds); a sequence never prefilled samples its first."""
        self.prefix = PrefixIndex(self.engine.model, self._prefix_bytes)  # entries may be half-written
        self._prefill = None  # a prompt under chunked prefill is prefilled whole below, with the others
        seqs = sorted(self._active.values(), key=lambda s: s.slot)
        if not seqs:
            return
        admit = [{"slot": s.slot, "prompt_ids": s.request.prompt_ids + s.history[:-1]} for s in seqs]
        msg = {"op": "step", "admit": admit, "tokens": [], "slots": [], "pos": []}
        self._broadcast(msg)
        out = run_guarded(execute_step, self.engine, msg)
        for seq, logits_V in zip(seqs, out.prefill_logits):
            if seq.slot in out.errors:
                self._release(seq, "error", Event(error=out.errors[seq.slot], status=500))
            elif not seq.history and logits_V is not None:  # resumed prompts are prefilled whole (never partial)
                self._advance_or_fail(seq, logits_V)
        self.last_progress = self._last_collective = now()

    def _serve(self) -> None:
        while self._next_batch():
            msg = self._plan()
            if msg is None:
                self._heartbeat()
                continue
            self._broadcast(msg)
            out = run_guarded(execute_step, self.engine, msg)
            self._finish_step(msg, out)
        self._fail_all("the server is shutting down")
        self._broadcast({"op": "shutdown"})

    def _next_batch(self) -> bool:
        """Move new requests in (waiting briefly when idle); False when stopping."""
        with self._cond:
            if not (self._inbox or self._waiting or self._active or self._stopping):
                self._cond.wait(max(0.0, HEARTBEAT_S - (now() - self._last_collective)))
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            return not self._stopping

    def _plan(self) -> dict | None:
        """Drop cancelled sequences, admit at most one waiting request, list the decode rows."""
        for seq in [s for s in self._active.values() if s.request.cancelled]:
            self._release(seq, "cancelled")
        for req in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(req)
            self._done_waiting(req, Event(finish_reason="cancelled"))
        if self._prefill is not None and self._prefill.slots[0] not in self._active:
            self._prefill = None  # cancelled or failed between its chunks
        prefilling = set(self._prefill.slots) if self._prefill is not None else set()
        rows = sorted((s for s in self._active.values() if s.slot not in prefilling), key=lambda s: s.slot)
        if self._prefill is None and self._waiting and len(self._free) >= self._waiting[0].params.n:
            req = self._waiting.popleft()
            seqs = self._new_sequences(req, [self._free.pop() for _ in range(req.params.n)])
            with self._cond:
                self._active.update((s.slot, s) for s in seqs)
            if seqs:
                hit = self.prefix.lookup(req.prompt_ids)
                for s in seqs:
                    s.cached_tokens = hit[1] if hit else 0
                self._prefill = PrefillState([s.slot for s in seqs], req.prompt_ids, hit)
        admit = []
        if self._prefill is not None:
            admit = [self._prefill.next_admit(self.prefill_chunk)]
            if not admit[0].get("partial"):  # store with the last chunk: a prompt cancelled earlier stores nothing
                admit[0] |= self._store_plan(self._prefill.ids, self._prefill.hit)
                self._prefill = None
        if not admit and not rows:
            return None
        return {
            "op": "step",
            "admit": admit,
            "tokens": [s.next_token for s in rows],
            "slots": [s.slot for s in rows],
            "pos": [s.pos for s in rows],
        }

    def _store_plan(self, ids: list[int], hit: tuple[int, int] | None) -> dict:
        """The admit fields of prefix caching that store this prompt's prefix: what to store and evict."""
        out: dict = {}
        new = self.prefix.plan_store(ids, hit[1] if hit else 0)
        if new is not None:
            out["store"], out["evict"] = [new[0], new[1]], new[2]
        return out

    def _new_sequences(self, req: Request, slots: list[int]) -> list[_Sequence]:
        """The n sequences of an admitted request; none (request failed, slots kept free) if it cannot start."""
        try:
            max_new = min(req.params.max_tokens, self.engine.max_seq_len - len(req.prompt_ids))
            return [
                _Sequence(
                    req,
                    slot,
                    max_new,
                    TextTracker(self.engine.tokenizer, req.params),
                    Sampler(req.params, req.prompt_ids, i),
                    pos=len(req.prompt_ids),
                    index=i,
                )
                for i, slot in enumerate(slots)
            ]
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
            self._free.extend(slots)
            self._done_waiting(req, Event(finish_reason="error", error=_describe(e), status=500))
            return []

    def _finish_step(self, msg: dict, out: StepOutput) -> None:
        """Sample every row, emit its text, finish the sequences that stopped."""
        for slot, error in out.errors.items():  # their forward failed: these requests only
            if slot in self._active:
                self._release(self._active[slot], "error", Event(error=error, status=500))
        for adm, logits_V, sec, trace in zip(msg["admit"], out.prefill_logits, out.prefill_seconds, out.prefill_traces):
            self.observer.on_step("prefill", 1, sec, 0, trace)
            if logits_V is None:  # a partial chunk: nothing to sample yet
                continue
            for slot in [adm["slot"], *adm.get("copies", [])]:
                if slot in self._active:  # a failed choice may have failed the others
                    self._advance_or_fail(self._active[slot], logits_V)
        if out.decode_logits_BV is not None:
            for slot, logits_V in zip(msg["slots"], out.decode_logits_BV):
                seq = self._active.get(slot)
                if seq is None:  # failed earlier in this step
                    continue
                seq.pos += 1
                self._advance_or_fail(seq, logits_V)
            self.observer.on_step("decode", len(msg["slots"]), out.decode_seconds, out.decode_bytes, out.decode_trace)
        self.last_progress = self._last_collective = now()

    def _advance_or_fail(self, seq: _Sequence, logits_V: torch.Tensor) -> None:
        """Sample one row; a failure (NaN logits, a detokenizer error...) ends this request only."""
        try:
            self._advance(seq, logits_V)
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the others
            if seq.slot in self._active:
                self._release(seq, "error", Event(error=_describe(e), status=500))

    def _advance(self, seq: _Sequence, logits_V: torch.Tensor) -> None:
        sample = seq.sampler.sample(logits_V)
        token = sample.token
        seq.generated += 1
        t = now()
        first = seq.generated == 1
        self.observer.on_token(first, t - (seq.request.submitted_at if first else seq.last_token_at))
        seq.last_token_at, seq.next_token = t, token
        seq.history.append(token)
        text, stopped = seq.tracker.push(token)
        complete = not stopped and seq.sampler.finished  # structured output: the grammar allows nothing more
        reason = "stop" if stopped or complete else "length" if seq.generated >= seq.max_new else None
        if reason == "length" or complete:
            text += seq.tracker.flush()
        if reason is None:
            self._emit(
                seq.request,
                Event(
                    text,
                    token,
                    completion_tokens=seq.generated,
                    prompt_tokens=len(seq.request.prompt_ids),
                    index=seq.index,
                    sample=sample,
                ),
            )
        else:
            self._release(seq, reason, Event(text, token, sample=sample))

    def _release(self, seq: _Sequence, reason: str, last: Event | None = None) -> None:
        """Finish a sequence: free its slot, send its last event."""
        with self._cond:
            del self._active[seq.slot]
            self._num_in_system -= 1
        self._free.append(seq.slot)
        event = last or Event()
        event.finish_reason = reason
        event.prompt_tokens, event.completion_tokens = len(seq.request.prompt_ids), seq.generated
        event.index, event.cached_tokens = seq.index, seq.cached_tokens
        self.observer.on_finish(event.prompt_tokens, event.completion_tokens, reason)
        self._emit(seq.request, event)

    def _done_waiting(self, req: Request, event: Event) -> None:
        with self._cond:
            self._num_in_system -= req.params.n
        event.prompt_tokens = len(req.prompt_ids)
        self._emit(req, event)

    def _emit(self, req: Request, event: Event) -> None:
        try:
            req.emit(event)
        except Exception as e:  # noqa: BLE001 - a broken client callback must not stop the batch
            print(f"moecluster: dropping an event for request {req.request_id}: {e!r}", file=sys.stderr)

    def _broadcast(self, msg: dict) -> None:
        if self.comm is not None and self.comm.world_size > 1:
            self.comm.broadcast_bytes(json.dumps(msg, separators=(",", ":")).encode(), src=0)
        self._last_collective = now()

    def _heartbeat(self) -> None:
        """Idle: keep the other ranks' waits short and notice a dead or stalled rank."""
        if now() - self._last_collective >= HEARTBEAT_S:
            if self.comm is not None and self.comm.world_size > 1:
                self._broadcast({"op": "ping"})
                self.comm.barrier()
            self._last_collective = now()
        self.last_progress = now()

    def _fail_all(self, reason: str) -> None:
        with self._cond:
            pending = self._inbox + list(self._waiting)
            self._inbox.clear()
            self._waiting.clear()
        for req in pending:
            self._done_waiting(req, Event(finish_reason="error", error=reason))
        for seq in list(self._active.values()):
            self._release(seq, "error", Event(error=reason))

    def _fail(self, exc: BaseException) -> None:
        """A collective failed (a rank died or stalled) or a bug: fail every request, refuse new ones."""
        if isinstance(exc, MoeClusterError):
            reason = str(exc)
        else:
            traceback.print_exc()
            reason = f"internal error in the scheduler: {exc!r}"
        if self.comm is not None:
            self.comm.mark_failed()  # never wait for the other ranks at exit
        with self._cond:
            self.failed_reason = reason
        print(f"moecluster: serving stopped: {reason}", file=sys.stderr, flush=True)
        self._fail_all(reason)
        if self.on_failure is not None:
            self.on_failure(reason)
