"""`mlx-moe serve` and `generate` across hosts named on the command line,
over real ssh and TCP: a test cluster of network namespaces on a bridge,
one sshd each (tools/testcluster.py). The hosts share this filesystem, so
the venv and the checkpoint are at the same path on every one, as they
must be on real Macs."""

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import openai
import pytest

import oracle
from mlx_moe.cluster.launch import free_port, stop_group, wait_ready
from test_reliability import _finish, _finished, _popen, _rank_pid, _streaming
from test_serve import _chat, _processes_with

_spec = importlib.util.spec_from_file_location("testcluster", Path(__file__).parents[1] / "tools" / "testcluster.py")
testcluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(testcluster)

QUESTION = "Where does the river run?"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe", quantize=4)


@pytest.fixture(scope="module")
def cluster(model_path):
    """h1, h2, and h3, which does not see the checkpoint."""
    why = testcluster.unavailable()
    if why:
        pytest.skip(f"no multi-host test cluster on this machine: {why}")
    with testcluster.Lock():
        try:
            yield testcluster.Cluster(3, hide={"h3": [str(model_path)]}).up()
        finally:
            testcluster.down()


def _command(*args):
    """`mlx-moe ARGS` started with its stdout in its stderr, which _popen
    collects in `proc.log`: ranks on other hosts write both to stdout
    (through ssh's terminal)."""
    return _popen(["sh", "-c", 'exec "$@" >&2', "sh", sys.executable, "-m", "mlx_moe.cli", *args])


def _serve(model_path, *cluster_args):
    """The serve command on a fresh port."""
    port = free_port()
    return _command("serve", "--model", str(model_path), "--port", str(port), *cluster_args), port


def _ready(proc, url):
    try:
        wait_ready(url, proc, timeout=120)
    except (RuntimeError, TimeoutError) as e:
        stop_group(proc)
        proc.drain.join(10)
        raise AssertionError(f"{e}\n{''.join(proc.log)[-3000:]}") from None


def _want(model_path):
    return oracle.greedy_text(model_path, oracle.chat_prompt(model_path, QUESTION), MAX_TOKENS)


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _gone(marker, timeout=15):
    """Whether every process with `marker` is gone within `timeout` seconds
    (ranks on other hosts end when their ssh session closes, just after)."""
    deadline = time.monotonic() + timeout
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _processes_with(marker) == []


@pytest.fixture(scope="module")
def server(cluster, model_path):
    """serve --hosts h1,h2: rank 0 on h1; the API here, in the serve command (the front)."""
    proc, port = _serve(model_path, "--hosts", "h1,h2")
    url = f"http://127.0.0.1:{port}"
    try:
        _ready(proc, url)
        yield url, f"--port {port}"
    finally:
        stop_group(proc)


def test_serve_by_host_names_runs_each_rank_on_its_host(server):
    _, marker = server
    assert [testcluster.host_of(_rank_pid(marker, r)) for r in (0, 1)] == ["h1", "h2"]


@pytest.mark.parametrize("stream", [False, True])
def test_serve_by_host_names_answers_as_one_process(server, model_path, stream):
    url, _ = server
    text, finish, _ = _chat(_client(url), model_path, QUESTION, stream, max_tokens=MAX_TOKENS)
    assert text == _want(model_path) and text
    assert finish in ("stop", "length")


def test_remote_rank_killed_mid_stream_is_named_to_the_client(server, model_path):
    """Both ranks remote: rank 1 on h2 killed mid-stream. Rank 0, on h1, is
    stopped by its ssh session ending (SIGHUP) and must still tell the
    client. Uses up the module's server: the last test to use it."""
    url, marker = server
    victim = _rank_pid(marker, 1)
    t, result = _streaming(url, model_path)
    os.kill(victim, signal.SIGKILL)
    t.join(30)
    assert not t.is_alive(), "the stream did not end within 30 s"
    assert not _finished(result), "the generation ended before rank 1 was killed"
    assert result["error"] and "rank 1 (host h2)" in result["error"], result["error"]
    assert _gone(marker, timeout=60)


def test_generate_by_host_names_prints_what_one_process_does(cluster, model_path):
    proc = _command("generate", "--hosts", "h1,h2", "--model", str(model_path), "--prompt", QUESTION,
                    "--max-tokens", str(MAX_TOKENS))
    code, log = _finish(proc, 120)
    assert code == 0, log[-3000:]
    # Rank 0 prints on h1, through ssh's terminal, which ends lines with \r\n.
    assert _want(model_path).replace("\n", "\r\n") in log, log[-3000:]
    assert "rank 0 on h1 at 10.77.0.11, rank 1 on h2 at 10.77.0.12" in log


