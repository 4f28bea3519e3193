"""Continuous batching on real ranks: concurrent requests share every step
and each still gets its single-process answer; seeded sampling does not
depend on the batch; clients that go away free their place; a full queue
answers 429; a lost rank ends every stream of the batch with its name; a
batched step costs one plan exchange and one combine per MoE layer."""

import functools
import http.client
import json
import os
from concurrent.futures import ThreadPoolExecutor
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from mlx_lm.utils import load_tokenizer

import oracle
from conftest import launch
from mlx_moe.cluster.launch import stop_group, wait_ready
from test_metrics import samples, value
from test_reliability import _finish, _finished, _rank_pid, _serve, _streams, no_eos
import test_serve
from test_serve import _chat

CONTEXT = 100000  # long streams cannot end before a test closes them
THREE_RANKS = "127.0.0.1,127.0.0.1,127.0.0.1"
# Sixteen questions whose chat prompts have different lengths.
QUESTIONS = [f"Tell me about {'the river and ' * (i % 5)}{w}." for i, w in enumerate(
    ("rivers", "bridges", "books", "music", "memory", "weather", "programs", "boats",
     "the mill", "light", "networks", "students", "fish", "spring", "the sea", "paper"))]


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe")  # float32: batched and single-process logits agree closely


def serving(model_path, *extra):
    return test_serve.serving(model_path, "--max-context", str(CONTEXT), *extra)


@pytest.fixture(scope="module")
def server(model_path):
    with serving(model_path) as url:
        yield url


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def _scrape(url) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return samples(r.read().decode())


def _poll(url, name, want, timeout=60):
    """Wait until the metric `name` equals `want` (it is updated every step)."""
    deadline = time.monotonic() + timeout
    while (got := value(_scrape(url), name)) != want:
        assert time.monotonic() < deadline, f"{name} is {got}, not {want}, after {timeout} s"
        time.sleep(0.05)


@functools.lru_cache(maxsize=None)
def _running_stream(url, model_path, prompt):
    """A long streamed completion (end-of-sequence banned) once its first
    token has come: it is in the batch, and stays there until closed."""
    stream = _client(url).completions.create(model=str(model_path), prompt=prompt, max_tokens=CONTEXT,
                                             temperature=0, stream=True, logit_bias=no_eos(str(model_path)))
    chunks = iter(stream)
    assert next(chunks).choices[0].finish_reason is None
    return stream, chunks


def _ask_all(url, model_path):
    """QUESTIONS asked at once by 16 clients (every other one streamed):
    {question: answer}; max_tokens 16-24."""
    answers = {}

    def ask(i, q):
        answers[q] = _chat(_client(url), model_path, q, stream=i % 2 == 1, max_tokens=16 + i % 9)[0]

    in_threads(ask, enumerate(QUESTIONS))
    return answers


def in_threads(target, arguments, timeout: float = 300) -> None:
    """`target(*args)` for each of `arguments`, all at once, each thread waited for up to `timeout`."""
    threads = [threading.Thread(target=target, args=tuple(a)) for a in arguments]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def _assert_single_process_answers(answers, model_path):
    for i, q in enumerate(QUESTIONS):
        assert answers.get(q) == oracle.greedy_text(model_path, oracle.chat_prompt(model_path, q), 16 + i % 9), q
    assert len(set(answers.values())) > 1


def _batched_steps(before, after) -> float:
    """Steps that decoded more than one sequence, between two scrapes."""
    count = lambda page, **le: value(page, "mlx_moe_batch_size_" + ("bucket" if le else "count"), **le)
    return count(after) - count(before) - (count(after, le="1.0") - count(before, le="1.0"))


def test_sixteen_clients_get_single_process_greedy_answers(server, model_path):
    before = _scrape(server)
    answers = _ask_all(server, model_path)
    _assert_single_process_answers(answers, model_path)
    after = _scrape(server)
    assert _batched_steps(before, after) > 0
    assert ("mlx_moe_kv_cache_bytes", (("rank", "1"),)) in after  # a gauge per rank
    assert value(after, "mlx_moe_requests_waiting") == 0


