"""The program each rank of `mlx-moe serve` runs: load the shard, then
follow the engine loop; rank 0 also serves HTTP.

The engine runs in a thread so the main thread stays free for signals: when
mlx.launch stops the cluster (a rank exited) or the user does, rank 0 first
ends the requests in flight with an error that says why."""

import argparse
import os
import signal
import sys
import threading
import time

import mlx.core as mx

from ..failures import exit_failed
from ..consistency import exchange
from ..loader import available_bytes, load_sharded, log
from ..placement import resolve
from .engine import Engine

DEFAULT_PROMPT_CACHE_BYTES = 2 * 2**30  # where the free memory is not known
FLUSH_WAIT = 5.0  # seconds it gives open responses to deliver their error


def context_length(model, override=None) -> int:
    if override:
        return override
    args = getattr(model, "args", None)
    return int(getattr(args, "max_position_embeddings", None) or 4096)


def _stop_rank0(engine: Engine, code: int) -> None:
    """Wait (bounded) for open responses to deliver the failure, then exit."""
    deadline = time.monotonic() + FLUSH_WAIT
    while engine.open_responses > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the last error chunk is on its way to the socket
    os._exit(code)


def main(argv=None):
    try:
        serve(argv)
    except Exception as e:
        exit_failed(e)


def prompt_cache_bytes(asked, group) -> int:
    """The prefix cache's bound: asked, else a quarter of the memory left on
    the host with the least (every rank must use the same bound, or their
    caches would evict differently and reuse different prefixes)."""
    if asked is not None:
        return asked
    free = available_bytes()
    return min(exchange(free // 4 if free else DEFAULT_PROMPT_CACHE_BYTES, group))


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
    args = p.parse_args(argv)

    group = mx.distributed.init()
    placement = resolve(args.placement, args.expert_load, group.size())
    model, tokenizer = load_sharded(args.model, group, args.strategy, placement=placement,
                                    max_collective_bytes=args.max_collective_bytes)
    engine = Engine(model, tokenizer, group, heartbeat=args.heartbeat, watchdog=args.watchdog_timeout,
                    max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                    prefill_step_size=args.prefill_step_size,
                    prompt_cache_bytes=prompt_cache_bytes(args.prompt_cache_bytes, group))
    if group.rank() == 0:
        import uvicorn

        from .app import create_app

        plan = str(model.sharding_plan)
        print(plan, file=sys.stderr, flush=True)
        app = create_app(engine, args.model, context_length(model, args.max_context), plan,
                         api_key=os.environ.get("MLX_MOE_API_KEY"),
                         control_token=os.environ.get("MLX_MOE_CONTROL_TOKEN"),
                         max_body_bytes=args.max_body_bytes)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True, name="http").start()
        engine.on_failure = lambda reason: _stop_rank0(engine, 3)

        def on_term(signum, frame):
            # mlx.launch stops the survivors when a rank exits: end the
            # requests in flight first, naming the rank if the launcher can.
            engine.on_failure = lambda reason: _stop_rank0(engine, 128 + signum)
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
