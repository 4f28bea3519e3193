"""Failed and stalled ranks, ranks that cannot load, and safe defaults:
every case with real processes and a time bound."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from mlx_moe.launch import free_port, stop_group, wait_ready
from test_serve import _processes_with, _start

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe", quantize=4)


def _rank_pid(marker, rank):
    """The pid of rank `rank` among the processes whose command line has `marker`."""
    for pid in _processes_with(marker):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and b"mlx_moe.serve.rank" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no rank {rank} process for {marker}")


def _stream_until_error(url, model, started: threading.Event, max_tokens=100000):
    """Stream a long completion; return the error message that ended it, or None."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        for _ in client.completions.create(model=str(model), prompt="The river", max_tokens=max_tokens,
                                           temperature=0, stream=True):
            started.set()
        return None
    except (openai.APIError, openai.APIConnectionError) as e:
        return str(e)


def _streaming(url, model):
    """A long stream running in a thread, once its first token has arrived:
    (thread, result dict that gets "error")."""
    started, result = threading.Event(), {}
    t = threading.Thread(target=lambda: result.update(error=_stream_until_error(url, model, started)))
    t.start()
    assert started.wait(60), "no token streamed"
    return t, result


def _popen(argv, **kw):
    """Start the serve command with its stderr drained as it comes (a full
    pipe would block the ranks' logging) into `proc.log`."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    proc.log = []
    proc.drain = threading.Thread(target=lambda: proc.log.extend(proc.stderr), daemon=True)
    proc.drain.start()
    return proc


def _serve(model_path, *extra):
    port = free_port()
    proc = _popen([sys.executable, "-m", "mlx_moe.cli", "serve", "--hosts", "127.0.0.1,127.0.0.1",
                   "--model", str(model_path), "--port", str(port), "--max-context", "100000", *extra])
    return proc, port, f"http://127.0.0.1:{port}"


def _finish(proc, timeout):
    """Exit code and stderr of the serve command, which must end within `timeout`."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        raise AssertionError(f"mlx-moe serve still running after {timeout}s")
    proc.drain.join(10)
    return proc.returncode, "".join(proc.log)


@pytest.mark.parametrize("when", ["mid-generation", "idle"])
def test_killed_rank_stops_the_cluster_with_a_message(model_path, when):
    proc, port, url = _serve(model_path)
    marker = f"--port {port}"
    try:
        wait_ready(url, proc)
        if when == "mid-generation":
            t, result = _streaming(url, model_path)
        os.kill(_rank_pid(marker, 1), signal.SIGKILL)
        killed = time.monotonic()
        if when == "mid-generation":
            t.join(30)
            assert not t.is_alive(), "the stream did not end within 30 s"
            assert result["error"] and "rank 1" in result["error"], result["error"]
        code, err = _finish(proc, 60)
        assert time.monotonic() - killed < 60
        assert code != 0 and "rank 1 was killed by SIGKILL" in err, err[-2000:]
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/health", timeout=5)
        assert _processes_with(marker) == []
    finally:
        stop_group(proc)


def test_stalled_rank_is_caught_by_the_watchdog(model_path):
    proc, port, url = _serve(model_path, "--watchdog-timeout", "5")
    marker = f"--port {port}"
    try:
        wait_ready(url, proc)
        t, result = _streaming(url, model_path)
        os.kill(_rank_pid(marker, 1), signal.SIGSTOP)
        stopped = time.monotonic()
        t.join(40)
        assert not t.is_alive(), "the stream did not end"
        assert result["error"] and "stalled" in result["error"], result["error"]
        code, err = _finish(proc, 60)
        assert time.monotonic() - stopped < 60
        assert code != 0 and "no progress from the cluster" in err, err[-2000:]
        assert _processes_with(marker) == []
    finally:
        stop_group(proc)


