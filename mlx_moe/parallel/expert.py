"""Expert parallelism: each rank holds a share of every MoE layer's experts
(a contiguous range, or the set a placement gives it) and computes only the
(token, expert) pairs routed to them.

A token's trip through one expert-parallel layer, top to bottom:
1. route: the block's own router runs unchanged on every rank (replicated),
   producing `indices` [..., k] and `scores` [..., k];
2. local compute: `LocalExperts` replaces the block's experts container
   (SwitchGLU / SwitchMLP) and evaluates only pairs whose expert is local,
   returning zeros for the rest, so the block's weighted sum over k is this
   rank's partial output;
3. combine: `ExpertParallelBlock` wraps the block and joins the partial
   outputs with one `all_sum` per layer. Shared experts are computed by one
   rank only, so they join the same single combine without being counted N
   times. Attention stays replicated: one collective per decoder layer in
   decode. For a long input each rank computes its share of the attention
   and gathers the rest (attention.py). In a data-parallel forward, where
   each rank brings its own tokens (data_parallel.py), the block first
   gathers every rank's tokens and the combine gives each rank its rows.
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import (
    QuantizedSwitchLinear,
    SwitchGLU,
    SwitchLinear,
    SwitchMLP,
)

from . import comm, data_parallel
from .attention import split_long_attention
from .placement import validate
from .plan import (
    LayerPlan,
    PlanError,
    ShardingPlan,
    Strategy,
    layer_index,
    layers_path,
    module_at,
    register,
    replace_module,
    split_evenly,
)

_SWITCH_LINEARS = (SwitchLinear, QuantizedSwitchLinear)

# Below this many tokens a rank runs every (token, expert) pair through its
# local experts with foreign pairs pointed at local expert 0 and masked: no
# host sync, so decode steps stay asynchronous, and on a GPU, where decode
# is bound by the weight bytes read, the extra pairs reread an expert that
# is already being read. From here on it gathers just its local pairs
# (about T*k/N of them), which costs one host sync per layer to learn the
# pair count but makes the work per rank scale with its share of the
# routing. On the CPU compute is the bound, so it always gathers (measured:
# decode 1.5x faster than masking on 2 ranks, 64 experts, top-8).
GATHER_MIN_TOKENS = 1 if mx.default_device() == mx.cpu else 32


def is_experts_container(m: nn.Module) -> bool:
    """A module that stacks experts on axis 0: SwitchGLU / SwitchMLP or any
    container whose weighted children are all switch linears (a module that
    merely uses one, like deepseek_v41's grouped attention output, is not)."""
    if isinstance(m, (SwitchGLU, SwitchMLP)):
        return True
    if not isinstance(m, nn.Module):
        return False
    weighted = [c for c in m.children().values() if isinstance(c, nn.Module) and c.parameters()]
    return bool(weighted) and all(isinstance(c, _SWITCH_LINEARS) for c in weighted)


@dataclass
class MoEBlock:
    experts: str  # attribute name of the experts container in the block
    num_experts: int
    top_k: Optional[int]
    # Children that one rank computes for all: the shared experts.
    shared: Tuple[str, ...]
    # Why expert parallel cannot serve this block exactly (None: it can).
    unsupported: Optional[str] = None


# What models call the experts per token, most specific first: a config's
# bare "top_k" may be a sampling default.
TOP_K_NAMES = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "n_activated_experts", "top_k", "k")


def top_k_of(holder) -> Optional[int]:
    """Experts per token as `holder` (a module, its args, or a config dict) names it."""
    get = holder.get if type(holder) is dict else lambda a: getattr(holder, a, None)
    return next((get(a) for a in TOP_K_NAMES if isinstance(get(a), int)), None)


def _top_k(block: nn.Module) -> Optional[int]:
    """Experts per token, from the block, the config it keeps or its router."""
    for holder in (block, *(getattr(block, a, None) for a in ("args", "config", "gate", "router"))):
        if (k := top_k_of(holder)) is not None:
            return k
    return None


