"""How a rank that fails on its own tells the launcher why.

A rank that cannot go on (a file missing on its host, out of memory, a
Metal error in its forward pass) prints one line in this form and exits;
the others then lose it in their next collective. The launcher reads the
line from the ranks' relayed output, so the error the user and the clients
see says which rank failed and why, not only that it exited.
"""

import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Set

PREFIX = "mlx-moe: rank"
_LINE = re.compile(r"mlx-moe: rank (\d+) failed: (.*)")

# Errors that say all there is to say (a missing file, a shard too large for
# its host, a plan or cluster mismatch); anything else also gets its traceback.
EXPLAINED = (FileNotFoundError, MemoryError, ValueError)


def rank_failed(rank: int, error: BaseException) -> None:
    """Print why this rank is about to exit (the traceback too when the
    error is not one that explains itself)."""
    reason = f"{type(error).__name__}: " + " ".join(str(error).split())
    try:
        if not isinstance(error, EXPLAINED):
            traceback.print_exception(error)
        print(f"{PREFIX} {rank} failed: {reason}", file=sys.stderr, flush=True)
    except OSError:  # no terminal left (an ended ssh session): exiting matters more
        pass


def parse(line: str):
    """(rank, reason) from a line rank_failed printed, else None."""
    m = _LINE.search(line)
    return (int(m.group(1)), m.group(2).strip()) if m else None


# The errors mlx 0.32 raises when a peer went away, exactly: any other error,
# even one that names the ring or a peer, is this rank's own.
LOST_PEER = (
    # ring/ring.cpp, SocketThread::worker: a socket to a neighbour closed or failed 10 times.
    (RuntimeError, re.compile(r"\[ring\] connection to a peer was lost")),
    # jaccl/lib/jaccl/rdma.h, Connection::post_send/post_recv (std::invalid_argument): the
    # queue pair to the peer is broken. JACCL checks no completion, so a peer lost
    # mid-collective may instead stall it: the watchdog's case.
    (ValueError, re.compile(r"\[jaccl\] (Send|Recv) failed with error code -?\d+")),
    # jaccl/lib/jaccl/tcp.cpp, TCPSocket::send/recv: the side channel that connects the ranks.
    (RuntimeError, re.compile(r"\[jaccl\] (Send|Recv) failed with errno=\d+")),
)


def lost_peer(e: Exception) -> bool:
    """A collective failed because a peer went away (not this rank's fault)."""
    text = str(e).strip()
    return any(isinstance(e, kind) and pattern.fullmatch(text) for kind, pattern in LOST_PEER)


def exit_failed(e: Exception) -> None:
    """What a rank program does with an error it cannot go on from: say why,
    then exit at once."""
    if lost_peer(e):
        # Another rank failed first; let the launcher see its exit first.
        time.sleep(2)
        traceback.print_exc()
    else:
        rank_failed(int(os.environ.get("MLX_RANK", 0)), e)
    sys.stderr.flush()
    # Skip interpreter teardown: MLX's communication threads can keep a
    # failed rank alive, and the others must see it go now.
    os._exit(1)


_RANK_EXIT = re.compile(r"Node with rank (\d+) (was killed|exited with code (-?\d+))")


def describe_exit(match) -> str:
    """mlx.launch's "Node with rank N ..." line in words."""
    code = match.group(3)
    if code is None:
        return "was killed"
    code = int(code)
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    if code == 255:  # ssh's own: a rank on another host
        return "exited with code 255 (over ssh: the rank was killed or its connection was lost)"
    return f"exited with code {code}"


class FirstFailure:
    """Finds, in the output mlx.launch relays, the first rank that failed
    and why, and calls `on_failure(sentence)` once.

    mlx.launch logs a rank's exit from the thread that relays its output,
    up to 0.1 s before it writes that output, so the rank's own reason may
    come just after the exit: an exit waits REASON_WAIT seconds for it."""

    REASON_WAIT = 0.5

    def __init__(self, on_failure: Callable[[str], None], hosts: Optional[Sequence[str]] = None):
        self.on_failure, self.hosts = on_failure, list(hosts or [])
        self.reasons: Dict[int, str] = {}
        self.failure: Optional[str] = None
        self._lock = threading.Lock()
        self._waits: List[threading.Timer] = []
        self._pending: Set[int] = set()  # ranks whose exit waits for its reason

    def who(self, rank: int) -> str:
        return f"rank {rank} (host {self.hosts[rank]})" if rank < len(self.hosts) else f"rank {rank}"

    def feed(self, line: str) -> None:
        failed = parse(line)
        if failed:
            self.reasons.setdefault(failed[0], failed[1])
            # Printed just before it exits; but a rank whose exit came first
            # (its wait below still running) failed first: this one may only
            # have read garbage from a collective that rank broke.
            if not any(rank != failed[0] for rank in self._pending):
                self._decide(failed[0], "")
            return
        m = _RANK_EXIT.search(line)
        if m:
            rank, how = int(m.group(1)), describe_exit(m)
            if rank in self.reasons:
                self._decide(rank, how)
            else:
                self._pending.add(rank)
                timer = threading.Timer(self.REASON_WAIT, self._decide, (rank, how))
                timer.daemon = True
                timer.start()
                self._waits.append(timer)

    def settle(self) -> Optional[str]:
        """The failure, once every exit seen has had its wait."""
        for timer in self._waits:
            timer.join()
        return self.failure

    def _decide(self, rank: int, how: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            reason = self.reasons.get(rank)
            self.failure = f"{self.who(rank)} failed: {reason}" if reason else f"{self.who(rank)} {how}"
        self.on_failure(self.failure)