def test_localhost_with_a_remote_host_then_losing_that_host(cluster, model_path):
    """--hosts localhost,h2: rank 0 runs here and gives the ring its bridge
    address, not 127.0.0.1, and answers as one process; then rank 1, on h2,
    killed mid-stream ends the stream with an error naming it, and the
    command with it. (One server for both: each start costs ~15 s here.)"""
    proc, port = _serve(model_path, "--hosts", "localhost,h2")
    marker, url = f"--port {port}", f"http://127.0.0.1:{port}"
    try:
        _ready(proc, url)
        rank0, victim = _rank_pid(marker, 0), _rank_pid(marker, 1)
        assert [testcluster.host_of(rank0), testcluster.host_of(victim)] == [None, "h2"]
        environ = dict(v.split(b"=", 1) for v in Path(f"/proc/{rank0}/environ").read_bytes().split(b"\0") if b"=" in v)
        ring = json.loads(Path(environ[b"MLX_HOSTFILE"].decode()).read_text())
        assert [a.rsplit(":", 1)[0] for [a] in ring] == [testcluster.BRIDGE_IP, testcluster.address("h2")]
        text, _, _ = _chat(_client(url), model_path, QUESTION, max_tokens=MAX_TOKENS)
        assert text == _want(model_path)

        t, result = _streaming(url, model_path)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        t.join(30)
        assert not t.is_alive(), "the stream did not end within 30 s"
        assert not _finished(result), "the generation ended before rank 1 was killed"
        assert result["error"] and "rank 1" in result["error"], result["error"]
        code, log = _finish(proc, 60)
        assert code != 0 and time.monotonic() - killed < 60, log[-3000:]
        assert _gone(marker)
    finally:
        stop_group(proc)


def test_hostfile_from_distributed_config_then_sigterm_leaves_nothing_on_any_host(cluster, model_path, tmp_path):
    # The form mlx.distributed_config writes (a ring over Thunderbolt; here over the bridge).
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps({"backend": "ring", "envs": [], "hosts": [
        {"ssh": name, "ips": [testcluster.address(name)], "rdma": []} for name in ("h1", "h2")]}, indent=4))
    proc, port = _serve(model_path, "--hostfile", str(hostfile))
    marker, url = f"--port {port}", f"http://127.0.0.1:{port}"
    try:
        _ready(proc, url)
        text, _, _ = _chat(_client(url), model_path, QUESTION, max_tokens=MAX_TOKENS)
        assert text == _want(model_path)
        # The command and mlx.launch here, a rank on each host.
        assert {testcluster.host_of(p) for p in _processes_with(marker)} == {None, "h1", "h2"}
        proc.send_signal(signal.SIGTERM)
        code, log = _finish(proc, 60)
        assert code == 0, log[-3000:]
        assert _gone(marker), [(p, testcluster.host_of(p)) for p in _processes_with(marker)]
    finally:
        stop_group(proc)


def _python_without_mlx_moe() -> str:
    return str(Path(sys.base_prefix) / "bin" / "python3")  # this venv's base: no mlx-moe


BAD_HOSTS = [
    ("checkpoint missing", ["--hosts", "h1,h3"], "host h3: no checkpoint at "),
    ("no host at the address", ["--hosts", "h1,10.77.0.99"],
     "host 10.77.0.99: cannot reach it over ssh (ssh: connect to host 10.77.0.99 port 22: No route to host)"),
    ("no such python", ["--hosts", "h1,h2", "--python", "/nonexistent/bin/python"],
     "2 hosts cannot run a rank:\n  host h1: no Python at /nonexistent/bin/python"),
    ("python without mlx-moe", ["--hosts", "localhost,h2", "--python", _python_without_mlx_moe()],
     f"host h2: {_python_without_mlx_moe()} cannot import mlx-moe"),
]


@pytest.fixture(scope="module")
def refused(cluster, model_path):
    """Every BAD_HOSTS command, all started at once: name -> (exit code,
    output, seconds to exit, port)."""
    started = time.monotonic()
    runs = {name: _serve(model_path, *args) for name, args, _ in BAD_HOSTS}
    try:
        return {name: (*_finish(proc, 30), time.monotonic() - started, port) for name, (proc, port) in runs.items()}
    finally:
        for proc, _ in runs.values():
            stop_group(proc)


@pytest.mark.parametrize("name,message", [(b[0], b[2]) for b in BAD_HOSTS], ids=[b[0] for b in BAD_HOSTS])
def test_host_that_cannot_run_a_rank_fails_in_seconds_naming_it(refused, name, message):
    code, log, seconds, port = refused[name]
    assert code == 2 and f"mlx-moe: {message}" in log, log[-3000:]
    assert "Traceback" not in log and seconds < 20, (seconds, log[-3000:])
    assert _processes_with(f"--port {port}") == []
