"""Rank program for tests/test_batching.py: the serve engine's lockstep
steps driven by hand, counting the collectives each step issues once every
request of the batch is decoding. Writes OUT/rank<r>.json."""

import json
import sys

import mlx.core as mx

import mlx_moe
from mlx_moe.serve.channel import Job
from mlx_moe.serve.engine.core import Engine

spec = json.loads(sys.argv[1])
group = mx.distributed.init()
model, tokenizer = mlx_moe.load_sharded(spec["checkpoint"], group)
engine = Engine(model, tokenizer, group, max_concurrency=max(spec["batches"]))
generator, live, result = engine.generator(), set(), {"moe_layers": len(model.sharding_plan.moe_layers)}
for batch in spec["batches"]:
    if group.rank() == 0:
        for i in range(batch):
            engine.submit(Job(prompt=tokenizer.encode("The river " * (i + 1)), max_tokens=spec["max_tokens"],
                              temperature=0, emit=lambda event: None))
    # Until every sequence has left prefill (the same on every rank): from
    # then on a step is one decode step of the whole batch.
    while len(generator._generation_batch) < batch:
        engine.step(generator, live)
    mlx_moe.reset_comm_stats()
    engine.step(generator, live)
    result[str(batch)] = {"collectives": mlx_moe.comm_stats()["collectives"], "live": len(live)}
    while live:  # run the batch out
        engine.step(generator, live)
if group.rank() == 0:
    engine.shutdown()
engine.step(generator, live)
with open(f"{spec['out']}/rank{group.rank()}.json", "w") as f:
    json.dump(result, f)
