"""When a rank last saw the cluster move, and how long it may wait for it.

The engine ticks at every point where all ranks have met (the plan
exchange, each data-parallel slot, the end of a step). A rank that waits
longer than its limit without a tick stops the cluster: a peer is stalled
or unreachable. The limit is the configured timeout plus SLOW_MARGIN times
the longest wait between ticks of the last WINDOW ones, so a machine that
is slow (a step reading a 512-token chunk on each of 2 ranks takes ~12 s
on this 2-core CPU when quiet, so about 60 s at 4x oversubscription) raises
its own limit instead of being mistaken for a stalled one, while a cluster
of fast steps still finds a stopped rank within about the timeout. The limit
is at most LIMIT_CAP times the timeout: after one very slow step (say 60 s),
a real stall is still found within 4x the timeout, not after ~300 s.
"""

import time
from collections import deque

SLOW_MARGIN = 4.0
WINDOW = 64
LIMIT_CAP = 4.0  # the limit's maximum, in timeouts


class Progress:
    def __init__(self, timeout: float, margin: float = SLOW_MARGIN, window: int = WINDOW,
                 clock=time.monotonic):
        self.timeout, self.margin, self.clock = timeout, margin, clock
        self.last = clock()
        self.waiting = False  # inside a collective or a step
        self.gaps = deque(maxlen=window)
        self.longest = 0.0  # max(gaps), kept as one float for the watchdog thread

    def tick(self) -> None:
        """The cluster moved (every rank met here)."""
        now = self.clock()
        if self.waiting:
            self.gaps.append(now - self.last)
            self.longest = max(self.gaps)
        self.last = now

    def stalled_for(self) -> float:
        """Seconds this rank has waited on the cluster without progress."""
        return self.clock() - self.last if self.waiting else 0.0

    def limit(self) -> float:
        """How long a wait may last before the cluster counts as stalled."""
        return min(self.timeout + self.margin * self.longest, LIMIT_CAP * self.timeout)