def test_sixteen_clients_on_three_ranks(model_path):
    with serving(model_path, "--hosts", THREE_RANKS) as url:
        before = _scrape(url)
        _assert_single_process_answers(_ask_all(url, model_path), model_path)
        assert _batched_steps(before, _scrape(url)) > 0


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(server, model_path):
    client = _client(server)
    kw = dict(model=str(model_path), prompt="Computers process", max_tokens=16, temperature=1.0)
    alone = client.completions.create(**kw, seed=1234).choices[0].text
    assert client.completions.create(**kw, seed=99).choices[0].text != alone  # it does sample
    with ThreadPoolExecutor(15) as pool:
        streams = list(pool.map(lambda i: _running_stream(server, model_path, f"The river {'ran ' * i}"), range(15)))
    try:
        in_batch = client.completions.create(**kw, seed=1234).choices[0].text
        # The others are still running, so it was decoded in their batch.
        _poll(server, "mlx_moe_requests_running", 15)
    finally:
        for stream, _ in streams:
            stream.close()
    assert in_batch == alone


def test_a_client_that_goes_away_frees_its_place(server, model_path):
    _poll(server, "mlx_moe_requests_running", 0)  # the last test's streams have left
    stream, _ = _running_stream(server, model_path, "The river")
    _poll(server, "mlx_moe_requests_running", 1)
    stream.close()
    _poll(server, "mlx_moe_requests_running", 0)
    # The same for a plain (not streamed) request.
    conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": str(model_path), "prompt": "The river", "max_tokens": CONTEXT, "logit_bias": no_eos(str(model_path))}),
        {"Content-Type": "application/json"})
    _poll(server, "mlx_moe_requests_running", 1)
    conn.close()
    _poll(server, "mlx_moe_requests_running", 0)
    text, _, _ = _chat(_client(server), model_path, "hi", max_tokens=8)
    assert text == oracle.greedy_text(model_path, oracle.chat_prompt(model_path, "hi"), 8)


def _post(url, body: dict):
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.load(e)


def test_a_full_queue_answers_429(model_path):
    with serving(model_path, "--max-concurrency", "1", "--max-queue", "1") as url:
        stream, _ = _running_stream(url, model_path, "The river")  # the one running
        waiting = {}
        body = {"model": str(model_path), "prompt": "The library", "max_tokens": 8, "temperature": 0}
        t = threading.Thread(target=lambda: waiting.update(answer=_post(url, body)))
        t.start()
        _poll(url, "mlx_moe_requests_waiting", 1)
        for _ in range(2):  # the queue is full
            code, headers, payload = _post(url, body)
            assert code == 429 and int(headers["Retry-After"]) > 0, payload
            assert payload["error"]["code"] == "queue_full" and payload["error"]["message"]
        stream.close()  # its place goes to the waiting request
        t.join(120)
        code, _, payload = waiting["answer"]
        assert code == 200 and payload["choices"][0]["text"] == oracle.greedy_text(model_path, "The library", 8)
        assert value(_scrape(url), "mlx_moe_requests_total", endpoint="/v1/completions", status="429") == 2


def test_the_prompts_of_one_request_join_the_batch_together_or_not_at_all():
    """A request's prompts are queued at once (a plan between them would make
    the late ones left-pad to the others' progress), and a queue without room
    for all takes none."""
    from mlx_moe.serve.channel import Job, QueueFull
    from mlx_moe.serve.engine.scheduler import Scheduler

    scheduler = Scheduler(max_running=4, max_waiting=3)
    jobs = [Job(prompt=[1, 2 + i], max_tokens=4) for i in range(4)]
    with pytest.raises(QueueFull, match="this one brings 4"):
        scheduler.submit(*jobs)
    assert not scheduler.waiting
    scheduler.submit(*jobs[:3])
    plan = scheduler.plan(0)
    assert [spec["prompt"] for spec in plan["add"]] == [[1, 2], [1, 3], [1, 4]]


def test_killed_rank_ends_every_stream_of_the_batch(model_path):
    killed_rank_ends_every_stream(model_path, "--attention", "replicated")


