"""`mlx-moe plan`: where a checkpoint's bytes go on each host, whether
they fit, and how fast decode will be, from config.json and the
safetensors headers alone (docs/PLAN.md has the model and its sources).

The strategy comes from the loader's own code: the mlx-lm model is built
lazily from the config (its arrays are never evaluated, so it costs no
memory) and handed to `mlx_moe.parallel.plan.plan` with a stand-in group. Bytes
come from the headers; ops per token from tracing one lazy decode step.

Decode time per token, per strategy:
    sum over synchronised segments of the slowest host's
        (weight + KV bytes read) / bandwidth + ops x op_us + host syncs x sync_us
    + per collective: link latency x rounds + message bytes / link bandwidth
                      + jitter x sqrt(compute since the previous collective)
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..parallel.plan import PlanError, plan
from ..parallel.simulate import LocalGroup
from .model import KVLayer, Model
from .profiles import GB, Host, Link

# Kernel ops the expert-parallel layer adds per MoE layer over the plain
# block (mlx_moe/parallel/expert.py LocalExperts, counted from its code, views
# excluded): the gathered path (CPU) sorts, counts, gathers and scatters
# back the local pairs and syncs once with the host; the masked path (GPU
# decode) compares, picks a used local expert for foreign pairs and
# selects. Both count the routed pairs, and all_sum.
EP_GATHER_OPS = 18
EP_MASK_OPS = 12


def expected_max(counts: Sequence[int], k: int, cost: Callable[[int, int], float]) -> float:
    """E[max over hosts h of cost(h, x_h)] when a token's k experts are
    drawn uniformly without replacement from sum(counts) experts and host h
    holds counts[h] of them (x_h: how many of the k it holds). Exact: a
    dynamic program over hosts, keeping (experts drawn so far, max so far)."""
    states = {(0, -math.inf): 1}
    for h, n in enumerate(counts):
        nxt: Dict[Tuple[int, float], int] = {}
        for (j, worst), ways in states.items():
            for x in range(min(n, k - j) + 1):
                key = (j + x, max(worst, cost(h, x)))
                nxt[key] = nxt.get(key, 0) + ways * math.comb(n, x)
        states = nxt
    total = math.comb(sum(counts), k)
    return sum(ways * worst for (j, worst), ways in states.items() if j == k) / total


class Timed:
    """What a step estimate (one stream's or a batch's) derives from its fields."""

    @property
    def runs(self) -> bool:
        return not self.note

    @property
    def fits(self) -> List[bool]:
        return [w + c <= u for w, c, u in zip(self.weights, self.kv, self.usable)]

    @property
    def seconds(self) -> float:
        return self.memory_s + self.overhead_s + self.comm_s

    def add_segment(self, reads: List[float], ops: List[float]) -> float:
        """Add what the hosts compute between two collectives, each host's
        read time and op time: the slowest host sets the time, the most ops
        of it count as overhead. Returns that time."""
        t = max(r + o for r, o in zip(reads, ops))
        self.overhead_s += max(ops)
        self.memory_s += t - max(ops)
        return t


@dataclass
class Estimate(Timed):
    strategy: str  # "expert" | "tensor" | "pipeline" | "single"
    label: str
    hosts: List[str]
    weights: List[float] = field(default_factory=list)  # bytes each host holds
    kv: List[float] = field(default_factory=list)  # KV cache bytes at the context
    holds: List[str] = field(default_factory=list)  # what each host holds, in words
    usable: List[float] = field(default_factory=list)
    memory_s: float = 0.0
    overhead_s: float = 0.0
    comm_s: float = 0.0
    collectives: int = 0
    note: str = ""  # why it cannot run, if it cannot

    @property
    def tok_s(self) -> float:
        return 1.0 / self.seconds if self.runs and self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "label": self.label, "runs": self.runs, "note": self.note,
                "fits": all(self.fits) if self.runs else False, "hosts": self.hosts,
                "weights_bytes": self.weights, "kv_bytes": self.kv, "usable_bytes": self.usable,
                "fits_per_host": self.fits, "holds": self.holds, "tok_s": self.tok_s,
                "ms_per_token": self.seconds * 1e3, "memory_ms": self.memory_s * 1e3,
                "overhead_ms": self.overhead_s * 1e3, "comm_ms": self.comm_s * 1e3,
                "collectives_per_token": self.collectives}


def _kv_total(m: Model, layers, context: int, split: Callable[[KVLayer], int] = lambda kv: 1) -> float:
    return sum(m.kv[i].at(context) / split(m.kv[i]) for i in layers if i < len(m.kv))


def estimate_single(m: Model, host: Host, context: int, position: int) -> Estimate:
    e = Estimate("single", f"single ({host.name})", [host.name], usable=[host.usable])
    e.weights = [m.inv.total]
    e.kv = [_kv_total(m, range(len(m.inv.layers)), context)]
    e.holds = ["everything"]
    reads = sum(l.active for l in m.inv.layers) + m.inv.outside_read
    e.memory_s = host.read_s(reads, sum(m.kv_read(i, position) for i in range(len(m.inv.layers))))
    e.overhead_s = host.ops_s(m.ops)
    return e


def _planned(m: Model, hosts: List[Host], strategy: str, label: str, **options):
    """An empty estimate and the registry's plan for `strategy`, or the
    estimate with the reason it cannot plan (plan None)."""
    e = Estimate(strategy, label, [h.name for h in hosts], usable=[h.usable for h in hosts])
    try:
        return e, plan(m.nn, LocalGroup(len(hosts)), strategy, **options)
    except PlanError as err:
        e.note = str(err)
        return e, None


def estimate_expert(m: Model, hosts: List[Host], link: Link, context: int, position: int,
                    weights: Optional[List[float]] = None) -> Estimate:
    n = len(hosts)
    e, p = _planned(m, hosts, "expert", "expert parallel", expert_weights=weights)
    if p is None:
        return e
    moe = {l.path: l for l in p.moe_layers}
    held = [m.inv.replicated] * n
    counts_of = {}
    for i, lb in enumerate(m.inv.layers):
        if lb.block in moe:
            lp = moe[lb.block]
            counts_of[i] = [hi - lo for lo, hi in lp.ranges]
            for h, c in enumerate(counts_of[i]):
                held[h] += lb.experts * c / lb.num_experts + (lb.shared if lp.shared_rank == h else 0)
    e.weights = held
    e.kv = [_kv_total(m, range(len(m.inv.layers)), context)] * n
    first = next(iter(moe.values()), None)
    e.holds = [f"experts {first.ranges[h][0]}-{first.ranges[h][1] - 1} of each MoE layer"
               + (" + shared" if first.shared and first.shared_rank == h else "") if first else "all"
               for h in range(n)]
    message = m.hidden * m.act_bytes
    pending = max(h.read_s(m.inv.outside_read) for h in hosts)  # compute since the last collective
    for i, lb in enumerate(m.inv.layers):
        base = [h.read_s(lb.dense, m.kv_read(i, position)) for h in hosts]
        over = [h.ops_s(m.layer_ops) for h in hosts]
        if i not in counts_of:
            pending += e.add_segment(base, over)
            continue
        lp = moe[lb.block]
        extra = [h.ops_s(EP_MASK_OPS) if h.chip.gpu else h.ops_s(EP_GATHER_OPS, syncs=1) for h in hosts]
        fixed = [b + o + x + (h.read_s(lb.shared) if lp.shared_rank == r else 0)
                 for r, (h, b, o, x) in enumerate(zip(hosts, base, over, extra))]
        k = lb.top_k

        def cost(r, x, lb=lb, fixed=fixed):
            # The masked (GPU) path reads one local expert for a token with none.
            experts = x + (1 if hosts[r].chip.gpu and x == 0 else 0)
            return fixed[r] + hosts[r].read_s(experts * lb.per_expert)

        t = expected_max(counts_of[i], k, cost)
        o = max(a + b for a, b in zip(over, extra))
        e.overhead_s += o
        e.memory_s += t - o
        e.comm_s += link.all_sum_s(n, message) + link.wait_s(pending + t)
        e.collectives += 1
        pending = 0.0
    e.memory_s += max(h.read_s(m.inv.outside_read) for h in hosts)
    return e


def estimate_tensor(m: Model, hosts: List[Host], link: Link, context: int, position: int) -> Estimate:
    """mlx-lm's `sharded_load(tensor_group=...)`: every layer's attention
    heads and every expert's intermediate axis split evenly, two all_sums
    per layer, embeddings and head whole on every host."""
    n = len(hosts)
    e = Estimate("tensor", "tensor parallel (mlx-lm)", [h.name for h in hosts], usable=[h.usable for h in hosts])
    if not hasattr(m.nn, "shard"):
        e.note = f"mlx-lm has no tensor parallel for {m.info.config.get('model_type')}"
        return e
    whole = sum(l.tp_whole for l in m.inv.layers) + m.inv.embed + m.inv.other
    e.weights = [whole + (m.inv.total - whole) / n] * n
    split = lambda kv: min(n, kv.heads)
    e.kv = [_kv_total(m, range(len(m.inv.layers)), context, split)] * n
    e.holds = [f"1/{n} of every layer"] * n
    message = m.hidden * m.act_bytes
    for i, lb in enumerate(m.inv.layers):
        reads = lb.tp_whole + (lb.active - lb.tp_whole) / n
        kv = m.kv_read(i, position) / split(m.kv[i]) if i < len(m.kv) else 0
        over = [h.ops_s(m.layer_ops) for h in hosts]
        t = e.add_segment([h.read_s(reads, kv) for h in hosts], over)
        # One all_sum after attention, one after the MLP: about half the layer each.
        e.comm_s += 2 * (link.all_sum_s(n, message) + link.wait_s(t / 2))
        e.collectives += 2
    e.memory_s += max(h.read_s(m.inv.outside_read) for h in hosts)
    return e


def estimate_pipeline(m: Model, hosts: List[Host], link: Link, context: int, position: int,
                      weights: Optional[List[float]] = None) -> Estimate:
    """mlx-moe's (and mlx-lm's) pipeline: for one stream the stages run one
    after another, then the last stage's output reaches every host."""
    n = len(hosts)
    e, p = _planned(m, hosts, "pipeline", "pipeline", layer_weights=weights)
    if p is None:
        return e
    ranges = p.layers[0].ranges
    outside = m.inv.embed + m.inv.other  # every stage keeps embeddings, norm and head
    e.weights = [outside + sum(m.inv.layers[i].total for i in range(lo, hi)) for lo, hi in ranges]
    e.kv = [_kv_total(m, range(lo, hi), context) for lo, hi in ranges]
    e.holds = [f"layers {lo}-{hi - 1}" for lo, hi in ranges]
    stage_s = []
    for h, (lo, hi) in zip(hosts, ranges):
        memory = h.read_s(sum(m.inv.layers[i].active for i in range(lo, hi)),
                          sum(m.kv_read(i, position) for i in range(lo, hi)))
        overhead = h.ops_s(m.layer_ops * (hi - lo))
        e.memory_s += memory
        e.overhead_s += overhead
        stage_s.append(memory + overhead)
    e.memory_s += max(h.read_s(m.inv.outside_read) for h in hosts)
    message = m.hidden * m.act_bytes
    e.collectives = n if n > 1 else 0
    if e.collectives:
        # A send after each stage but the last, then the broadcast.
        e.comm_s = (n - 1) * link.send_s(message) + link.all_sum_s(n, message)
        e.comm_s += sum(link.wait_s(t) for t in stage_s)
    return e


