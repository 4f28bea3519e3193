"""Where a batched serving step's time goes: the engine of `mlx-moe serve`
driven in-process on local ranks (no HTTP), with every step timed.

    python tools/step_profile.py --clients 1,16 --json docs/step-profile.json

For each concurrency level, rank 0 submits that many chat requests at once
(the prompts of tools/serve_bench.py) and every rank runs the engine's own
`step` until they end. Each step is recorded on rank 0: the plan exchange,
the generator's step (decode of the running batch + one prefill chunk),
the rows decoded and the prompt tokens read. A least-squares fit of step
time = fixed + per decoded row + per prompt token says what a batch costs;
the same requests' TTFT and tok/s without HTTP say what the server adds.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from serve_bench import prompt_for  # tools/ is on the path when run as a script
from load_test import percentile

from mlx_moe.bench import MODEL
from mlx_moe.cluster.launch import run_ranks
from mlx_moe.checkpoints.synthetic import synthesize


def rank_main(spec: dict) -> None:
    import mlx.core as mx

    from mlx_moe.parallel import comm
    from mlx_moe.loader import load_sharded
    from mlx_moe.serve.channel import Job
    from mlx_moe.serve.engine.core import Engine

    group = mx.distributed.init()
    model, tokenizer = load_sharded(spec["model"], group)
    engine = Engine(model, tokenizer, group, max_concurrency=max(spec["levels"]), attention=spec["attention"])
    engine.ready.set()
    generator = engine.generator()
    live = set()
    steps, swap = [], engine.exchange.swap

    def timed_exchange(plan, tokens):
        t = time.perf_counter()
        out = swap(plan, tokens)
        steps[-1]["exchange_s"] = time.perf_counter() - t
        return out

    engine.exchange.swap = timed_exchange
    next_step = generator.next

    def timed_next():
        # Rows decoded and prompt tokens read by this call, from mlx-lm's counters.
        c = generator._counters
        before = (c.generation_tokens, c.prompt_tokens)
        t = time.perf_counter()
        out = next_step()
        steps[-1].update(next_s=time.perf_counter() - t, decoded=c.generation_tokens - before[0],
                         prompt_tokens=c.prompt_tokens - before[1])
        return out

    generator.next = timed_next
    actives, joined = [], engine.scheduler.joined

    def recorded_joined(uids, cached):  # keeps each request's state: when its first token came
        joined(uids, cached)
        actives.extend(engine.scheduler.running[u] for u in uids)

    engine.scheduler.joined = recorded_joined
    results = []
    for level in spec["levels"]:
        jobs, t0 = [], time.perf_counter()
        if group.rank() == 0:
            for c in range(level):
                record = {"first": None, "tokens": 0, "ids": []}
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt_for(c, 0, spec["words"])}], add_generation_prompt=True)

                def emit(event, record=record):  # ("token", id, finish, logprobs, cached): text is the front's
                    if event[0] == "token":
                        record["first"] = record["first"] or time.perf_counter()
                        record["tokens"] += 1
                        if event[2] != "stop":  # end-of-sequence has no text
                            record["ids"].append(event[1])
                        if event[2]:
                            record["end"] = time.perf_counter()

                jobs.append(record)
                engine.submit(Job(prompt=prompt, max_tokens=spec["max_tokens"], temperature=0.0, emit=emit))
        first_step = len(steps)
        while True:
            steps.append({"level": level, "t": time.perf_counter() - t0})
            host = time.thread_time()
            engine.step(generator, live)
            steps[-1]["step_s"] = time.perf_counter() - t0 - steps[-1]["t"]
            # This thread's CPU time: the host's work, not its waits for the computation.
            steps[-1]["host_s"] = time.thread_time() - host
            # Every rank leaves together: rank 0 says whether anything is left.
            busy = int(group.rank() == 0 and any(engine.scheduler.counts()))
            if not int(comm.all_sum(mx.array([busy]), group).item()) and not live:
                break
        comm.barrier(group)
        if group.rank() == 0:
            wall = max(r["end"] for r in jobs) - t0
            ttfts = [a.first - t0 for a in actives[-level:]]
            texts = [r["first"] - t0 for r in jobs]
            results.append({"clients": level, "wall_s": wall, "tok_s": sum(r["tokens"] for r in jobs) / wall,
                            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
                            "first_text_p50_s": percentile(texts, 50), "first_text_p99_s": percentile(texts, 99),
                            "answers": [tokenizer.decode(r["ids"]) for r in jobs], "steps": steps[first_step:]})
    engine.scheduler.stop()
    engine.step(generator, live)
    if group.rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results))


def fit(steps):
    """Least squares: step seconds = fixed + per row decoded + per prompt token."""
    rows = [s for s in steps if "next_s" in s]
    a = np.array([[1.0, s["decoded"], s["prompt_tokens"]] for s in rows])
    y = np.array([s["step_s"] for s in rows])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return dict(zip(("fixed_s", "per_row_s", "per_prompt_token_s"), coef.tolist()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--words", type=int, default=24)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--attention", default="replicated", choices=("replicated", "data-parallel", "auto"))
    p.add_argument("--model", help="a checkpoint directory instead of serve_bench's (e.g. `mlx-moe synth`'s)")
    p.add_argument("--json", default="step-profile.json")
    p.add_argument("--rank-spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_spec:
        return rank_main(json.loads(args.rank_spec))
    home = Path(os.environ.get("MLX_MOE_HOME", Path.home() / ".cache" / "mlx-moe"))
    spec = dict(MODEL, experts=args.experts, top_k=args.top_k)  # serve_bench's checkpoint
    path = args.model or synthesize(home / f"serve-bench-qwen3-moe-{args.experts}e{args.top_k}k", "qwen3_moe", **spec)
    out = Path(args.json).with_suffix(".raw.json")
    spec = {"model": str(path), "levels": [int(c) for c in args.clients.split(",")],
            "max_tokens": args.max_tokens, "words": args.words, "attention": args.attention, "out": str(out)}
    proc = run_ranks([__file__, "--rank-spec", json.dumps(spec)], n=args.ranks, timeout=3600)
    if proc.returncode != 0 or not out.exists():
        print(proc.stderr[-3000:] if not os.environ.get("FULL") else proc.stderr, file=sys.stderr)
        return 1
    results = json.loads(out.read_text())
    print("| clients | tok/s | first token p50 / p99 | first text p99 | steps | decode-only step p50 "
          "| its host time p50 | longest step with streams running |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        decode = [s for s in r["steps"] if s.get("decoded") and not s["prompt_tokens"]]
        stalls = [s["step_s"] for s in r["steps"] if s.get("decoded")]
        print(f"| {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} s "
              f"| {r['first_text_p99_s']:.2f} s | {len(r['steps'])} "
              f"| {1e3 * percentile([s['step_s'] for s in decode], 50):.1f} ms "
              f"| {1e3 * percentile([s['host_s'] for s in decode], 50):.1f} ms | {max(stalls, default=0):.2f} s |")
    cost = fit([s for r in results for s in r["steps"]])
    print(f"\nstep time = {1e3 * cost['fixed_s']:.1f} ms + {1e3 * cost['per_row_s']:.2f} ms per row decoded "
          f"+ {1e3 * cost['per_prompt_token_s']:.2f} ms per prompt token (least squares over every step)")
    results = {"fit": cost, "levels": results}
    Path(args.json).write_text(json.dumps(results, indent=1))
    out.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
