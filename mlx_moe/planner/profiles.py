"""The hardware `mlx-moe plan` predicts for: chip and link profiles
(profiles.json, docs/PLAN.md has their sources) and the hosts a command
line names."""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..cluster.memory import parse_bytes

PROFILES_FILE = Path(__file__).with_name("profiles.json")
GB = 1e9


@dataclass
class Chip:
    name: str
    bandwidth_GBps: float  # weight bytes read per second by a decode step
    op_us: float  # fixed cost of one op that runs a kernel
    sync_us: float  # one host sync (read a value back mid-step)
    memory_GB: float
    usable_fraction: float
    gpu: bool
    source: str
    # KV cache bytes read per second by attention; None: bandwidth_GBps.
    # Differs on a CPU, where dequantizing weights, not memory, is the bound.
    kv_bandwidth_GBps: Optional[float] = None


@dataclass
class Link:
    name: str
    latency_us: float
    bandwidth_GBps: float
    allreduce: str  # "ring" | "mesh"
    source: str
    # A collective also waits for the slower rank: segment times drift
    # apart like a random walk, so the wait grows with the square root of
    # the compute since the previous collective; this is the wait after
    # 1 ms. Measured for the loopback ring, where ranks sharing the cores
    # also slow each other while one spins; 0 (unmeasured) between machines.
    jitter_us: float = 0.0

    def wait_s(self, segment_s: float) -> float:
        return self.jitter_us * 1e-6 * math.sqrt(max(segment_s, 0.0) * 1e3)

    def all_sum_s(self, n: int, nbytes: int) -> float:
        """One all_sum of `nbytes` over `n` hosts: a ring pays a latency
        per step and moves 2(n-1)/n of the message; a full mesh sends to
        every peer at once."""
        if n < 2:
            return 0.0
        if self.allreduce == "mesh":
            return self.latency_us * 1e-6 + nbytes / (self.bandwidth_GBps * GB)
        return (n - 1) * self.latency_us * 1e-6 + 2 * (n - 1) / n * nbytes / (self.bandwidth_GBps * GB)

    def send_s(self, nbytes: int) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_GBps * GB)


def load_profiles(path: Path = PROFILES_FILE) -> Tuple[Dict[str, Chip], Dict[str, Link]]:
    data = json.loads(Path(path).read_text())
    chips = {k: Chip(k, **v) for k, v in data["chips"].items()}
    links = {k: Link(k, **v) for k, v in data["links"].items()}
    return chips, links


@dataclass
class Host:
    name: str
    chip: Chip
    memory_GB: float
    usable_fraction: float

    @property
    def usable(self) -> float:
        return self.memory_GB * GB * self.usable_fraction

    def read_s(self, nbytes: float, kv: float = 0.0) -> float:
        """Seconds to read `nbytes` of weights and `kv` bytes of KV cache."""
        kv_rate = self.chip.kv_bandwidth_GBps or self.chip.bandwidth_GBps
        return nbytes / (self.chip.bandwidth_GBps * GB) + kv / (kv_rate * GB)

    def ops_s(self, ops: float, syncs: float = 0) -> float:
        return ops * self.chip.op_us * 1e-6 + syncs * self.chip.sync_us * 1e-6


def _per_host(value: Optional[str], n: int, what: str) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise ValueError(f"--{what} has {len(items)} entries for {n} hosts; give one, or one per host")
    return items


def make_hosts(hosts: str, chips: Optional[str], memory: Optional[str], usable: Optional[float],
               profiles: Dict[str, Chip]) -> List[Host]:
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    if len(names) == 1 and names[0].isdigit():
        names = [f"host{i}" for i in range(int(names[0]))]
    if not names:
        raise ValueError("--hosts names no host")
    chip_names = _per_host(chips, len(names), "chip") or ["m3-ultra"] * len(names)
    unknown = sorted(set(chip_names) - set(profiles))
    if unknown:
        raise ValueError(f"unknown chip {unknown[0]!r}; known chips: {', '.join(profiles)}")
    mems = _per_host(memory, len(names), "memory")
    out = []
    for i, (name, c) in enumerate(zip(names, chip_names)):
        chip = profiles[c]
        out.append(Host(name, chip, parse_bytes(mems[i]) if mems else chip.memory_GB,
                        usable if usable is not None else chip.usable_fraction))
    return out
