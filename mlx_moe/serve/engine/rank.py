"""The program each rank of `mlx-moe serve` runs: load the shard, then
follow the engine loop. Rank 0 connects to the front process (front.py,
the `mlx-moe serve` command, which serves HTTP) and takes its jobs
(link.py).

The engine runs in a thread so the main thread stays free for signals: when
mlx.launch stops the cluster (a rank exited) or the user does, rank 0 first
ends the requests in flight and tells the front why."""

import argparse
import os
import signal
import socket
import sys
import threading
import time

from ...cluster.failures import exit_failed
from ...cluster.launch import init_world
from ...cluster.consistency import exchange
from ...cluster.cores import restore_priority
from ...cluster.memory import available_bytes
from ...loader import load_sharded, log, param_bytes
from ...parallel.placement import resolve
from ..channel import Ready
from .core import Engine
from .link import FrontLink
from .homes import ATTENTION, attention_mode

DEFAULT_PROMPT_CACHE_BYTES = 2 * 2**30  # where the free memory is not known
PEER_EXIT_WAIT = 30.0  # seconds rank 0, having lost a peer, waits for mlx.launch to stop it


def context_length(model, override=None) -> int:
    if override:
        return override
    args = getattr(model, "args", None)
    return int(getattr(args, "max_position_embeddings", None) or 4096)


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


def serve(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_moe.serve.engine.rank")
    p.add_argument("--model", required=True)
    # Where the front serves HTTP: unused here, but it tells this server's ranks apart in `ps`.
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--max-collective-bytes", type=int, default=None)
    p.add_argument("--placement", default="contiguous")
    p.add_argument("--expert-load", default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--watchdog-timeout", type=float, default=60.0)
    p.add_argument("--heartbeat", type=float, default=5.0)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--prompt-cache-bytes", type=int, default=None)
    p.add_argument("--attention", choices=ATTENTION, default="replicated")
    args = p.parse_args(argv)

    group = init_world()
    restore_priority()
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
        plan = str(model.sharding_plan)
        print(plan, file=sys.stderr, flush=True)
        hosts = [{k: r[k] for k in ("host", "pid", "memory_bytes", "memory_total_bytes")} for r in ranks]
        link = FrontLink(engine, Ready(model.sharding_plan, plan, context_length(model, args.max_context),
                                       args.heartbeat, hosts))

        def stop(reason, code=3, wait=True):
            link.failed(reason, engine.failed_elsewhere)  # the front ends the streams
            if wait and engine.failed_elsewhere:
                # Another rank failed first: mlx.launch stops this one once it
                # sees that exit (on_term). Exiting now could make this exit
                # the one the launcher reports first, naming the wrong rank.
                time.sleep(PEER_EXIT_WAIT)
            os._exit(code)

        engine.on_failure = stop

        def on_term(signum, frame):
            # mlx.launch stops the survivors when a rank exits (a rank on
            # another host by SIGHUP: its ssh session ends).
            if engine.failure:  # already stopped: waiting in stop() for this
                os._exit(128 + signum)
            engine.on_failure = lambda reason: stop(reason, 128 + signum, wait=False)
            engine.fail("the cluster is stopping (a rank exited or a stop was requested)", elsewhere=True)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, on_term)
    worker = threading.Thread(target=engine.run, daemon=True, name="engine")
    worker.start()
    while worker.is_alive():
        worker.join(0.5)


if __name__ == "__main__":
    main()
