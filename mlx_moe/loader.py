"""load_sharded: resolve the checkpoint -> lazy model -> plan -> apply ->
read this rank's weights."""

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from .checkpoints.checkpoint import LAYER, WEIGHTS, Checkpoint, local_checkpoint, per_expert, weight_map
from .checkpoints.headers import read_hub
from .cluster.consistency import check_cluster
from .cluster.cores import settle_local_rank
from .cluster.memory import available_bytes
from .cluster.progress import Progress, download_bar
from .parallel import comm
from .parallel.expert import copy_rows, find_moe_blocks
from .parallel.pipeline import _layer_list
from .parallel.placement import read_placement
from .parallel.plan import ShardingPlan, experts_text, get_strategy, module_at, plan as make_plan

# Everything but the weights: enough to build the model and plan it.
METADATA_PATTERNS = ["*.json", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jsonl", "*.jinja"]


def log(msg: str) -> None:
    """Progress for long work, on stderr so stdout stays the program's."""
    if os.environ.get("MLX_MOE_QUIET") != "1":
        try:
            print(msg, file=sys.stderr, flush=True)
        except OSError:  # a remote rank's terminal is gone once its ssh session ends
            pass


def _download(model_id: str, revision, allow_patterns, progress=None) -> Path:
    from huggingface_hub import snapshot_download

    # No tqdm bars: several ranks' would interleave; `progress` gets the bytes instead.
    bar = download_bar(lambda done, total: progress and progress("downloading", done, total))
    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=allow_patterns,
                                      tqdm_class=bar))
    except Exception as e:
        raise FileNotFoundError(
            f"Could not fetch {model_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass a local checkpoint directory, or check the repo id and your network."
        ) from e


def load_tokenizer_of(model_id: str, revision=None):
    """The tokenizer load_sharded gives for `model_id` (a directory, or a hub
    repo: its metadata files only, no weights), for a process that holds no
    part of the model (the front of `mlx-moe serve`)."""
    path = local_checkpoint(model_id) or _download(model_id, revision, METADATA_PATTERNS)
    config = json.loads((path / "config.json").read_text())
    return load_tokenizer(path, eos_token_ids=config.get("eos_token_id", None))


def files_for(path: Path, plan: ShardingPlan, model: nn.Module, known: Optional[dict] = None):
    """The weight files this rank needs. A pipeline stage needs the files
    holding its layers and the layer-less weights (embeddings, norm, head).
    Expert parallel needs every file but those holding only other ranks'
    experts, which a checkpoint with one tensor per expert may have (found
    through the model's sanitize; `known`: the tensors' dtypes and shapes,
    for files not here yet)."""
    files = weight_map(path)
    if not files:
        return [WEIGHTS]  # one file: nothing to choose
    if plan.strategy != "pipeline":
        others = set()
        if any(map(per_expert, files)):
            ckpt = Checkpoint(path, known)
            _trace(ckpt, model, plan)
            for layer in plan.moe_layers:
                mine = set(layer.experts_of(plan.rank))
                for key, sources in ckpt.stacks.items():
                    if key.startswith(layer.path + "."):
                        others.update(s for e, s in enumerate(sources) if e not in mine)
        return sorted({file for key, file in files.items() if key not in others})
    lo, hi = plan.layers[0].ranges[plan.rank]
    needed = set()
    for key, file in files.items():
        m = LAYER.search(key)
        if m is None or lo <= int(m.group(1)) < hi:
            needed.add(file)
    return sorted(needed)


def _trace(ckpt: Checkpoint, model: nn.Module, plan: ShardingPlan) -> None:
    """Which per-expert tensors each of the plan's stacked expert tensors
    comes from (Checkpoint.trace_stacks). Where the trace cannot follow
    sanitize, those experts are read whole, as mlx-lm would."""
    sanitize = getattr(model, "sanitize", None)
    if sanitize is None or not plan.moe_layers or not any(map(per_expert, ckpt.tensors)):
        return
    containers = {p: info.experts for p, info, _ in find_moe_blocks(model)}
    try:
        ckpt.trace_stacks(sanitize, tuple(f"{l.path}.{containers[l.path]}." for l in plan.moe_layers))
    except Exception as e:  # sanitize is the model's own code, run on stand-in arrays
        log(f"[rank {plan.rank}/{plan.size}] cannot trace {type(model).__name__}.sanitize "
            f"({type(e).__name__}: {e}); the experts it stacks are read whole on every rank")


def _with_stand_ins(stand_ins: dict):
    """mlx-lm's model classes, each model's sanitize first given
    `stand_ins` for the tensors this rank did not download."""

    def classes(config):
        model_class, args_class = _get_classes(config)

        def build(args):
            model = model_class(args)
            sanitize = getattr(model, "sanitize", dict)
            model.sanitize = lambda weights: sanitize({**stand_ins, **weights})
            return model

        return build, args_class

    return classes