@dataclass
class Report:
    model: Model
    hosts: List[Host]
    link: Link
    context: int
    position: int
    auto: str  # the strategy load_sharded picks
    reason: str
    expert_weights: Optional[List[float]]
    layer_weights: Optional[List[float]]
    estimates: List[Estimate]

    def chosen(self) -> Estimate:
        return next((e for e in self.estimates if e.strategy == self.auto), self.estimates[-1])

    def to_json(self) -> dict:
        inv = self.model.inv
        return {
            "model": self.model.info.source, "model_type": self.model.info.config.get("model_type"),
            "checkpoint_bytes": self.model.info.total_bytes, "loaded_bytes": inv.total,
            "ops_per_token": self.model.ops, "hosts": [h.name for h in self.hosts],
            "chips": [h.chip.name for h in self.hosts], "link": self.link.name, "context": self.context,
            "decode_position": self.position, "strategy": self.auto, "reason": self.reason,
            "expert_weights": self.expert_weights, "layer_weights": self.layer_weights,
            "notes": inv.notes, "estimates": [e.to_json() for e in self.estimates],
        }


def _shares(hosts: List[Host], fixed: float) -> Optional[List[float]]:
    """Even shares for equal hosts; else in proportion to the room each
    has left after what every host holds anyway."""
    room = [max(h.usable - fixed, 1.0) for h in hosts]
    if len({round(r) for r in room}) == 1:
        return None
    return [round(r / max(room), 4) for r in room]


