"""The program each rank of `mlx-moe serve` runs: load the shard, then
follow the engine loop; rank 0 also serves HTTP, from before it loads (the
loading app, see loading.py) until the end.

The engine runs in a thread so the main thread stays free for signals: when
mlx.launch stops the cluster (a rank exited) or the user does, rank 0 first
ends the requests in flight with an error that says why."""

import argparse
import os
import signal
import socket
import sys
import threading
import time

from ..cluster.failures import exit_failed
from ..cluster.launch import init_world
from ..cluster.consistency import exchange
from ..cluster.cores import restore_priority
from ..cluster.memory import available_bytes
from ..loader import load_sharded, log, param_bytes
from ..parallel.placement import resolve
from .engine import Engine
from .homes import ATTENTION, attention_mode

DEFAULT_PROMPT_CACHE_BYTES = 2 * 2**30  # where the free memory is not known
FLUSH_WAIT = 5.0  # seconds it gives open responses to deliver their error
HTTP_STOP_SLACK = 1.0  # uvicorn's own steps around its graceful wait (a tick, a pause, cancelling)


def context_length(model, override=None) -> int:
    if override:
        return override
    args = getattr(model, "args", None)
    return int(getattr(args, "max_position_embeddings", None) or 4096)


def _stop_rank0(engine: Engine, http, code: int) -> None:
    """Exit once the open responses have delivered the failure, within
    FLUSH_WAIT: wait for each to take its error, then stop the HTTP server
    (`http`: uvicorn's Server and its thread) gracefully, which finishes
    writing every response and closes its connection (after the bound,
    uvicorn cancels what is left)."""
    deadline = time.monotonic() + FLUSH_WAIT
    while engine.open_responses > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    server, thread = http
    server.config.timeout_graceful_shutdown = max(0.0, deadline - time.monotonic())
    server.should_exit = True
    thread.join(server.config.timeout_graceful_shutdown + HTTP_STOP_SLACK)
    os._exit(code)


def main(argv=None):
    try:
        serve(argv)
    except Exception as e:
        exit_failed(e)


def describe_ranks(model, available, group) -> list:
    """Every rank's host and process id, the bytes its shard holds, the
    memory its host had for it (before loading) and has left: one
    all_gather, at start."""
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "memory_bytes": param_bytes(model),
            "memory_total_bytes": available, "free_bytes": available_bytes()}
    return exchange(mine, group)


def prompt_cache_bytes(asked, ranks) -> int:
    """The prefix cache's bound: asked, else a quarter of the memory left on
    the host with the least (every rank must use the same bound, or their
    caches would evict differently and reuse different prefixes)."""
    if asked is not None:
        return asked
    return min(r["free_bytes"] // 4 if r["free_bytes"] else DEFAULT_PROMPT_CACHE_BYTES for r in ranks)


def serve_http(args, size: int):
    """Start rank 0's HTTP server on the loading app; it listens before
    this returns, or this fails. Returned: the Switch to hand the real app
    to, and (uvicorn's Server, its thread) to stop it with."""
    import uvicorn

    from .loading import Loading, Switch, loading_app

    loading = loading_app(Loading(size), args.model, api_key=os.environ.get("MLX_MOE_API_KEY"),
                          control_token=os.environ.get("MLX_MOE_CONTROL_TOKEN"))
    switch = Switch(loading)
    server = uvicorn.Server(uvicorn.Config(switch, host=args.host, port=args.port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True, name="http")
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(0.05)
    if not server.started:
        raise OSError(f"rank 0 cannot serve HTTP on {args.host}:{args.port} (is the port in use?)")
    log(f"[rank 0] status page and /health on http://{args.host}:{args.port}/ while the ranks load")
    return switch, (server, thread)


def serve(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_moe.serve.rank")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--max-collective-bytes", type=int, default=None)
    p.add_argument("--placement", default="contiguous")
    p.add_argument("--expert-load", default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--watchdog-timeout", type=float, default=60.0)
    p.add_argument("--heartbeat", type=float, default=5.0)
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--prompt-cache-bytes", type=int, default=None)
    p.add_argument("--attention", choices=ATTENTION, default="replicated")
    args = p.parse_args(argv)

    group = init_world()
    restore_priority()  # before the HTTP thread starts, which keeps the priority it starts with
    switch, http = serve_http(args, group.size()) if group.rank() == 0 else (None, None)
    available = available_bytes()
    placement = resolve(args.placement, args.expert_load, group.size())
    model, tokenizer = load_sharded(args.model, group, args.strategy, placement=placement,
                                    max_collective_bytes=args.max_collective_bytes)
    ranks = describe_ranks(model, available, group)
    engine = Engine(model, tokenizer, group, heartbeat=args.heartbeat, watchdog=args.watchdog_timeout,
                    max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                    prefill_step_size=args.prefill_step_size,
                    prompt_cache_bytes=prompt_cache_bytes(args.prompt_cache_bytes, ranks),
                    attention=attention_mode(args.attention, model))
    if group.rank() == 0:
        from .app import create_app

        plan = str(model.sharding_plan)
        print(plan, file=sys.stderr, flush=True)
        hosts = [{k: r[k] for k in ("host", "pid", "memory_bytes", "memory_total_bytes")} for r in ranks]
        app = create_app(engine, args.model, context_length(model, args.max_context), plan,
                         api_key=os.environ.get("MLX_MOE_API_KEY"),
                         control_token=os.environ.get("MLX_MOE_CONTROL_TOKEN"),
                         max_body_bytes=args.max_body_bytes, cluster=lambda: hosts)
        switch.switch(app, engine.ready)  # the real app answers once the engine runs
        engine.on_failure = lambda reason: _stop_rank0(engine, http, 3)

        def on_term(signum, frame):
            # mlx.launch stops the survivors when a rank exits: end the
            # requests in flight first, naming the rank if the launcher can.
            engine.on_failure = lambda reason: _stop_rank0(engine, http, 128 + signum)
            engine.fail_with_notice("the cluster is stopping (a rank exited or a stop was requested)")

        # A rank on another host is stopped by SIGHUP: mlx.launch ends its ssh session.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_term)
        log(f"[rank 0] serving {args.model} on http://{args.host}:{args.port}/v1 ({group.size()} ranks)")
    worker = threading.Thread(target=engine.run, daemon=True, name="engine")
    worker.start()
    while worker.is_alive():
        worker.join(0.5)


if __name__ == "__main__":
    main()
