"""Failed and stalled ranks, ranks that cannot load, and safe defaults:
every case with real processes and a time bound."""

import contextlib
from concurrent.futures import ThreadPoolExecutor
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_moe.cluster.launch import free_port, stop_group, wait_ready
from mlx_moe.parallel.placement import write_placement
from test_serve import _processes_with, _start

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe", quantize=4)


def _rank_pid(marker, rank, url=None):
    """The pid of rank `rank` among the processes whose command line has
    `marker`: found by its environment in /proc, or where there is no /proc
    (macOS), the one the server at `url` reports."""
    if not Path("/proc/self").exists():
        assert url, "no /proc to read the ranks' environments: give the server's URL"
        with urllib.request.urlopen(url + "/v1/status", timeout=30) as r:
            pid = json.load(r)["cluster"]["ranks"][rank]["pid"]
        assert pid in _processes_with(marker), (pid, marker)
        return pid
    for pid in _processes_with(marker):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in env and b"mlx_moe.serve.engine.rank" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no rank {rank} process for {marker}")


def get(url):
    """(status, headers, JSON body); (None, None, None) while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.load(e)
    except (urllib.error.URLError, ConnectionError):
        return None, None, None


@functools.lru_cache(maxsize=None)
def no_eos(model) -> dict:
    """A logit_bias that bans end-of-sequence. Read once: 8 threads loading
    the tokenizer together under a CPU hog took minutes (seen: 200 s)."""
    return {str(t): -100 for t in load_tokenizer(Path(model)).eos_token_ids}


def _open_stream(url, model, max_tokens=100000):
    """A long streamed completion, sent: the server has answered with its
    headers (the request is queued). End-of-sequence is banned: the tiny
    model outpaces the test and could finish first. An error is returned."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    try:
        return client.completions.create(model=str(model), prompt="The river", max_tokens=max_tokens,
                                         temperature=0, stream=True, logit_bias=no_eos(model))
    except (openai.APIError, openai.APIConnectionError) as e:
        return str(e)


def _read_until_error(stream, started: threading.Event, seen: list):
    """Read `stream`, appending each chunk's finish_reason to `seen`; the
    error message that ended it, or None."""
    if isinstance(stream, str):
        return stream
    try:
        for chunk in stream:
            seen.append(chunk.choices[0].finish_reason if chunk.choices else None)
            started.set()
        return None
    except (openai.APIError, openai.APIConnectionError) as e:
        return str(e)


def _streams(url, model, n: int):
    """n long streams, each read in a thread, once each has its first token:
    [(thread, result dict with the finish reasons "seen" and, once it ends,
    "error")]. All n are sent before any is read: a thread reading a stream
    at full speed can hold this process's share of a loaded CPU for longer
    than the wait below (seen under a CPU hog: a request sent 200 s late)."""
    with ThreadPoolExecutor(n) as pool:
        opened = list(pool.map(lambda _: _open_stream(url, model), range(n)))
    out = []
    for stream in opened:
        started, result = threading.Event(), {"seen": []}
        t = threading.Thread(target=lambda s=stream, e=started, r=result: r.update(
            error=_read_until_error(s, e, r["seen"])))
        t.start()
        out.append((t, result, started))
    for _, result, started in out:
        assert started.wait(60), f"no token streamed: {result.get('error')}"
    return [(t, result) for t, result, _ in out]


def _streaming(url, model):
    """One long stream running in a thread, once its first token has arrived (see _streams)."""
    return _streams(url, model, 1)[0]


def _finished(result) -> bool:
    """Whether the stream ended normally (the model chose to stop) rather than by an error."""
    return any(result["seen"])


