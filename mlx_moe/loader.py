"""load_sharded: resolve the checkpoint -> lazy model -> plan -> apply ->
read this rank's weights."""

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model, load_tokenizer

from . import comm
from .checkpoint import Checkpoint
from .cores import settle_local_rank
from .expert import copy_rows, find_moe_blocks
from .placement import read_placement
from .pipeline import _layer_list
from .plan import ShardingPlan, experts_text, get_strategy, module_at, plan as make_plan

# Everything but the weights: enough to build the model and plan it.
METADATA_PATTERNS = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jsonl", "*.jinja"]


def log(msg: str) -> None:
    """Progress for long work, on stderr so stdout stays the program's."""
    if os.environ.get("MLX_MOE_QUIET") != "1":
        print(msg, file=sys.stderr, flush=True)


def _download(model_id: str, revision, allow_patterns) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=allow_patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"Could not fetch {model_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass a local checkpoint directory, or check the repo id and your network."
        ) from e


def local_checkpoint(model_id: str) -> Optional[Path]:
    """The directory `model_id` names, None if it is a hub repo id."""
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not an mlx-lm checkpoint")
        return path
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise FileNotFoundError(
            f"No checkpoint directory at {model_id!r}, and it is not a Hugging Face repo id (owner/name)."
        )
    return None


def files_for(path: Path, plan: ShardingPlan):
    """The weight files this rank needs. Expert parallel needs every file
    (each holds a slice for every rank); a pipeline stage needs the files
    holding its layers and the layer-less weights (embeddings, norm, head)."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return ["model*.safetensors"]  # one file: nothing to choose
    weight_map = json.loads(index.read_text())["weight_map"]
    if plan.strategy != "pipeline":
        return sorted(set(weight_map.values()))
    lo, hi = plan.layers[0].ranges[plan.rank]
    needed = set()
    for key, file in weight_map.items():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
        if m is None or lo <= int(m.group(1)) < hi:
            needed.add(file)
    return sorted(needed)


def fingerprint(path: Path) -> bytes:
    """What must agree across ranks: the config and every tensor's name,
    dtype, shape and size in the safetensors headers."""
    tensors = sorted((k, m["dtype"], m["shape"], m["data_offsets"][1] - m["data_offsets"][0])
                     for k, (_, _, m) in Checkpoint(path).tensors.items())
    config = json.loads((path / "config.json").read_text())
    return hashlib.sha256(json.dumps([config, tensors], sort_keys=True).encode()).digest()


def check_same_checkpoint(path: Path, group) -> None:
    """Every rank compares its checkpoint with every other's before serving;
    a mismatch fails on every rank with the ranks that differ. Doubles as
    the barrier that ends loading."""
    comm.settle()
    mine = mx.array(list(fingerprint(path)), dtype=mx.uint8)
    everyone = mx.distributed.all_gather(mine[None], group=group)
    mx.eval(everyone)
    digests = [bytes(row) for row in np.array(everyone)]
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise RuntimeError(
            f"rank(s) {odd} loaded a different checkpoint than rank 0 (config or tensor "
            f"headers differ; rank {group.rank()} read {path}). Give every host the same "
            "checkpoint files.")


def _share(plan: ShardingPlan) -> str:
    if plan.strategy == "expert":
        first = plan.moe_layers[0]
        return (f"experts {experts_text(first.experts_of(plan.rank))} of {first.num_experts} "
                f"in {len(plan.moe_layers)} MoE layers")
    lo, hi = plan.layers[0].ranges[plan.rank]
    return f"layers {lo}-{hi - 1} of {len(plan.layers)}"


def param_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def held_bytes(model: nn.Module, plan: ShardingPlan) -> int:
    """Parameter bytes this rank will hold under `plan`, from the lazy
    model's shapes: nothing is read."""
    total = param_bytes(model)
    if plan.strategy == "pipeline":
        lo, hi = plan.layers[0].ranges[plan.rank]
        total -= sum(param_bytes(l) for i, l in enumerate(_layer_list(model)) if not lo <= i < hi)
    elif plan.strategy == "expert":
        containers = {p: info.experts for p, info, _ in find_moe_blocks(model)}
        for layer in plan.moe_layers:
            block = module_at(model, layer.path)
            experts = param_bytes(block[containers[layer.path]])
            total -= experts - experts * len(layer.experts_of(plan.rank)) // layer.num_experts
            if layer.shared_rank != plan.rank:  # shared experts live on one rank
                total -= sum(param_bytes(block[s]) for s in layer.shared)
    return total