def make_report(m: Model, hosts: List[Host], link: Link, context: int, position: int = 0) -> Report:
    """What `mlx-moe plan` prints: the strategy auto picks, each host's
    share, and the decode estimate of every strategy."""
    config = m.info.config
    limit = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    context = min(context, limit) if limit else context
    n = len(hosts)
    kv_all = _kv_total(m, range(len(m.inv.layers)), context)
    expert_weights = _shares(hosts, m.inv.replicated + kv_all)
    layer_weights = _shares(hosts, m.inv.embed + m.inv.other)
    if n == 1:
        auto, reason = "single", "one host: the plain mlx-lm model"
    else:
        p = plan(m.nn, LocalGroup(n), "auto", expert_weights=expert_weights, layer_weights=layer_weights)
        auto, reason = p.strategy, p.reason
    estimates = [estimate_single(m, hosts[0], context, position)]
    if n > 1:
        estimates = [estimate_expert(m, hosts, link, context, position, expert_weights),
                     estimate_tensor(m, hosts, link, context, position),
                     estimate_pipeline(m, hosts, link, context, position, layer_weights)] + estimates
    return Report(m, hosts, link, context, position, auto, reason, expert_weights, layer_weights, estimates)


def _gb(x: float) -> str:
    return f"{x / GB:.1f} GB"


