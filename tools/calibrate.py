"""Calibrate `mlx-moe plan`'s cost model on this machine, then check it
against the benchmark (docs/PLAN.md, "Calibration").

    python tools/calibrate.py                 # ~1-2 min
    python tools/calibrate.py --no-write      # measure and compare, leave profiles.json alone

Measures the per-op costs the model needs, in a fresh process as the
benchmark's single mode runs (both cores free) and on two local ranks
pinned to one core each, measuring at the same time, as the benchmark's
parallel modes run:
  - quantized matmul time vs bytes (4-bit, group 32, the benchmark's
    format), fitted as t = intercept + bytes / bandwidth;
  - the cost of one graph op (a chain of small elementwise ops);
  - the cost of one host sync (a tiny graph evaluated and read back);
  - on the two ranks, one small all_sum over the loopback ring.
Writes them as the `cpu-here` (one process) and `cpu-here-shared` (one of
two ranks sharing this machine) chips and the `loopback-ring` link in
mlx_moe/planner/profiles.json, then predicts the decode rows of the benchmark
(docs/bench.json) for the benchmark's own model and prints predicted vs
measured.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (out, in) of the measured weights: the benchmark's projections span these.
QMM_SHAPES = [(192, 512), (512, 512), (1024, 512), (2048, 512), (1024, 1024), (2048, 1024)]
# Benchmark mode -> (strategy, hosts): the parallel modes run 2 local ranks.
ROWS = {"single": ("single", 1), "mlx-lm tensor": ("tensor", 2), "mlx-lm pipeline": ("pipeline", 2),
        "mlx-moe expert": ("expert", 2), "mlx-moe pipeline": ("pipeline", 2)}


def _time(fn, reps=7, stat=min):
    """Seconds one call of `fn` takes: the fastest of `reps` by default,
    since other work on the machine only ever adds time."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return stat(times)


def measure(barrier=None) -> dict:
    """Per-op costs of this process. With `barrier`, ranks line up before
    each measurement so they run at the same time, and the median run is
    kept (their contention is part of the cost); alone, the fastest."""
    stat = min if barrier is None else statistics.median
    barrier = barrier or (lambda: None)
    import mlx.core as mx
    import numpy as np

    mx.random.seed(0)
    points = []
    for out_dim, in_dim in QMM_SHAPES:
        w, scales, biases = mx.quantize(mx.random.normal((out_dim, in_dim)), group_size=32, bits=4)
        x = mx.random.normal((1, in_dim))
        mx.eval(w, scales, biases, x)
        nbytes = w.nbytes + scales.nbytes + biases.nbytes

        def qmm(n=16):
            mx.eval([mx.quantized_matmul(x, w, scales, biases, group_size=32, bits=4) for _ in range(n)])

        barrier()
        points.append((nbytes, _time(qmm, stat=stat) / 16))
    slope, intercept = np.polyfit([b for b, _ in points], [t for _, t in points], 1)

    x = mx.random.normal((1, 512))
    mx.eval(x)

    def chain(n=400):
        y = x
        for _ in range(n):
            y = y * 1.0001
        mx.eval(y)

    barrier()
    op_s = _time(chain, stat=stat) / 400

    def synced(n=50):
        y = x
        for _ in range(n):
            y = y * 1.0001
            y.sum().item()  # two ops, then back to the host

    barrier()
    sync_s = _time(synced, stat=stat) / 50 - 2 * op_s

    # Attention over a float32 KV cache, the benchmark's heads: 8 query, 4 KV, 64 wide.
    kv_points = []
    q = mx.random.normal((1, 8, 1, 64))
    for tokens in (512, 4096):
        k, v = mx.random.normal((1, 4, tokens, 64)), mx.random.normal((1, 4, tokens, 64))
        mx.eval(q, k, v)

        def attend(n=16):
            mx.eval([mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125) for _ in range(n)])

        barrier()
        kv_points.append((k.nbytes + v.nbytes, _time(attend, stat=stat) / 16))
    (b0, t0), (b1, t1) = kv_points
    return {"bandwidth_GBps": 1 / slope / 1e9, "qmm_intercept_us": intercept * 1e6, "op_us": op_s * 1e6,
            "sync_us": max(sync_s, 0.0) * 1e6, "kv_bandwidth_GBps": (b1 - b0) / (t1 - t0) / 1e9,
            "qmm_points": points}