def _popen(argv, **kw):
    """Start the serve command with its stderr drained as it comes (a full
    pipe would block the ranks' logging) into `proc.log`."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    proc.log = []
    proc.drain = threading.Thread(target=lambda: proc.log.extend(proc.stderr), daemon=True)
    proc.drain.start()
    return proc


def with_log(e: AssertionError, proc) -> AssertionError:
    """A failed check, with what the server printed."""
    proc.drain.join(1)
    return AssertionError(f"{e}\n--- mlx-moe serve's stderr, its end ---\n{''.join(proc.log)[-4000:]}")


def _serve(model_path, *extra, linger: float = 1, **kw):
    """`mlx-moe serve` on two local ranks; /health keeps saying why for
    `linger` seconds after a failure (a test that reads it then needs more)."""
    kw["env"] = dict(kw.get("env") or os.environ, MLX_MOE_FAILED_LINGER=str(linger))
    port = free_port()
    proc = _popen([sys.executable, "-m", "mlx_moe.cli", "serve", "--hosts", "127.0.0.1,127.0.0.1",
                   "--model", str(model_path), "--port", str(port), "--max-context", "100000", *extra], **kw)
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


@contextlib.contextmanager
def cpu_hog():
    """A busy process per core: races that hide on an idle machine show."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


# Under load the client can read its first chunk seconds after the server
# wrote it (seen: 11.7 s, by which time the whole answer had been generated
# and buffered), so the streamed answer cannot end by itself: see
# _open_stream.
@pytest.mark.parametrize("when", ["mid-generation", "idle", "mid-generation under a CPU hog"])
def test_killed_rank_stops_the_cluster_with_a_message(model_path, when):
    with cpu_hog() if "hog" in when else contextlib.nullcontext():
        _kill_rank_1(model_path, when.startswith("mid-generation"))


def _kill_rank_1(model_path, streaming: bool):
    proc, port, url = _serve(model_path, linger=10)
    marker = f"--port {port}"
    try:
        wait_ready(url, proc)
        victim = _rank_pid(marker, 1, url)
        if streaming:
            t, result = _streaming(url, model_path)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        if streaming:
            t.join(30)
            assert not t.is_alive(), "the stream did not end within 30 s"
            assert not _finished(result), "the generation ended before rank 1 was killed"
            assert result["error"] and "rank 1" in result["error"], result["error"]
            # The front outlives the ranks: /health says why before it exits.
            status, _, body = get(url + "/health")
            assert status == 503 and "rank 1 (host 127.0.0.1) was killed by SIGKILL" in body["reason"], body
        code, err = _finish(proc, 60)
        assert time.monotonic() - killed < 60
        assert code != 0 and "rank 1 (host 127.0.0.1) was killed by SIGKILL" in err, err[-2000:]
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(url + "/health", timeout=5)
        assert _processes_with(marker) == []
    except AssertionError as e:
        raise with_log(e, proc) from e
    finally:
        stop_group(proc)


def test_the_front_exits_only_once_the_error_is_written():
    """A response that takes its error (open_responses reaches 0) but writes
    it late, as on a loaded machine: the front still delivers it, and closes
    the connection, before it exits."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(WORKERS / "slow_flush_worker.py"), str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.read() == b"first\nerror\n"
        assert proc.wait(30) == 3
    finally:
        proc.kill()
        proc.wait()


def test_stalled_rank_is_caught_by_the_watchdog(model_path):
    proc, port, url = _serve(model_path, "--watchdog-timeout", "5")
    marker = f"--port {port}"
    try:
        wait_ready(url, proc)
        victim = _rank_pid(marker, 1, url)  # found first: the stream must still be running when it stops
        t, result = _streaming(url, model_path)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        t.join(40)
        assert not t.is_alive(), "the stream did not end"
        assert not _finished(result), "the generation ended before rank 1 was stopped"
        assert result["error"] and "stalled" in result["error"], result["error"]
        code, err = _finish(proc, 60)
        assert time.monotonic() - stopped < 60
        assert code != 0 and "no progress from the cluster" in err, err[-2000:]
        assert _processes_with(marker) == []
    except AssertionError as e:
        raise with_log(e, proc) from e
    finally:
        stop_group(proc)


def test_clear_cache_lets_other_threads_run_while_it_waits():
    """mlx-lm's periodic mx.clear_cache waited for a stalled collective
    holding the GIL, which froze the watchdog; the engine's version must not."""
    import mlx.core as mx

    from mlx_moe.parallel.comm import settle
    from mlx_moe.patches import settled_clear_cache

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
        with settled_clear_cache(settle):
            mx.clear_cache()
        waited, counted = time.monotonic() - started, len(ticks) - before
    finally:
        stop.set()
        t.join()
    # About one tick per 1.1 ms while the GIL is free; a held GIL gives 0 or 1.
    assert counted >= max(5, waited * 100), (counted, waited)


