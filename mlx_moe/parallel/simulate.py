"""Expert parallel in one process: every rank's shard of a model side by
side, each combine done by summing the ranks' partial outputs.

This checks a block handler without launching ranks: the combined model
must give the logits of the unsharded one. It is how tools/architectures.py
decides which mlx-lm architectures expert parallel serves exactly, and what
the fast tests run; the real ranks are tested with mlx.launch.
"""

import copy
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .expert import ExpertParallelBlock, copy_rows
from .plan import ShardingPlan, get_strategy, module_at, plan, replace_module


class LocalGroup:
    """Stands in for mx.distributed.Group where only size and rank matter."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def shard_in_process(
    model: nn.Module, size: int, expert_weights: Optional[Sequence[float]] = None, placement=None,
    strategy: str = "expert",
) -> List[Tuple[nn.Module, ShardingPlan]]:
    """The model as each of `size` ranks holds it under `strategy` (deep
    copies; `model` is left as it is)."""
    shards = []
    for rank in range(size):
        m = copy.deepcopy(model)
        group = LocalGroup(size, rank)
        p = plan(m, group, strategy, expert_weights=expert_weights, placement=placement)
        get_strategy(strategy).apply(m, p, group, read_rows=copy_rows)
        shards.append((m, p))
    return shards


class SummedRanks(nn.Module):
    """One combine point with every rank's module behind it: the sum of
    their outputs is what the all_sum would give each rank."""

    def __init__(self, parts: List[nn.Module]):
        super().__init__()
        self.parts = parts

    def __call__(self, *args, **kwargs):
        out = self.parts[0](*args, **kwargs)
        for p in self.parts[1:]:
            out = out + p(*args, **kwargs)
        return out


def combined(
    model: nn.Module, size: int, expert_weights: Optional[Sequence[float]] = None, placement=None
) -> Tuple[nn.Module, ShardingPlan]:
    """Rank 0's shard with each combine point summing the partial outputs of
    all `size` ranks: a single-process model computing what the ranks
    compute together. Returns it with rank 0's plan."""
    shards = shard_in_process(model, size, expert_weights, placement)
    first = shards[0][0]
    points = [p for p, m in first.named_modules() if isinstance(m, ExpertParallelBlock)]
    for path in points:
        replace_module(first, path, SummedRanks([module_at(m, path).block for m, _ in shards]))
    return first, shards[0][1]


def max_logit_diff(model: nn.Module, other: nn.Module, inputs: Sequence[Sequence[int]]) -> float:
    """Largest |difference| of the two models' logits over every position of each input."""
    worst = 0.0
    for ids in inputs:
        x = mx.array([list(ids)])
        worst = max(worst, mx.abs(model(x) - other(x)).max().item())
    return worst