class BlockHandler:
    """Detects one kind of MoE block. The generic handler, found by module
    type, serves most mlx-lm models; an architecture whose block needs
    different treatment registers its own handler ahead of it."""

    name = "generic"

    def match(self, block: nn.Module) -> Optional[MoEBlock]:
        children = block.children()
        experts = [k for k, c in children.items() if is_experts_container(c)]
        if len(experts) != 1:
            return None
        # "share" also catches step3p5's `share_expert`; a shared expert's
        # gate stays on every rank (it scales only the shared output).
        shared = tuple(
            k
            for k, c in children.items()
            if "share" in k and not k.endswith("gate") and isinstance(c, nn.Module)
        )
        return MoEBlock(experts[0], _num_experts(children[experts[0]]), _top_k(block), shared)

    def shard(self, block: nn.Module, moe: MoEBlock, holder: bool, group) -> nn.Module:
        """The block as this rank runs it, its experts container already cut
        to the local rows. `holder`: this rank adds the terms that must be
        counted once (the shared experts). The block's output becomes this
        rank's partial sum, joined by one all_sum."""
        if not holder:
            for s in moe.shared:
                setattr(block, s, Absent())
        return ExpertParallelBlock(block, group)


def _num_experts(container: nn.Module) -> int:
    for c in container.children().values():
        if isinstance(c, _SWITCH_LINEARS):
            return c.weight.shape[0]
    raise PlanError(f"{type(container).__name__} holds no switch linear")


_HANDLERS: List[BlockHandler] = [BlockHandler()]


def register_block(handler: BlockHandler) -> BlockHandler:
    """Register an architecture-specific handler; it is tried before the generic one."""
    _HANDLERS.insert(0, handler)
    return handler


def block_handlers() -> List[BlockHandler]:
    """The registered handlers in the order they are tried."""
    return list(_HANDLERS)


def find_moe_blocks(model: nn.Module) -> List[Tuple[str, MoEBlock, BlockHandler]]:
    found = []
    for path, m in model.named_modules():
        for h in _HANDLERS:
            info = h.match(m)
            if info is not None:
                found.append((path, info, h))
                break
    return sorted(found, key=lambda f: _model_order(f[0]))


