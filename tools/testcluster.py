"""A cluster of test hosts on one Linux machine: network namespaces on a
bridge, each running its own sshd, so `mlx-moe serve --hosts h1,h2` runs
over real ssh and TCP between "hosts" that share this filesystem (the same
venv and checkpoint paths exist on every one).

    python tools/testcluster.py up [N]    # h1..hN (default 2); `ssh h1` works
    python tools/testcluster.py down      # remove everything `up` made

Needs root, `ip` (iproute2) and sshd (Debian: apt-get install openssh-server).
Addresses: the bridge (this machine, as seen from the hosts) is 10.77.0.1,
host hK is 10.77.0.(10+K); nothing here routes beyond that /24.
"""

import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SUBNET = "10.77.0"
BRIDGE, BRIDGE_IP = "mlxmoe0", f"{SUBNET}.1"
# Runtime state (keys, sshd configs, pid files); /run is cleared at boot, like the namespaces.
STATE = Path("/run/mlx-moe-testcluster")
LOCK = Path("/run/mlx-moe-testcluster.lock")
SSH_CONFIG = Path("/root/.ssh/config")
BEGIN, END = "# >>> mlx-moe testcluster (tools/testcluster.py down removes this block)", "# <<< mlx-moe testcluster"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def address(name: str) -> str:
    return f"{SUBNET}.{10 + int(name[1:])}"


def namespace(name: str) -> str:
    return f"mlxmoe-{name}"


