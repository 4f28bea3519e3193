"""The sharding-strategy registry and the plan it produces.

A strategy is a registered object with two steps: `detect` walks an mlx-lm
model and returns a `ShardingPlan` (or raises `PlanError` saying what to
change), `apply` rewrites the model in place to follow the plan. `plan()`
picks the strategy; adding one is a `register()` call, not another branch.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn


class PlanError(ValueError):
    """A sharding request that cannot work, with what to change."""


@dataclass
class LayerPlan:
    index: int  # decoder layer index, -1 for modules outside the layers
    path: str  # module path of the block, e.g. "model.layers.3.mlp"
    kind: str  # "moe" | "dense" | "attention"
    # What each rank holds: "experts" | "replicated" | "stage" | "tensor"
    # (an MLP, or every expert, split by hidden units) | "heads" (attention split by heads).
    holder: str
    num_experts: int = 0
    top_k: Optional[int] = None
    shared: Tuple[str, ...] = ()  # child names of shared experts in the block
    # The rank that adds what must be counted once: the shared experts and
    # any other term a block adds outside its experts (identity experts, biases).
    shared_rank: Optional[int] = None
    ranges: List[Tuple[int, int]] = field(default_factory=list)  # experts [lo, hi) per rank
    handler: str = ""  # the registered block handler that detected it
    # Expert ids in placed order when a placement moved them: rank r holds
    # order[lo:hi] of its range. None: rank r holds experts lo..hi-1.
    order: Optional[List[int]] = None
    split: Tuple[str, ...] = ()  # shared experts split by tensor parallel over every rank (hybrid)
    note: str = ""  # why a block stays replicated where its strategy would split it

    def experts_of(self, rank: int) -> List[int]:
        lo, hi = self.ranges[rank]
        return list(self.order[lo:hi]) if self.order else list(range(lo, hi))

    def owner(self) -> List[int]:
        """The rank holding each expert."""
        out = [0] * self.num_experts
        for r in range(len(self.ranges)):
            for e in self.experts_of(r):
                out[e] = r
        return out


@dataclass
class ShardingPlan:
    strategy: str  # "expert" | "hybrid" | "tensor" | "pipeline" | "single"
    reason: str
    size: int
    rank: int
    layers: List[LayerPlan]
    param_bytes: Dict[str, int] = field(default_factory=dict)  # filled by apply

    @property
    def moe_layers(self) -> List[LayerPlan]:
        return [l for l in self.layers if l.kind == "moe"]

    @property
    def splits_experts(self) -> bool:
        """Whether each rank holds a share of the experts (expert parallel)."""
        return self.strategy in ("expert", "hybrid")

    def __str__(self) -> str:
        w = max([24] + [len(l.path) for l in self.layers])  # the block column
        lines = [
            f"strategy: {self.strategy} on {self.size} rank(s) ({self.reason})",
            f"{'layer':>5}  {'block':<{w}} {'kind':<9} {'experts':>7} {'top-k':>5}  "
            + "  ".join(f"rank {r:<8}" for r in range(self.size)),
        ]
        for l in self.layers:
            if l.kind == "moe":
                cells = []
                for r in range(len(l.ranges)):
                    cell = experts_text(l.experts_of(r))
                    if l.split:
                        cell += "+sh/tp"
                    elif l.shared and l.shared_rank == r:
                        cell += "+sh"
                    cells.append(f"{cell:<13}")
                top_k = "?" if l.top_k is None else str(l.top_k)
                lines.append(
                    f"{l.index:>5}  {l.path:<{w}} {'moe':<9} {l.num_experts:>7} {top_k:>5}  "
                    + "".join(cells) + (f"  ({l.note})" if l.note else "")
                )
            else:
                note = f"  ({l.note})" if l.note else ""
                lines.append(f"{l.index:>5}  {l.path:<{w}} {l.kind:<9} {'':>7} {'':>5}  {l.holder}{note}")
        if self.param_bytes:
            lines.append(
                "parameter bytes on this rank: "
                + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in self.param_bytes.items())
            )
        return "\n".join(lines)


def experts_text(ids: List[int]) -> str:
    """"4-7" for a contiguous run, else the count ("32 placed")."""
    if not ids:
        return "-"
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]}"
    return f"{len(ids)} placed"


class Strategy:
    """A way to split a model over ranks."""

    name = ""

    def detect(self, model: nn.Module, group, **options) -> ShardingPlan:
        raise NotImplementedError

    def apply(self, model: nn.Module, plan: ShardingPlan, group, read_rows=None) -> None:
        raise NotImplementedError


_STRATEGIES: Dict[str, Strategy] = {}
# What "auto" tries, in order; the first whose detect succeeds wins.
_AUTO_ORDER: List[str] = []


def register(strategy: Strategy, auto: bool = True) -> Strategy:
    _STRATEGIES[strategy.name] = strategy
    if auto and strategy.name not in _AUTO_ORDER:
        _AUTO_ORDER.append(strategy.name)
    return strategy


def strategies() -> List[str]:
    return list(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    if name not in _STRATEGIES:
        raise PlanError(
            f"Unknown strategy {name!r}; choose one of: auto, {', '.join(_STRATEGIES)}."
        )
    return _STRATEGIES[name]


def plan(model: nn.Module, group=None, strategy: str = "auto", **options) -> ShardingPlan:
    """Walk `model` and decide what each rank of `group` holds."""
    group = group or mx.distributed.init()
    if strategy != "auto":
        return get_strategy(strategy).detect(model, group, **options)
    reasons = []
    for name in _AUTO_ORDER:
        try:
            p = _STRATEGIES[name].detect(model, group, **options)
        except PlanError as e:
            reasons.append(f"{name}: {e}")
            continue
        if reasons:
            p.reason += "; not " + "; not ".join(reasons)
        return p
    raise PlanError("No strategy can shard this model: " + " | ".join(reasons))


def layers_path(model: nn.Module) -> str:
    """The path of the decoder layer list (e.g. "model.layers")."""
    layers = getattr(model, "layers", None)
    if not layers:
        raise PlanError(f"{type(model).__name__} exposes no decoder layer list (model.layers)")
    first = next((l for l in layers if l is not None), None)
    for path, m in model.named_modules():
        if m is first and path.rsplit(".", 1)[-1].isdigit():
            return path.rsplit(".", 1)[0]
    raise PlanError("could not find where the decoder layers live in the model")


def layer_index(path: str, layers: Optional[str]) -> int:
    """The index of the decoder layer that module `path` lies in, given the
    path of the layer list; -1 for modules outside it."""
    if layers is None or not path.startswith(layers + "."):
        return -1
    return int(path[len(layers) + 1 :].split(".")[0])


def module_at(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else m[part]
    return m


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = module_at(root, parent_path) if parent_path else root
    if isinstance(parent, list):
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


def split_evenly(n: int, weights: List[float]) -> List[Tuple[int, int]]:
    """Contiguous ranges of `n` items, sized in proportion to `weights`
    (largest remainder, at least one item each)."""
    total = float(sum(weights))
    if len(weights) > n:
        raise PlanError(f"{len(weights)} ranks but only {n} items to split")
    if any(w <= 0 for w in weights):
        raise PlanError(f"weights must be positive, got {weights}")
    quotas = [n * w / total for w in weights]
    counts = [max(1, int(q)) for q in quotas]
    # Hand out (or take back) the rest by largest remainder.
    while sum(counts) < n:
        r = max(range(len(counts)), key=lambda i: quotas[i] - counts[i])
        counts[r] += 1
    while sum(counts) > n:
        r = max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - quotas[i])
        counts[r] -= 1
    ranges, lo = [], 0
    for c in counts:
        ranges.append((lo, lo + c))
        lo += c
    return ranges