def format_report(r: Report) -> str:
    m, inv = r.model, r.model.inv
    cfg = m.info.config.get("text_config", m.info.config)
    moe_layers = [l for l in inv.layers if l.num_experts]
    shape = (f"{len(inv.layers)} layers, {len(moe_layers)} MoE ({moe_layers[0].num_experts} experts, "
             f"top-{moe_layers[0].top_k})" if moe_layers else f"{len(inv.layers)} layers, dense")
    lines = [
        f"model: {m.info.source} ({m.info.config.get('model_type')}: {shape}, hidden {cfg.get('hidden_size')})",
        f"checkpoint: {_gb(m.info.total_bytes)} in {len(m.info.tensors)} tensors (read from the headers); "
        f"{_gb(inv.total)} loaded; {m.ops} ops per decode step",
        f"hosts: " + ", ".join(f"{h.name} ({h.chip.name}, {h.memory_GB:g} GB, {h.usable_fraction:.0%} usable)"
                                for h in r.hosts)
        + (f"; link {r.link.name}" if len(r.hosts) > 1 else ""),
        f"context: {r.context} tokens of KV cache per host budgeted; decode predicted at position {r.position}",
        "",
        f"strategy (auto): {r.auto} - {r.reason}",
    ]
    if r.expert_weights and r.auto == "expert":
        lines.append(f"  uneven hosts: load_sharded(..., expert_weights={r.expert_weights})")
    if r.layer_weights and r.auto == "pipeline":
        lines.append(f"  uneven hosts: load_sharded(..., layer_weights={r.layer_weights})")
    e = r.chosen()
    lines.append(f"  {'host':<12} {'holds':<44} {'weights':>10} {'KV cache':>10} {'total':>10} {'usable':>10}  fits")
    for i, h in enumerate(e.hosts):
        lines.append(f"  {h:<12} {e.holds[i]:<44} {_gb(e.weights[i]):>10} {_gb(e.kv[i]):>10} "
                     f"{_gb(e.weights[i] + e.kv[i]):>10} {_gb(e.usable[i]):>10}  "
                     + ("yes" if e.fits[i] else f"NO: short by {_gb(e.weights[i] + e.kv[i] - e.usable[i])}"))
    if not all(e.fits):
        lines.append("  does not fit: add hosts, use hosts with more memory, a smaller quantization or a shorter "
                     "--context (or raise the wired-memory limit and pass --usable)")
    lines += ["", "predicted decode, batch 1 (docs/PLAN.md):",
              f"  {'strategy':<26} {'fits':<5} {'tok/s':>7} {'ms/tok':>8} {'memory':>8} {'overhead':>9} "
              f"{'comm':>7} {'coll/tok':>8}"]
    for est in r.estimates:
        name = est.label + (" *" if est.strategy == r.auto else "")
        if not est.runs:
            lines.append(f"  {name:<26} n/a   {est.note}")
            continue
        lines.append(f"  {name:<26} {'yes' if all(est.fits) else 'no':<5} {est.tok_s:>7.1f} "
                     f"{est.seconds * 1e3:>8.2f} {est.memory_s * 1e3:>8.2f} {est.overhead_s * 1e3:>9.2f} "
                     f"{est.comm_s * 1e3:>7.2f} {est.collectives:>8}")
    lines.append("  (* the strategy auto picks; memory/overhead/comm in ms per token)")
    fitting = [est for est in r.estimates if est.runs and all(est.fits)]
    if fitting:
        best = max(fitting, key=lambda est: est.tok_s)
        lines.append(f"fastest that fits: {best.label} at {best.tok_s:.1f} tok/s"
                     + (" (mlx-lm's sharded_load; mlx-moe runs expert parallel and pipeline)"
                        if best.strategy == "tensor" else ""))
    else:
        lines.append("nothing fits these hosts")
    lines += [f"note: {n}" for n in inv.notes]
    return "\n".join(lines)
