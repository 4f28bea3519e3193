"""`mlx-moe plan --concurrency B`: aggregate decode tok/s and KV cache per
host when B requests decode together, for expert parallel with
data-parallel or replicated attention, mlx-lm's tensor parallel, pipeline
and one host (docs/PLAN.md, "Batches"). It extends costmodel's
single-stream model, whose bytes, ops, profiles and expert-count machinery
it reuses; at B = 1 it gives the same numbers.

One decode step of B requests (B tokens), per layer, the slowest host's
    weights: read once per step, bytes / bandwidth, unless its matmuls are
             compute-bound: then x tokens / ridge (`ridge`)
    experts: the distinct experts the batch uses on that host, each read
             once, serving B k / u of the pairs (u: `distinct_experts`)
    KV cache: the sequences whose attention it runs, each read
    ops:     as for one token (the graph does not grow with B)
plus the step's collectives, whose messages hold B (or B/N) hidden rows;
aggregate tok/s = B / step seconds.
"""

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, List, Sequence, Tuple

import numpy as np

from ..parallel.comm import max_message_bytes
from ..parallel.plan import plan
from ..parallel.simulate import LocalGroup
from .costmodel import EP_GATHER_OPS, EP_MASK_OPS, Report, Timed
from .model import Model
from .profiles import GB, Chip, Host, Link

# expert.GATHER_MIN_TOKENS on a GPU (that module reads the device it runs
# on): below this many tokens a rank runs the masked path, from here on it
# gathers its local pairs, with one host sync per MoE layer.
GPU_GATHER_MIN_TOKENS = 32
# Kernel ops data-parallel attention adds per MoE layer over the replicated
# layer (mlx_moe/parallel/data_parallel.py Home, views excluded): the pad before the
# all_gather, the all_gather, the packed-row index of an uneven batch.
DP_OPS = 3
# Slot messages per data-parallel step (serve/homes.py SlotModel): one
# all_gather before the decode forward, one that ends the step.
DP_SLOTS = 2
DP_SLOT_BYTES = 4096

# Dense matmul rate, TFLOP/s. The M3 Ultra's is measured: 17.4 for an fp16
# matmul on an 80-core M3 Ultra with MLX (raullenchai/Rapid-MLX PR #258),
# 0.61 of its 28.6 spec (80 cores x 128 ALUs x 2 x 1.398 GHz). The others
# are spec (cores x 128 x 2 x clock; clocks as hmc-tech.com lists them)
# x 0.61. A CPU profile has none: its "bandwidth" is already a quantized
# matmul's throughput, and that grows with every token (ridge 1).
MATMUL_TFLOPS = {
    "m3-ultra": 17.4,
    "m2-ultra": 27.2 * 0.61,  # 76 cores, 1.398 GHz
    "m1-ultra": 21.2 * 0.61,  # 64 cores, 1.296 GHz
    "m4-max": 17.2 * 0.61,  # 40 cores, 1.678 GHz
    "m3-max": 14.3 * 0.61,  # 40 cores, 1.398 GHz
    "m2-max": 13.6 * 0.61,  # 38 cores, 1.398 GHz
    "m1-max": 10.6 * 0.61,  # 32 cores, 1.296 GHz
    "m4-pro": 8.6 * 0.61,  # 20 cores, 1.678 GHz
}


def params_per_byte(m: Model) -> float:
    """Weights per byte as stored: quantized (bits plus a scale and a bias
    per group, at the activation dtype) or plain."""
    q = m.info.config.get("quantization")
    if isinstance(q, dict) and q.get("bits"):
        return 1.0 / (q["bits"] / 8 + 2 * m.act_bytes / q.get("group_size", 64))
    return 1.0 / m.act_bytes


def ridge(chip: Chip, per_byte: float) -> float:
    """Tokens one read of a weight serves before its matmul turns
    compute-bound: matmul FLOP/s / (bandwidth x 2 FLOPs x weights per byte)."""
    tflops = MATMUL_TFLOPS.get(chip.name) if chip.gpu else None
    if not tflops:
        return 1.0
    return max(1.0, tflops * 1e12 / (chip.bandwidth_GBps * GB * 2 * per_byte))


