"""Rank program for the sharded-model tests: for each run in the spec,
load_sharded the checkpoint and write what it measured to OUT/rank<r>.json.

Inputs are prefilled in chunks through a KV cache, as generation does, so
cache alignment and chunked prefill are exercised too."""

import gc
import json
import sys

import mlx.core as mx
from mlx_lm import generate
from mlx_lm.models.cache import make_prompt_cache

import mlx_moe
from mlx_moe.parallel import comm

spec = json.loads(sys.argv[1])
group = mx.distributed.init()
results = []
for run in spec["runs"]:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model, tokenizer = mlx_moe.load_sharded(
        run["checkpoint"], group, run.get("strategy", "auto"),
        expert_weights=run.get("expert_weights"), layer_weights=run.get("layer_weights"),
        placement=run.get("placement"), max_collective_bytes=run.get("max_collective_bytes"))
    gc.collect()
    mx.clear_cache()
    plan = model.sharding_plan
    r = {
        "peak_load_bytes": mx.get_peak_memory() - base,
        "active_bytes": mx.get_active_memory() - base,
        "param_bytes": plan.param_bytes,
        "strategy": plan.strategy,
        "plan": str(plan),
        "ranges": [l.ranges for l in plan.layers if l.ranges],
        "experts": [l.experts_of(group.rank()) for l in plan.moe_layers],
        "moe_layers": len(plan.moe_layers),
        "logits": [], "collectives": [], "messages": [], "max_message_bytes": [],
        "decode_collectives": [], "kv_bytes": [],
    }
    step = run.get("prefill_step", 512)
    for ids in run["inputs"]:
        cache = make_prompt_cache(model)
        mlx_moe.reset_comm_stats()
        for i in range(0, len(ids), step):
            logits = model(mx.array([ids[i:i + step]]), cache=cache)[0, -1]
            mx.eval(logits)
        stats = mlx_moe.comm_stats()
        r["collectives"].append(stats["collectives"])
        r["messages"].append(stats["messages"])
        r["max_message_bytes"].append(stats["max_message_bytes"])
        r["logits"].append(logits.tolist() if run.get("return_logits", True) else None)
        r["kv_bytes"].append(sum(c.nbytes for c in cache))
        # One decoded token after the prompt.
        mlx_moe.reset_comm_stats()
        mx.eval(model(mx.array([[int(mx.argmax(logits))]]), cache=cache))
        r["decode_collectives"].append(mlx_moe.comm_stats()["collectives"])
    if "prompt" in run:
        r["text"] = generate(model, tokenizer, run["prompt"], max_tokens=run["max_tokens"])
    comm.barrier(group)
    results.append(r)
    del model, cache
with open(f"{spec['out']}/rank{group.rank()}.json", "w") as f:
    json.dump(results, f)
