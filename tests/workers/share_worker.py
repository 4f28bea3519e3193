"""Rank program for tests/test_checkpoint_share.py: for each run in the
spec, load_sharded the checkpoint (a local directory, or a repo id served by
a fake hub from one) and write to OUT/rank<r>.json the bytes this rank read
(/proc/self/io rchar: read syscalls, page cache included), its peak memory,
the files it downloaded, its logits and its greedy text."""

import gc
import json
import sys
from pathlib import Path

import huggingface_hub
import mlx.core as mx
from mlx_lm import generate
from mlx_lm.utils import load_model, load_tokenizer

import mlx_moe
from fake_hub import FakeHub
from mlx_moe.parallel import comm

IO = Path("/proc/self/io")


def rchar():
    """Bytes read so far, or None where the kernel does not say."""
    if not IO.exists():
        return None
    return int(next(l for l in IO.read_text().splitlines() if l.startswith("rchar:")).split()[1])


spec = json.loads(sys.argv[1])
group = mx.distributed.init()
rank = group.rank()
results = []
for run in spec["runs"]:
    source = run["checkpoint"]
    # Imports and tokenizer code load once, outside the measured load.
    load_model(Path(source), lazy=True)
    load_tokenizer(Path(source))
    hub = None
    if "hub_repo" in run:
        hub = FakeHub(source, Path(spec["out"]) / f"hub-rank{rank}")
        for name, fn in hub.patches():
            setattr(huggingface_hub, name, fn)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    before = rchar()
    model, tokenizer = mlx_moe.load_sharded(run.get("hub_repo", source), group, "expert")
    after = rchar()
    r = {
        "read_bytes": None if before is None else after - before,
        "peak_load_bytes": mx.get_peak_memory() - base,
        "param_bytes": model.sharding_plan.param_bytes,
        "experts": [l.experts_of(rank) for l in model.sharding_plan.moe_layers],
        "downloads": hub and hub.requests,
        "logits": [model(mx.array([ids]))[0, -1].tolist() for ids in run["inputs"]],
        "text": generate(model, tokenizer, run["prompt"], max_tokens=run["max_tokens"]),
    }
    comm.barrier(group)
    results.append(r)
    del model
with open(f"{spec['out']}/rank{rank}.json", "w") as f:
    json.dump(results, f)
