"""The status page (mlx_moe.serve.front.status) against a stand-in engine with
plausible data: its JSON, and the page rendered by headless Chromium (the
heatmap has one cell per layer and rank, and is really drawn); then the
page of a real two-rank `mlx-moe serve` after a few requests."""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
import zlib
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlx_moe.parallel.expert import ExpertLoad
from mlx_moe.parallel.placement import spread
from mlx_moe.parallel.plan import LayerPlan, ShardingPlan
from mlx_moe.serve.front.status import status_router
from test_serve import serving

RANKS, LAYERS, EXPERTS = 4, 6, 16


class FakeEngine:
    def __init__(self, ready=True):
        per = EXPERTS // RANKS
        ranges = [(r * per, (r + 1) * per) for r in range(RANKS)]
        layers = [LayerPlan(i, f"model.layers.{i}.mlp", "moe", "experts", EXPERTS, 2, ranges=list(ranges))
                  for i in range(LAYERS)]
        self.model = SimpleNamespace(sharding_plan=ShardingPlan("expert", "MoE model", RANKS, 0, layers))
        self.group = SimpleNamespace(size=lambda: RANKS)
        self.ready = threading.Event()
        if ready:
            self.ready.set()
        self.failure = None
        owner = layers[0].owner()
        # Low experts are popular, more so in deeper layers: rank 0 works most.
        self.expert_load = [ExpertLoad(l.path, [round((EXPERTS - e) ** (1 + l.index / 2)) for e in range(EXPERTS)],
                                       owner) for l in layers] if ready else []
        job = SimpleNamespace(prompt=list(range(40)), max_tokens=128)
        running = {7: SimpleNamespace(job=job, tokens=17, first=time.perf_counter() - 2)} if ready else {}
        self.scheduler = SimpleNamespace(running=running, counts=lambda: (len(running), 3 if ready else 0))
        self.steps = []
        self.on_step = lambda *a: self.steps.append(a)


def cluster_info(loading=False):
    def info():
        return [{"host": f"mac{r + 1}", "memory_bytes": (20 + r) * 10**9, "memory_total_bytes": 64 * 10**9,
                 **({"stage": "reading", "loaded_bytes": (r + 1) * 10**9, "load_total_bytes": 8 * 10**9,
                     "progress": (r + 1) / 8} if loading else {})} for r in range(RANKS)]
    return info


def make_app(engine, loading=False):
    app = FastAPI()
    app.include_router(status_router(engine, "tiny-moe", cluster_info(loading)))
    return app


def test_status_json_describes_cluster_requests_and_load():
    engine = FakeEngine()
    client = TestClient(make_app(engine))
    engine.on_step(1, 3, 5, 1000)
    engine.on_step(1, 3, 4, 1000)
    s = client.get("/v1/status").json()
    assert engine.steps == [(1, 3, 5, 1000), (1, 3, 4, 1000)]  # the hook it replaced still runs
    assert s["state"] == "ready" and s["model"] == "tiny-moe"
    assert s["cluster"]["strategy"] == "expert" and s["cluster"]["size"] == RANKS
    ranks = s["cluster"]["ranks"]
    assert [r["host"] for r in ranks] == ["mac1", "mac2", "mac3", "mac4"]
    assert ranks[1]["experts"] == "4-7" and ranks[1]["experts_per_layer"] == [4] * LAYERS
    q = s["requests"]
    assert (q["running"], q["waiting"]) == (1, 3) and q["active"][0]["generated_tokens"] == 17
    assert sum(n for _, n in q["tokens_per_second"]) == 9 and len(q["tokens_per_second"]) == 300
    layers = s["experts"]["layers"]
    assert len(layers) == LAYERS
    for layer, load in zip(layers, engine.expert_load):
        assert layer["rank_totals"] == load.rank_totals(RANKS)
        assert layer["imbalance"] == pytest.approx(spread(load.rank_totals(RANKS)), abs=1e-4)
        assert layer["imbalance"] > 1.5
    assert "text/html" in client.get("/").headers["content-type"]


@pytest.fixture
def serve():
    """Serves an app on a socket that already listens, so a browser
    started at once waits for uvicorn rather than failing."""
    servers = []

    def start(app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=30)


MAC_APPS = ["/Applications/Chromium.app/Contents/MacOS/Chromium",
            "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"]
CHROMIUM = (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
            or next((p for p in MAC_APPS if os.path.exists(p)), None))


