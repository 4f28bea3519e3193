"""The rank program of `mlx-moe generate`: every rank loads its shard and
runs the same generation in lockstep; rank 0 prints the text as it comes."""

import argparse
import sys

from mlx_lm import stream_generate

from .parallel import comm
from .loader import load_sharded
from .cluster.failures import exit_failed
from .cluster.launch import init_world
from .parallel.placement import resolve


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mlx_moe.generate")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--max-collective-bytes", type=int, default=None)
    p.add_argument("--placement", default="contiguous")
    p.add_argument("--expert-load", default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    args = p.parse_args(argv)

    group = init_world()
    placement = resolve(args.placement, args.expert_load, group.size())
    model, tokenizer = load_sharded(args.model, group, args.strategy, placement=placement,
                                    max_collective_bytes=args.max_collective_bytes)
    rank = group.rank()
    if rank == 0:
        print(model.sharding_plan, file=sys.stderr, flush=True)
    prompt = args.prompt
    if not args.raw and tokenizer.chat_template is not None:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens):
        if rank == 0:
            print(last.text, end="", flush=True)
    # The last step may still be in flight; settle it before leaving together.
    comm.barrier(group)
    if rank == 0 and last is not None:
        print(
            f"\n[{group.size()} ranks] prompt {last.prompt_tokens} tokens at "
            f"{last.prompt_tps:.1f} tok/s, generated {last.generation_tokens} tokens at "
            f"{last.generation_tps:.1f} tok/s, peak memory {last.peak_memory:.3f} GB",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        exit_failed(e)