def rank_main():
    import mlx.core as mx

    from mlx_moe.cluster.cores import settle_local_rank

    group = mx.distributed.init()
    settle_local_rank(group.rank())

    def barrier():
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))

    costs = measure(barrier)
    # One all_sum of a decode step's hidden state (the benchmark's: 512 float32).
    h = mx.ones((1, 1, 512))
    mx.eval(h)

    def all_sums(n=200):
        for _ in range(n):
            mx.eval(mx.distributed.all_sum(h, group=group))

    barrier()
    costs["all_sum_us"] = _time(all_sums, reps=5, stat=statistics.median) / 200 * 1e6
    costs["segments"] = segments(group, barrier)
    costs["jitter_us"] = _fit_jitter(costs["segments"], costs["all_sum_us"] / 1e3) * 1e3
    if group.rank() == 0:
        print(json.dumps(costs))


def segments(group, barrier, shapes=((50, 1), (150, 2), (150, 6), (600, 4), (300, 12)), steps=10):
    """Decode-like segments on both ranks: `small` tiny ops and `nq`
    quantized matmuls (a layer's mix), 4 per step, each followed (or not)
    by one all_sum. Returns (compute ms per segment, extra ms its all_sum
    costs) per shape: besides its latency a collective waits for the
    slower rank, and the waiting rank's spinning slows the other."""
    import mlx.core as mx

    w, scales, biases = mx.quantize(mx.random.normal((512, 512)), group_size=32, bits=4)
    x = mx.random.normal((1, 512))
    mx.eval(w, scales, biases, x)

    def segment_ms(small, nq, collective):
        def run():
            for _ in range(steps):
                y = x
                for _ in range(4):
                    for _ in range(nq):
                        y = mx.quantized_matmul(y, w, scales, biases, group_size=32, bits=4) / 16
                    for _ in range(small):
                        y = y * 1.0001
                    if collective:
                        y = mx.distributed.all_sum(y, group=group)
                mx.eval(y)

        barrier()
        return _time(run, reps=7, stat=statistics.median) / steps / 4 * 1e3

    out = []
    for small, nq in shapes:
        alone = segment_ms(small, nq, False)
        out.append((alone, segment_ms(small, nq, True) - alone))
    return out


