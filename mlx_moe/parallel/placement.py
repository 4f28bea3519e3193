"""Which experts each rank holds, from measured expert loads.

Contiguous ranges put experts 0..E/N-1 on rank 0; when the router favours
some experts (it usually does), the rank holding them computes more pairs
per token than the others, and every other rank waits for it at the
combine. A balanced placement (EPLB-style greedy) gives each rank the same
number of experts but mixes popular and unpopular ones so each rank's share
of the measured routed pairs is as even as it can be. It moves experts
between ranks only: every pair is still computed by the expert it was
routed to, so the model's output is unchanged.

A placement is {block path: [[expert ids of rank 0], [of rank 1], ...]}.
Files are JSON: {"ranks": N, "layers": {path: [[...], ...]}}. Loads come
from a /metrics dump (Prometheus text) or JSON {"layers": {path: [count per
expert]}}.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .plan import PlanError, split_evenly

Placement = Dict[str, List[List[int]]]


def balance(counts: Sequence[float], capacities: Sequence[int]) -> List[List[int]]:
    """Experts per rank: the most loaded expert first, each to the rank
    with the least load that still has room (rank r takes capacities[r])."""
    if sum(capacities) != len(counts):
        raise PlanError(f"capacities {list(capacities)} do not add up to {len(counts)} experts")
    ranks: List[List[int]] = [[] for _ in capacities]
    totals = [0.0] * len(capacities)
    for e in sorted(range(len(counts)), key=lambda e: (-counts[e], e)):
        r = min((r for r in range(len(ranks)) if len(ranks[r]) < capacities[r]),
                key=lambda r: (totals[r], r))
        ranks[r].append(e)
        totals[r] += counts[e]
    return [sorted(r) for r in ranks]


def spread(totals: Sequence[float]) -> float:
    """Max / mean of the pairs each rank computes (1.0: even, also when
    nothing ran yet; N: one rank computes everything)."""
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean else 1.0


def imbalance(counts: Sequence[float], experts_per_rank: Sequence[Sequence[int]]) -> float:
    """`spread` of the ranks' shares of `counts` under a placement."""
    return spread([sum(counts[e] for e in experts) for experts in experts_per_rank])


def contiguous(num_experts: int, size: int, weights: Optional[Sequence[float]] = None) -> List[List[int]]:
    """The default placement: contiguous ranges in proportion to `weights`."""
    return [list(range(lo, hi)) for lo, hi in split_evenly(num_experts, list(weights or [1] * size))]


def balanced(loads: Dict[str, Sequence[float]], size: int,
             weights: Optional[Sequence[float]] = None) -> Placement:
    """A balanced placement for every layer in `loads`, with as many experts
    per rank as the contiguous split would give (memory stays as planned)."""
    out = {}
    for path, counts in loads.items():
        capacities = [len(r) for r in contiguous(len(counts), size, weights)]
        out[path] = balance(counts, capacities)
    return out


def validate(placement: Placement, path: str, num_experts: int, size: int) -> List[List[int]]:
    """The placement of block `path`, checked to be a partition of its experts over `size` ranks."""
    ranks = placement[path]
    if len(ranks) != size:
        raise PlanError(f"placement for {path} has {len(ranks)} ranks; the cluster has {size}. "
                        "Compute the placement for this number of ranks.")
    ids = sorted(e for r in ranks for e in r)
    if ids != list(range(num_experts)):
        raise PlanError(f"placement for {path} must hold each of its {num_experts} experts exactly once")
    if any(not r for r in ranks):
        raise PlanError(f"placement for {path} leaves a rank without experts")
    return [list(r) for r in ranks]


def read_placement(file) -> Placement:
    data = json.loads(Path(file).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
        raise PlanError(f"{file} is not a placement file (expected {{\"ranks\": N, \"layers\": {{...}}}})")
    return {k: [list(map(int, r)) for r in v] for k, v in data["layers"].items()}


def write_placement(placement: Placement, file) -> None:
    size = len(next(iter(placement.values()))) if placement else 0
    Path(file).write_text(json.dumps({"ranks": size, "layers": placement}, indent=1) + "\n")


def read_loads(file) -> Dict[str, List[float]]:
    """Tokens per expert per layer from a /metrics dump or a JSON file."""
    text = Path(file).read_text()
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        return {k: [float(c) for c in v] for k, v in data["layers"].items()}
    from prometheus_client.parser import text_string_to_metric_families

    found: Dict[str, Dict[int, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("mlx_moe_expert_tokens") and not s.name.endswith("_created"):
                found.setdefault(s.labels["layer"], {})[int(s.labels["expert"])] = s.value
    if not found:
        raise PlanError(f"{file} has no mlx_moe_expert_tokens samples: save GET /metrics of a "
                        "server that has answered requests")
    return {path: [c.get(e, 0.0) for e in range(max(c) + 1)] for path, c in found.items()}


def resolve(choice: Optional[str], expert_load: Optional[str], size: int) -> Optional[Placement]:
    """The placement a command line asks for: "contiguous" (None), "balanced"
    (from the loads in `expert_load`) or a placement file."""
    if choice in (None, "contiguous"):
        return None
    if choice == "balanced":
        if not expert_load:
            raise PlanError("--placement balanced needs --expert-load FILE: a saved GET /metrics "
                            "of a server that has answered typical requests")
        return balanced(read_loads(expert_load), size)
    if not Path(choice).is_file():
        raise PlanError(f"--placement {choice!r} is neither contiguous, balanced nor a placement file")
    return read_placement(choice)


def report(loads: Dict[str, Sequence[float]], placement: Placement, size: int) -> str:
    """Per layer: the busiest rank's share of the pairs, contiguous vs placed."""
    lines = [f"{'block':<28} {'imbalance contiguous':>20} {'placed':>8}"]
    for path, counts in loads.items():
        before = imbalance(counts, contiguous(len(counts), size))
        after = imbalance(counts, placement[path])
        lines.append(f"{path:<28} {before:>20.2f} {after:>8.2f}")
    return "\n".join(lines)
