"""Starting ranks through `mlx.launch` (ssh for remote hosts, local
processes for 127.0.0.1), with a time bound so a hang fails instead of
freezing the caller. Which hosts and addresses: hosts.py."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

from mlx._distributed_utils.common import Hostfile

from .cores import RANK_PRIORITY
from .hosts import LOCAL_NAMES


def mlx_launch() -> str:
    """The mlx.launch beside this interpreter (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "mlx.launch"
    if beside.exists():
        return str(beside)
    found = shutil.which("mlx.launch")
    if found is None:
        raise FileNotFoundError("mlx.launch not found: install mlx in this environment")
    return found


def init_world():
    """mx.distributed.init() in a rank that mlx.launch started, one rank
    alone included: mlx 0.32's mlx.launch gives a lone rank an empty
    hostfile, which the ring backend fails to parse; without one, init
    gives the group of one."""
    import mlx.core as mx

    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and Path(hostfile).exists() and not Path(hostfile).read_text().strip():
        del os.environ["MLX_HOSTFILE"]
    return mx.distributed.init()


def free_port_range(n: int) -> int:
    """A first port p such that p .. p+n-1 are free on 127.0.0.1 right now
    (the ring backend listens on consecutive ports, one per rank)."""
    for _ in range(200):
        base = random.randint(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def normalize_hosts(hosts: Sequence[str]) -> List[str]:
    # mlx.launch runs 127.0.0.1 locally but would ssh to "localhost".
    return ["127.0.0.1" if h in LOCAL_NAMES else h for h in hosts]


def launch_command(
    argv: Sequence[str],
    hosts: Sequence[str] = ("127.0.0.1", "127.0.0.1"),
    backend: str = "ring",
    hostfile: Optional[str] = None,
    python: Optional[str] = None,
    port: Optional[int] = None,
    env: Sequence[str] = (),
) -> List[str]:
    """The mlx.launch command line that runs `python argv...` once per host
    of `hosts` (local names or IP addresses) or of `hostfile` (one that
    hosts.resolve wrote, with names); `python` defaults to this interpreter
    and argv is e.g. ["-m", "pkg.mod"]."""
    cmd = [mlx_launch()]
    if hostfile:
        cmd += ["--hostfile", hostfile]
        ring_ports = sum(len(h.ips) for h in Hostfile.from_file(hostfile).hosts)  # one per address
    else:
        cmd += ["--hosts", ",".join(normalize_hosts(hosts))]
        ring_ports = len(hosts)
    cmd += ["--backend", backend]
    if backend == "ring":
        # Free here; on other hosts a fresh random range rarely meets a previous run's sockets.
        cmd += ["--starting-port", str(port or free_port_range(ring_ports))]
    cmd += ["--python", python or sys.executable]
    for e in env:
        cmd += ["--env", e]
    return cmd + ["--", *argv]


# mlx.launch relays each rank's output in a thread that polls the rank's
# stdin pipe for writability, which is always true, so it spins until that
# pipe breaks (see _stop_relay_spin). Started at a lower priority it yields
# most of the CPU it takes meanwhile (and where the pipe never breaks: ranks
# on other hosts, which sit behind ssh); the ranks restore the caller's
# priority (cores.restore_priority).
LAUNCHER_NICE = 10


def _own_group_niced() -> None:
    os.setpgid(0, 0)
    os.nice(LAUNCHER_NICE)


def start(cmd, remote: bool = False, **kwargs) -> subprocess.Popen:
    """Start an mlx.launch command line in a process group of its own (so
    stopping it reaches every rank), its stdin a pipe this process holds
    (/dev/null, or a pipe closed by communicate(), would make its stdin poll
    spin too). `remote`: some rank runs over ssh, so nothing is fed to the
    ranks' stdin (see _stop_relay_spin).

    In this session, not a new one: Linux gives each session its own
    scheduling group (autogroup), and a session of spinning local ranks
    beside `mlx-moe serve`'s nearly idle one left the front waiting ~10 ms
    on average, and up to ~900 ms, for a core at each wake-up (measured:
    5.3 s on the run queue for 38 ms of work), so streams came in clumps."""
    here = os.getpriority(os.PRIO_PROCESS, 0)
    env = dict(kwargs.pop("env", None) or os.environ, **{RANK_PRIORITY: str(here)})
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(cmd, stdin=read, env=env, preexec_fn=_own_group_niced, **kwargs)
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    threading.Thread(target=_stop_relay_spin, args=(proc, write, 0.0 if remote else 300.0), daemon=True).start()
    return proc


def _stop_relay_spin(proc: subprocess.Popen, fd: int, feed_for: float = 300.0) -> None:
    """At a lower priority the relay threads still delay local ranks: Linux's
    scheduler can make a woken rank thread wait out a spinning relay's time
    slice, and a 2-rank decode on 2 cores lost a third of its speed to it
    (27 against 39 tok/s). A relay stops polling a rank's stdin once a
    write to it fails, so local ranks close theirs when they start
    (cores.release_stdin) and this feeds mlx.launch bytes to pass on, at
    growing intervals for `feed_for` seconds. The pipe stays open until
    mlx.launch exits: closed, it would make mlx.launch spin again.

    Nothing is fed when a rank runs over ssh: its stdin is a terminal there
    (mlx.launch runs `ssh -tt`) that echoes what it gets until mlx.launch's
    script turns echo off, and the echo comes back before the first line
    mlx.launch reads as the rank's pid file, so the rank's output would
    start with blank lines and that file's path."""
    delay, fed = 0.25, 0.0
    try:
        while proc.poll() is None:
            if fed < feed_for:
                os.write(fd, b"\n")
            time.sleep(delay)
            fed += delay
            delay = min(2 * delay, 5.0)
    except OSError:
        pass
    finally:
        os.close(fd)


def run_ranks(argv: Sequence[str], n: int = 2, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run `argv` on n local ranks over ring and wait at most `timeout`
    seconds; on time-out every rank is killed and TimeoutError raised with
    the output so far."""
    cmd = launch_command(argv, hosts=["127.0.0.1"] * n, **kw)
    p = start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise TimeoutError(f"ranks did not finish in {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll `url`/health until it answers 200; fail at once if `proc` exits,
    and after `timeout` seconds."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready after {timeout}s")


def stop_group(proc: subprocess.Popen, grace: float = 10) -> int:
    """Stop a process started in a process group of its own and everything it
    started (the ranks): SIGTERM, then SIGKILL after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()