def _fit_jitter(points, latency_ms):
    """j in extra = latency + j * sqrt(segment), least squares (ms)."""
    num = sum((extra - latency_ms) * math.sqrt(seg) for seg, extra in points)
    return max(0.0, num / sum(seg for seg, _ in points))


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def calibrate(timeout=600):
    """(one-process costs, per-rank costs of two ranks sharing the machine)."""
    from mlx_moe.cluster.launch import run_ranks

    proc = subprocess.run([sys.executable, __file__, "--measure"], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    single = _last_json(proc.stdout)
    proc = run_ranks([__file__, "--rank"], n=2, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return single, _last_json(proc.stdout)


def write_profiles(single, shared, path):
    data = json.loads(Path(path).read_text())
    where = f"tools/calibrate.py, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores"
    memory_GB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    fit = "4-bit group-32 quantized matmul throughput (compute-bound on this CPU, not DRAM bandwidth)"
    data["chips"]["cpu-here"] = {
        "bandwidth_GBps": round(single["bandwidth_GBps"], 4), "op_us": round(single["op_us"], 3),
        "sync_us": round(single["sync_us"], 2), "kv_bandwidth_GBps": round(single["kv_bandwidth_GBps"], 3),
        "memory_GB": round(memory_GB, 1), "usable_fraction": 0.9,
        "gpu": False, "source": f"measured by {where}: one process, both cores free; bandwidth = {fit}"}
    data["chips"]["cpu-here-shared"] = {
        "bandwidth_GBps": round(shared["bandwidth_GBps"], 4), "op_us": round(shared["op_us"], 3),
        "sync_us": round(shared["sync_us"], 2), "kv_bandwidth_GBps": round(shared["kv_bandwidth_GBps"], 3),
        "memory_GB": round(memory_GB / 2, 1), "usable_fraction": 0.9,
        "gpu": False, "source": f"measured by {where}: each of two ranks pinned to one core, both busy; "
                                f"bandwidth = {fit}"}
    data["links"]["loopback-ring"] = {
        "latency_us": round(shared["all_sum_us"], 1), "bandwidth_GBps": 2.0, "allreduce": "ring",
        "jitter_us": round(shared["jitter_us"], 1),
        "source": f"measured by {where} between two pinned local ranks over the ring backend (127.0.0.1): "
                  "latency = median small all_sum alone; jitter = the extra an all_sum adds after "
                  "decode-like segments (small ops and quantized matmuls, 0.4-8 ms), fitted as "
                  "latency + jitter x sqrt(segment ms); bandwidth assumed (decode messages are 2 KB)"}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def predict(bench: dict, profiles_path) -> list:
    """Predicted vs measured decode tok/s of each benchmark row."""
    from mlx_moe.bench import MODEL
    from mlx_moe.planner.costmodel import make_report
    from mlx_moe.planner.model import Model
    from mlx_moe.planner.profiles import load_profiles, make_hosts
    from mlx_moe.checkpoints.headers import read_local
    from mlx_moe.checkpoints.synthetic import synthesize

    spec = dict(MODEL, layers=bench["model"]["layers"])
    home = Path(os.environ.get("MLX_MOE_HOME", Path.home() / ".cache" / "mlx-moe"))
    path = synthesize(home / f"bench-qwen3-moe-{spec['layers']}l", "qwen3_moe", **spec)
    model = Model.read(read_local(path))
    chips, links = load_profiles(profiles_path)
    # Decode runs after the prompt: the KV cache read is that of its middle token.
    position = bench["args"]["prompt_tokens"] + bench["args"]["decode_tokens"] // 2
    rows = []
    for mode, (strategy, n) in ROWS.items():
        if mode not in bench["table"]:
            continue
        chip = "cpu-here" if n == 1 else "cpu-here-shared"
        hosts = make_hosts(str(n), chip, None, None, chips)
        report = make_report(model, hosts, links["loopback-ring"], 4096, position)
        est = next(e for e in report.estimates if e.strategy == strategy)
        measured = bench["table"][mode]["decode_tps"]["median"]
        rows.append({"mode": mode, "predicted_tps": est.tok_s, "measured_tps": measured,
                     "error_pct": 100 * (est.tok_s - measured) / measured, "memory_ms": est.memory_s * 1e3,
                     "overhead_ms": est.overhead_s * 1e3, "comm_ms": est.comm_s * 1e3,
                     "collectives": est.collectives})
    return rows


def format_rows(rows) -> str:
    head = (f"{'mode':<18} {'predicted':>9} {'measured':>9} {'error':>7}  "
            f"{'memory ms':>9} {'overhead ms':>11} {'comm ms':>8} {'coll/tok':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['mode']:<18} {r['predicted_tps']:>9.1f} {r['measured_tps']:>9.1f} "
                     f"{r['error_pct']:>+6.1f}%  {r['memory_ms']:>9.2f} {r['overhead_ms']:>11.2f} "
                     f"{r['comm_ms']:>8.2f} {r['collectives']:>8}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default=str(ROOT / "docs" / "bench.json"), help="benchmark results to check against")
    p.add_argument("--json", default="calibration.json", help="where to write the results")
    p.add_argument("--profiles", default=str(ROOT / "mlx_moe" / "planner" / "profiles.json"))
    p.add_argument("--no-write", action="store_true", help="do not update the profiles file")
    p.add_argument("--predict-only", action="store_true",
                   help="measure nothing: predict the benchmark rows from the profiles as they are")
    args = p.parse_args()

    bench = json.loads(Path(args.bench).read_text())
    if args.predict_only:
        print(format_rows(predict(bench, args.profiles)))
        return
    t0 = time.perf_counter()
    single, shared = calibrate()
    for name, c in (("one process", single), ("each of 2 ranks", shared)):
        print(f"{name:<16} qmm {c['bandwidth_GBps']:.3f} GB/s (+{c['qmm_intercept_us']:.1f} us), "
              f"KV {c['kv_bandwidth_GBps']:.2f} GB/s, op {c['op_us']:.2f} us, host sync {c['sync_us']:.1f} us"
              + (f", all_sum {c['all_sum_us']:.0f} us + {c['jitter_us']:.0f} us x sqrt(segment ms)"
                 if "all_sum_us" in c else ""), file=sys.stderr)
    profiles = args.profiles
    if args.no_write:
        import shutil
        import tempfile

        profiles = Path(tempfile.mkdtemp()) / "profiles.json"
        shutil.copy(args.profiles, profiles)
    write_profiles(single, shared, profiles)
    rows = predict(bench, profiles)
    print(format_rows(rows))
    Path(args.json).write_text(json.dumps({"single": single, "shared": shared, "rows": rows,
                                           "bench": args.bench, "seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {args.json}" + ("" if args.no_write else f" and {args.profiles}"), file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        os.environ.setdefault("MLX_MOE_PIN_CORES", "1")
        rank_main()
    elif sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure()))
    else:
        main()
