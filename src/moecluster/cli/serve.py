"""`moecluster serve`: an OpenAI-compatible server; rank 0 serves HTTP, every rank steps in lockstep."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
from pathlib import Path

from moecluster.cli.cluster import add_cluster_args, add_engine_arg, add_quant_args, quant_options, run_on_rank
from moecluster.errors import MoeClusterError

FAILED_LINGER_S = 30.0  # after a rank fails, keep answering 503 (and /health) this long, then exit


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching, expert parallel)")
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $MOECLUSTER_API_KEY, else no key; "
        "prefer the variable or --api-key-file: a command line is visible to every user)",
    )
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="accept this Host name (repeatable; IP addresses and localhost always; '*': any)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. https://app.example) call the API; default: none",
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together in one step")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    p.add_argument(
        "--prefix-cache-gb",
        type=float,
        default=0.0,
        help="keep the KV of prompt prefixes (64-token blocks, LRU) in up to this much memory (default off)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        metavar="N",
        help="prefill long prompts N positions per step, decoding running streams between chunks "
        "(a multiple of 64; 0: whole prompts at once; default 128)",
    )
    p.add_argument(
        "--no-batch-invariance",
        action="store_true",
        help="batched decode attention over all rows at once: faster at large batches, but a request's tokens "
        "may then depend on the other requests in its batch",
    )
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 unless the checkpoint is fp32"
    )
    p.add_argument("--max-seq-len", type=int, default=None, help="context per sequence (default: the model's)")
    add_quant_args(p)
    p.add_argument("--no-check-weights", action="store_true", help="skip the NaN/Inf scan of the weights while loading")
    add_engine_arg(p)
    add_cluster_args(p)
    p.add_argument(
        "--restart",
        type=int,
        default=0,
        metavar="N",
        help="supervise the whole job: when it fails, start it again (backoff 1, 2, 4 ... 30 s), at most N times",
    )
    p.set_defaults(func=run_serve, timeout=20.0)  # a dead rank fails requests within 30 s


def resolve_api_key(args) -> None:
    """args.api_key from --api-key, --api-key-file or $MOECLUSTER_API_KEY (in that order)."""
    if args.api_key is None and args.api_key_file is not None:
        try:
            args.api_key = Path(args.api_key_file).read_text().splitlines()[0].strip() or ""
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise MoeClusterError(f"cannot read --api-key-file {args.api_key_file!r} ({e})") from None
    if args.api_key is None:
        args.api_key = os.environ.get("MOECLUSTER_API_KEY")


def without_api_key(argv: list[str]) -> list[str]:
    """The command line without --api-key/--api-key-file and their values (ranks get the key by env)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--api-key", "--api-key-file"):
            skip = True
        elif not a.startswith(("--api-key=", "--api-key-file=")):
            out.append(a)
    return out


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def check_args(args) -> None:
    resolve_api_key(args)
    problems = []
    if args.nodes < 1:
        problems.append(f"--nodes must be at least 1, got {args.nodes}")
    if not 0 < args.port < 65536:
        problems.append(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        problems.append(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_queue < 0:
        problems.append(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.prefix_cache_gb <= 1024:
        problems.append(f"--prefix-cache-gb must be in [0, 1024], got {args.prefix_cache_gb}")
    if args.prefill_chunk is not None and (args.prefill_chunk < 0 or args.prefill_chunk % 64):
        problems.append(f"--prefill-chunk must be 0 or a multiple of 64, got {args.prefill_chunk}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        problems.append(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if args.restart < 0:
        problems.append(f"--restart must be >= 0, got {args.restart}")
    if args.timeout <= 0:
        problems.append(f"--timeout must be positive, got {args.timeout}")
    if args.api_key is not None and not args.api_key.strip():
        problems.append("--api-key is empty")
    if problems:
        raise MoeClusterError("; ".join(problems))
    if not Path(args.model).is_dir():
        raise MoeClusterError(f"model directory {args.model!r} does not exist; pass --model DIR with a HF checkpoint")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a busy port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MoeClusterError(f"--host {host!r} is not an address of this machine ({e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise MoeClusterError(
            f"cannot listen on {host}:{port} ({e.strerror}); is another server running? pass --port with a free port"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_serve(args) -> int:
    check_args(args)
    from moecluster.cli.supervise import SUPERVISED_ENV, supervise, without_restart

    if args.restart and not args.rank_worker and not os.environ.get(SUPERVISED_ENV):
        bind(args.host, args.port).close()  # a busy port fails now, not at every restart
        cmd = [sys.executable, "-m", "moecluster.cli", *without_restart(without_api_key(args.argv))]
        return supervise(cmd, args.restart, {"MOECLUSTER_API_KEY": args.api_key} if args.api_key is not None else None)
    if args.engine == "mlx":
        return _serve_mlx(args)
    if args.nodes > 1 and not args.rank_worker:
        bind(args.host, args.port).close()  # fail now, not after every rank has loaded the model
        from moecluster.distributed.launch import launch_local

        cmd = [sys.executable, "-m", "moecluster.cli", *without_api_key(args.argv), "--rank-worker"]
        env = {"MOECLUSTER_API_KEY": args.api_key} if args.api_key is not None else None  # never in argv
        # A dead rank must not end the job (MPI: keep_survivors): rank 0 answers 503 until it exits,
        # FAILED_LINGER_S after noticing; the launcher kills ranks still running this long after one died.
        return launch_local(
            cmd, args.nodes, args.backend, timeout_s=args.timeout + FAILED_LINGER_S + 10, keep_survivors=True, env=env
        )
    return run_on_rank(args, lambda comm: _serve_on_rank(args, comm))


def _serve_on_rank(args, comm) -> int:
    from moecluster.engine.batching import worker_loop
    from moecluster.runtime import load_summary, open_engine

    rank = comm.rank if comm is not None else 0
    sock = bind(args.host, args.port) if rank == 0 else None
    if rank == 0:
        import uvicorn  # noqa: F401 - import before loading so that a missing extra fails fast

        from moecluster.server.app import create_app  # noqa: F401
    _check_memory(args, comm)
    if args.no_batch_invariance:
        from moecluster.models import invariance

        invariance.set_enabled(False)  # on every rank: each runs the same forwards
    engine, placement = open_engine(
        args.model,
        args.dtype,
        comm,
        args.placement,
        num_slots=args.max_batch,
        max_seq_len=args.max_seq_len,
        exchange=args.exchange,
        quant=quant_options(args),
        check_weights=not args.no_check_weights,
    )
    if (summary := load_summary(engine)) and (rank == 0 or engine.world_size > 1):
        print(summary, file=sys.stderr, flush=True)
    survival = None
    if args.backend == "torch":  # keep serving on the surviving ranks (MPI cannot shrink a communicator)
        from moecluster.distributed.reform import supports_reform
        from moecluster.engine.survive import Survival

        survival = Survival(engine, placement) if supports_reform(comm) and placement is not None else None
    if rank != 0:
        worker_loop(engine, comm, survival.recover if survival is not None else None)
        return 0
    assert sock is not None  # bound above on rank 0
    return _serve_http(args, engine, placement, sock, survival)


def _check_memory(args, comm) -> None:
    """Refuse before loading when this rank's weights + KV cache exceed the machine's MemAvailable."""
    from moecluster.engine.capacity import check_fits, serving_memory

    quant = quant_options(args)
    need = serving_memory(
        args.model,
        args.dtype,
        args.max_batch,
        args.max_seq_len,
        comm.world_size if comm is not None else 1,
        comm.rank if comm is not None else 0,
        args.placement,
        quant.fmt if quant is not None else None,
        quant.dense if quant is not None else None,
    )
    check_fits(need, rank=comm.rank if comm is not None else 0)


def _serve_mlx(args) -> int:
    """`serve --engine mlx`: the same scheduler and server over the MLX engine (engines/mlx)."""
    from moecluster.engines.mlx.run import check_mlx_args, open_mlx_comm, relaunch_mlx

    check_mlx_args(args)
    if args.nodes > 1 and not args.rank_worker:
        bind(args.host, args.port).close()
        env = {"MOECLUSTER_API_KEY": args.api_key} if args.api_key is not None else None
        return relaunch_mlx(args, without_api_key(args.argv), env, linger_s=FAILED_LINGER_S + 10, keep=True)
    from moecluster.engine.batching import worker_loop
    from moecluster.engines.mlx.generate import MlxEngine

    comm = open_mlx_comm(args, keep_rank0=True)
    try:
        sock = bind(args.host, args.port) if comm.rank == 0 else None
        engine = MlxEngine(
            args.model,
            args.dtype,
            comm,
            args.placement,
            args.max_batch,
            args.max_seq_len,
            quantize=args.quantize,
            quant_group_size=args.quant_group_size,
        )
        if sock is None:
            worker_loop(engine, comm)
            return 0
        return _serve_http(args, engine, engine.placement, sock, failure=comm.failure)
    finally:
        comm.close()


def _watch_failure(scheduler, failure) -> None:
    """Poll failure() (the MLX watchdog's message) and fail the scheduler with it: a collective may block."""

    def watch() -> None:
        while scheduler.failed_reason is None:
            reason = failure()
            if reason:
                scheduler.fail(reason)
                return
            time.sleep(0.1)

    threading.Thread(target=watch, name="moecluster-failure-watch", daemon=True).start()


def _serve_http(args, engine, placement, sock: socket.socket, survival=None, failure=None) -> int:
    import uvicorn

    from moecluster.engine.batching import Scheduler
    from moecluster.engine.chunked_prefill import DEFAULT_PREFILL_CHUNK
    from moecluster.server.app import create_app
    from moecluster.server.metrics import Metrics
    from moecluster.tracing import TRACER

    TRACER.reset(enabled=True)  # per-layer exchange times for /metrics (the scheduler keeps no history)
    metrics = Metrics(engine, placement, engine.world_size)
    scheduler = Scheduler(
        engine,
        args.max_batch,
        args.max_queue,
        observer=metrics,
        prefix_cache_bytes=int(args.prefix_cache_gb * 2**30),
        prefill_chunk=DEFAULT_PREFILL_CHUNK if args.prefill_chunk is None else args.prefill_chunk,
    )
    if survival is not None:
        scheduler.recover, scheduler.degraded = survival.recover, survival.degraded
        survival.on_reform = metrics.set_placement  # /metrics and /v1/cluster show the survivors' placement
    name = args.model_name or Path(args.model).resolve().name
    from moecluster.server.connections import KEEP_ALIVE_S, ReapingH11Protocol

    # /health and /metrics stay open on loopback binds (local probes); elsewhere they need the key
    app = create_app(
        scheduler,
        name,
        args.api_key,
        metrics,
        allowed_hosts=args.allowed_host,
        cors_origins=args.cors_origin,
        open_status=is_loopback(args.host),
    )
    if args.api_key is None and not is_loopback(args.host):
        print(
            f"moecluster: warning: serving on {args.host} without an API key: anyone who can reach this "
            "address can use the model (set MOECLUSTER_API_KEY or --api-key-file)",
            file=sys.stderr,
        )
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="off",
        http=ReapingH11Protocol,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=64 * 1024,
    )
    server = uvicorn.Server(config)

    def exit_later(reason: str) -> None:
        timer = threading.Timer(FAILED_LINGER_S, lambda: setattr(server, "should_exit", True))
        timer.daemon = True
        timer.start()

    scheduler.on_failure = exit_later
    scheduler.start()
    if failure is not None:
        _watch_failure(scheduler, failure)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"moecluster: serving {name!r} on http://{host}:{args.port}/v1 ({engine.world_size} rank"
        f"{'s' if engine.world_size > 1 else ''}, batch {args.max_batch}, context {engine.max_seq_len})",
        file=sys.stderr,
        flush=True,
    )
    print(
        f"moecluster: KV cache: {engine.kv_cache_bytes() / 2**30:.3f} GiB reserved per rank "
        f"({args.max_batch} slots x {engine.max_seq_len} positions)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
    if scheduler.failed_reason is not None:
        raise MoeClusterError(f"serving stopped: {scheduler.failed_reason}")
    return 0
