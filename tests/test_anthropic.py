"""The Messages API (mlx_moe.serve.front.anthropic) driven by the official
anthropic client (async, over httpx2's ASGI transport: in process), against
a stand-in runner that answers with scripted text: the request reaches the
chat template as it should, and the answer comes back as Anthropic content
blocks, whole and streamed."""

import asyncio
import json

import anthropic
import httpx2
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from mlx_lm.utils import load_tokenizer

from mlx_moe.serve.front.anthropic import anthropic_router
from mlx_moe.serve.structured import Grammars
from mlx_moe.checkpoints.synthetic_chat import synthesize_chat

WEATHER = {"name": "get_weather", "description": "Weather now",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = ('<think>Need the weather.</think>\n\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')


class NotFound(Exception):
    """Like schema.py's APIError: a status and a message."""
    status, message = 404, "The model 'other' does not exist."


class Runner:
    """Answers each generation with the next scripted (pieces, finish, extra usage)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.script, self.seen = tokenizer, [], []

    async def __call__(self, gen):
        if gen.model == "other":
            raise NotFound()
        self.seen.append(gen)
        pieces, finish, extra = self.script.pop(0)
        for p in pieces:
            if p.startswith("!error"):
                yield ("error", p[7:])
                return
            yield ("text", p)
        yield ("done", finish, {"prompt_tokens": len(gen.prompt), "completion_tokens": len(pieces), **extra})

    def prompt(self, i=-1):
        return self.tokenizer.decode(self.seen[i].prompt)


@pytest.fixture(scope="module")
def tokenizer(ckpt_dir):
    return load_tokenizer(synthesize_chat(ckpt_dir / "chat-qwen3_moe"))


@pytest.fixture
def runner(tokenizer):
    return Runner(tokenizer)


@pytest.fixture
def app(tokenizer, runner):
    app = FastAPI()
    app.include_router(anthropic_router(tokenizer, runner, Grammars(tokenizer)))
    return app


@pytest.fixture
def talk(app):
    """Runs `body(client)` with an AsyncAnthropic client bound to the app."""

    def run(body):
        async def main():
            http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver")
            async with anthropic.AsyncAnthropic(base_url="http://testserver", api_key="none", max_retries=0,
                                                http_client=http) as client:
                return await body(client)
        return asyncio.run(main())

    return run


def _pieces(text, size=5):
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_plain_message_with_a_system_prompt(talk, runner):
    runner.script = [(_pieces("The river runs."), "stop", {})]
    msg = talk(lambda c: c.messages.create(
        model="tiny", max_tokens=16, system="Be brief.", messages=[{"role": "user", "content": "Where?"}],
        stop_sequences=["END"], metadata={"user_id": "u1"}, extra_body={"temperature": 0.5, "top_k": 5}))
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "The river runs."
    assert msg.stop_reason == "end_turn" and msg.role == "assistant" and msg.model == "tiny"
    assert msg.usage.input_tokens == len(runner.seen[0].prompt) and msg.usage.output_tokens == 3  # one per piece
    assert runner.prompt().startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere?")
    gen = runner.seen[0]
    assert (gen.max_tokens, gen.temperature, gen.top_k, gen.stop, gen.grammar) == (16, 0.5, 5, ["END"], None)


def test_system_blocks_and_stop_reasons(talk, runner):
    runner.script = [(["a"], "length", {}), (["b"], "stop", {"stop_sequence": "END"})]
    system = [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]
    msg = talk(lambda c: c.messages.create(model="tiny", max_tokens=1, system=system, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]))
    assert msg.stop_reason == "max_tokens"
    assert "<|im_start|>system\nOne.\n\nTwo.<|im_end|>" in runner.prompt()
    msg = talk(lambda c: c.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]))
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "END")


def test_thinking_and_output_config_reach_the_template_and_grammar(talk, runner):
    runner.script = [(['{"a": 1}'], "stop", {})]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    msg = talk(lambda c: c.messages.create(
        model="tiny", max_tokens=8, thinking={"type": "disabled"}, messages=[{"role": "user", "content": "Hi"}],
        output_config={"format": {"type": "json_schema", "schema": schema}}))
    assert msg.content[0].text == '{"a": 1}'
    assert runner.prompt().endswith("<think>\n\n</think>\n\n")
    assert '"required": ["a"]' in runner.seen[0].grammar


async def _round_trip(client, runner, stream):
    runner.script = [(_pieces(CALL, 7), "stop", {}), (_pieces("<think>Easy.</think>\n\nIt is 21 degrees."), "stop", {})]
    kw = dict(model="tiny", max_tokens=64, tools=[WEATHER])
    history = [{"role": "user", "content": "Weather in Paris?"}]
    types = None
    if stream:
        async with client.messages.stream(messages=history, **kw) as s:
            types = [e.type async for e in s]
            first = await s.get_final_message()
    else:
        first = await client.messages.create(messages=history, **kw)
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    assert first.content[0].thinking == "Need the weather."
    use = first.content[1]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"}) and use.id
    assert first.stop_reason == "tool_use"
    assert "# Tools" in runner.prompt(0) and '"name": "get_weather"' in runner.prompt(0)
    history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                              "content": [{"type": "text", "text": '{"temp": 21}'}]}]}]
    second = await client.messages.create(messages=history, **kw)
    assert [b.type for b in second.content] == ["thinking", "text"] and second.stop_reason == "end_turn"
    assert second.content[1].text == "It is 21 degrees."  # without the newlines after </think>
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n') in runner.prompt(1)
    return types


def test_tool_use_and_tool_result_round_trip(talk, runner):
    talk(lambda c: _round_trip(c, runner, stream=False))


def test_streamed_round_trip_sends_anthropics_event_sequence(talk, runner):
    types = talk(lambda c: _round_trip(c, runner, stream=True))
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    blocks = [t for t in types if t in ("content_block_start", "content_block_stop")]
    assert blocks == ["content_block_start", "content_block_stop"] * 2  # thinking, tool_use: no blank text


def test_raw_stream_events(app, runner):
    runner.script = [(_pieces(CALL, 3), "stop", {})]
    body = {"model": "tiny", "max_tokens": 64, "stream": True, "tools": [WEATHER],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "messages": [{"role": "user", "content": "Weather?"}]}
    r = TestClient(app).post("/v1/messages", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = r.text.splitlines()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [line[7:] for line in lines if line.startswith("event: ")] == [e["type"] for e in events]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [s["type"] for s in starts] == ["thinking", "tool_use"] and starts[1]["input"] == {}
    json_deltas = [e["delta"]["partial_json"] for e in events
                   if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert json.loads("".join(json_deltas)) == {"city": "Paris"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"]["output_tokens"] > 0
    # tool_choice any without parallel use: exactly one call, forced by the grammar.
    assert runner.seen[0].grammar.endswith("body: call")


def test_errors_have_anthropics_shape(talk, runner):
    def create(**kw):
        args = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], **kw}
        return talk(lambda c: c.messages.create(**args))

    with pytest.raises(anthropic.BadRequestError) as e:
        create(max_tokens=0)
    assert e.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in e.value.message
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
    with pytest.raises(anthropic.BadRequestError, match="'image' .* does not match any of the expected tags"):
        create(messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.NotFoundError, match="does not exist"):
        create(model="other")
    with pytest.raises(anthropic.BadRequestError, match="not among the tools"):
        create(tools=[WEATHER], tool_choice={"type": "tool", "name": "x"})
    with pytest.raises(anthropic.BadRequestError, match="dependentSchemas"):
        create(output_config={"format": {"type": "json_schema", "schema": {"dependentSchemas": {}}}})
    runner.script = [(["part", "!error rank 1 failed"], "stop", {})]
    with pytest.raises(anthropic.InternalServerError, match="rank 1 failed"):
        create()
    runner.script = [(["part", "!error rank 1 failed"], "stop", {})]
    with pytest.raises(anthropic.APIError, match="rank 1 failed"):
        talk(lambda c: _drain(c.messages.stream(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "x"}])))


async def _drain(stream):
    async with stream as s:
        return [e async for e in s]


def test_count_tokens(talk, runner):
    messages = [{"role": "user", "content": "Hello there"}]
    r = talk(lambda c: c.messages.count_tokens(model="tiny", messages=messages, tools=[WEATHER]))
    runner.script = [(["x"], "stop", {})]
    talk(lambda c: c.messages.create(model="tiny", max_tokens=4, messages=messages, tools=[WEATHER]))
    assert r.input_tokens == len(runner.seen[0].prompt)


def test_a_client_that_goes_away_closes_the_runner(tokenizer):
    """What lets app.py cancel the job at once: the runner is closed when
    the client disconnects mid-stream."""

    async def main():
        closed, sent = asyncio.Event(), asyncio.Event()

        async def endless(gen):
            try:
                while True:
                    yield ("text", "word ")
                    await asyncio.sleep(0)  # let the server run between pieces
            finally:
                closed.set()

        app = FastAPI()
        app.include_router(anthropic_router(tokenizer, endless))
        body = json.dumps({"model": "tiny", "max_tokens": 10**6, "stream": True,
                           "messages": [{"role": "user", "content": "Go"}]}).encode()
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if requests:
                return requests.pop()
            await sent.wait()  # the client leaves once the stream has started
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                sent.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/messages", "raw_path": b"/v1/messages", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
        await asyncio.wait_for(app(scope, receive, send), 60)
        return sent.is_set(), closed.is_set()

    assert asyncio.run(main()) == (True, True)
