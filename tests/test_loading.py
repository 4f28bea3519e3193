"""Loading progress: the launcher's board in-process (progress lines out of
the relayed output, one line per rank), rank 0's loading app and its switch
to the real one (in-process), and `mlx-moe serve` on two real
ranks held mid-load (tests/workers/load_gate): /health says loading with a
fraction that rises to ok, every other path is a 503 with Retry-After, and
the command's stderr has the progress as whole lines, one rank each, and no
tqdm bars, also while the ranks download from a hub (tests/workers/http_hub)."""

import io
import json
import os
import re
import signal
import sys
import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlx_moe.cluster.launch import stop_group, wait_ready
from mlx_moe.cluster.progress import PREFIX, Board
from mlx_moe.serve.front.loading import Loading, Switch, loading_app
from test_reliability import WORKERS, _finish, _serve, get
from workers.http_hub import HttpHub


def report(rank, stage, done, total, progress):
    return (PREFIX + json.dumps({"rank": rank, "stage": stage, "done": done, "total": total,
                                 "progress": progress}) + "\n").encode()


def sink():
    return io.TextIOWrapper(io.BytesIO(), write_through=True)


def screen(raw: str):
    """The lines a terminal shows after `raw`: text, newlines and the
    board's codes (n lines up and clear below, clear the line)."""
    lines, row = [""], 0
    for up, clear, text in re.findall(r"\x1b\[(\d+)F\x1b\[J|(\x1b\[2K)|([^\x1b]+)", raw):
        if up:
            row -= int(up)
            del lines[row + 1:]
            lines[row] = ""
        elif clear:
            lines[row] = ""
        for ch in text:
            if ch == "\n":
                row += 1
                if row == len(lines):
                    lines.append("")
            else:
                lines[row] += ch
    return lines[:-1] if lines[-1] == "" else lines


def test_board_takes_progress_out_of_the_output_and_prints_a_line_per_tenth():
    err, changes = sink(), []
    board = Board(["mac1", "mac2"], err, changes.append, tty=False)
    line = report(0, "reading", 0, 1000, 0.0)
    written, held = board.relay(err, b"plan: expert\n" + line[:20])  # a report cut in two
    assert (written, held) == (b"plan: expert\n", line[:20])
    written, held = board.relay(err, held + line[20:] + b"token")  # generate's text has no newline
    assert (written, held) == (b"token", b"")
    for done in (50, 99, 100, 420):
        board.relay(err, report(0, "reading", done, 1000, done / 1000))
    board.relay(err, b'mlx-moe-progress {"rank": 1, "sta\n')  # a fragment: dropped
    board.relay(err, report(1, "loaded", 1000, 1000, 1.0))
    out = err.buffer.getvalue().decode()
    assert out == ("plan: expert\n"
                   "mlx-moe: rank 0 (mac1): reading   0%, 0 B of 1.0 KB\n"
                   "token"
                   "mlx-moe: rank 0 (mac1): reading  10%, 100 B of 1.0 KB\n"
                   "mlx-moe: rank 0 (mac1): reading  42%, 420 B of 1.0 KB\n"
                   "mlx-moe: rank 1 (mac2): loaded, 1.0 KB\n")
    assert len(changes) == 6
    assert changes[-1] == [
        {"rank": 0, "host": "mac1", "stage": "reading", "loaded_bytes": 420, "load_total_bytes": 1000, "progress": 0.42},
        {"rank": 1, "host": "mac2", "stage": "loaded", "loaded_bytes": 1000, "load_total_bytes": 1000, "progress": 1.0}]


def test_board_on_a_terminal_keeps_one_line_per_rank_below_the_output():
    err = sink()
    board = Board(["mac1", "mac2"], err, tty=True)
    board.relay(err, report(0, "downloading", 5, 10, 0.25) + b"[rank 1/2] plan: expert\n")
    assert screen(err.buffer.getvalue().decode()) == [
        "[rank 1/2] plan: expert",
        "mlx-moe: rank 0 (mac1): downloading  50%, 5 B of 10 B",
        "mlx-moe: rank 1 (mac2): starting"]
    board.relay(err, report(1, "reading", 3, 10, 0.3) + report(0, "loaded", 10, 10, 1.0))
    board.relay(err, report(1, "loaded", 10, 10, 1.0) + b"serving\n")
    assert screen(err.buffer.getvalue().decode()) == [
        "[rank 1/2] plan: expert",
        "mlx-moe: rank 0 (mac1): loaded, 10 B",
        "mlx-moe: rank 1 (mac2): loaded, 10 B",
        "serving"]  # once every rank has loaded, the block stays where it is


def test_loading_app_answers_from_the_launchers_progress_until_the_switch():
    loading = Loading(2)
    switch = Switch(loading_app(loading, "tiny-moe", api_key="k"))
    client = TestClient(switch)
    entries = [{"rank": 0, "host": "mac1", "stage": "reading", "loaded_bytes": 3, "load_total_bytes": 4,
                "progress": 0.75}, {"rank": 1, "host": "mac2", "stage": "downloading", "progress": 0.25}]
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["progress"] == 0.0
    loading.update(entries)  # the launcher read them from the ranks' output
    health = client.get("/health").json()
    assert health == {"status": "loading", "progress": 0.5, "ranks": entries}
    refused = client.post("/v1/chat/completions", json={})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["message"] == "the model is loading (50%)"
    assert client.get("/v1/status").status_code == 401  # the page's data needs the key, as once loaded
    status = client.get("/v1/status", headers={"Authorization": "Bearer k"}).json()
    assert status["state"] == "loading" and [r["host"] for r in status["cluster"]["ranks"]] == ["mac1", "mac2"]
    assert "text/html" in client.get("/").headers["content-type"]

    real, ready = FastAPI(), threading.Event()
    real.get("/v1/models")(lambda: {"data": []})
    switch.switch(real, ready)
    assert client.get("/v1/models").status_code == 503  # until the engine runs
    ready.set()
    assert client.get("/v1/models").json() == {"data": []}