def _model_order(path: str):
    """Sort key for module paths: layer 10 after layer 9."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


class ExpertCounter:
    """(token, expert) pairs routed to each expert of a block, counted on the
    device as part of the forward pass and folded into `total` on demand."""

    def __init__(self, num_experts: int):
        # Made from data, not a lazy op: the model is built on one thread and
        # run on another, and a lazy array belongs to its thread's stream.
        self.pending = mx.array(np.zeros(num_experts, dtype=np.int32))
        self.total = np.zeros(num_experts, dtype=np.int64)

    def add(self, y: mx.array, flat: mx.array) -> mx.array:
        """`y`, made to also count the expert ids in `flat` when evaluated."""
        self.pending = self.pending.at[flat].add(1)
        return mx.depends(y, self.pending)

    def collect(self) -> List[int]:
        pending = self.pending
        self.pending = mx.array(np.zeros(pending.shape, dtype=np.int32))
        self.total += np.array(pending, dtype=np.int64)
        return self.total.tolist()


class LocalExperts(nn.Module):
    """This rank's experts of a stacked-experts container, called like the
    container: (x [..., D], indices [..., k] global ids) -> [..., k, D]
    with zeros for the pairs routed to other ranks. The local experts are
    placed positions [lo, hi); `position` maps expert ids to positions when
    a placement moved them."""

    def __init__(self, experts: nn.Module, layer: LayerPlan, rank: int):
        super().__init__()
        self.experts = experts
        self.lo, self.hi = layer.ranges[rank]
        self.layer = layer
        # From data (numpy), like the counter's array: it is used on another thread.
        position = mx.array(np.argsort(layer.order).astype(np.int32)) if layer.order else None
        self.position = _Constant(position)
        self.counter = ExpertCounter(layer.num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        flat = indices.flatten()
        if self.position.value is not None:
            indices = self.position.value[indices]
        tokens = indices.size // indices.shape[-1]
        y = self._masked(x, indices) if tokens < GATHER_MIN_TOKENS else self._gathered(x, indices)
        return self.counter.add(y, flat)

    def _masked(self, x, indices):
        local = (indices >= self.lo) & (indices < self.hi)
        # Foreign pairs run an expert this token already uses here, so a GPU,
        # bound by the distinct experts it reads, reads nothing extra for
        # them; only a token with no local pair reads one (local expert 0).
        some = mx.take_along_axis(indices, mx.argmax(local, axis=-1, keepdims=True), axis=-1)
        fill = mx.where(local.any(axis=-1, keepdims=True), some - self.lo, 0)
        y = self.experts(x, mx.where(local, indices - self.lo, fill))
        return mx.where(local[..., None], y, mx.zeros((), dtype=y.dtype))

    def _gathered(self, x, indices):
        k = indices.shape[-1]
        flat = indices.flatten()  # [T*k] expert position per pair
        order = mx.argsort(flat)
        # The pair count decides the shape of the local computation.
        start, end = mx.stack([(flat < self.lo).sum(), (flat < self.hi).sum()]).tolist()
        if end == start:
            return mx.zeros((*indices.shape, x.shape[-1]), dtype=x.dtype)
        pairs = order[start:end]  # local pairs, sorted by expert
        xs = x.reshape(-1, x.shape[-1])[pairs // k]  # [P, D]
        ys = self.experts(xs, (flat[pairs] - self.lo)[:, None]).squeeze(-2)  # [P, D]
        pad = lambda n: mx.zeros((n, ys.shape[-1]), dtype=ys.dtype)
        ys = mx.concatenate([pad(start), ys, pad(flat.size - end)])
        return ys[mx.argsort(order)].reshape(*indices.shape, ys.shape[-1])


class _Constant:
    """Holds an array that is not a parameter (nn.Module would count it as one)."""

    def __init__(self, value: Optional[mx.array]):
        self.value = value


@dataclass
class ExpertLoad:
    path: str  # MoE block path, e.g. "model.layers.3.mlp"
    counts: List[int]  # (token, expert) pairs routed to each expert since start
    owner: List[int]  # the rank holding each expert

    def rank_totals(self, size: int) -> List[int]:
        """Pairs each rank computed."""
        totals = [0] * size
        for count, rank in zip(self.counts, self.owner):
            totals[rank] += count
        return totals


def expert_loads(model: nn.Module) -> List[ExpertLoad]:
    """Counts so far, in model order (empty for a model with no
    expert-parallel blocks). Every rank counts every pair, since the router
    is replicated. Call from the thread that runs the model."""
    found = [m for _, m in model.named_modules() if isinstance(m, LocalExperts)]
    found.sort(key=lambda m: _model_order(m.layer.path))
    return [ExpertLoad(m.layer.path, m.counter.collect(), m.layer.owner()) for m in found]


class Absent(nn.Module):
    """A shared expert computed by another rank: adds zero to this rank's
    partial output, which keeps the block's sum exact after the combine."""

    def __call__(self, x, *args, **kwargs):
        return mx.zeros_like(x)


class ExpertParallelBlock(nn.Module):
    """An MoE block whose output is a partial sum, joined by one all_sum."""

    def __init__(self, block: nn.Module, group):
        super().__init__()
        self.block = block
        self.group = group

    def __call__(self, x, *args, **kwargs):
        home = data_parallel.current()
        if home is None:  # replicated: every rank has the same tokens
            return comm.all_sum(self.block(x, *args, **kwargs), self.group)
        # Data-parallel attention (data_parallel.py): every rank's tokens in
        # (with any per-token argument, such as a router's indices), this
        # rank's own rows of the sum out.
        args = [home.dispatch(a) if isinstance(a, mx.array) and a.shape[:-1] == x.shape[:-1] else a
                for a in args]
        return home.combine(self.block(home.dispatch(x), *args, **kwargs), x)


