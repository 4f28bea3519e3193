"""Where a decode step's collective time goes on one machine: an all_sum
after a given amount of compute, ranks pinned to their own cores or not.

    python tools/ring_overhead.py            # launches 2 local ranks itself

Each step is 8 "layers" of `inner` small matmuls followed by one all_sum,
like a decode step of an 8-layer expert-parallel model. The table shows the
time per step with and without the all_sums, and the cost per collective.
"""

import json
import os
import sys
import time


def rank_main(pin: bool):
    import mlx.core as mx

    from mlx_moe.cluster.cores import pin_local_rank, release_stdin, restore_priority

    group = mx.distributed.init()
    restore_priority()
    release_stdin()
    if pin:
        pin_local_rank(group.rank())
    w = mx.random.normal((512, 512))
    x = mx.random.normal((1, 512))
    mx.eval(w, x)

    def step_ms(inner, collective, steps=60):
        mx.eval(mx.distributed.all_sum(mx.array(1.0)))
        t = time.perf_counter()
        for _ in range(steps):
            y = x
            for _ in range(8):
                for _ in range(inner):
                    y = mx.tanh(y @ w)
                if collective:
                    y = mx.distributed.all_sum(y) / 2
            mx.eval(y)
        return (time.perf_counter() - t) / steps * 1e3

    rows = []
    for inner in (0, 1, 5, 20):
        alone, with_sum = step_ms(inner, False), step_ms(inner, True)
        rows.append({"inner": inner, "compute_ms": alone, "with_all_sum_ms": with_sum,
                     "per_collective_ms": (with_sum - alone) / 8})
    if group.rank() == 0:
        print(json.dumps({"pinned": pin, "rows": rows}))


def main():
    from mlx_moe.cluster.launch import run_ranks

    print(f"{'pinned':>6} {'inner':>5} {'compute ms':>10} {'+all_sums ms':>12} {'ms/collective':>13}")
    for pin in (False, True):
        proc = run_ranks([__file__, "--rank", "1" if pin else "0"], n=2, timeout=600)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        for r in out["rows"]:
            print(f"{str(pin):>6} {r['inner']:>5} {r['compute_ms']:>10.2f} {r['with_all_sum_ms']:>12.2f} "
                  f"{r['per_collective_ms']:>13.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        os.environ["MLX_MOE_PIN_CORES"] = "1"
        rank_main(sys.argv[2] == "1")
    else:
        main()