def _rank1_differs(tmp_path, checkpoint, other):
    """(RANK1_REPLACE, RANK1_ENV) for rank 1 to differ from rank 0 as `other` says."""
    if other == "missing checkpoint":
        return f"--model={tmp_path / 'nowhere'}", ""
    if other == "different checkpoint":
        return f"--model={checkpoint('qwen3_moe', quantize=4, layers=3)}", ""
    if other == "too little memory":
        return "", "MLX_MOE_MEMORY_LIMIT=0.0001G"  # 100 kB: less than any rank's shard here
    if other == "collective bound":
        return "", "MLX_MOE_MAX_COLLECTIVE_BYTES=65536"
    # A stale placement file on rank 1's host: experts swapped between the ranks.
    swapped = tmp_path / "placement.json"
    write_placement({f"model.layers.{i}.mlp": [[4, 5, 6, 7], [0, 1, 2, 3]] for i in range(4)}, swapped)
    return f"--placement={swapped}", ""


# What the user reads for each way rank 1 can differ.
CANNOT_LOAD = {
    "missing checkpoint": ["rank 1 (host 127.0.0.1) failed: FileNotFoundError: No checkpoint directory"],
    "different checkpoint": [f"loaded a different checkpoint than rank 0 (host {socket.gethostname()}): config.json"],
    "too little memory": ["rank 1 (host 127.0.0.1) failed: MemoryError: rank 1/2 needs", "0.00 GB available"],
    "collective bound": ["differ in max_collective_bytes: 65536 vs 524288", "MLX_MOE_MAX_COLLECTIVE_BYTES"],
    "placement": ["differ in placement: '4 blocks placed by a file", "vs 'contiguous ranges'"],
}


@pytest.mark.parametrize("other", list(CANNOT_LOAD))
def test_rank_that_cannot_load_fails_every_rank_fast(model_path, checkpoint, other, tmp_path):
    replace, setting = _rank1_differs(tmp_path, checkpoint, other)
    # Nothing reads /health after the failure here: it need not keep saying why.
    env = dict(os.environ, REAL_PYTHON=sys.executable, RANK1_REPLACE=replace, RANK1_ENV=setting,
               MLX_MOE_FAILED_LINGER="1")
    port = free_port()
    started = time.monotonic()
    proc = _popen([sys.executable, "-m", "mlx_moe.cli", "serve", "--hosts", "127.0.0.1,127.0.0.1",
                   "--model", str(model_path), "--port", str(port),
                   "--python", str(WORKERS / "rank1_differs_python.sh")], env=env)
    try:
        code, err = _finish(proc, 60)
        assert code != 0 and time.monotonic() - started < 60
        for words in CANNOT_LOAD[other]:
            assert words in err, (words, err[-3000:])
        assert "every rank was stopped" in err.splitlines()[-1], err[-2000:]
        # It failed before any rank read a weight.
        assert "reading" not in err and "loaded in" not in err, err[-2000:]
        assert _processes_with(f"--port {port}") == []
    finally:
        stop_group(proc)