def copy_rows(name: str, array: mx.array, rows: List[int]) -> mx.array:
    """Rows `rows` of an in-memory array as an array of their own: a plain
    slice would keep the whole tensor alive."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        out = array[rows[0] : rows[0] + len(rows)]
    else:
        out = array[mx.array(rows)]
    mx.eval(out)
    return mx.array(out)


class ExpertParallel(Strategy):
    name = "expert"

    def detect(self, model, group, expert_weights=None, placement=None, **_) -> ShardingPlan:
        size, rank = group.size(), group.rank()
        blocks = find_moe_blocks(model)
        if not blocks and any(isinstance(m, _SWITCH_LINEARS) for _, m in model.named_modules()):
            raise PlanError(
                "the model has switch-linear experts in a block no registered expert "
                "strategy recognizes; use strategy='pipeline'"
            )
        if not blocks:
            raise PlanError(
                "the model has no MoE block (no SwitchGLU/SwitchLinear experts); "
                "use strategy='pipeline' for dense models"
            )
        weights = expert_weights or [1] * size
        if len(weights) != size:
            raise PlanError(f"expert_weights has {len(weights)} entries for {size} ranks")
        for path, info, handler in blocks:
            if info.unsupported:
                raise PlanError(f"{path}: {info.unsupported}; use strategy='pipeline'")
        try:
            prefix = layers_path(model)
        except PlanError:
            prefix = None  # no layer list: the blocks are planned all the same
        placement = placement or {}
        unknown = sorted(set(placement) - {p for p, _, _ in blocks})
        if unknown:
            raise PlanError(f"the placement names blocks this model does not have: {unknown[:3]}; "
                            "was it made for another model?")
        layers = []
        for path, info, handler in blocks:
            if info.num_experts < size:
                raise PlanError(
                    f"{path} has {info.num_experts} experts but there are {size} ranks; "
                    f"use at most {info.num_experts} ranks or strategy='pipeline'"
                )
            order = None
            if path in placement:
                per_rank = validate(placement, path, info.num_experts, size)
                order = [e for r in per_rank for e in r]
                ranges, lo = [], 0
                for r in per_rank:
                    ranges.append((lo, lo + len(r)))
                    lo += len(r)
            else:
                ranges = split_evenly(info.num_experts, weights)
            # The rank with the fewest experts has the most room for the shared
            # ones (and adds whatever else a block must count once).
            shared_rank = min(range(size), key=lambda r: (ranges[r][1] - ranges[r][0], -r))
            layers.append(
                LayerPlan(
                    index=layer_index(path, prefix),
                    path=path,
                    kind="moe",
                    holder="experts",
                    num_experts=info.num_experts,
                    top_k=info.top_k,
                    shared=info.shared,
                    shared_rank=shared_rank,
                    ranges=ranges,
                    handler=handler.name,
                    order=order,
                )
            )
        moe_idx = {l.index for l in layers}
        for i in range(len(model.layers) if prefix else 0):
            if i not in moe_idx:
                layers.append(LayerPlan(i, f"{prefix}.{i}", "dense", "replicated"))
        layers.sort(key=lambda l: (l.index, l.path))
        return ShardingPlan(
            "expert",
            f"{len(blocks)} MoE blocks, experts split on axis 0, attention replicated",
            size,
            rank,
            layers,
        )

    def apply(self, model, plan, group, read_rows: Callable = copy_rows, long_attention: bool = True) -> None:
        """Keep this rank's experts, drop the rest, wrap each block for the
        combine. `read_rows(name, array, rows)` materializes rows of a
        stacked parameter (the loader reads them straight from the file).
        Shared experts the plan splits (`split`, hybrid) stay on every rank.
        `long_attention`: share a long input's attention (attention.py)."""
        info = dict((p, (i, h)) for p, i, h in find_moe_blocks(model))
        local_bytes = total_bytes = 0
        for layer in plan.moe_layers:
            block = module_at(model, layer.path)
            moe, handler = info[layer.path]
            rows_here = layer.experts_of(plan.rank)
            container = block[moe.experts]
            prefix = f"{layer.path}.{moe.experts}."
            rows = []
            for name, p in tree_flatten(container.parameters()):
                total_bytes += p.nbytes
                local = read_rows(prefix + name, p, rows_here)
                local_bytes += local.nbytes
                rows.append((name, local))
            container.update(tree_unflatten(rows))
            setattr(block, moe.experts, LocalExperts(container, layer, plan.rank))
            if layer.split:
                moe = dataclasses.replace(moe, shared=tuple(s for s in moe.shared if s not in layer.split))
            sharded = handler.shard(block, moe, layer.shared_rank == plan.rank, group)
            replace_module(model, layer.path, sharded)
        plan.param_bytes = {"experts_local": local_bytes, "experts_total": total_bytes}
        # Real ranks only: simulate's stand-in groups cannot gather.
        if long_attention and isinstance(group, mx.distributed.Group) and group.size() > 1:
            split_long_attention(model, group)


register(ExpertParallel())
