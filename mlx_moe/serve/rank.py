"""The program each rank of `mlx-moe serve` runs: load the shard, then
follow the engine loop; rank 0 also serves HTTP."""

import argparse
import sys
import threading

import mlx.core as mx

from ..loader import load_sharded, log
from .engine import Engine


def context_length(model, override=None) -> int:
    if override:
        return override
    args = getattr(model, "args", None)
    return int(getattr(args, "max_position_embeddings", None) or 4096)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_moe.serve.rank")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--max-collective-bytes", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None)
    args = p.parse_args(argv)

    group = mx.distributed.init()
    model, tokenizer = load_sharded(args.model, group, args.strategy,
                                    max_collective_bytes=args.max_collective_bytes)
    engine = Engine(model, tokenizer, group)
    if group.rank() == 0:
        import uvicorn

        from .app import create_app

        plan = str(model.sharding_plan)
        print(plan, file=sys.stderr, flush=True)
        app = create_app(engine, args.model, context_length(model, args.max_context), plan)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        log(f"[rank 0] serving {args.model} on http://{args.host}:{args.port}/v1 ({group.size()} ranks)")
    engine.run()


if __name__ == "__main__":
    main()