def test_clear_cache_lets_other_threads_run_while_it_waits():
    """mlx-lm's periodic mx.clear_cache waited for a stalled collective
    holding the GIL, which froze the watchdog; the engine's version must not."""
    import mlx.core as mx

    from mlx_moe.serve.engine import clear_cache_without_gil

    ticks, stop = [], threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    a = mx.random.normal((512, 512))
    mx.eval(a)
    x = a
    for _ in range(40):
        x = x @ a / 30
    t = threading.Thread(target=count)
    t.start()
    try:
        mx.async_eval(x)
        before, started = len(ticks), time.monotonic()
        clear_cache_without_gil()()
        waited, counted = time.monotonic() - started, len(ticks) - before
    finally:
        stop.set()
        t.join()
    # About one tick per 1.1 ms while the GIL is free; a held GIL gives 0 or 1.
    assert counted >= max(5, waited * 100), (counted, waited)


@pytest.mark.parametrize("other", ["missing", "different", "too small"])
def test_rank_that_cannot_load_fails_every_rank_fast(model_path, checkpoint, other, tmp_path):
    env = dict(os.environ, REAL_PYTHON=sys.executable)
    if other == "too small":
        env["RANK1_MEMORY_LIMIT"] = "0.0001G"  # 100 kB: less than any rank's shard here
    else:
        env["OTHER_CHECKPOINT"] = str(tmp_path / "nowhere" if other == "missing"
                                      else checkpoint("qwen3_moe", quantize=4, layers=3))
    port = free_port()
    started = time.monotonic()
    proc = _popen([sys.executable, "-m", "mlx_moe.cli", "serve", "--hosts", "127.0.0.1,127.0.0.1",
                   "--model", str(model_path), "--port", str(port),
                   "--python", str(WORKERS / "rank1_differs_python.sh")], env=env)
    try:
        code, err = _finish(proc, 60)
        assert code != 0 and time.monotonic() - started < 60
        if other == "missing":
            assert "No checkpoint directory" in err and "rank 1 exited with code 1" in err, err[-2000:]
        elif other == "different":
            assert "loaded a different checkpoint than rank 0" in err, err[-2000:]
        else:
            assert "rank 1/2 needs" in err and "0.00 GB available" in err, err[-2000:]
            # It failed before reading any weights.
            assert "rank 1 exited with code 1" in err and "[rank 1/2] reading" not in err, err[-2000:]
        assert _processes_with(f"--port {port}") == []
    finally:
        stop_group(proc)


def test_api_key_and_body_limit(model_path):
    port = free_port()
    proc = _start(model_path, port, "--api-key", "s3cret", "--max-body-bytes", "4096")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)  # /health needs no key
        body = json.dumps({"model": str(model_path), "prompt": "hi", "max_tokens": 2}).encode()

        def post(data, key=None):
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            req = urllib.request.Request(url + "/v1/completions", data, headers)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.load(r)
            except urllib.error.HTTPError as e:
                return e.code, json.load(e)

        assert post(body)[0] == 401
        assert post(body, "wrong")[1]["error"]["code"] == "invalid_api_key"
        assert post(body, "s3cret")[0] == 200
        big = json.dumps({"model": str(model_path), "prompt": "x" * 10000}).encode()
        code, payload = post(big, "s3cret")
        assert code == 413 and payload["error"]["code"] == "request_too_large"
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model=str(model_path), prompt="hi", max_tokens=2).choices[0].text is not None
    finally:
        stop_group(proc)


def test_32_streaming_clients_times_4_requests_all_answered(model_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parents[1] / "tools" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    import oracle

    port = free_port()
    proc = _start(model_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        r = load_test.run(url, str(model_path), clients=32, requests=4, max_tokens=4, timeout=600)
        assert r["errors"] == []
        assert sum(len(v) for v in r["answers"].values()) == 128
        for prompt, texts in r["answers"].items():
            assert texts == [oracle.greedy_text(model_path, prompt, 4)] * len(texts), prompt
        with urllib.request.urlopen(url + "/health", timeout=10) as h:
            assert h.status == 200
    finally:
        stop_group(proc)
