"""Ranks started through mlx.launch on one machine: their own cores, and a
launcher that stops polling once they have settled; the hosts and
hostfiles the command takes (with remote hosts: tests/test_multihost.py)."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from mlx_moe.cli import main
from mlx_moe.cluster import hosts
from mlx_moe.cluster.hosts import common_network, resolve
from mlx_moe.cluster.launch import launch_command, start, stop_group

RANK = """
import json, os, sys, time
import mlx.core as mx
from mlx_moe.cluster.cores import settle_local_rank
group = mx.distributed.init()
cores = settle_local_rank(group.rank())
out, stop = sys.argv[1], sys.argv[2]
if os.path.isdir("/proc/self/fd"):
    stdin = os.readlink("/proc/self/fd/0")
else:  # no /proc (macOS)
    stdin = os.devnull if os.path.samestat(os.fstat(0), os.stat(os.devnull)) else "not " + os.devnull
with open(f"{out}.{group.rank()}", "w") as f:
    json.dump({"cores": sorted(cores or []), "stdin": stdin}, f)
deadline = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` itself (not its children):
    from /proc, or where there is none (macOS) from ps, to 1/100 s there."""
    if not Path("/proc/self").exists():
        out = subprocess.run(["ps", "-o", "time=", "-p", str(pid)], capture_output=True, text=True,
                             check=True).stdout.strip()
        days, _, clock = out.rpartition("-")  # [days-][[hours:]minutes:]seconds
        seconds = 0.0
        for part in clock.split(":"):
            seconds = seconds * 60 + float(part)
        return 86400 * int(days or 0) + seconds
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
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no os.sched_getaffinity on this OS: ranks are not pinned to cores")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        assert ranks[0]["cores"] and ranks[1]["cores"], ranks
        assert not set(ranks[0]["cores"]) & set(ranks[1]["cores"]), ranks


def test_ranks_all_here_need_no_hostfile():
    cluster = resolve(["127.0.0.1", "localhost"])
    assert cluster.path is None and cluster.backend == "ring" and not cluster.remote
    cmd = launch_command(["x.py"], hosts=["127.0.0.1", "localhost"], backend=cluster.backend)
    assert cmd[cmd.index("--hosts") + 1] == "127.0.0.1,127.0.0.1" and "--starting-port" in cmd


# What mlx.distributed_config writes (hosts named 127.0.0.1 here, so nothing is reached over ssh).
RING = {"backend": "ring", "envs": [], "hosts": [
    {"ssh": "127.0.0.1", "ips": ["192.168.0.1"], "rdma": []}, {"ssh": "localhost", "ips": ["192.168.0.2"], "rdma": []}]}
JACCL = {"backend": "jaccl", "envs": ["MLX_METAL_FAST_SYNCH=1"], "hosts": [
    {"ssh": "127.0.0.1", "ips": ["192.168.0.1"], "rdma": [None, "rdma_en3"]},
    {"ssh": "localhost", "ips": [], "rdma": ["rdma_en3", None]}]}


@pytest.mark.parametrize("given", [RING, JACCL, RING["hosts"]], ids=["ring", "jaccl", "plain list"])
def test_distributed_config_hostfiles_are_read_as_they_are(tmp_path, given):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(given))
    cluster = resolve([], str(path))
    hosts = given["hosts"] if isinstance(given, dict) else given
    written = json.loads(Path(cluster.path).read_text())
    assert written["backend"] == (given["backend"] if isinstance(given, dict) else "ring")
    assert written["envs"] == (given["envs"] if isinstance(given, dict) else [])
    assert [h["ssh"] for h in written["hosts"]] == ["127.0.0.1", "127.0.0.1"]  # what mlx.launch runs here
    assert [h["rdma"] for h in written["hosts"]] == [h["rdma"] for h in hosts]
    assert written["hosts"][0]["ips"] == ["192.168.0.1"]
    cmd = launch_command(["x.py"], backend=cluster.backend, hostfile=cluster.path)
    assert cmd[cmd.index("--backend") + 1] == cluster.backend
    assert ("--starting-port" in cmd) == (cluster.backend == "ring")  # JACCL's coordinator keeps its port


def test_backend_given_overrides_the_hostfiles(tmp_path):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(RING))
    assert resolve([], str(path), backend="jaccl-ring").backend == "jaccl-ring"


def test_cluster_arguments_that_cannot_work_fail_before_anything_starts(tmp_path, capsys):
    assert main(["serve", "--model", "m", "--backend", "jaccl", "--hosts", "mac1,mac2"]) == 2
    assert "--backend jaccl needs a hostfile with each host's RDMA devices" in capsys.readouterr().err
    assert main(["generate", "--model", "m", "--prompt", "p", "--hostfile", str(tmp_path / "none.json")]) == 2
    assert "doesn't exist (write one with mlx.distributed_config" in capsys.readouterr().err
    assert main(["serve", "--model", "m", "--hosts", "127.0.0.1,,h2"]) == 2
    assert "Hostname cannot be empty" in capsys.readouterr().err


def test_thunderbolt_addresses_only_when_every_host_shares_a_network():
    assert common_network([["169.254.1.2/16", "192.168.5.1/24"], ["169.254.9.9/16"]]) == ["169.254.1.2", "169.254.9.9"]
    assert common_network([["192.168.5.1/24"], ["192.168.6.1/24"]]) is None
    assert common_network([["169.254.1.2/16"], []]) is None


def test_addresses_from_what_the_hosts_answer(monkeypatch):
    """resolve's choices, from the answers hosts give over ssh (faked here;
    tests/test_multihost.py asks real ones)."""
    answers = {"mac1": {"client": "192.168.1.5", "server": "192.168.1.5", "thunderbolt": [], "model": None},
               "mac2": {"client": "192.168.1.5", "server": "192.168.1.6", "thunderbolt": [], "model": None}}
    monkeypatch.setattr(hosts, "_probe_all", lambda names, python, model: [answers[n] for n in names])
    monkeypatch.setattr(hosts, "thunderbolt_interfaces", lambda: ["169.254.1.2/16"])

    def ranks(*names):
        return [(h.ssh_hostname, h.ips) for h in resolve(list(names)).hostfile.hosts]

    # mac1 is this machine (ssh to it ends where it started): it runs here, without ssh.
    assert ranks("mac1", "mac2") == [("127.0.0.1", ["192.168.1.5"]), ("mac2", ["192.168.1.6"])]
    # Thunderbolt bridges on one network win over the network ssh went over; 127.0.0.1 is replaced.
    answers["mac2"]["thunderbolt"] = ["169.254.3.4/16"]
    assert ranks("127.0.0.1", "mac2") == [("127.0.0.1", ["169.254.1.2"]), ("mac2", ["169.254.3.4"])]
    answers["mac2"]["thunderbolt"] = ["10.0.0.2/24"]
    assert ranks("localhost", "mac2") == [("127.0.0.1", ["192.168.1.5"]), ("mac2", ["192.168.1.6"])]