def killed_rank_ends_every_stream(model_path, *extra):
    """8 streams running, rank 1 killed: every stream ends with an error
    naming it (none normally), and the command exits non-zero."""
    proc, port, url = _serve(model_path, "--max-concurrency", "8", *extra)
    try:
        wait_ready(url, proc)
        victim = _rank_pid(f"--port {port}", 1, url)
        streams = _streams(url, model_path, 8)
        os.kill(victim, signal.SIGKILL)
        for t, result in streams:
            t.join(60)
            assert not t.is_alive(), "a stream did not end within 60 s"
            assert not _finished(result), "a generation ended before rank 1 was killed"
            assert result["error"] and "rank 1" in result["error"], result["error"]
        code, err = _finish(proc, 60)
        assert code != 0 and "rank 1 (host 127.0.0.1) was killed by SIGKILL" in err, err[-2000:]
    finally:
        stop_group(proc)


def test_a_batched_step_costs_one_exchange_and_one_combine_per_moe_layer(model_path, tmp_path):
    # 16 and 17 sequences: as many rows as a prompt the CPU backend splits the
    # attention's projections of (attention.MIN_ROWS), but one token each.
    spec = {"checkpoint": str(model_path), "batches": [1, 4, 16, 17], "max_tokens": 16}
    for out in launch("batch_step_worker", spec, 2, tmp_path):
        for batch in spec["batches"]:
            assert out[str(batch)] == {"collectives": 1 + out["moe_layers"], "live": batch}


def _messages_prompt(model_path, messages):
    """The chat prompt of `messages`, as the single-process reference reads it."""
    return load_tokenizer(Path(model_path)).apply_chat_template(messages, add_generation_prompt=True)


def test_follow_up_turn_reads_its_prefix_from_the_cache(server, model_path):
    """A chat's second turn starts with the first turn and its answer: only
    the new tokens are prefilled, and the answer is what one process gives
    reading the whole conversation."""
    client = _client(server)
    first = [{"role": "user", "content": "Tell me everything about " + "the river and the mill, " * 20}]
    r1 = client.chat.completions.create(model=str(model_path), messages=first, max_tokens=12, temperature=0)
    follow = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And the bridges?"}]
    r2 = client.chat.completions.create(model=str(model_path), messages=follow, max_tokens=12, temperature=0)
    prompt1 = _messages_prompt(model_path, first)
    # Earlier requests share at most the template's opening with it.
    assert r1.usage.prompt_tokens_details.cached_tokens < 10
    # The cache held at least the whole first prompt (and some of its answer).
    assert len(prompt1) <= r2.usage.prompt_tokens_details.cached_tokens < r2.usage.prompt_tokens
    assert r2.choices[0].message.content == oracle.greedy_text(
        model_path, _messages_prompt(model_path, follow), 12)
    assert value(_scrape(server), "mlx_moe_prompt_cached_tokens_total") >= len(prompt1)


def test_a_step_reads_at_most_the_prefill_budget_and_answers_do_not_change(checkpoint):
    """mlx-lm reads prefill_step_size tokens of every prompt of its prompt
    batch per step; bound_prefill keeps the step's total within the budget
    (the running streams wait for all of it), and the answers stay the same."""
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    from mlx_moe.serve.engine.core import bound_prefill

    model, tokenizer = load(str(checkpoint("qwen3_moe")))
    prompts = [tokenizer.encode("the river and the mill " * (8 + i)) for i in range(8)]

    def run(budget):
        g = BatchGenerator(model, stop_tokens=[], completion_batch_size=16, prefill_batch_size=8,
                           prefill_step_size=64)
        uids = g.insert(prompts, max_tokens=[6] * len(prompts))
        out, most = {u: [] for u in uids}, 0
        while any(len(t) < 6 for t in out.values()):
            if budget:
                bound_prefill(g, budget)
            before = g._counters.prompt_tokens
            for r in g.next()[1]:
                out[r.uid].append(r.token)
            most = max(most, g._counters.prompt_tokens - before)
        return [out[u] for u in uids], most

    unbounded, most_unbounded = run(None)
    bounded, most_bounded = run(64)
    assert most_unbounded > 64 * 4  # mlx-lm alone: 64 tokens of each of the 8 prompts
    assert 0 < most_bounded <= 64
    assert bounded == unbounded