def _share(plan: ShardingPlan) -> str:
    if plan.strategy == "tensor":
        return f"a 1/{plan.size} slice of every block that splits, experts included"
    if plan.splits_experts:
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
    elif plan.splits_experts or plan.strategy == "tensor":
        containers = {p: info.experts for p, info, _ in find_moe_blocks(model)}
        for layer in plan.moe_layers:
            block = module_at(model, layer.path)
            experts = param_bytes(block[containers[layer.path]])
            share = 1 / plan.size if layer.holder == "tensor" else len(layer.experts_of(plan.rank)) / layer.num_experts
            total -= experts - int(experts * share)
            for s in layer.shared:
                shared = param_bytes(block[s])
                if s in layer.split:  # hybrid: a share on every rank
                    total -= shared - shared // plan.size
                elif layer.shared_rank != plan.rank:  # on one rank
                    total -= shared
        for layer in plan.layers:  # hybrid: blocks split by tensor parallel (their norms are a rounding error)
            if layer.holder in ("heads", "tensor"):
                split = param_bytes(module_at(model, layer.path))
                total -= split - split // plan.size
    return total


def _evaluate(model: nn.Module, report, pieces: int = 50) -> None:
    """mx.eval(model.parameters()) in about `pieces` parts, calling
    `report(bytes evaluated)` after each, in the parameters' order."""
    params = [p for _, p in tree_flatten(model.parameters())]
    step, batch, done = max(1, sum(p.nbytes for p in params) // pieces), [], 0
    for i, p in enumerate(params):
        batch.append(p)
        done += p.nbytes
        if done // step > (done - p.nbytes) // step or i == len(params) - 1:
            mx.eval(batch)
            batch = []
            report(done)


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
    "expert", "hybrid" (expert-parallel experts, attention split by heads,
    dense MLPs and shared experts by tensor parallel) or "pipeline". expert_weights / layer_weights: one positive
    number per rank, its share of experts / layers (default even).
    placement: which experts each rank holds, per MoE block ({path: [[ids
    of rank 0], ...]} or a placement file, see mlx_moe.parallel.placement); blocks
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
    progress = Progress(rank, size, downloads=path is None, log=log)
    if size == 1:
        path = path or _download(model_id, revision, None, progress)
        model, config = load_model(path)
        model.sharding_plan = ShardingPlan("single", "one process: the plain model", 1, 0, [])
        progress("loaded", param_bytes(model), param_bytes(model))
        return model, load_tokenizer(path, eos_token_ids=config.get("eos_token_id", None))

    strict, known = True, None
    if path is None:
        # Plan on the bare model first, then fetch only this rank's files.
        path = _download(model_id, revision, METADATA_PATTERNS)
        skeleton, _ = load_model(path, lazy=True, strict=False)
        first = make_plan(skeleton, group, strategy, **options)
        if first.splits_experts and any(map(per_expert, weight_map(path))):
            # One tensor per expert: the headers (not the weights) say which files to skip.
            known = read_hub(model_id, revision).tensors
        files = files_for(path, first, skeleton, known)
        log(f"[rank {rank}/{size}] downloading {len(files)} of {len(set(weight_map(path).values())) or 1} "
            f"weight file(s) of {model_id}")
        path = _download(model_id, revision, files, progress)
        strict = first.strategy != "pipeline"  # a pipeline stage has only its own layers' files

    # Build the model lazily: nothing is read until a parameter is evaluated,
    # and the stand-ins for tensors not downloaded never are.
    ckpt = Checkpoint(path, known)
    model, config = load_model(path, lazy=True, strict=strict,
                               get_model_classes=_with_stand_ins(ckpt.stand_ins()))
    del model.sanitize  # back to the class's own
    plan = make_plan(model, group, strategy, **options)
    log(f"[rank {rank}/{size}] plan: {plan.strategy} ({plan.reason}); this rank holds {_share(plan)}")
    held = held_bytes(model, plan)
    check_fits(held, rank, size)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id", None))
    check_cluster(path, plan, tokenizer, group)  # before reading: a mismatch costs no load time

    if plan.splits_experts:
        _trace(ckpt, model, plan)
        if ckpt.stacks:
            log(f"[rank {rank}/{size}] {len(ckpt.stacks)} expert tensors are stacked from one tensor "
                "per expert: reading only this rank's")
    warned = []
    progress("reading", 0, held)

    def read_rows(name, array, rows):
        out = ckpt.read_rows(name, array, rows)
        if out is not None:
            progress("reading", ckpt.bytes_read, held)
            return out
        # A tensor that sanitize renamed or rebuilt is read whole, then copied.
        if not warned:
            warned.append(name)
            log(f"[rank {rank}/{size}] {name} is not in the files as the model holds it: reading it "
                "(and tensors like it) whole")
        return copy_rows(name, array, rows)

    get_strategy(plan.strategy).apply(model, plan, group, read_rows=read_rows)
    # The rest (attention, shared weights) is read as it is evaluated.
    _evaluate(model, lambda n: progress("reading", min(held, max(ckpt.bytes_read, n)), held))
    plan.param_bytes["total"] = param_bytes(model)
    if "experts_local" in plan.param_bytes:
        plan.param_bytes["replicated"] = plan.param_bytes["total"] - plan.param_bytes["experts_local"]
    model.sharding_plan = plan
    comm.barrier(group)  # loading ends together: no rank serves while another still reads
    progress("loaded", plan.param_bytes["total"], plan.param_bytes["total"])
    log(
        f"[rank {rank}/{size}] loaded in {time.perf_counter() - t0:.1f}s: "
        f"{plan.param_bytes['total'] / 2**20:.1f} MiB of parameters"
        + (f", {ckpt.bytes_read / 2**20:.1f} MiB of them expert rows" if ckpt.bytes_read else "")
    )
    return model, tokenizer
