"""Rank program for tests/test_batch_api.py: load_sharded the checkpoint,
then pass each call of the spec to mlx_moe.batch_generate (a call's
"on_rank" entries override its arguments on one rank, to make the ranks
disagree) and write each call's texts, or the ValueError it raised, to
OUT/rank<r>.json. With "noise", rank 1's logits get that much noise
(workers/noise), as on another kind of Mac."""

import json
import sys
from pathlib import Path

import mlx.core as mx

import mlx_moe

spec = json.loads(sys.argv[1])
group = mx.distributed.init()
model, tokenizer = mlx_moe.load_sharded(spec["checkpoint"], group)
if spec.get("noise") and group.rank() == 1:
    sys.path.insert(0, str(Path(__file__).parent / "noise"))
    from logit_noise import add_noise

    add_noise(model, spec["noise"], seed=2)
results = []
for call in spec["calls"]:
    args = {**call, **call.get("on_rank", {}).get(str(group.rank()), {})}
    args.pop("on_rank", None)
    try:
        results.append({"texts": mlx_moe.batch_generate(model, tokenizer, **args).texts})
    except ValueError as e:
        results.append({"error": str(e)})
with open(f"{spec['out']}/rank{group.rank()}.json", "w") as f:
    json.dump(results, f)
