"""Ranks started through mlx.launch on one machine: their own cores, and a
launcher that stops polling once they have settled."""

import json
import os
import subprocess
import time
from pathlib import Path

from mlx_moe.launch import launch_command, start, stop_group

RANK = """
import json, os, sys, time
import mlx.core as mx
from mlx_moe.cores import settle_local_rank
group = mx.distributed.init()
cores = settle_local_rank(group.rank())
out, stop = sys.argv[1], sys.argv[2]
with open(f"{out}.{group.rank()}", "w") as f:
    json.dump({"cores": sorted(cores or []), "stdin": os.readlink("/proc/self/fd/0")}, f)
deadline = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` itself (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ranks_get_own_cores_and_launcher_goes_quiet(tmp_path):
    script, out, stop = tmp_path / "rank.py", tmp_path / "out", tmp_path / "stop"
    script.write_text(RANK)
    proc = start(launch_command([str(script), str(out), str(stop)], hosts=["127.0.0.1"] * 2))
    try:
        # mlx.launch's relay threads spin (a core or more) until the ranks
        # let go of their stdin; then it only waits for output.
        deadline, rate = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            before = _cpu_seconds(proc.pid)
            time.sleep(1.0)  # a measuring window, not a wait for an event
            rate = _cpu_seconds(proc.pid) - before
            if rate < 0.05:
                break
        assert proc.poll() is None, "the ranks exited early"
        assert rate is not None and rate < 0.05, f"mlx.launch still uses {rate:.2f} s of CPU per second"
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    finally:
        stop.touch()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(proc)
    assert all(r["stdin"] == os.devnull for r in ranks), ranks
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        assert ranks[0]["cores"] and ranks[1]["cores"], ranks
        assert not set(ranks[0]["cores"]) & set(ranks[1]["cores"]), ranks