def weights_s(host: Host, nbytes: float, tokens: float, ridge_tokens: float) -> float:
    """A matmul over `nbytes` of weights for `tokens` tokens (a roofline)."""
    return host.read_s(nbytes) * max(1.0, tokens / ridge_tokens)


def distinct_experts(experts: int, top_k: int, tokens: int) -> float:
    """Expected number of experts `tokens` tokens use between them, each
    picking top_k of `experts` uniformly: E (1 - (1 - k/E)^B)."""
    u = experts * (1 - (1 - top_k / experts) ** tokens)
    return float(round(u)) if abs(u - round(u)) < 1e-9 else u


@lru_cache(maxsize=4096)
def _expected_max(counts: Tuple[int, ...], draws: int, table: Tuple[Tuple[float, ...], ...]) -> float:
    """costmodel.expected_max by the distribution of the max: for each cost c
    a host can have, P(max <= c) = the z^draws coefficient of
    prod_h sum_{x: cost(h, x) <= c} C(n_h, x) z^x, over C(E, draws). A few
    ms for hundreds of draws over four hosts (costmodel's exact DP, which
    tracks every running max, takes seconds there)."""
    costs = [np.array(row) for row in table]
    ways = [np.array([float(math.comb(n, x)) for x in range(n + 1)]) for n in counts]
    total, below, mean = math.comb(sum(counts), draws), 0.0, 0.0
    for c in sorted({v for row in table for v in row}):
        poly = np.ones(1)
        for w, row in zip(ways, costs):
            poly = np.convolve(poly, np.where(row <= c, w, 0.0))[:draws + 1]
        at_most = (poly[draws] if draws < len(poly) else 0.0) / total
        mean += c * (at_most - below)
        below = at_most
    return mean


def expected_max_of(counts: Sequence[int], draws: float, cost: Callable[[int, int], float]) -> float:
    """costmodel.expected_max (E[max over hosts of cost(h, x_h)] when `draws`
    distinct experts are drawn uniformly from the hosts' `counts`), linear
    between whole numbers of draws."""
    table = tuple(tuple(cost(h, x) for x in range(n + 1)) for h, n in enumerate(counts))
    lo = math.floor(draws)
    low = _expected_max(tuple(counts), lo, table)
    return low if draws == lo else low + (draws - lo) * (_expected_max(tuple(counts), lo + 1, table) - low)


# ----------------------------------------------------------- collectives


def _guarded(one: Callable[[float], float], nbytes: float, per_piece: float = 1.0) -> float:
    """A collective sent as mlx-moe's comm sends it: in pieces of at most
    max_message_bytes, each paying the latency (per_piece: how many bytes
    of a message each byte of `nbytes` puts in it)."""
    pieces = max(1, math.ceil(nbytes * per_piece / max_message_bytes()))
    return pieces * one(nbytes / pieces)


def all_gather_s(link: Link, n: int, block: float) -> float:
    """Every host's `block` bytes to every host: a ring passes n-1 blocks on,
    one step each; a mesh receives them over n-1 links at once."""
    if n < 2:
        return 0.0
    one = lambda b: link.send_s(b) if link.allreduce == "mesh" else (n - 1) * link.send_s(b)
    return _guarded(one, block)


def sum_scatter_s(link: Link, n: int, block: float) -> float:
    """Sum n blocks of `block` bytes, each host keeping one: it receives n-1
    partial blocks (the backends that have it are meshes: JACCL)."""
    if n < 2:
        return 0.0
    one = lambda b: link.send_s(b) if link.allreduce == "mesh" else (n - 1) * link.send_s(b)
    return _guarded(one, block, per_piece=n)


def all_sum_s(link: Link, n: int, nbytes: float) -> float:
    return _guarded(lambda b: link.all_sum_s(n, b), nbytes)


# -------------------------------------------------------------- estimates