def unavailable() -> Optional[str]:
    """Why this machine cannot host the cluster, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge, sshd)"
    if shutil.which("ip") is None:
        return "needs `ip` (apt-get install iproute2)"
    if not os.path.exists(SSHD):
        return "needs sshd (apt-get install openssh-server)"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "needs ssh and ssh-keygen (apt-get install openssh-client)"
    probe = f"mlx-moe-probe-{os.getpid()}"  # not "mlxmoe-": down() must not take it
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces here (ip netns add: {made.stderr.strip()})"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _run(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


class Cluster:
    """Hosts h1..hN. `hide` maps a host to directories that host must not
    see (its sshd runs in a mount namespace with an empty tmpfs on each)."""

    def __init__(self, n: int = 2, hide: Optional[Dict[str, Sequence[str]]] = None):
        self.names = [f"h{k}" for k in range(1, n + 1)]
        self.hide = {k: list(v) for k, v in (hide or {}).items()}

    def up(self) -> "Cluster":
        """Start from nothing (a previous cluster is removed first), so it is
        idempotent; on failure everything made so far is removed."""
        down()
        try:
            STATE.mkdir(mode=0o700)
            Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(STATE / "id_ed25519"))
            shutil.copy(STATE / "id_ed25519.pub", STATE / "authorized_keys")
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
            _run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
            _run("ip", "link", "set", BRIDGE, "up")
            known = []
            for name in self.names:
                known.append(self._add_host(name))
            (STATE / "known_hosts").write_text("".join(known))
            self._write_ssh_config()
            for name in self.names:
                self.wait_ssh(name)
        except BaseException:
            down()
            raise
        return self

    def _add_host(self, name: str) -> str:
        """Namespace, veth pair onto the bridge, sshd; returns its known_hosts line."""
        ns, ip, host = namespace(name), address(name), STATE / name
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", ns, "master", BRIDGE, "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        host.mkdir()
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host / "host_key"))
        (host / "sshd_config").write_text("\n".join([
            f"ListenAddress {ip}",
            f"HostKey {host / 'host_key'}",
            f"PidFile {host / 'sshd.pid'}",
            f"AuthorizedKeysFile {STATE / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PrintMotd no",
            "MaxStartups 100",  # the tests open many sessions at once
            "MaxSessions 100",
            "",
        ]))
        self._start_sshd(name)
        key_type, key = (host / "host_key.pub").read_text().split()[:2]
        return f"{name},{ip} {key_type} {key}\n"

    def _start_sshd(self, name: str) -> None:
        """Start `name`'s sshd (it daemonizes and writes its pid file); with
        hidden directories it runs in a mount namespace of its own."""
        host = STATE / name
        sshd = [SSHD, "-f", str(host / "sshd_config")]
        hidden = self.hide.get(name)
        if hidden:
            mounts = " && ".join(f"mount -t tmpfs mlx-moe-hidden {shlex.quote(d)}" for d in hidden)
            sshd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    f"{mounts} && exec {' '.join(map(shlex.quote, sshd))}"]
        _run("ip", "netns", "exec", namespace(name), *sshd)

    def wait_ssh(self, name: str, timeout: float = 20) -> None:
        """Until `ssh name` works (sshd has daemonized but may not listen yet)."""
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", name, "true"],
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"ssh {name} does not work: {r.stderr.strip()}")
            time.sleep(0.1)

    def _write_ssh_config(self) -> None:
        """`ssh h1` for root: an Include at the top of /root/.ssh/config (top:
        an Include after a Host line would apply to that Host only)."""
        lines = []
        for name in self.names:
            lines += [f"Host {name}", f"  HostName {address(name)}"]
        lines += [f"Host {' '.join(self.names)} {SUBNET}.*",
                  "  User root",
                  f"  IdentityFile {STATE / 'id_ed25519'}",
                  "  IdentitiesOnly yes",
                  f"  UserKnownHostsFile {STATE / 'known_hosts'}",
                  "  StrictHostKeyChecking yes", ""]
        (STATE / "ssh_config").write_text("\n".join(lines))
        SSH_CONFIG.parent.mkdir(mode=0o700, exist_ok=True)
        old = SSH_CONFIG.read_text() if SSH_CONFIG.exists() else ""
        SSH_CONFIG.write_text(f"{BEGIN}\nInclude {STATE / 'ssh_config'}\n{END}\n{old}")


def _pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kill_and_wait(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running, not a zombie: a daemon's parent is init, which may reap it late."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def host_of(pid: int) -> Optional[str]:
    """The test host process `pid` runs on (by its network namespace), or
    None when it runs on this machine itself."""
    mine = os.stat(f"/proc/{pid}/ns/net").st_ino
    for ns in _namespaces():
        if os.stat(f"/run/netns/{ns}").st_ino == mine:
            return ns[len("mlxmoe-"):]
    return None


def _namespaces() -> List[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("mlxmoe-")]


def down() -> None:
    """Remove every part of a test cluster that exists: sshd daemons (from
    their pid files), namespaces, the bridge, the ssh config block, the state."""
    if STATE.exists():
        for pidfile in STATE.glob("*/sshd.pid"):
            pid = _pid(pidfile)
            if pid:
                _kill_and_wait(pid)
    for ns in _namespaces():
        _run("ip", "netns", "del", ns, check=False)  # takes the veth pair with it
    _run("ip", "link", "del", BRIDGE, check=False)
    if SSH_CONFIG.exists():
        text = SSH_CONFIG.read_text()
        start = text.find(BEGIN)
        if start >= 0:
            end = text.index(END, start) + len(END) + 1
            rest = text[:start] + text[end:]
            if rest:
                SSH_CONFIG.write_text(rest)
            else:  # nothing else in it: up made it
                SSH_CONFIG.unlink()
    shutil.rmtree(STATE, ignore_errors=True)


class Lock:
    """One test cluster per machine at a time: concurrent test sessions
    (say, two people running the suite) wait for each other here."""

    def __init__(self, timeout: float = 900):
        self.timeout = timeout

    def __enter__(self):
        self.fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"another test cluster held {LOCK} for {self.timeout}s")
                time.sleep(0.5)

    def __exit__(self, *exc):
        os.close(self.fd)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    why = unavailable()
    if why:
        print(f"testcluster: {why}", file=sys.stderr)
        return 1
    if argv[0] == "down":
        down()
        print("testcluster: removed")
        return 0
    cluster = Cluster(int(argv[1]) if len(argv) > 1 else 2).up()
    for name in cluster.names:
        print(f"{name} {address(name)} (namespace {namespace(name)}): ssh {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
