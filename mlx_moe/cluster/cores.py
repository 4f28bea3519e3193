"""Giving ranks that share a machine their own cores.

The ring backend's socket threads spin while a collective waits for a
peer. When several ranks run on one machine, an unpinned waiting rank's
spinning thread takes the core the rank it waits for is computing on;
measured here (2 cores, 2 ranks), that alone costs 1.4x in decode. Each
local rank gets a disjoint share of the cores instead.
"""

import json
import os
from typing import Optional, Set


def local_ranks(rank: int) -> Optional[list]:
    """Ranks whose ring address has the same IP as `rank`'s, from the
    hostfile mlx.launch wrote; None when there is no ring hostfile."""
    path = os.environ.get("MLX_HOSTFILE")
    if not path or not os.path.exists(path):
        return None
    try:
        hosts = json.loads(open(path).read() or "[]")
        ips = [h[0].rsplit(":", 1)[0] for h in hosts]
    except (ValueError, IndexError, TypeError, AttributeError):
        return None
    if rank >= len(ips):
        return None
    return [r for r, ip in enumerate(ips) if ip == ips[rank]]


def pin_local_rank(rank: int) -> Optional[Set[int]]:
    """Pin every thread of this process to this rank's share of the cores
    when other ranks run on the same machine. Returns the cores, or None
    when nothing was done (one rank here, no affinity API, or
    MLX_MOE_PIN_CORES=0)."""
    if os.environ.get("MLX_MOE_PIN_CORES", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    peers = local_ranks(rank)
    if not peers or len(peers) < 2:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    i, n = peers.index(rank), len(peers)
    mine = set(cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n]) or {cpus[i % len(cpus)]}
    # Threads started later (MLX's stream threads) inherit the main thread's set.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:
            pass
    return mine


# Set by launch.start for the ranks it starts: the priority to restore.
RANK_PRIORITY = "MLX_MOE_RANK_PRIORITY"


def settle_local_rank(rank: int) -> Optional[Set[int]]:
    """What a rank started by launch.start does first: take back its
    priority, let go of its stdin, and pin itself to its share of the cores
    (returned, as pin_local_rank)."""
    restore_priority()
    release_stdin()
    return pin_local_rank(rank)


def restore_priority() -> None:
    """Undo the lower priority mlx.launch was started with (see
    launch.start) so the ranks outrank its polling threads. Lowering a
    nice value needs privilege on most systems; without it the ranks keep
    the launcher's priority, which costs nothing but the gain."""
    want = os.environ.get(RANK_PRIORITY)
    if want is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, int(want))
    except (OSError, ValueError):
        pass


def release_stdin() -> None:
    """Put /dev/null in place of the stdin pipe mlx.launch gave this rank
    (only when launch.start started it): the launcher's relay for this rank
    spins until a write to that pipe fails (see launch._stop_relay_spin)."""
    if os.environ.get(RANK_PRIORITY) is None:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