@dataclass
class BatchEstimate(Timed):
    strategy: str  # "expert-dp" | "expert" | "tensor" | "pipeline" | "single"
    label: str
    requests: int  # B, decoding together
    hosts: List[str]
    weights: List[float] = field(default_factory=list)
    kv: List[float] = field(default_factory=list)  # KV cache bytes per host: B requests at the context
    usable: List[float] = field(default_factory=list)
    memory_s: float = 0.0  # per step
    overhead_s: float = 0.0
    comm_s: float = 0.0
    collectives: int = 0  # per step
    note: str = ""

    @property
    def tok_s(self) -> float:
        """Aggregate: every request's tokens per second."""
        return self.requests / self.seconds if self.runs and self.seconds > 0 else 0.0

    @property
    def stream_tok_s(self) -> float:
        return self.tok_s / self.requests

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "label": self.label, "concurrency": self.requests,
                "runs": self.runs, "note": self.note, "fits": all(self.fits) if self.runs else False,
                "hosts": self.hosts, "weights_bytes": self.weights, "kv_bytes": self.kv,
                "usable_bytes": self.usable, "fits_per_host": self.fits, "tok_s": self.tok_s,
                "tok_s_per_request": self.stream_tok_s, "ms_per_step": self.seconds * 1e3,
                "memory_ms": self.memory_s * 1e3, "overhead_ms": self.overhead_s * 1e3,
                "comm_ms": self.comm_s * 1e3, "collectives_per_step": self.collectives}


def _single_stream(r: Report, strategy: str):
    return next(e for e in r.estimates if e.strategy == strategy)


def _start(r: Report, base: str, strategy: str, label: str, b: int, hosts: List[Host]) -> BatchEstimate:
    """A batch estimate with the weights of the single-stream estimate
    `base` and its reason not to run, if any."""
    single = _single_stream(r, base)
    return BatchEstimate(strategy, label, b, [h.name for h in hosts], list(single.weights), [],
                         [h.usable for h in hosts], note=single.note)


def _expert_layers(r: Report, n: int):
    p = plan(r.model.nn, LocalGroup(n), "expert", expert_weights=r.expert_weights)
    return {l.path: l for l in p.moe_layers}


