"""Where the ranks run: each host checked over ssh and given an address the
other ranks can reach, before any rank starts.

mlx.launch runs a rank here only when its ssh name is exactly 127.0.0.1,
runs `ssh NAME` for any other, and its ring backend wants an IP address per
host, not a name. So every remote host is asked over ssh, in parallel and
in seconds, for its address (as mlx.distributed_config does), whether the
`--python` there imports mlx-moe and whether the checkpoint is there; the
answers go into the JSON hostfile mlx.launch reads, or into an error that
names the host and the fix."""

import atexit
import ipaddress
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence

from mlx._distributed_utils.common import Host, Hostfile
from mlx._distributed_utils.config import parse_hardware_ports

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}
HERE = "127.0.0.1"  # the one ssh name mlx.launch runs locally
# Never prompt (a password prompt would hang the launcher); give up on a silent host fast.
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
PROBE_TIMEOUT = 30  # connect, then start Python there
PROBE_MARK = "mlx-moe-probe:"  # the answer's line; shell start-up files may print others
# What each remote host's --python runs: this file's probe(), loaded without
# importing the mlx_moe package (that imports mlx-lm: seconds per host).
PROBE = """
import importlib.util, os, sys
spec = importlib.util.find_spec("mlx_moe")
if spec is None:
    sys.exit("No module named 'mlx_moe'")
path = os.path.join(spec.submodule_search_locations[0], "cluster", "hosts.py")
if not os.path.exists(path):
    sys.exit("No module named 'mlx_moe.cluster.hosts'")
hosts = importlib.util.module_from_spec(importlib.util.spec_from_file_location("mlx_moe_hosts", path))
hosts.__spec__.loader.exec_module(hosts)
hosts.probe(sys.argv[1])
"""


class HostError(Exception):
    """A host that cannot run a rank; the message names it and the fix."""


@dataclass
class Cluster:
    names: List[str]  # each rank's host as the user named it
    hostfile: Hostfile  # what mlx.launch runs: ssh name 127.0.0.1 runs here
    path: Optional[str]  # hostfile written for mlx.launch; None: every rank is here, use --hosts
    front: str = HERE  # this machine's address as rank 0 reaches it (the front of `mlx-moe serve`)

    @property
    def backend(self) -> str:
        return self.hostfile.backend

    @property
    def remote(self) -> bool:
        """Whether some rank runs over ssh."""
        return any(h.ssh_hostname != HERE for h in self.hostfile.hosts)

    def describe(self) -> str:
        """Which rank runs where, for the log: failures name ranks."""
        def where(name, host):
            this = " (this machine)" if host.ssh_hostname == HERE and name not in LOCAL_NAMES else ""
            return f"rank {host.rank} on {name}{this} at {host.ips[0]}"

        return ", ".join(where(name, host) for name, host in zip(self.names, self.hostfile.hosts))


