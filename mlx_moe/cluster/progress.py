"""Loading progress: each rank reports it, the launcher shows it and passes
it on to rank 0 (for /health and the status page: rank 0 cannot hear from
the other ranks while they load, except through the launcher).

A rank started by `mlx-moe` ($MLX_MOE_PROGRESS=1) prints its progress as
lines on stderr,

    mlx-moe-progress {"rank": 1, "stage": "reading", "done": 1048576, "total": 8388608, "progress": 0.125}

(stages: downloading its files, reading its share of the weights, loaded;
`progress` is the rank's share of all its stages done), which the launcher
takes out of the output it relays (Board). Started otherwise, a rank logs a
line per quarter of each stage instead.
"""

import json
import os
import sys
import threading
from typing import Callable, Dict, List, Optional, Sequence

PREFIX = "mlx-moe-progress "
ENV = "MLX_MOE_PROGRESS"


class Progress:
    """One rank's reports, at most one per percent of each stage.
    `downloads`: the rank downloads its files first (the first half of its
    progress), else reading is all of it."""

    def __init__(self, rank: int, size: int, downloads: bool, log: Callable[[str], None]):
        self.rank, self.size, self.log = rank, size, log
        self.stages = ["downloading", "reading"] if downloads else ["reading"]
        self.machine = os.environ.get(ENV) == "1"
        self.last = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        part = min(1.0, done / total) if total else 0.0
        key = (stage, int(100 * part) if self.machine else int(4 * part))
        if key == self.last:
            return
        self.last = key
        if not self.machine:
            if stage != "loaded":  # the loader logs that itself
                self.log(f"[rank {self.rank}/{self.size}] {stage}: {100 * part:.0f}% "
                         f"({done / 2**20:.1f} of {total / 2**20:.1f} MiB)")
            return
        step = self.stages.index(stage) if stage in self.stages else len(self.stages)
        report = {"rank": self.rank, "stage": stage, "done": done, "total": total,
                  "progress": round(min(1.0, (step + part) / len(self.stages)), 4)}
        try:
            print(PREFIX + json.dumps(report), file=sys.stderr, flush=True)
        except OSError:  # a remote rank's terminal is gone once its ssh session ends
            pass


def download_bar(report: Callable[[int, int], None]):
    """A class for snapshot_download's `tqdm_class`: it draws nothing (no
    bars of several ranks interleaved on the launcher's terminal), and the
    bar of bytes written, of the files' total as known so far, passes them
    to `report(done, total)` (huggingface_hub >= 1.0 calls that bar
    "Reconstructing ..."; older versions report nothing)."""

    class Bar:
        format_dict: dict = {}

        def __init__(self, *args, **kw):
            self.n, self.total = kw.get("initial") or 0, kw.get("total") or 0
            self.counts = kw.get("unit") == "B" and str(kw.get("desc", "")).startswith("Reconstructing")

        def update(self, n=1):
            self.n += n or 0
            if self.counts:
                report(self.n, self.total or 0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __getattr__(self, name):  # refresh, close, set_description, set_postfix_str, ...
            return lambda *args, **kw: None

    return Bar


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Board:
    """The launcher's view of the ranks' loading: takes their progress lines
    out of the output it relays (relay) and shows one line per rank on
    `sink` (stderr), rewritten in place on a terminal, else printed when a
    rank's stage changes or it moves on by 10%. `on_change(entries())` is
    called on every report."""

    ERASE = "\x1b[{}F\x1b[J"  # up n lines, clear to the end of the screen

    def __init__(self, hosts: Sequence[str], sink, on_change=None, tty: Optional[bool] = None):
        self.hosts, self.sink, self.on_change = list(hosts), sink, on_change
        self.tty = sink.isatty() if tty is None else tty
        self.reports: Dict[int, dict] = {}
        self.printed: Dict[int, tuple] = {}  # rank -> (stage, tenths) of its last line, off a terminal
        self.drawn = 0  # lines of the block at the bottom of the terminal
        self.finished = False
        self.lock = threading.Lock()

    def relay(self, sink, data: bytes):
        """Write `data` to `sink`, in order, but for its progress lines,
        which update the board instead; an unfinished last line that may be
        one is kept back until its end arrives. Returns (what was written,
        what was kept back)."""
        prefix = PREFIX.encode()
        *lines, last = data.split(b"\n")
        held = last if prefix in last or (last and prefix.startswith(last)) else b""
        written, run = [], []
        for line in lines:
            if prefix in line:
                self.write(sink, b"".join(run))
                written += run
                run = []
                self._take(line.split(prefix, 1)[1])
            else:
                run.append(line + b"\n")
        run.append(b"" if held else last)
        self.write(sink, b"".join(run))
        return b"".join(written + run), held

    def write(self, sink, data: bytes) -> None:
        """Relayed output: on a terminal above the block, which moves down."""
        if not data:
            return
        with self.lock:
            self._erase()
            sink.buffer.write(data)
            sink.flush()
            if self.tty and data.endswith(b"\n") and self.reports and not self.finished:
                self._draw()

    def entries(self) -> List[dict]:
        """Per rank: host, stage, bytes done and total of the stage, progress."""
        out = []
        for rank, host in enumerate(self.hosts):
            r = self.reports.get(rank, {})
            out.append({"rank": rank, "host": host, "stage": r.get("stage", "starting"),
                        "loaded_bytes": r.get("done", 0), "load_total_bytes": r.get("total", 0),
                        "progress": r.get("progress", 0.0)})
        return out

    def line(self, rank: int) -> str:
        who = f"mlx-moe: rank {rank} ({self.hosts[rank]})" if rank < len(self.hosts) else f"mlx-moe: rank {rank}"
        r = self.reports.get(rank)
        if r is None:
            return f"{who}: starting"
        if r["stage"] == "loaded":
            return f"{who}: loaded, {_size(r['total'])}"
        pct = 100 * r["done"] // r["total"] if r["total"] else 0
        return f"{who}: {r['stage']} {pct:3d}%, {_size(r['done'])} of {_size(r['total'])}"

    def _take(self, text: bytes) -> None:
        try:
            r = json.loads(text)
            r = {"rank": int(r["rank"]), "stage": str(r["stage"]), "done": int(r["done"]),
                 "total": int(r["total"]), "progress": float(r["progress"])}
        except (ValueError, KeyError, TypeError):
            return  # a fragment: mlx.launch may cut a line where it reads a rank's output
        with self.lock:
            rank = r["rank"]
            self.reports[rank] = r
            if self.tty:
                self._erase()
                self._draw()
                if all(self.reports.get(i, {}).get("stage") == "loaded" for i in range(len(self.hosts))):
                    self.finished, self.drawn = True, 0  # the block stays; what follows goes below it
            else:
                tenths = (r["stage"], 10 * r["done"] // r["total"] if r["total"] else 0)
                if self.printed.get(rank) != tenths:
                    self.printed[rank] = tenths
                    self.sink.buffer.write((self.line(rank) + "\n").encode())
                    self.sink.flush()
        if self.on_change:
            self.on_change(self.entries())

    def _erase(self) -> None:
        if self.drawn:
            self.sink.buffer.write(self.ERASE.format(self.drawn).encode())
            self.drawn = 0

    def _draw(self) -> None:
        self.sink.buffer.write("".join(f"\x1b[2K{self.line(r)}\n" for r in range(len(self.hosts))).encode())
        self.sink.flush()
        self.drawn = len(self.hosts)