def test_fault_on_one_rank_fails_the_request_with_its_reason(model_path, tmp_path):
    """An error in rank 1's forward pass only (as a Metal out-of-memory would
    be): the stream ends with that reason and the rank's name, and the
    cluster stops instead of running its collectives out of step."""
    trigger = tmp_path / "fail-now"
    env = dict(os.environ, REAL_PYTHON=sys.executable,
               RANK1_ENV=f"PYTHONPATH={WORKERS / 'fault'} FAULT_TRIGGER={trigger}")
    proc, port, url = _serve(model_path, "--python", str(WORKERS / "rank1_differs_python.sh"), env=env)
    try:
        wait_ready(url, proc)
        t, result = _streaming(url, model_path)
        trigger.touch()
        failed = time.monotonic()
        t.join(30)
        assert not t.is_alive(), "the stream did not end within 30 s"
        assert not _finished(result), "the generation ended before the fault"
        assert result["error"] and "rank 1 (host 127.0.0.1) failed: RuntimeError: [metal::malloc]" \
            in result["error"], result["error"]
        code, err = _finish(proc, 60)
        assert time.monotonic() - failed < 60
        assert code != 0 and "rank 1 (host 127.0.0.1) failed: RuntimeError: [metal::malloc]" in err, err[-2000:]
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


@pytest.mark.parametrize("error, lost", [
    # What mlx 0.32 raises (ring: seen when a peer is SIGKILLed; JACCL: from its source).
    (RuntimeError("[ring] connection to a peer was lost"), True),
    (ValueError("[jaccl] Send failed with error code 12"), True),
    (ValueError("[jaccl] Recv failed with error code 110"), True),
    (RuntimeError("[jaccl] Recv failed with errno=54"), True),
    # Near misses: this rank's own errors.
    (RuntimeError("[ring] sum_scatter not supported."), False),
    (RuntimeError("[ring] Recv only supported from direct neighbors but tried to recv from 2 to 0\n"), False),
    (RuntimeError("[jaccl] Unsupported dtype for JACCL operation"), False),
    (RuntimeError("rank 1 loaded a different plan than its peer"), False),
    (RuntimeError("[metal::malloc] Attempting to allocate 9 bytes; the peer was lost"), False),
    (RuntimeError("[ring] connection to a peer was lost, then found"), False),
    (ValueError("[ring] connection to a peer was lost"), False),
    (RuntimeError("[jaccl] Send failed with error code 12"), False),  # mlx raises it as a ValueError
])
def test_lost_peer_knows_mlx_own_messages(error, lost):
    from mlx_moe.cluster.failures import lost_peer

    assert lost_peer(error) is lost


def test_watchdog_limit_follows_the_slowest_recent_step():
    """A loaded machine's long steps raise the limit (no false stall), up to
    LIMIT_CAP timeouts (a stall after one very slow step is still found);
    the window forgets them; a wait for a request (rank 0, not waiting on
    the cluster) never counts."""
    from mlx_moe.serve.engine.progress import LIMIT_CAP, Progress

    now = [0.0]
    p = Progress(60, margin=4, window=3, clock=lambda: now[0])
    assert p.limit() == 60 and p.stalled_for() == 0
    now[0] = 500.0  # idle, not waiting: neither a stall nor a step
    p.tick()
    assert p.limit() == 60
    p.waiting = True
    for gap in (1.0, 30.0, 2.0):  # one 30 s prompt chunk among fast steps
        now[0] += gap
        p.tick()
    assert p.limit() == 60 + 4 * 30
    now[0] += 150  # as long a wait as that chunk may take again under load
    assert p.stalled_for() == 150 and p.stalled_for() < p.limit()
    p.tick()
    assert LIMIT_CAP == 4 and p.limit() == 4 * 60  # not 60 + 4 * 150
    now[0] += 4 * 60 + 1  # a real stall after the slow step: found at the cap
    assert p.stalled_for() > p.limit()
    p.tick()
    for _ in range(3):
        now[0] += 1.0
        p.tick()
    assert p.limit() == 64  # the slow chunk left the window
    now[0] += 65
    assert p.stalled_for() > p.limit()