def available_bytes() -> Optional[int]:
    """Memory this host can give the weights: $MLX_MOE_MEMORY_LIMIT (e.g.
    "96G"), else Metal's recommended working set, else Linux's MemAvailable."""
    limit = os.environ.get("MLX_MOE_MEMORY_LIMIT")
    if limit:
        from .costmodel import parse_bytes

        return int(parse_bytes(limit) * 1e9)
    working_set = mx.device_info().get("max_recommended_working_set_size")
    if working_set:
        return int(working_set)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(need: int, rank: int, size: int) -> None:
    """Fail before reading anything when this rank's shard cannot fit."""
    have = available_bytes()
    if have is not None and need > have:
        raise MemoryError(
            f"rank {rank}/{size} needs {need / 1e9:.2f} GB for its shard but this host has "
            f"{have / 1e9:.2f} GB available; add hosts, use a more quantized checkpoint, or free "
            "memory (`mlx-moe plan` shows what each host needs; $MLX_MOE_MEMORY_LIMIT overrides "
            "the limit, e.g. after raising macOS's iogpu.wired_limit_mb)")


def load_sharded(
    model_id: str,
    group: Optional[mx.distributed.Group] = None,
    strategy: str = "auto",
    *,
    expert_weights: Optional[Sequence[float]] = None,
    layer_weights: Optional[Sequence[float]] = None,
    placement: Union[None, str, Path, dict] = None,
    max_collective_bytes: Optional[int] = None,
    revision: Optional[str] = None,
):
    """Load `model_id` (a local mlx-lm checkpoint or a Hugging Face repo id)
    sharded over `group` (default: `mx.distributed.init()`).

    strategy: "auto" (expert parallel for MoE models, pipeline otherwise),
    "expert" or "pipeline". expert_weights / layer_weights: one positive
    number per rank, its share of experts / layers (default even).
    placement: which experts each rank holds, per MoE block ({path: [[ids
    of rank 0], ...]} or a placement file, see mlx_moe.placement); blocks
    it does not name get contiguous ranges.
    max_collective_bytes: the largest message any collective may send.

    Returns `(model, tokenizer)`; `model` is a drop-in mlx-lm model whose
    `sharding_plan` says what each rank holds. With one process this is the
    plain single-process model.
    """
    group = group or mx.distributed.init()
    rank, size = group.rank(), group.size()
    if strategy != "auto":
        get_strategy(strategy)  # an unknown name fails before any work
    if max_collective_bytes is not None:
        comm.set_max_message_bytes(max_collective_bytes)
    if isinstance(placement, (str, Path)):
        placement = read_placement(placement)
    options = dict(expert_weights=expert_weights, layer_weights=layer_weights, placement=placement)
    if size > 1:
        settle_local_rank(rank)
    t0 = time.perf_counter()

    path = local_checkpoint(model_id)
    if size == 1:
        path = path or _download(model_id, revision, None)
        model, config = load_model(path)
        model.sharding_plan = ShardingPlan("single", "one process: the plain model", 1, 0, [])
        return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id", None))

    strict = True
    if path is None:
        # Plan on the bare model first, then fetch only this rank's files.
        path = _download(model_id, revision, METADATA_PATTERNS)
        skeleton, _ = load_model(path, lazy=True, strict=False)
        files = files_for(path, make_plan(skeleton, group, strategy, **options))
        log(f"[rank {rank}/{size}] downloading {len(files)} weight file(s) of {model_id}")
        path = _download(model_id, revision, files)
        strict = False  # a pipeline stage has only its own layers' files

    # Build the model lazily: nothing is read until a parameter is evaluated.
    model, config = load_model(path, lazy=True, strict=strict)
    plan = make_plan(model, group, strategy, **options)
    log(f"[rank {rank}/{size}] plan: {plan.strategy} ({plan.reason}); this rank holds {_share(plan)}")
    check_fits(held_bytes(model, plan), rank, size)

    ckpt = Checkpoint(path)
    moe_paths = [l.path for l in plan.moe_layers]
    done = set()

    def read_rows(name, array, rows):
        # Progress about every quarter of the MoE layers.
        layer = next((p for p in moe_paths if name.startswith(p + ".")), None)
        if layer not in done:
            done.add(layer)
            if len(done) % max(1, len(moe_paths) // 4) == 0 or len(done) == len(moe_paths):
                log(f"[rank {rank}/{size}] reading {len(rows)} experts: MoE layer {len(done)}/"
                    f"{len(moe_paths)}, {ckpt.bytes_read / 2**20:.1f} MiB read")
        out = ckpt.read_rows(name, array, rows)
        # A tensor that sanitize renamed or rebuilt is read whole, then copied.
        return out if out is not None else copy_rows(name, array, rows)

    get_strategy(plan.strategy).apply(model, plan, group, read_rows=read_rows)
    mx.eval(model.parameters())
    plan.param_bytes["total"] = param_bytes(model)
    if "experts_local" in plan.param_bytes:
        plan.param_bytes["replicated"] = plan.param_bytes["total"] - plan.param_bytes["experts_local"]
    model.sharding_plan = plan
    check_same_checkpoint(path, group)
    log(
        f"[rank {rank}/{size}] loaded in {time.perf_counter() - t0:.1f}s: "
        f"{plan.param_bytes['total'] / 2**20:.1f} MiB of parameters"
        + (f", {ckpt.bytes_read / 2**20:.1f} MiB of them expert rows" if ckpt.bytes_read else "")
    )
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id", None))
    return model, tokenizer