def test_a_failure_reported_while_loading_shows_in_health():
    loading = Loading(2)
    client = TestClient(loading_app(loading, "tiny-moe"))
    loading.failure = "rank 1 (host mac2) failed: MemoryError"  # as Front.failed sets it
    assert client.get("/health").json() == {"status": "failed", "reason": "rank 1 (host mac2) failed: MemoryError"}
    assert client.get("/v1/models").json()["error"]["message"] == "rank 1 (host mac2) failed: MemoryError"


def poll_health(url, proc, until, seen, timeout=180):
    """Append each /health answer (status, body) to `seen` until `until(status, body)`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "".join(proc.log)[-3000:]
        status, _, body = get(url + "/health")
        if status is not None:
            seen.append((status, body))
            if until(status, body):
                return
        time.sleep(0.05)
    raise AssertionError(f"/health never got there: {seen[-3:]}")


def stop_once_loaded(proc):
    """SIGTERM the serve command once its stderr shows both ranks loaded
    (their output reaches it through mlx.launch, which may lag behind
    HTTP): its exit code and each rank's progress lines, checked whole:
    one rank a line, and no report, tqdm bar or terminal code between them."""
    deadline = time.monotonic() + 60
    while sum(": loaded, " in line for line in proc.log) < 2:
        assert time.monotonic() < deadline, "".join(proc.log)[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc, 60)
    assert PREFIX.strip() not in err and "\r" not in err and "\x1b" not in err
    assert not re.search(r"it/s|B/s|\d+%\|", err), err[-3000:]
    size = r"[\d.]+ [KMG]?B"
    whole = re.compile(rf"mlx-moe: rank [01] \(127\.0\.0\.1\): ((downloading|reading) +\d+%, {size} of {size}"
                       rf"|loaded, {size})")
    lines = [l for l in err.splitlines() if l.startswith("mlx-moe: rank ") and " failed" not in l]
    assert all(whole.fullmatch(l) for l in lines), lines
    return code, {rank: [l for l in lines if l.startswith(f"mlx-moe: rank {rank} ")] for rank in (0, 1)}


def percents(lines, stage):
    return [int(m.group(1)) for m in map(re.compile(rf".*: {stage} +(\d+)%, ").match, lines) if m]


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe", quantize=4)


def test_health_says_loading_with_a_rising_fraction_until_ready(model_path, tmp_path):
    gate = tmp_path / "open"
    env = dict(os.environ, PYTHONPATH=str(WORKERS / "load_gate"), LOAD_GATE=str(gate))
    proc, port, url = _serve(model_path, env=env)
    try:
        seen = []
        # From the moment the port opens, until both ranks wait at the gate, having read some rows.
        poll_health(url, proc, lambda s, b: s == 503 and all(r["stage"] == "reading" and r["progress"] > 0
                                                             for r in b.get("ranks", [])), seen)
        status, headers, body = get(url + "/v1/models")
        assert status == 503 and headers["Retry-After"] == "5"
        pct = int(re.fullmatch(r"the model is loading \((\d+)%\)", body["error"]["message"]).group(1))
        assert 0 < pct < 100 and body["error"]["code"] == "model_loading"
        page = get(url + "/v1/status")[2]
        assert page["state"] == "loading" and [r["host"] for r in page["cluster"]["ranks"]] == ["127.0.0.1"] * 2
        gate.touch()
        poll_health(url, proc, lambda s, b: s == 200, seen)
        assert get(url + "/v1/models")[0] == 200  # the real app now

        loading = [b for s, b in seen if s == 503]
        assert all(b["status"] == "loading" and 0 <= b["progress"] <= 1 and len(b["ranks"]) == 2 for b in loading)
        fractions = [b["progress"] for b in loading]
        assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions)
        assert seen[-1] == (200, {"status": "ok", "ranks": 2})
        code, lines = stop_once_loaded(proc)
    finally:
        stop_group(proc)
    assert code == 0
    for rank in (0, 1):
        pcts = percents(lines[rank], "reading")
        assert pcts and pcts[0] == 0 and pcts == sorted(pcts) and len(pcts) == len(set(pcts)), lines
        assert ": loaded, " in lines[rank][-1], lines


def test_download_from_the_hub_shows_as_progress_lines_not_bars(model_path, tmp_path):
    """Each rank downloads into its own cache, as on its own host, from a
    stand-in hub over HTTP: huggingface_hub's real download, bars and all."""
    hub = HttpHub(model_path, "owner/tiny-moe")
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf0"), REAL_PYTHON=sys.executable,
               RANK1_ENV=f"HF_HOME={tmp_path / 'hf1'}")
    proc, port, url = _serve("owner/tiny-moe", "--python", str(WORKERS / "rank1_differs_python.sh"), env=env)
    try:
        wait_ready(url, proc)
        code, lines = stop_once_loaded(proc)
    finally:
        stop_group(proc)
        hub.close()
    assert code == 0
    for rank in (0, 1):
        stages = [re.search(r"\): (\w+)", l).group(1) for l in lines[rank]]
        assert stages == sorted(stages, key=["downloading", "reading", "loaded"].index), lines
        assert percents(lines[rank], "downloading")[-1] == 100 and stages[-1] == "loaded", lines
