"""`mlx-moe bench`: one checkpoint, six ways to run it, one table.

Modes: a single process; mlx-lm's `sharded_load` tensor parallel and
pipeline; mlx-moe expert parallel, hybrid (tensor-parallel attention and
dense parts around expert-parallel experts) and pipeline; each parallel mode on local
ranks over ring. The modes run alternately, `--repeats` times, and the
table reports medians with min/max, so drift on a shared machine hits every
mode alike. Timing comes from mlx-lm's own `generate_step`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ["single", "mlx-lm tensor", "mlx-lm pipeline", "mlx-moe expert", "mlx-moe hybrid", "mlx-moe pipeline"]
# Expert parallel with experts placed from the loads a calibration run measured.
BALANCED = "mlx-moe expert balanced"
# A scaled-down Qwen3-30B-A3B: 64 experts, top-8, moe_intermediate = hidden / 2.67.
MODEL = dict(layers=8, hidden=512, experts=64, top_k=8, quantize=4,
             overrides={"moe_intermediate_size": 192, "num_attention_heads": 8,
                        "num_key_value_heads": 4, "head_dim": 64})


class _Counter:
    """Counts every mx.distributed call, whoever makes it (mlx-lm's
    layers or mlx-moe's comm), with the bytes of each message."""

    def __init__(self):
        import mlx.core as mx

        self.calls, self.max_bytes = 0, 0
        for name in ("all_sum", "all_gather", "send", "recv_like", "sum_scatter"):
            original = getattr(mx.distributed, name, None)
            if original is not None:
                setattr(mx.distributed, name, self._wrap(original))

    def _wrap(self, fn):
        def counted(x, *args, **kwargs):
            self.calls += 1
            self.max_bytes = max(self.max_bytes, x.nbytes)
            return fn(x, *args, **kwargs)

        return counted

    def reset(self):
        self.calls, self.max_bytes = 0, 0


def _load(mode, path, group, placement=None):
    from mlx_lm import load
    from mlx_lm.utils import sharded_load

    if mode == "single":
        return load(path)[0]
    if mode == "mlx-lm tensor":
        return sharded_load(path, tensor_group=group)[0]
    if mode == "mlx-lm pipeline":
        return sharded_load(path, pipeline_group=group)[0]
    from .loader import load_sharded

    strategy = {"mlx-moe pipeline": "pipeline", "mlx-moe hybrid": "hybrid"}.get(mode, "expert")
    return load_sharded(path, group, strategy, placement=placement)[0]


def _routed(model, before):
    """Pairs routed to each expert since `before` (expert_loads), per block,
    and the mean over blocks of the busiest rank's share (max / mean)."""
    from .parallel.expert import ExpertLoad, expert_loads
    from .parallel.placement import spread

    loads, ratios = {}, []
    for old, new in zip(before, expert_loads(model)):
        delta = ExpertLoad(new.path, [b - a for a, b in zip(old.counts, new.counts)], new.owner)
        loads[new.path] = delta.counts
        ratios.append(spread(delta.rank_totals(max(new.owner) + 1)))
    return loads, (sum(ratios) / len(ratios) if ratios else None)


def run_rank(mode: str, path: str, args) -> dict:
    """Load `path` the way `mode` does and time decode and prefill."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.generate import generate_step

    from .parallel import comm
    from .cluster.cores import settle_local_rank

    counter = _Counter()
    group = mx.distributed.init()
    # Every parallel mode gets the priority and cores mlx-moe gives its ranks.
    settle_local_rank(group.rank())
    mx.reset_peak_memory()
    model = _load(mode, path, group, getattr(args, "placement", None))
    mx.eval(model.parameters())
    params = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    load_peak = mx.get_peak_memory()
    rng = __import__("numpy").random.RandomState(getattr(args, "seed", 0))

    def timed(prompt_len, max_tokens):
        """Seconds to the first token, seconds for the rest, collective
        calls and largest message during the rest."""
        prompt = mx.array(rng.randint(0, 500, prompt_len))
        comm.barrier(group)
        t0 = time.perf_counter()
        first = None
        steps = generate_step(prompt, model, max_tokens=max_tokens)
        for n, (token, _) in enumerate(steps):
            if n == 0:
                first = time.perf_counter()
                counter.reset()
        end = time.perf_counter()
        comm.settle()
        return first - t0, end - first, counter.calls, counter.max_bytes

    from .parallel.expert import expert_loads

    timed(16, 4)  # warm up
    before = expert_loads(model)
    _, decode_s, calls, decode_max = timed(args.prompt_tokens, args.decode_tokens)
    loads, imbalance = _routed(model, before)
    before = expert_loads(model)
    prefill_s, _, _, _ = timed(args.prefill_tokens, 1)
    prefill_loads, prefill_imbalance = _routed(model, before)
    counter.reset()
    comm.barrier(group)
    steps = args.decode_tokens - 1
    return {
        "mode": mode,
        "ranks": group.size(),
        "decode_tps": steps / decode_s,
        "prefill_tps": args.prefill_tokens / prefill_s,
        "peak_memory": mx.get_peak_memory(),
        "load_peak_memory": load_peak,
        "param_bytes": params,
        # generate_step builds step n+1 before yielding n, so the count
        # over the decode covers `steps` graphs exactly.
        "collectives_per_token": calls / steps,
        "max_message_bytes": decode_max,
        # Expert-parallel modes: how evenly the decode's and the prefill's
        # pairs fell on the ranks.
        "imbalance": imbalance,
        "loads": loads,
        "prefill_imbalance": prefill_imbalance,
        "prefill_loads": prefill_loads,
    }


def _rank_main(argv):
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--mode", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--decode-tokens", type=int)
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--prefill-tokens", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--placement")
    args = p.parse_args(argv)
    r = run_rank(args.mode, args.path, args)
    import mlx.core as mx

    rank = mx.distributed.init().rank()
    Path(f"{args.out}.rank{rank}").write_text(json.dumps(r))


def _run_mode(mode, path, args, out, extra=()):
    from .cluster.launch import run_ranks

    rank_argv = ["-m", "mlx_moe.bench", "--rank", "--mode", mode, "--path", str(path), "--out", out,
                 "--decode-tokens", str(args.decode_tokens), "--prompt-tokens", str(args.prompt_tokens),
                 "--prefill-tokens", str(args.prefill_tokens), *extra]
    env = dict(os.environ, MLX_MOE_QUIET="1")
    if mode == "single":
        proc = subprocess.run([sys.executable, *rank_argv], capture_output=True, text=True,
                              timeout=args.timeout, env=env)
    else:
        proc = run_ranks(rank_argv, n=args.ranks, timeout=args.timeout, env=["MLX_MOE_QUIET=1"])
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    n = 1 if mode == "single" else args.ranks
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(n)]


def summarize(runs):
    """Per mode: medians (min, max) over repeats of rank-0 speed, the
    largest per-rank memory and bytes, and the collective counts."""
    table = {}
    for mode, reps in runs.items():
        row = {}
        for key in ("decode_tps", "prefill_tps"):
            vals = [rep[0][key] for rep in reps]
            row[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        for key in ("peak_memory", "load_peak_memory", "param_bytes", "collectives_per_token",
                    "max_message_bytes"):
            row[key] = max(r[key] for rep in reps for r in rep)
        for key in ("imbalance", "prefill_imbalance"):
            if reps[0][0].get(key) is not None:
                row[key] = statistics.median(rep[0][key] for rep in reps)
        table[mode] = row
    base = table.get("single")
    tensor = table.get("mlx-lm tensor")
    for row in table.values():
        for ref_name, ref in (("single", base), ("tensor", tensor)):
            if ref:
                for key in ("decode_tps", "prefill_tps"):
                    row[f"{key}_vs_{ref_name}"] = row[key]["median"] / ref[key]["median"]
    return table


def format_table(table) -> str:
    head = (f"{'mode':<24} {'decode tok/s':>22} {'prefill tok/s':>22} {'vs 1 proc':>9} {'vs TP':>6} "
            f"{'peak MiB':>9} {'params MiB':>10} {'coll/tok':>8} {'max msg':>8} {'imbal. d/p':>10}")
    lines = [head, "-" * len(head)]
    for mode, r in table.items():
        d, p = r["decode_tps"], r["prefill_tps"]
        lines.append(
            f"{mode:<24} {d['median']:>8.1f} ({d['min']:.1f}-{d['max']:.1f}) "
            f"{p['median']:>8.0f} ({p['min']:.0f}-{p['max']:.0f}) "
            f"{r.get('decode_tps_vs_single', 0):>9.2f} {r.get('decode_tps_vs_tensor', 0):>6.2f} "
            f"{r['peak_memory'] / 2**20:>9.1f} {r['param_bytes'] / 2**20:>10.1f} "
            f"{r['collectives_per_token']:>8.1f} {r['max_message_bytes']:>8} "
            + (f"{r['imbalance']:>5.2f}/{r['prefill_imbalance']:.2f}" if "imbalance" in r else ""))
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:  # the program each rank runs
        return _rank_main(argv[1:])
    p = argparse.ArgumentParser(prog="mlx-moe bench", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of: " + ", ".join(MODES + [BALANCED])
                        + f" ('{BALANCED}' first measures expert loads on other prompts, then places)")
    p.add_argument("--calibration-seed", type=int, default=1,
                   help=f"prompt seed of the run that measures loads for '{BALANCED}' (the timed runs "
                        "use 0: give 0 to place from the very workload that is timed)")
    p.add_argument("--router-skew", type=float, default=0.0,
                   help="make the synthetic routers favour low expert ids (e.g. 1.0) to study placement")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=MODEL["layers"])
    p.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one mode may take")
    args = p.parse_args(argv)

    from .checkpoints.synthetic import synthesize

    home = Path(os.environ.get("MLX_MOE_HOME", Path.home() / ".cache" / "mlx-moe"))
    spec = dict(MODEL, layers=args.layers)
    skew = f"-skew{args.router_skew:g}" if args.router_skew else ""
    path = synthesize(home / f"bench-qwen3-moe-{args.layers}l{skew}", "qwen3_moe",
                      router_skew=args.router_skew, **spec)
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = set(modes) - set(MODES + [BALANCED])
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {MODES + [BALANCED]}")
    runs = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        extra = {}
        if BALANCED in modes:
            from .parallel.placement import balanced, write_placement

            print("measuring expert loads for the balanced placement ...", file=sys.stderr, flush=True)
            calib = _run_mode("mlx-moe expert", path, args, f"{tmp}/calibration", ["--seed", str(args.calibration_seed)])
            # Every pair the calibration routed, as /metrics counts a served load.
            loads = {path: [a + b for a, b in zip(counts, calib[0]["prefill_loads"][path])]
                     for path, counts in calib[0]["loads"].items()}
            write_placement(balanced(loads, args.ranks), f"{tmp}/placement.json")
            extra[BALANCED] = ["--placement", f"{tmp}/placement.json"]
        for rep in range(args.repeats):
            # Alternate the order so slow drift does not favour one mode.
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                print(f"[{rep + 1}/{args.repeats}] {mode} ...", file=sys.stderr, flush=True)
                runs[mode].append(_run_mode(mode, path, args, f"{tmp}/{mode.replace(' ', '_')}-{rep}",
                                            extra.get(mode, ())))
    table = summarize(runs)
    print(format_table(table))
    result = {"model": {"arch": "qwen3_moe", **spec, "router_skew": args.router_skew, "path": str(path)},
              "args": vars(args),
              "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
              "table": table, "runs": runs}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
