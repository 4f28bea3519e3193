"""`mlx-moe serve` on two real local ranks, driven with the official openai
client: greedy answers equal single-process mlx-lm, concurrency, bad input,
the demo, and a clean SIGTERM."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from mlx_lm.sample_utils import make_logits_processors

import oracle
from mlx_moe.cluster.launch import free_port, stop_group, wait_ready

MAX_TOKENS = 24
CONTEXT = 512


def _start(model, port, *extra, env=None):
    cmd = [sys.executable, "-m", "mlx_moe.cli", "serve", "--hosts", "127.0.0.1,127.0.0.1",
           "--model", str(model), "--port", str(port), *extra]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True, env=env)


def _processes_with(marker: str):
    """PIDs whose command line contains `marker` (from /proc, or from ps
    where there is no /proc, as on macOS)."""
    if not Path("/proc/self").exists():
        out = subprocess.run(["ps", "-A", "-ww", "-o", "pid=,command="], capture_output=True, text=True,
                             check=True).stdout
        return [int(pid) for pid, _, command in (line.strip().partition(" ") for line in out.splitlines())
                if marker in command]
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe", quantize=4)


@contextlib.contextmanager
def serving(model_path, *extra, env=None):
    """`mlx-moe serve` on two local ranks (unless `extra` says otherwise) on
    a fresh port, until the block ends: its URL."""
    port = free_port()
    proc = _start(model_path, port, *extra, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def server(model_path):
    with serving(model_path, "--max-context", str(CONTEXT)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def _chat(client, model, content, stream=False, **kw):
    messages = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model=str(model), messages=messages, temperature=0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(model=str(model), messages=messages, temperature=0,
                                                stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, usage


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_single_process_greedy(client, model_path, stream):
    prompt = oracle.chat_prompt(model_path, "Where does the river run?")
    want = oracle.greedy_text(model_path, prompt, MAX_TOKENS)
    text, finish, usage = _chat(client, model_path, "Where does the river run?", stream, max_tokens=MAX_TOKENS)
    assert text == want and want
    assert finish in ("stop", "length")
    assert usage.completion_tokens <= MAX_TOKENS and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_single_process_greedy(client, model_path, stream):
    prompt = "The library stood at the corner"
    want = oracle.greedy_text(model_path, prompt, MAX_TOKENS)
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=str(model_path), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True)
            if c.choices)
    else:
        r = client.completions.create(model=str(model_path), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        text = r.choices[0].text
        assert r.usage.completion_tokens == MAX_TOKENS and r.choices[0].finish_reason == "length"
    assert text == want and want


def test_stop_string_cuts_the_answer(client, model_path):
    prompt = "The library stood at the corner"
    want = oracle.greedy_text(model_path, prompt, MAX_TOKENS)
    stop = want[len(want) // 2: len(want) // 2 + 2]
    r = client.completions.create(model=str(model_path), prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0, stop=[stop, "never-appears"])
    assert r.choices[0].text == want[: want.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_logit_bias_steers_the_answer_as_in_a_single_process(client, model_path):
    prompt = "The library stood at the corner"
    first = oracle.next_token(model_path, prompt)
    plain = oracle.greedy_text(model_path, prompt, MAX_TOKENS)
    want = oracle.greedy_text(model_path, prompt, MAX_TOKENS,
                              logits_processors=make_logits_processors(logit_bias={first: -100}))
    r = client.completions.create(model=str(model_path), prompt=prompt, max_tokens=MAX_TOKENS,
                                  temperature=0, logit_bias={str(first): -100})
    assert r.choices[0].text == want and want != plain


def test_seeded_sampling_is_reproducible(client, model_path):
    kw = dict(model=str(model_path), prompt="Computers process", max_tokens=12, temperature=1.0, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_eight_concurrent_clients_each_get_their_answer(server, model_path):
    questions = [f"Tell me about {w}." for w in
                 ("rivers", "bridges", "books", "music", "memory", "weather", "programs", "boats")]
    results = {}

    def ask(q):
        c = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
        results[q] = _chat(c, model_path, q, stream=q.endswith("s."), max_tokens=16)[0]

    threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for q in questions:
        assert results.get(q) == oracle.greedy_text(model_path, oracle.chat_prompt(model_path, q), 16), q
    assert len(set(results.values())) > 1


def _post_raw(url, body: bytes):
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


BAD = [
    ("malformed json", b'{"model": "x", "messages": [', 400, None),
    ("missing messages", {"model": "M"}, 400, "messages"),
    ("mistyped max_tokens", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ("zero max_tokens", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("negative max_tokens", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens"),
    ("bad role", {"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("unknown model", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("logit_bias token outside the vocabulary", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("logit_bias over 100", {"model": "M", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 150}}, 400, "logit_bias"),
    ("prompt over the context", {"model": "M", "messages": [{"role": "user", "content": "river " * 2000}]}, 400, "messages"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, client, model_path, name, body, status, param):
    if isinstance(body, dict):
        body = json.dumps({k: (str(model_path) if v == "M" else v) for k, v in body.items()}).encode()
    code, payload = _post_raw(server + "/v1/chat/completions", body)
    assert code == status, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    text, _, _ = _chat(client, model_path, "hi", max_tokens=4)
    assert text == oracle.greedy_text(model_path, oracle.chat_prompt(model_path, "hi"), 4)


def test_models_and_health(server, client, model_path):
    assert [m.id for m in client.models.list().data] == [str(model_path)]
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert r.status == 200 and json.load(r)["ranks"] == 2


def test_sigterm_stops_every_process(model_path):
    port = free_port()
    proc = _start(model_path, port)
    marker = f"--port {port}"
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        assert len(_processes_with(marker)) >= 3  # the command, mlx.launch, two ranks
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=30) as r:
            pids = [rank["pid"] for rank in json.load(r)["cluster"]["ranks"]]
        assert len(pids) == 2 and set(pids) <= set(_processes_with(marker)), pids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert _processes_with(marker) == []
    finally:
        stop_group(proc)


def test_demo_runs_to_completion(tmp_path):
    env = dict(os.environ, MLX_MOE_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "mlx_moe.cli", "demo", "--max-tokens", "8"],
                       capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.PIPE)
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stdout and "rank 1" in r.stdout and "assistant" in r.stdout
