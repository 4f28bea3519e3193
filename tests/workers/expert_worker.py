"""Rank program for the expert-parallel tests: loads each checkpoint with
load_sharded and writes what it measured to OUT/rank<r>.json."""

import gc
import json
import sys

import mlx.core as mx
from mlx_lm import generate

import mlx_moe
from mlx_moe import comm

spec = json.loads(sys.argv[1])
group = mx.distributed.init()
results = []
for ckpt in spec["checkpoints"]:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    model, tokenizer = mlx_moe.load_sharded(ckpt, group, spec.get("strategy", "auto"),
                                            expert_weights=spec.get("expert_weights"))
    gc.collect()
    mx.clear_cache()
    r = {
        "checkpoint": ckpt,
        "peak_load_bytes": mx.get_peak_memory() - base,
        "active_bytes": mx.get_active_memory() - base,
        "param_bytes": model.sharding_plan.param_bytes,
        "plan": str(model.sharding_plan),
        "ranges": [l.ranges for l in model.sharding_plan.moe_layers],
        "moe_layers": len(model.sharding_plan.moe_layers),
        "logits": [],
        "collectives": [],
    }
    for ids in spec["inputs"]:
        mlx_moe.reset_comm_stats()
        logits = model(mx.array([ids]))[0, -1]
        r["collectives"].append(mlx_moe.comm_stats()["collectives"])
        r["logits"].append(logits.tolist())
    r["text"] = generate(model, tokenizer, spec["prompt"], max_tokens=spec["max_tokens"])
    comm.barrier(group)
    results.append(r)
    del model
with open(f"{spec['out']}/rank{group.rank()}.json", "w") as f:
    json.dump(results, f)
