"""What every rank must agree on before it serves, checked once at load.

Ranks on different hosts read their own files and environment, so one host
can silently differ: a stale placement file computes wrong logits, and
MLX_MOE_MAX_COLLECTIVE_BYTES set on one host only splits its collectives
differently, which puts the ranks' messages out of step. Each rank states
what it has; every rank compares everyone's statement with rank 0's and a
mismatch fails every rank with the host, the field and both values.
"""

import hashlib
import json
import socket
from importlib import metadata
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
import numpy as np

from ..parallel import comm
from ..checkpoints.checkpoint import read_header, weight_files
from ..parallel.plan import ShardingPlan


class ClusterMismatch(ValueError):
    """Ranks that must agree do not (different files, settings or versions)."""


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_files(path: Path) -> Dict[str, str]:
    """A digest per file that must match across ranks: config.json, the
    index, and the header (every tensor's name, dtype, shape and offsets) of
    each weight file this rank has. A rank may have only some weight files
    (a pipeline stage's download); files both ranks have are compared."""
    out = {"config.json": digest(json.loads((path / "config.json").read_text()))}
    index = path / "model.safetensors.index.json"
    if index.exists():
        out[index.name] = digest(json.loads(index.read_text())["weight_map"])
    for name in weight_files(path):
        if (path / name).exists():
            out[name] = digest(read_header(path / name)[1])
    return out


def plan_facts(plan: ShardingPlan) -> Dict[str, str]:
    """The plan and the expert placement in short comparable form."""
    layers = [(l.path, l.kind, l.holder, l.num_experts, l.ranges, l.shared_rank) for l in plan.layers]
    placed = {l.path: l.order for l in plan.moe_layers if l.order}
    return {
        "plan": f"{plan.strategy} on {plan.size} ranks, {len(plan.layers)} blocks (digest {digest(layers)})",
        "placement": f"{len(placed)} blocks placed by a file (digest {digest(placed)})" if placed
        else "contiguous ranges",
    }


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return digest([vocab, getattr(tokenizer, "chat_template", None)])


def statement(path: Path, plan: ShardingPlan, tokenizer) -> dict:
    """What this rank loaded and how it is set up."""
    return {
        "host": socket.gethostname(),
        "checkpoint": checkpoint_files(path),
        **plan_facts(plan),
        "max_collective_bytes": comm.max_message_bytes(),
        "tokenizer and chat template": tokenizer_digest(tokenizer),
        "mlx-moe version": metadata.version("mlx-moe"),
        "mlx version": mx.__version__,
    }


# Why a field can differ, and what to do about it.
FIXES = {
    "checkpoint": "give every host the same checkpoint files at the same path",
    "plan": "give every rank the same --strategy, weights and checkpoint",
    "placement": "give every host the same placement file (or none)",
    "max_collective_bytes": "set MLX_MOE_MAX_COLLECTIVE_BYTES the same on every host, or unset it "
                            "and pass --max-collective-bytes",
    "tokenizer and chat template": "give every host the same tokenizer files",
    "mlx-moe version": "install the same mlx-moe on every host",
    "mlx version": "install the same mlx on every host",
}


def mismatches(statements: List[dict]) -> List[str]:
    """Each way a rank's statement differs from rank 0's, as a sentence."""
    first, out = statements[0], []
    for rank, mine in enumerate(statements[1:], start=1):
        who = f"rank {rank} (host {mine['host']})"
        boss = f"rank 0 (host {first['host']})"
        files = [f for f in mine["checkpoint"] if f in first["checkpoint"]
                 and mine["checkpoint"][f] != first["checkpoint"][f]]
        if files:
            out.append(f"{who} loaded a different checkpoint than {boss}: {', '.join(files)} differ "
                       f"({mine['checkpoint'][files[0]]} vs {first['checkpoint'][files[0]]}); "
                       + FIXES["checkpoint"])
        for field, fix in FIXES.items():
            if field != "checkpoint" and mine[field] != first[field]:
                out.append(f"{who} and {boss} differ in {field}: {mine[field]!r} vs {first[field]!r}; {fix}")
    return out


def exchange(obj: dict, group) -> List[dict]:
    """Every rank's `obj` (JSON), in rank order."""
    comm.settle()
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    lengths = comm.all_gather(mx.array([data.size], dtype=mx.int32), group)
    longest = int(mx.max(lengths).item())
    padded = np.zeros((1, longest), dtype=np.uint8)
    padded[0, : data.size] = data
    rows = np.array(comm.all_gather(mx.array(padded), group))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, np.array(lengths).tolist())]


def check_cluster(path: Path, plan: ShardingPlan, tokenizer, group) -> None:
    """Fail on every rank, with every difference, unless all agree with rank 0."""
    found = mismatches(exchange(statement(path, plan, tokenizer), group))
    if found:
        raise ClusterMismatch("the ranks disagree, so none will serve:\n  " + "\n  ".join(found))
