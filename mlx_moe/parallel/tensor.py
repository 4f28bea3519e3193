"""The `hybrid` strategy: tensor parallelism for the blocks around the
experts, expert parallelism for the routed experts; and `tensor`, which
splits the routed experts by tensor parallel too (every rank holds a slice
of every expert, as mlx-lm's `sharded_load` does), for comparison.

Attention is split by heads, dense MLPs and shared experts by their hidden
units. The linears are cut with mlx's `shard_inplace` (q, k, v, gate and up
by output rows; o_proj and down by input columns), so a split block gives
this rank's partial sum. Attention and a dense MLP join theirs with one
`all_sum` (through comm.py, so it is counted and bounded like every other
collective); a shared expert's partial sum joins the routed experts' in
the MoE block's one combine (expert.py). A decoder layer then costs two
collectives, attention and its MLP or MoE block, whatever its kind. The KV
cache of a split attention holds this rank's KV heads only.

A block that cannot be split stays replicated (its shared experts on one
rank, as under `expert`), and the plan says why: head counts that do not
divide by the ranks, a quantization whose groups do not, a layout this
module does not know (fused projections, parameters per head such as
attention sinks, DeepSeek's latent attention, whose cache holds no heads).
"""

import dataclasses
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from . import comm
from .expert import ExpertParallel, block_handlers, find_moe_blocks
from .plan import LayerPlan, PlanError, layers_path, module_at, register, replace_module

LINEARS = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
QUERY_HEADS = ("n_heads", "num_heads", "num_attention_heads")
KV_HEADS = ("n_kv_heads", "num_key_value_heads", "num_kv_heads")
ATTENTION = ("self_attn", "attention", "attn")
MLP = ("mlp", "feed_forward", "ffn")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# An MLP's projection back to the hidden size; every other linear of it reads the input.
OUTPUT = ("down_proj", "w2", "fc2")


def _cut_reason(linear: nn.Module, by: str, n: int) -> Optional[str]:
    """Why `linear` cannot be cut in n by output rows or input columns (None: it can)."""
    if by == "rows":
        rows = linear.weight.shape[-2]  # a switch linear stacks its experts on axis 0
        return None if rows % n == 0 else f"{rows} output rows do not divide by {n} ranks"
    if "scales" in linear:  # quantized
        groups = linear.scales.shape[-1]
        return None if groups % n == 0 else f"{groups} quantization groups per row do not divide by {n} ranks"
    cols = linear.weight.shape[-1]
    return None if cols % n == 0 else f"{cols} input columns do not divide by {n} ranks"


def _int_attr(module: nn.Module, names) -> Optional[str]:
    return next((a for a in names if isinstance(getattr(module, a, None), int)), None)


def attention_split(attn: nn.Module, n: int) -> Tuple[Optional[Tuple[str, Optional[str]]], str]:
    """((query-heads attribute, KV-heads attribute or None), "") when `attn`
    splits by heads over n ranks, else (None, why not)."""
    children = attn.children()
    if "kv_a_proj_with_mqa" in children:  # mlx-lm's DeepSeek and Kimi attention
        return None, ("latent attention (MLA): its KV cache holds one compressed latent per token, "
                      "which no head split divides")
    if not all(isinstance(children.get(p), LINEARS) for p in PROJECTIONS):
        return None, f"{type(attn).__name__} has no separate q/k/v/o projections"
    heads = _int_attr(attn, QUERY_HEADS)
    if heads is None:
        return None, f"{type(attn).__name__} names its head count in no known attribute"
    kv = _int_attr(attn, KV_HEADS)
    n_heads, n_kv = getattr(attn, heads), getattr(attn, kv) if kv else getattr(attn, heads)
    if n_heads % n or n_kv % n:
        return None, f"{n_heads} query and {n_kv} KV heads do not divide by {n} ranks"
    head_dim = children["q_proj"].weight.shape[0] // n_heads
    for name, p in tree_flatten(attn.parameters()):
        if name.split(".")[0] not in PROJECTIONS and p.shape != (head_dim,):
            return None, f"attention parameter {name} {tuple(p.shape)} is not per head dimension"
    for name, by in zip(PROJECTIONS, ("rows", "rows", "rows", "columns")):
        if reason := _cut_reason(children[name], by, n):
            return None, f"{name}: {reason}"
    return (heads, kv), ""


def mlp_split(mlp: nn.Module, n: int) -> Tuple[Optional[str], str]:
    """(its output projection's name, "") when `mlp` (linears in, one out,
    elementwise between; or the same of stacked experts) splits by hidden
    units over n ranks, else (None, why not)."""
    children = mlp.children()
    linears = {k: c for k, c in children.items() if isinstance(c, LINEARS)}
    out = [k for k in linears if k in OUTPUT]
    weighted = [k for k, c in children.items() if isinstance(c, nn.Module) and c.parameters()]
    if len(out) != 1 or len(linears) < 2 or set(weighted) != set(linears):
        return None, f"{type(mlp).__name__} is not an MLP of separate linears"
    for name, linear in linears.items():
        if reason := _cut_reason(linear, "columns" if name == out[0] else "rows", n):
            return None, f"{name}: {reason}"
    return out[0], ""


class SummedLinear(nn.Module):
    """A linear cut by input columns, whose partial products are summed over
    the ranks (mlx's ShardedToAllLinear, through comm.all_sum); its bias is
    added once, after the sum."""

    def __init__(self, linear: nn.Module, group):
        super().__init__()
        self.bias = linear.bias if "bias" in linear else None
        if "bias" in linear:
            del linear["bias"]
        self.linear, self.group = linear, group

    def __call__(self, x):
        y = comm.all_sum(self.linear(x), self.group)
        return y if self.bias is None else y + self.bias