def resolve(hosts: Sequence[str], hostfile: Optional[str] = None, backend: Optional[str] = None,
            python: str = sys.executable, model: Optional[str] = None) -> Cluster:
    """Check every remote host of `hosts` (or of the mlx.launch/
    mlx.distributed_config `hostfile`) and give each rank an address.

    A rank's address is the one the hostfile gives, else the host's
    Thunderbolt bridge when every host has one on a common network, else
    the address the launcher reached it at over ssh. A local name
    (localhost) runs here and, when other hosts are remote, gets this
    machine's address on the route to them, never 127.0.0.1. A remote name
    that turns out to be this machine runs here too. `backend`: None takes
    the hostfile's, else ring. Raises HostError."""
    given = _read(hostfile) if hostfile else _parse(hosts)
    backend = backend or given.backend or "ring"
    if backend.startswith("jaccl") and not hostfile:
        raise HostError(f"--backend {backend} needs a hostfile with each host's RDMA devices: write one with "
                        "`mlx.distributed_config --backend jaccl --over thunderbolt --hosts mac1,mac2 "
                        "--output-hostfile hosts.json` and pass --hostfile hosts.json")
    names = [h.ssh_hostname for h in given.hosts]
    remote = sorted({n for n in names if n not in LOCAL_NAMES})
    if not hostfile and not remote:
        # Every rank here: mlx.launch --hosts 127.0.0.1,... needs nothing more.
        hosts_here = [Host(i, HERE, [HERE], []) for i in range(len(names))]
        return Cluster(names, Hostfile(hosts_here, backend), None)

    probes = dict(zip(remote, _probe_all(remote, python, model)))
    # A name for this machine (ssh to itself: the connection's two ends are one address) runs here.
    here = {n for n in names if n in LOCAL_NAMES or probes[n]["client"] == probes[n]["server"]}
    away = [n for n in remote if n not in here]
    machine = {n: HERE if n in here else n for n in names}
    machines = list(dict.fromkeys(machine.values()))
    address = {m: probes[m]["server"] for m in away}
    address[HERE] = probes[away[0]]["client"] if away else HERE
    thunderbolt = away and common_network([thunderbolt_interfaces() if m == HERE else probes[m]["thunderbolt"]
                                           for m in machines])
    if thunderbolt:
        address = dict(zip(machines, thunderbolt))

    out = []
    for h in given.hosts:
        # Loopback means nothing to a peer on another machine: replace it.
        ips = [ip for ip in h.ips if not (away and _is_loopback(ip))]
        out.append(Host(h.rank, machine[h.ssh_hostname], ips or [address[machine[h.ssh_hostname]]], h.rdma))
    resolved = Hostfile(out, backend, given.envs)
    rank0 = machine[names[0]]
    return Cluster(names, resolved, _write(resolved), HERE if rank0 == HERE else probes[rank0]["client"])


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _parse(hosts: Sequence[str]) -> Hostfile:
    try:
        return Hostfile.from_list(",".join(hosts))
    except ValueError as e:
        raise HostError(f"--hosts {','.join(hosts)}: {e}") from None


def _read(path: str) -> Hostfile:
    try:
        parsed = Hostfile.from_file(path)
    except ValueError as e:
        raise HostError(f"--hostfile: {e} (write one with mlx.distributed_config --output-hostfile)") from None
    if not parsed.hosts:
        raise HostError(f"--hostfile {path} lists no hosts")
    return parsed


