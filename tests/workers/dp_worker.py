"""Rank program for the data-parallel attention tests: each rank runs its
home sequences (a left-padded batch with mlx-lm's BatchKVCache, prefilled
in chunks, then greedy decode), the ranks in lockstep with every rank's
token counts known from the shared schedule; a rank with nothing to run
in a step joins it with idle_step. Writes OUT/rank<r>.json.

spec: checkpoint, homes (per rank, a list of prompts), chunk, decode_steps,
bounds (max_collective_bytes per pass, null: the default), replicated (a
prompt every rank runs in the replicated mode afterwards), kv (equal
prompts for the KV bytes comparison, an even number), sum_scatter_standin."""

import json
import sys

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

import mlx_moe
from mlx_moe.parallel import comm, data_parallel

spec = json.loads(sys.argv[1])
group = mx.distributed.init()
rank, size = group.rank(), group.size()
model, _ = mlx_moe.load_sharded(spec["checkpoint"], group, "expert")
dp = data_parallel.enable(model, group)
probe = dp.sum_scatter
if spec.get("sum_scatter_standin"):
    # Ring has no sum_scatter: the same result from all_sum stands in, so
    # the sum_scatter combine (its padded layout) runs on real ranks.
    mx.distributed.sum_scatter = lambda x, group: mx.distributed.all_sum(x, group=group).reshape(size, -1)[rank]
    dp.sum_scatter = True
moe_layers = len(model.sharding_plan.moe_layers)
chunk, steps = spec["chunk"], spec["decode_steps"]


def calls(prompts):
    """A rank's forward calls: [B, L] token counts, prefill chunks then decode."""
    if not prompts:
        return []
    width = max(map(len, prompts))
    prefill = [min(chunk, width - i) for i in range(0, width, chunk)]
    return [len(prompts) * L for L in prefill] + [len(prompts)] * steps


def kv_bytes(cache):
    return sum(a.nbytes for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array))


def run_homes():
    """The schedule once; returns this rank's sequences' logits and tokens
    and each call's collectives."""
    prompts = spec["homes"][rank]
    plans = [calls(p) for p in spec["homes"]]
    width = max(map(len, prompts), default=0)
    pads = [width - len(p) for p in prompts]
    padded = mx.array([[0] * pad + p for pad, p in zip(pads, prompts)]) if prompts else None
    cache = [BatchKVCache(pads) for _ in model.layers]
    seqs = [{"logits": [], "tokens": []} for _ in prompts]
    stats, done = [], 0
    for i in range(max(map(len, plans))):
        counts = [p[i] if i < len(p) else 0 for p in plans]
        mlx_moe.reset_comm_stats()
        with data_parallel.home_tokens(model, counts):
            if not counts[rank]:
                data_parallel.idle_step(model)
            else:
                if done < width:  # a prefill chunk
                    inputs = padded[:, done:done + chunk]
                    done += inputs.shape[1]
                else:
                    inputs = mx.array([[s["tokens"][-1]] for s in seqs])
                logits = model(inputs, cache=cache)[:, -1]
                mx.eval(logits)
                if done == width:  # the last prefill chunk or a decode step
                    for s, row in zip(seqs, logits.tolist()):
                        s["logits"].append(row)
                        s["tokens"].append(max(range(len(row)), key=row.__getitem__))
        stats.append(dict(mlx_moe.comm_stats(), counts=counts))
    return {"seqs": seqs, "calls": stats, "kv_bytes": kv_bytes(cache)}


out = {"probe": probe, "sum_scatter": dp.sum_scatter, "moe_layers": moe_layers,
       "hidden": model.args.hidden_size, "passes": []}
for bound in spec["bounds"]:
    comm.set_max_message_bytes(bound or comm.DEFAULT_MAX_COLLECTIVE_BYTES)
    out["passes"].append(run_homes())
comm.set_max_message_bytes(comm.DEFAULT_MAX_COLLECTIVE_BYTES)

# The same model, the next call replicated: every rank the same prompt.
mlx_moe.reset_comm_stats()
logits = model(mx.array([spec["replicated"]]), cache=make_prompt_cache(model))[0, -1]
out["replicated"] = {"logits": logits.tolist(), "collectives": mlx_moe.comm_stats()["collectives"]}

if spec.get("kv"):
    prompts = spec["kv"]
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array(prompts), cache=cache))
    replicated = kv_bytes(cache)
    per = len(prompts) // size
    cache = make_prompt_cache(model)
    with data_parallel.home_tokens(model, [per * len(prompts[0])] * size):
        mx.eval(model(mx.array(prompts[rank * per:(rank + 1) * per]), cache=cache))
    out["kv"] = {"replicated": replicated, "data_parallel": kv_bytes(cache)}

comm.barrier(group)
with open(f"{spec['out']}/rank{rank}.json", "w") as f:
    json.dump(out, f)