def _cut_mlp(mlp: nn.Module, out: str, group, summed: bool) -> None:
    for name, child in mlp.children().items():
        if isinstance(child, LINEARS) and name != out:
            shard_inplace(child, "all-to-sharded", group=group)
    down = mlp[out]
    shard_inplace(down, "sharded-to-all", group=group)
    if summed:
        setattr(mlp, out, SummedLinear(down, group))
    elif "bias" in down and group.rank() != 0:  # a partial sum: the bias is added by one rank
        down.bias = mx.zeros_like(down.bias)


def _cut_attention(attn: nn.Module, heads: Tuple[str, Optional[str]], group) -> None:
    n = group.size()
    for name in PROJECTIONS[:3]:
        shard_inplace(attn[name], "all-to-sharded", group=group)
    shard_inplace(attn["o_proj"], "sharded-to-all", group=group)
    attn.o_proj = SummedLinear(attn["o_proj"], group)
    for attr in heads:
        if attr:
            setattr(attn, attr, getattr(attn, attr) // n)


def _child(module: nn.Module, names) -> Optional[str]:
    return next((a for a in names if isinstance(getattr(module, a, None), nn.Module)), None)


class Hybrid(ExpertParallel):
    name = "hybrid"

    def detect(self, model, group, **options):
        plan = super().detect(model, group, **options)
        n = group.size()
        prefix = layers_path(model)
        moe = {l.index: l for l in plan.moe_layers}
        layers: List[LayerPlan] = []
        for i, layer in enumerate(model.layers):
            path = f"{prefix}.{i}"
            attn = _child(layer, ATTENTION)
            if attn is not None:
                heads, why = attention_split(layer[attn], n)
                layers.append(LayerPlan(i, f"{path}.{attn}", "attention", "heads" if heads else "replicated",
                                        note=why))
            if i in moe:
                block = moe[i]
                split, why = [], []
                for s in block.shared:
                    out, reason = mlp_split(module_at(model, f"{block.path}.{s}"), n)
                    if out:
                        split.append(s)
                    else:
                        why.append(f"{s}: {reason}")
                layers.append(dataclasses.replace(block, split=tuple(split), note="; ".join(why)))
                continue
            mlp = _child(layer, MLP)
            if mlp is None:
                layers.append(LayerPlan(i, path, "dense", "replicated", note="no MLP found"))
                continue
            out, why = mlp_split(layer[mlp], n)
            layers.append(LayerPlan(i, f"{path}.{mlp}", "dense", "tensor" if out else "replicated", note=why))
        plan.layers = layers
        plan.strategy = "hybrid"
        heads = sum(l.holder == "heads" for l in layers)
        attention = [l for l in layers if l.kind == "attention"]
        plan.reason = (f"{len(moe)} MoE blocks, experts split on axis 0; attention split by heads in "
                       f"{heads} of {len(attention)} layers; dense MLPs and shared experts split by tensor "
                       "parallel where they divide")
        return plan

    def apply(self, model, plan, group, read_rows=None) -> None:
        split_around(model, plan, group)
        split_attention = any(l.kind == "attention" and l.holder == "heads" for l in plan.layers)
        kwargs = {} if read_rows is None else {"read_rows": read_rows}
        super().apply(model, plan, group, long_attention=not split_attention, **kwargs)


def split_around(model, plan, group) -> None:
    """Cut what the plan splits around the routed experts: attention by
    heads, dense MLPs and shared experts by hidden units."""
    n = group.size()
    for l in plan.layers:
        if l.kind == "attention" and l.holder == "heads":
            attn = module_at(model, l.path)
            _cut_attention(attn, attention_split(attn, n)[0], group)
        elif l.kind == "dense" and l.holder == "tensor":
            mlp = module_at(model, l.path)
            _cut_mlp(mlp, mlp_split(mlp, n)[0], group, summed=True)
        elif l.kind == "moe":
            for s in l.split:
                shared = module_at(model, f"{l.path}.{s}")
                _cut_mlp(shared, mlp_split(shared, n)[0], group, summed=False)


class Tensor(Hybrid):
    """Hybrid's split of attention and dense blocks, and every routed expert
    split by its hidden units on every rank; the MoE block keeps its one
    combine (the block handlers' partial sums, expert.py)."""

    name = "tensor"

    def detect(self, model, group, **options):
        plan = super().detect(model, group, **options)
        n = group.size()
        info = {p: i for p, i, _ in find_moe_blocks(model)}
        for l in plan.moe_layers:
            out, why = mlp_split(module_at(model, f"{l.path}.{info[l.path].experts}"), n)
            if out is None:
                raise PlanError(f"{l.path}: its experts cannot be split by tensor parallel ({why}); "
                                "use strategy='hybrid' or 'expert'")
            l.holder, l.ranges, l.order = "tensor", [(0, l.num_experts)] * n, None
        plan.strategy = "tensor"
        plan.reason = plan.reason.replace("experts split on axis 0", "every expert split by tensor parallel")
        return plan

    def apply(self, model, plan, group, read_rows=None) -> None:
        split_around(model, plan, group)
        handlers = {h.name: h for h in block_handlers()}
        info = {p: i for p, i, _ in find_moe_blocks(model)}
        for l in plan.moe_layers:
            block, moe = module_at(model, l.path), info[l.path]
            experts = block[moe.experts]
            _cut_mlp(experts, mlp_split(experts, group.size())[0], group, summed=False)
            moe = dataclasses.replace(moe, shared=tuple(s for s in moe.shared if s not in l.split))
            replace_module(model, l.path, handlers[l.handler].shard(block, moe, l.shared_rank == plan.rank, group))
        plan.param_bytes = {}


register(Hybrid(), auto=False)
register(Tensor(), auto=False)