def _write(hostfile: Hostfile) -> str:
    """The hostfile in a temporary file, removed when this process exits
    (mlx.launch reads it as it starts)."""
    fd, path = tempfile.mkstemp(prefix="mlx-moe-hosts-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(hostfile.to_json(), f, indent=1)
    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def common_network(interfaces: List[List[str]]) -> Optional[List[str]]:
    """One address per machine, all on one network, from each machine's
    "ip/prefix" interfaces; None when some machine has none on it."""
    if not interfaces or not all(interfaces):
        return None
    parsed = [[ipaddress.ip_interface(i) for i in ifs] for ifs in interfaces]
    for first in parsed[0]:
        picked = [next((i for i in ifs if i.ip in first.network), None) for ifs in parsed]
        if all(picked):
            return [str(i.ip) for i in picked]
    return None


def thunderbolt_interfaces() -> List[str]:
    """This Mac's Thunderbolt bridge addresses as "ip/prefix" (none elsewhere):
    a direct Thunderbolt cable beats the network the launcher's ssh went over."""
    if platform.system() != "Darwin":
        return []
    try:
        ports = parse_hardware_ports(_output(["networksetup", "-listallhardwareports"]).encode())
        found = []
        for port, device in ports.items():
            if port.startswith("Thunderbolt Bridge"):
                m = re.search(r"inet (\S+) netmask 0x([0-9a-f]+)", _output(["ifconfig", device]))
                if m:
                    found.append(f"{m[1]}/{bin(int(m[2], 16)).count('1')}")
        return found
    except (OSError, subprocess.SubprocessError):
        return []


def _output(cmd) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout


def probe(model: str) -> None:
    """Run on each remote host by the launcher (with `--python`): print what
    it needs to know as one line."""
    client, _, server, _ = os.environ["SSH_CONNECTION"].split()
    print(PROBE_MARK + json.dumps({
        "client": client,  # the launcher's address on the route to this host
        "server": server,  # this host's address on that route
        "thunderbolt": thunderbolt_interfaces(),
        "model": os.path.isfile(os.path.join(model, "config.json")) if model else None,
    }))


def _probe_all(names: List[str], python: str, model: Optional[str]) -> List[dict]:
    """Probe every host at once; raise one HostError naming every host that fails."""
    # A checkpoint directory here must be at the same path there; a hub id is fetched by each host.
    local_model = os.path.abspath(model) if model and os.path.isdir(model) else ""
    with ThreadPoolExecutor(max(1, len(names))) as pool:
        results = list(pool.map(lambda n: _probe(n, python, local_model), names))
    problems = [r for r in results if isinstance(r, str)]
    if len(problems) == 1:
        raise HostError(problems[0])
    if problems:
        raise HostError(f"{len(problems)} hosts cannot run a rank:\n  " + "\n  ".join(problems))
    return results


def _probe(name: str, python: str, model: str):
    """The host's answer (dict), or what is wrong with it (str)."""
    command = shlex.join([python, "-c", PROBE, model])
    try:
        r = subprocess.run([*SSH, name, command], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=PROBE_TIMEOUT)
    except FileNotFoundError:
        return f"host {name}: no ssh command on this machine: install OpenSSH"
    except subprocess.TimeoutExpired:
        return (f"host {name}: no answer within {PROBE_TIMEOUT}s over ssh: check that it is awake "
                f"and that `ssh {name} {shlex.quote(python)} -c 'import mlx_moe'` works")
    answer = next((line for line in r.stdout.splitlines() if line.startswith(PROBE_MARK)), None)
    if answer is not None:
        info = json.loads(answer[len(PROBE_MARK):])
        if info["model"] is False:
            return (f"host {name}: no checkpoint at {model} (every host needs the model at the same "
                    f"path): copy it there, e.g. rsync -a {shlex.quote(model)}/ {name}:{shlex.quote(model)}/")
        return info
    err = r.stderr.strip()
    last = err.splitlines()[-1] if err else f"exit code {r.returncode}"
    if r.returncode == 255:
        return f"host {name}: cannot reach it over ssh ({last}): {_ssh_fix(name, err)}"
    if r.returncode in (126, 127):  # the shell there could not run it
        return (f"host {name}: no Python at {python}: install mlx-moe there in a virtual environment "
                f"at the same path as here, or pass --python with the interpreter's path there")
    if "No module named 'mlx_moe'" in err or "No module named 'mlx'" in err:
        return (f"host {name}: {python} cannot import mlx-moe: install it there as here "
                f"(e.g. {python} -m pip install -e . in a checkout at the same path)")
    if "No module named 'mlx_moe.cluster.hosts'" in err:
        return f"host {name}: its mlx-moe is older than this one: update it there"
    return f"host {name}: checking it over ssh failed ({last})"


def _ssh_fix(name: str, err: str) -> str:
    if "Could not resolve hostname" in err:
        return f"check the name, or add it to /etc/hosts or ~/.ssh/config (Host {name} / HostName ADDRESS)"
    if "Host key verification failed" in err:
        return f"run `ssh {name}` once by hand to check and accept its host key"
    if "Connection refused" in err:
        return "it runs no ssh server: turn on Remote Login (System Settings > General > Sharing)"
    if re.search(r"timed out|No route to host|Network is unreachable", err):
        return "check that it is on, awake and on this network"
    return f"set up key-based ssh (ssh-copy-id {name})"