def estimate_expert(r: Report, b: int, data_parallel: bool) -> BatchEstimate:
    """Expert parallel. Replicated attention: every host runs all B
    sequences' attention and holds their KV; one all_sum of [B, hidden] per
    MoE layer. Data-parallel: host h runs its own B_h (B/N, rounded)
    sequences, and each MoE layer all_gathers the batch and combines it."""
    m, hosts, link, n = r.model, r.hosts, r.link, len(r.hosts)
    e = _start(r, "expert", "expert-dp" if data_parallel else "expert",
               "expert, data-parallel attn" if data_parallel else "expert, replicated attn", b, hosts)
    if not e.runs:
        return e
    moe = _expert_layers(r, n)
    per_request = _single_stream(r, "expert").kv[0]  # every host holds every request's cache
    seqs = [b // n + (h < b % n) for h in range(n)] if data_parallel else [b] * n
    e.kv = [s * per_request for s in seqs]
    ridges = [ridge(h.chip, params_per_byte(m)) for h in hosts]
    message = m.hidden * m.act_bytes
    outside = [weights_s(h, m.inv.outside_read, s, rg) for h, s, rg in zip(hosts, seqs, ridges)]
    pending = max(outside)  # compute since the last collective
    masked = [h.chip.gpu and b < GPU_GATHER_MIN_TOKENS for h in hosts]
    extra = [h.ops_s(EP_MASK_OPS) if mk else h.ops_s(EP_GATHER_OPS, syncs=1) for h, mk in zip(hosts, masked)]
    if data_parallel:
        extra = [x + h.ops_s(DP_OPS) for x, h in zip(extra, hosts)]
    most = max(seqs)  # the rows each host sends to the all_gather (padded to the busiest)
    for i, lb in enumerate(m.inv.layers):
        base = [weights_s(h, lb.dense, s, rg) + h.read_s(0, s * m.kv_read(i, r.position))
                for h, s, rg in zip(hosts, seqs, ridges)]
        over = [h.ops_s(m.layer_ops) for h in hosts]
        if lb.block not in moe:
            pending += e.add_segment(base, over)
            continue
        lp = moe[lb.block]
        # The shared experts and the router see every token of the batch.
        fixed = [x + o + y + (weights_s(h, lb.shared, b, rg) if lp.shared_rank == j else 0)
                 for j, (h, x, o, y, rg) in enumerate(zip(hosts, base, over, extra, ridges))]
        u = distinct_experts(lb.num_experts, lb.top_k, b)
        pairs = b * lb.top_k / u  # per distinct expert

        def cost(j, x, lb=lb, fixed=fixed, pairs=pairs):
            # The masked path reads one local expert for a token with none.
            experts = x + (1 if masked[j] and x == 0 else 0)
            return fixed[j] + weights_s(hosts[j], experts * lb.per_expert, pairs, ridges[j])

        t = expected_max_of([hi - lo for lo, hi in lp.ranges], u, cost)
        o = max(a + c for a, c in zip(over, extra))
        e.overhead_s += o
        e.memory_s += t - o
        if data_parallel:
            before = max(x + y for x, y in zip(base, over))  # attention, then the gather
            e.comm_s += all_gather_s(link, n, most * message) + link.wait_s(pending + before)
            combine = (sum_scatter_s(link, n, most * message) if link.allreduce == "mesh"
                       else all_sum_s(link, n, b * message))
            e.comm_s += combine + link.wait_s(t - before)
            e.collectives += 2
        else:
            e.comm_s += all_sum_s(link, n, b * message) + link.wait_s(pending + t)
            e.collectives += 1
        pending = 0.0
    e.memory_s += max(outside)
    if data_parallel and n > 1:
        e.comm_s += DP_SLOTS * all_gather_s(link, n, DP_SLOT_BYTES)
        e.collectives += DP_SLOTS
    return e


def estimate_tensor(r: Report, b: int) -> BatchEstimate:
    """mlx-lm's tensor parallel: every host runs all B tokens through 1/N of
    each layer (and reads 1/N of each expert the batch uses)."""
    m, hosts, link, n = r.model, r.hosts, r.link, len(r.hosts)
    e = _start(r, "tensor", "tensor", "tensor parallel (mlx-lm)", b, hosts)
    if not e.runs:
        return e
    e.kv = [b * x for x in _single_stream(r, "tensor").kv]
    ridges = [ridge(h.chip, params_per_byte(m)) for h in hosts]
    message = b * m.hidden * m.act_bytes
    for i, lb in enumerate(m.inv.layers):
        u = distinct_experts(lb.num_experts, lb.top_k, b) if lb.num_experts else 0
        kv = b * m.kv_read(i, r.position) / min(n, m.kv[i].heads) if i < len(m.kv) else 0
        over = [h.ops_s(m.layer_ops) for h in hosts]
        t = e.add_segment([weights_s(h, lb.tp_whole + (lb.dense - lb.tp_whole) / n, b, rg)
                           + weights_s(h, lb.shared / n, b, rg)
                           + (weights_s(h, u * lb.per_expert / n, b * lb.top_k / u, rg) if u else 0)
                           + h.read_s(0, kv) for h, rg in zip(hosts, ridges)], over)
        e.comm_s += 2 * (link.all_sum_s(n, message) + link.wait_s(t / 2))
        e.collectives += 2
    e.memory_s += max(weights_s(h, m.inv.outside_read, b, rg) for h, rg in zip(hosts, ridges))
    return e


def _stage_s(m: Model, host: Host, layers: range, b: int, position: int) -> Tuple[float, float]:
    """(memory, overhead) seconds of one host running `layers` whole for B tokens."""
    rg = ridge(host.chip, params_per_byte(m))
    memory = 0.0
    for i in layers:
        lb = m.inv.layers[i]
        memory += weights_s(host, lb.dense + lb.shared, b, rg) + host.read_s(0, b * m.kv_read(i, position))
        if lb.num_experts:
            u = distinct_experts(lb.num_experts, lb.top_k, b)
            memory += weights_s(host, u * lb.per_expert, b * lb.top_k / u, rg)
    return memory, host.ops_s(m.layer_ops * len(layers))


def estimate_pipeline(r: Report, b: int) -> BatchEstimate:
    """The pipeline as mlx-moe and mlx-lm run it: the batch goes through the
    stages one after another (no micro-batches), then to every host."""
    m, hosts, link, n = r.model, r.hosts, r.link, len(r.hosts)
    e = _start(r, "pipeline", "pipeline", "pipeline", b, hosts)
    if not e.runs:
        return e
    e.kv = [b * x for x in _single_stream(r, "pipeline").kv]
    p = plan(m.nn, LocalGroup(n), "pipeline", layer_weights=r.layer_weights)
    stage_s = []
    for h, (lo, hi) in zip(hosts, p.layers[0].ranges):
        memory, overhead = _stage_s(m, h, range(lo, hi), b, r.position)
        e.memory_s += memory
        e.overhead_s += overhead
        stage_s.append(memory + overhead)
    e.memory_s += max(weights_s(h, m.inv.outside_read, b, ridge(h.chip, params_per_byte(m))) for h in hosts)
    message = b * m.hidden * m.act_bytes
    e.collectives = n if n > 1 else 0
    if e.collectives:
        e.comm_s = (n - 1) * _guarded(link.send_s, message) + all_sum_s(link, n, message)
        e.comm_s += sum(link.wait_s(t) for t in stage_s)
    return e


def estimate_single(r: Report, b: int) -> BatchEstimate:
    m, host = r.model, r.hosts[0]
    e = _start(r, "single", "single", f"single ({host.name})", b, [host])
    e.kv = [b * x for x in _single_stream(r, "single").kv]
    e.memory_s, e.overhead_s = _stage_s(m, host, range(len(m.inv.layers)), b, r.position)
    e.memory_s += weights_s(host, m.inv.outside_read, b, ridge(host.chip, params_per_byte(m)))
    return e


def parse_concurrency(text: str) -> List[int]:
    """'8' or '1,8,32' -> request counts."""
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--concurrency {text!r}: give request counts of at least 1, e.g. 8 or 1,8,32")
    return counts


def batch_estimates(r: Report, concurrency: Sequence[int]) -> List[BatchEstimate]:
    """Every strategy's step at each number of concurrent requests."""
    out = []
    for b in concurrency:
        if len(r.hosts) > 1:
            out += [estimate_expert(r, b, True), estimate_expert(r, b, False), estimate_tensor(r, b),
                    estimate_pipeline(r, b)]
        out.append(estimate_single(r, b))
    return out


def format_batch(r: Report, rows: List[BatchEstimate]) -> str:
    gb = lambda x: f"{x / GB:.1f} GB"
    lines = [f"predicted decode with concurrent requests, every request at position {r.position} "
             f"and --context {r.context} tokens of KV cache each (docs/PLAN.md, \"Batches\"):",
             f"  {'strategy':<28} {'requests':>8} {'fits':<5} {'tok/s':>8} {'tok/s/req':>9} {'ms/step':>8} "
             f"{'memory':>8} {'overhead':>9} {'comm':>7} {'coll/step':>9} {'KV/host':>10}"]
    for est in rows:
        if not est.runs:
            lines.append(f"  {est.label:<28} {est.requests:>8} n/a   {est.note}")
            continue
        lines.append(f"  {est.label:<28} {est.requests:>8} {'yes' if all(est.fits) else 'no':<5} "
                     f"{est.tok_s:>8.1f} {est.stream_tok_s:>9.1f} {est.seconds * 1e3:>8.2f} "
                     f"{est.memory_s * 1e3:>8.2f} {est.overhead_s * 1e3:>9.2f} {est.comm_s * 1e3:>7.2f} "
                     f"{est.collectives:>9} {gb(max(est.kv)):>10}")
    lines.append("  (tok/s: all requests together; memory/overhead/comm in ms per step; KV/host: the most any "
                 "host holds)")
    if len(r.hosts) > 1:
        lines.append("  (mlx-moe serve --attention auto: replicated while one request runs, data-parallel from two)")
    return "\n".join(lines)
