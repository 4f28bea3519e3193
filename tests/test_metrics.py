"""GET /metrics: in one process with a stand-in engine (rendering, auth,
the request hooks), then on a real two-rank server after a few requests
made with the official openai client (counts, histograms, expert load)."""

import json
import urllib.request

import openai
import pytest
from fastapi.testclient import TestClient
from mlx_lm.utils import load_tokenizer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mlx_moe.parallel.expert import ExpertLoad
from mlx_moe.cluster.launch import free_port, stop_group, wait_ready
from mlx_moe.serve.front.app import create_app
from mlx_moe.serve.front.metrics import Metrics
from test_http_fuzz import InstantEngine
from test_serve import _start

MODEL = "tiny"


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value} of a Prometheus text page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page: dict, name: str, **labels) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def by_layer(page: dict, name: str) -> dict:
    """{layer: {other labels: value}} of one expert-load metric."""
    out = {}
    for (n, labels), v in page.items():
        if n == name:
            labels = dict(labels)
            out.setdefault(labels.pop("layer"), {})[tuple(sorted(labels.items()))] = v
    return out


def test_metrics_page_in_process(checkpoint):
    engine = InstantEngine(load_tokenizer(checkpoint("qwen3_moe")))
    engine.expert_load = [ExpertLoad("model.layers.0.mlp", [6, 1, 0, 1], [0, 0, 1, 1]),
                          ExpertLoad("model.layers.1.mlp", [0, 0, 0, 0], [0, 1, 0, 1])]
    client = TestClient(create_app(engine, MODEL, context_length=256, api_key="k"))
    auth = {"Authorization": "Bearer k"}
    assert client.get("/metrics").status_code == 401
    body = {"model": MODEL, "prompt": "hi there", "max_tokens": 2}
    for _ in range(2):
        assert client.post("/v1/completions", json=body, headers=auth).status_code == 200
    assert client.post("/v1/completions", json=body).status_code == 401
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert "[DONE]" in client.post("/v1/chat/completions", json=chat, headers=auth).text
    assert client.get("/no/such/path", headers=auth).status_code == 404

    r = client.get("/metrics", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    page = samples(r.text)
    assert value(page, "mlx_moe_requests_total", endpoint="/v1/completions", status="200") == 2
    assert value(page, "mlx_moe_requests_total", endpoint="/v1/completions", status="401") == 1
    assert value(page, "mlx_moe_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert value(page, "mlx_moe_requests_total", endpoint="other", status="404") == 1
    assert value(page, "mlx_moe_requests_total", endpoint="/metrics", status="401") == 1
    assert value(page, "mlx_moe_time_to_first_token_seconds_count") == 3
    assert value(page, "mlx_moe_request_latency_seconds_count") == 3
    assert value(page, "mlx_moe_generated_tokens_total") == 3  # the stand-in answers one token
    assert value(page, "mlx_moe_queue_depth") == 0
    assert by_layer(page, "mlx_moe_expert_tokens_total")["model.layers.0.mlp"] == {
        (("expert", "0"), ("rank", "0")): 6, (("expert", "1"), ("rank", "0")): 1,
        (("expert", "2"), ("rank", "1")): 0, (("expert", "3"), ("rank", "1")): 1}
    ranks = by_layer(page, "mlx_moe_rank_tokens_total")
    assert ranks["model.layers.0.mlp"] == {(("rank", "0"),): 7, (("rank", "1"),): 1}
    assert ranks["model.layers.1.mlp"] == {(("rank", "0"),): 0, (("rank", "1"),): 0}
    assert value(page, "mlx_moe_expert_load_imbalance", layer="model.layers.0.mlp") == 7 / 4
    assert value(page, "mlx_moe_expert_load_imbalance", layer="model.layers.1.mlp") == 1.0


def test_a_job_is_tracked_once_however_it_ends():
    """Queue depth and latency stay right when a failing cluster ends a job twice."""
    metrics, events = Metrics(InstantEngine(None)), []
    page = lambda: samples(generate_latest(metrics.registry).decode())
    emit = metrics.track(events.append)
    assert value(page(), "mlx_moe_queue_depth") == 1
    for event in (("text", "a"), ("text", "b"), ("error", "lost"), ("error", "lost")):
        emit(event)
    assert len(events) == 4
    assert value(page(), "mlx_moe_queue_depth") == 0
    assert value(page(), "mlx_moe_time_to_first_token_seconds_count") == 1
    assert value(page(), "mlx_moe_request_latency_seconds_count") == 1
    assert value(page(), "mlx_moe_generated_tokens_total") == 0


def test_metrics_after_requests_to_two_ranks(checkpoint):
    path = checkpoint("qwen3_moe", quantize=4)
    config = json.loads((path / "config.json").read_text())
    top_k, n_experts = config["num_experts_per_tok"], config["num_experts"]
    port = free_port()
    proc = _start(path, port, "--max-context", "512")
    url = f"http://127.0.0.1:{port}"

    def scrape() -> dict:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            return samples(r.read().decode())

    try:
        wait_ready(url, proc)
        before = scrape()
        layers = by_layer(before, "mlx_moe_expert_tokens_total")
        assert len(layers) == config["num_hidden_layers"]
        assert all(v == 0 for experts in layers.values() for v in experts.values())

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        usage_opt = {"include_usage": True}
        usages = []
        messages = [{"role": "user", "content": "Where does the river run?"}]
        r = client.chat.completions.create(model=str(path), messages=messages, max_tokens=8, temperature=0)
        usages.append(r.usage)
        usages += [c.usage for c in client.chat.completions.create(
            model=str(path), messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options=usage_opt) if c.usage]
        # A stop string ends the generation early, on the engine's side.
        kw = dict(model=str(path), prompt="The library stood at the corner", max_tokens=24, temperature=0)
        r = client.completions.create(**kw)
        usages.append(r.usage)
        text = r.choices[0].text
        r = client.completions.create(**kw, stop=[text[len(text) // 2: len(text) // 2 + 2]])
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 24
        usages.append(r.usage)
        usages += [c.usage for c in client.completions.create(
            model=str(path), prompt="Computers process", max_tokens=6, temperature=0.8, seed=3,
            stream=True, stream_options=usage_opt) if c.usage]
        assert len(usages) == 5

        # Every prompt token the prefix cache did not hold is prefilled and
        # every generated token is fed back (mlx-lm computes one step ahead,
        # also past the last token), so each layer routes (prompt - cached +
        # completion tokens) x top_k pairs. The request a stop string ended
        # runs on until the front's word reaches the engine (it finds stop
        # strings in the text, serve/front/answers.py): at least one step
        # more, never past its max_tokens.
        want = (sum(u.total_tokens - u.prompt_tokens_details.cached_tokens for u in usages) + 1) * top_k
        page = scrape()  # the engine refreshes the expert counts before an answer ends
        totals = {layer: sum(e.values()) for layer, e in by_layer(page, "mlx_moe_expert_tokens_total").items()}
        assert totals.keys() == layers.keys() and len(set(totals.values())) == 1, totals
        routed = next(iter(totals.values()))
        extra = routed - want
        assert extra % top_k == 0 and 0 <= extra <= (24 - usages[3].completion_tokens) * top_k, (totals, want)

        assert value(page, "mlx_moe_requests_total", endpoint="/v1/chat/completions", status="200") == 2
        assert value(page, "mlx_moe_requests_total", endpoint="/v1/completions", status="200") == 3
        assert value(page, "mlx_moe_requests_total", endpoint="/metrics", status="200") >= 1  # the earlier scrapes
        assert value(page, "mlx_moe_time_to_first_token_seconds_count") == 5
        assert value(page, "mlx_moe_request_latency_seconds_count") == 5
        assert 0 < value(page, "mlx_moe_time_to_first_token_seconds_sum") \
            <= value(page, "mlx_moe_request_latency_seconds_sum")
        assert value(page, "mlx_moe_request_latency_seconds_bucket", le="+Inf") == 5
        assert value(page, "mlx_moe_generated_tokens_total") == sum(u.completion_tokens for u in usages)
        assert value(page, "mlx_moe_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
        assert value(page, "mlx_moe_generation_tokens_per_second") > 0
        assert value(page, "mlx_moe_queue_depth") == 0

        ranks = by_layer(page, "mlx_moe_rank_tokens_total")
        for layer, experts in by_layer(page, "mlx_moe_expert_tokens_total").items():
            assert len(experts) == n_experts
            per_rank = {}
            for labels, v in experts.items():
                rank = dict(labels)["rank"]
                per_rank[rank] = per_rank.get(rank, 0) + v
            assert {(("rank", r),): v for r, v in per_rank.items()} == ranks[layer]
            assert sorted(per_rank) == ["0", "1"]
            imbalance = value(page, "mlx_moe_expert_load_imbalance", layer=layer)
            assert imbalance >= 1.0
            assert imbalance == pytest.approx(max(per_rank.values()) / (routed / 2))
    finally:
        stop_group(proc)
