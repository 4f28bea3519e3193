"""Fuzzing the HTTP layer: no request, however malformed, gets a 5xx, and
the server stays healthy. Most examples run in one process with a stand-in
engine that answers at once (only the HTTP layer is under test); a shorter
run hits a real two-rank server."""

import json
import threading
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.utils import load_tokenizer

from mlx_moe.serve.front.app import create_app
from mlx_moe.serve.structured import Grammars
from mlx_moe.checkpoints.synthetic_chat import synthesize_chat

MODEL = "tiny"


class InstantEngine:
    """Answers every job with one word, as the real engine would emit it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ready = threading.Event()
        self.ready.set()
        self.failure = None
        self.heartbeat = 5.0
        self.open_responses = 0
        self.notice, self.noticed = None, threading.Event()
        self.group = type("G", (), {"size": lambda self: 2})()
        self.expert_load = []
        self.grammars = Grammars(tokenizer)

    def stalled_for(self):
        return 0.0

    def submit(self, *jobs):
        for job in jobs:
            job.emit(("text", "ok"))
            job.emit(("done", "stop", {"prompt_tokens": len(job.prompt), "completion_tokens": 1,
                                       "total_tokens": len(job.prompt) + 1}))


@pytest.fixture(scope="module")
def client(ckpt_dir):
    # The tool-calling template, so tools and tool_choice reach the template and grammars.
    tokenizer = load_tokenizer(synthesize_chat(ckpt_dir / "chat-qwen3_moe"))
    return TestClient(create_app(InstantEngine(tokenizer), MODEL, context_length=256))


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
fields = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "seed", "stop", "logit_bias", "stream", "stream_options", "n", "user", "tools", "tool_choice",
          "parallel_tool_calls", "chat_template_kwargs", "reasoning_effort", "response_format",
          "logprobs", "top_logprobs", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
          "stop_token_ids",
          # Anthropic's
          "system", "stop_sequences", "top_k", "thinking", "output_config", "metadata"]
calls = st.lists(st.fixed_dictionaries({"id": st.text(max_size=5), "type": st.just("function"), "function":
                                        st.fixed_dictionaries({"name": st.text(max_size=8),
                                                               "arguments": st.one_of(st.text(max_size=20), values)})}),
                 max_size=2)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]),
     "content": st.one_of(st.none(), st.text(max_size=40), values)},
    optional={"tool_calls": calls, "tool_call_id": st.text(max_size=5)}), max_size=3)
schemas = st.one_of(values, st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "integer", "x"])},
                                                  optional={"properties": st.dictionaries(st.text(max_size=5), values,
                                                                                          max_size=2),
                                                            "required": values, "maxLength": values}))
tools = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "x y", ""])}, optional={"parameters": schemas})}), max_size=2)
choices = st.one_of(st.sampled_from(["auto", "none", "required", "any"]), values,
                    st.just({"type": "function", "function": {"name": "get_weather"}}),
                    st.just({"type": "tool", "name": "get_weather"}))
formats = st.one_of(values, st.just({"type": "json_object"}),
                    st.fixed_dictionaries({"type": st.just("json_schema"),
                                           "json_schema": st.fixed_dictionaries({"name": st.just("r")},
                                                                                optional={"schema": schemas})}))
anthropic_tools = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["get_weather", "x"])},
                                                 optional={"input_schema": schemas}), max_size=2)
bodies = st.dictionaries(st.sampled_from(fields), st.one_of(values, messages, st.just(MODEL), tools, choices,
                                                            formats, anthropic_tools), max_size=8)
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens"]


def error_shape(path, body):
    if path.startswith("/v1/messages"):  # Anthropic's
        return body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return set(body["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(ENDPOINTS))
def test_no_5xx_for_any_json_body(client, body, path):
    r = client.post(path, content=json.dumps(body))
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert error_shape(path, r.json()), r.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=30))
def test_no_5xx_for_any_model_id(client, name):
    r = client.get("/v1/models/" + quote(name, safe=""))
    assert r.status_code in (200, 404), (name, r.text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), path=st.sampled_from(ENDPOINTS + ["/v1/models", "/nope"]))
def test_no_5xx_for_any_bytes(client, raw, path):
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (raw, r.text)


def test_healthy_after_fuzzing(client):
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ok"


def test_no_5xx_from_a_real_two_rank_server(checkpoint):
    """The same fuzzing, briefly, against `mlx-moe serve` on two real ranks."""
    import urllib.error
    import urllib.request

    from mlx_moe.cluster.launch import free_port, stop_group, wait_ready
    from test_serve import _start

    path = checkpoint("qwen3_moe", quantize=4)
    port = free_port()
    proc = _start(path, port, "--max-context", "64")
    url = f"http://127.0.0.1:{port}"

    def post(endpoint, data: bytes) -> int:
        req = urllib.request.Request(url + endpoint, data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    @settings(max_examples=40, deadline=None)
    @given(body=st.one_of(bodies.map(lambda b: json.dumps(b).encode()), st.binary(max_size=100)),
           endpoint=st.sampled_from(ENDPOINTS))
    def fuzz(body, endpoint):
        assert post(endpoint, body) < 500, body

    try:
        wait_ready(url, proc)
        fuzz()
        assert post("/v1/completions", json.dumps({"model": str(path), "prompt": "hi",
                                                   "max_tokens": 2}).encode()) == 200
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200
    finally:
        stop_group(proc)
