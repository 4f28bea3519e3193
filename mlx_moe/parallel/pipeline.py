"""Pipeline parallelism for any mlx-lm model whose decoder layers are a
list called in order.

Rank r keeps a contiguous range of layers and loads only their weights; the
others become `Skipped` so the model's own forward, its per-layer cache list
and layer numbering stay exactly as mlx-lm wrote them. The first local layer
receives the hidden state from rank r-1, the last sends it to rank r+1, and
the model's final layer slot broadcasts the last stage's output so every
rank computes the same logits.
"""

import mlx.core as mx
import mlx.nn as nn

from . import comm
from .expert import find_moe_blocks
from .plan import (
    LayerPlan,
    PlanError,
    ShardingPlan,
    Strategy,
    layers_path,
    register,
    split_evenly,
)


class Skipped(nn.Module):
    """A layer held by another stage: passes the hidden state through and
    keeps its cache's offset in step, since masks are built from caches.
    It keeps the layer's plain attributes (e.g. `use_sliding`, `is_linear`)
    that models read while choosing a layer's mask."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        for k, v in vars(layer).items():
            if not k.startswith("_") and k not in vars(self):
                object.__setattr__(self, k, v)

    def __call__(self, x, *args, **kwargs):
        cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
        if hasattr(cache, "offset") and isinstance(cache.offset, int):
            cache.offset += x.shape[1]
        return x


class Stage(nn.Module):
    """A local layer at a stage boundary: receive before it, send after it,
    and (in the model's last layer slot) broadcast the final hidden state."""

    def __init__(self, layer, group, recv_from=None, send_to=None, broadcast_from=None):
        super().__init__()
        self.layer = layer
        self.group = group
        self.recv_from, self.send_to, self.broadcast_from = recv_from, send_to, broadcast_from

    def __getattr__(self, key):
        # Models read attributes of their layers (use_sliding, is_linear, ...).
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "layer" not in self:
                raise
            return getattr(self["layer"], key)

    def __call__(self, x, *args, **kwargs):
        if self.recv_from is not None:
            x = comm.recv_like(x, self.recv_from, self.group)
        x = self.layer(x, *args, **kwargs)
        if self.send_to is not None:
            x = comm.send(x, self.send_to, self.group)
            if x.shape[1] > 1:
                # A prefill chunk evaluates only the caches, which do not
                # depend on this send; the next stage's recv would wait forever.
                mx.eval(x)
        if self.broadcast_from is not None:
            x = comm.broadcast(x, self.broadcast_from, self.group)
        return x


def _layer_list(model: nn.Module):
    m = model
    for part in layers_path(model).split("."):
        m = m[part]
    return m


class Pipeline(Strategy):
    name = "pipeline"

    def detect(self, model, group, layer_weights=None, **_) -> ShardingPlan:
        size, rank = group.size(), group.rank()
        layers = _layer_list(model)
        weights = layer_weights or [1] * size
        if len(weights) != size:
            raise PlanError(f"layer_weights has {len(weights)} entries for {size} ranks")
        if len(layers) < size:
            raise PlanError(f"{len(layers)} layers cannot be split over {size} ranks; use fewer ranks")
        ranges = split_evenly(len(layers), weights)
        moe = {p: i for p, i, _ in find_moe_blocks(model)}
        plans = []
        prefix = layers_path(model)
        for i in range(len(layers)):
            owner = next(r for r, (lo, hi) in enumerate(ranges) if lo <= i < hi)
            block = next((p for p in moe if p.startswith(f"{prefix}.{i}.")), None)
            plans.append(
                LayerPlan(
                    index=i,
                    path=f"{prefix}.{i}",
                    kind="moe" if block else "dense",
                    holder=f"rank {owner}",
                    num_experts=moe[block].num_experts if block else 0,
                    top_k=moe[block].top_k if block else None,
                    ranges=ranges,
                )
            )
        sizes = "/".join(str(hi - lo) for lo, hi in ranges)
        return ShardingPlan("pipeline", f"layers split {sizes} over {size} ranks", size, rank, plans)

    def apply(self, model, plan, group, read_rows=None) -> None:
        layers = _layer_list(model)
        rank, size = plan.rank, plan.size
        lo, hi = plan.layers[0].ranges[rank]
        last = len(layers) - 1
        for i in range(len(layers)):
            if not lo <= i < hi:
                layers[i] = Skipped(layers[i])
        for i in {lo, hi - 1, last}:
            layers[i] = Stage(
                layers[i],
                group,
                recv_from=rank - 1 if i == lo and rank > 0 else None,
                send_to=rank + 1 if i == hi - 1 and rank < size - 1 else None,
                broadcast_from=size - 1 if i == last else None,
            )
        plan.param_bytes = {}


register(Pipeline())