def chromium(tmp_path, url, *action):
    if CHROMIUM is None:
        pytest.skip("no Chromium or Chrome for headless page tests (Debian: apt-get install -y chromium)")
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--window-size=1400,1000", "--force-device-scale-factor=1", "--hide-scrollbars",
           # Lets the page's fetch and render finish before the dump or the shot.
           "--virtual-time-budget=5000", *action, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def read_png(path):
    """(width, height, rows of RGB tuples) of an 8-bit RGB or RGBA PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6) and body[12] == 0  # not interlaced
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    channels = 4 if color == 6 else 3
    raw, stride, rows, prev = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append([tuple(line[x * channels:x * channels + 3]) for x in range(width)])
        prev = line
    return width, height, rows


def assert_heatmap_drawn(tmp_path, url, dom, layers, ranks):
    """The page's heatmap in `dom` has a cell per layer and rank, and its
    screenshot shows them drawn where the page says the grid is."""
    cells = re.findall(r'<div class="cell" data-layer="(\d+)" data-rank="(\d+)"', dom)
    assert len(cells) == layers * ranks
    assert {(int(l), int(r)) for l, r in cells} == {(l, r) for l in range(layers) for r in range(ranks)}
    left, top, width, height = map(int, re.search(r'id="heatmap"[^>]*data-box="([\d,]+)"', dom).group(1).split(","))
    # Rows of 18 px cells and columns of 44 px cells, with labels and gaps.
    assert width >= ranks * 44 and height >= (layers + 1) * 18

    shot = tmp_path / "status.png"
    chromium(tmp_path, url, f"--screenshot={shot}")
    w, h, rows = read_png(shot)
    assert (w, h) == (1400, 1000) and top + height <= h
    region = [rows[y][x] for y in range(top, top + height) for x in range(left, left + width)]
    inked = sum(1 for px in region if px != (255, 255, 255))
    blue = sum(1 for r, g, b in region if b > r + 20)  # the cells' colour scale
    # The cells cover most of the grid's columns for ranks: well over a third of its box.
    assert blue > 0.35 * len(region) and inked >= blue
    outside = [rows[y][x] for y in range(top, top + height) for x in range(min(w, left + width + 200), w)]
    assert sum(1 for r, g, b in outside if b > r + 20) < 0.05 * len(region)


def test_page_draws_the_heatmap(tmp_path, serve):
    url = serve(make_app(FakeEngine()))
    dom = chromium(tmp_path, url, "--dump-dom")
    assert "mac3" in dom and "1 running, 3 waiting" in dom and dom.count('class="rank"') == RANKS
    assert_heatmap_drawn(tmp_path, url, dom, LAYERS, RANKS)


def test_page_shows_loading_progress(tmp_path, serve):
    url = serve(make_app(FakeEngine(ready=False), loading=True))
    dom = chromium(tmp_path, url, "--dump-dom")
    assert '<span id="state" class="badge loading">loading 31%</span>' in dom  # (1 + 2 + 3 + 4) / 32
    assert dom.count('class="load"') == RANKS and "reading" in dom
    assert 'style="width:25%"' in dom  # rank 1: 2 of 8 GB
    assert dom.count('class="cell"') == 0


def test_page_of_a_real_two_rank_server(tmp_path, checkpoint):
    """Keyless, so the page needs no key: after a few requests, the heatmap
    has a cell per MoE layer and rank, and each rank's host and memory show."""
    model = checkpoint("qwen3_moe", quantize=4)
    with serving(model) as url:
        for topic in ("rivers", "bridges", "books"):
            body = {"model": str(model), "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
                    "max_tokens": 8}
            req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=120).close()
        with urllib.request.urlopen(url + "/v1/status", timeout=30) as r:
            status = json.load(r)
        dom = chromium(tmp_path, url + "/", "--dump-dom")
        ranks = status["cluster"]["ranks"]
        assert status["state"] == "ready" and len(ranks) == 2 and len(status["experts"]["layers"]) == 4
        assert sum(sum(l["rank_totals"]) for l in status["experts"]["layers"]) > 0
        assert_heatmap_drawn(tmp_path, url + "/", dom, layers=4, ranks=2)
        for r in ranks:
            assert r["host"] == socket.gethostname() and 0 < r["memory_bytes"] < r["memory_total_bytes"]
        rows = re.findall(r'<tr class="rank" data-memory="(\d+)"><td>(\d)</td><td>([^<]*)</td>.*?'
                          r'<td>([\d.]+ [KMG]?B) / ([\d.]+ [KMG]?B)</td>', dom)
        assert [(int(m), int(i), h) for m, i, h, _, _ in rows] == [
            (r["memory_bytes"], r["rank"], r["host"]) for r in ranks]
