"""The clients people use, against `mlx-moe serve` on two real local ranks
with a thinking, tool-calling chat template (synthesize_chat): the openai
client's tool calls, reasoning split and JSON schemas, the anthropic
client's Messages API, the status page, 400s naming unsupported fields,
models by id, and completions of several prompts."""

import asyncio
import json
import re
import urllib.error
import urllib.request

import anthropic
import jsonschema
import openai
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_moe.checkpoints.synthetic_chat import synthesize_chat
from test_serve import serving
from test_status import chromium

KEY = "test-key"
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}  # a random model may think past max_tokens
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def model_path(ckpt_dir):
    return synthesize_chat(ckpt_dir / "chat-qwen3_moe")  # float32, shared with test_chat.py


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
def server(model_path):
    with serving(model_path, "--max-context", "1024", "--api-key", KEY) as url:
        yield url


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def claude(server):
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def _streamed_call(oai, model, **kw):
    """(calls as {id, name, arguments}, finish_reason) of a streamed answer."""
    calls, finish = {}, None
    for chunk in oai.chat.completions.create(model=model, stream=True, **kw):
        for c in chunk.choices:
            for t in c.delta.tool_calls or []:
                call = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = t.id or call["id"]
                call["name"] += t.function.name or ""
                call["arguments"] += t.function.arguments or ""
            finish = c.finish_reason or finish
    return list(calls.values()), finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_openai_tool_call_round_trip(oai, model_path, stream):
    model = str(model_path)
    ask = dict(messages=QUESTION, tools=[WEATHER], parallel_tool_calls=False, temperature=0, max_tokens=64,
               extra_body=NO_THINKING)
    if stream:
        named = {"type": "function", "function": {"name": "get_weather"}}
        calls, finish = _streamed_call(oai, model, tool_choice=named, **ask)
    else:
        r = oai.chat.completions.create(model=model, tool_choice="required", **ask)
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
        assert msg.content is None
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls]
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(json.loads(call["arguments"]), CITY)

    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]
    r = oai.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice="none",
                                    temperature=0, max_tokens=4, extra_body=NO_THINKING)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    # The call and its result are in the prompt (the template rendered them).
    first = oai.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER], tool_choice="none",
                                        max_tokens=1, extra_body=NO_THINKING)
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + 10


def test_reasoning_is_split_from_content(oai, model_path, tokenizer):
    think = tokenizer.convert_tokens_to_ids("<think>")
    # The bias makes the random model open a think block (and fill it with more of the tag).
    ask = dict(model=str(model_path), messages=QUESTION, temperature=0, max_tokens=6,
               logit_bias={str(think): 100})
    msg = oai.chat.completions.create(**ask).choices[0].message
    assert msg.reasoning_content and not msg.content

    reasoning, content = "", ""
    for chunk in oai.chat.completions.create(stream=True, **ask):
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
    assert (reasoning, content) == (msg.reasoning_content, "")

    # enable_thinking false closes the think block in the prompt: the answer is
    # content only (the JSON grammar allows no new think block after it).
    msg = oai.chat.completions.create(response_format={"type": "json_object"}, extra_body=NO_THINKING,
                                      **ask).choices[0].message
    assert getattr(msg, "reasoning_content", None) is None and msg.content.startswith("{")


def test_json_schema_answers_validate(server, model_path):
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"}}, "required": ["name", "count", "ok"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300) as client:
            # Concurrent: the server runs them in one batch, each with its own grammar.
            return await asyncio.gather(*[
                client.chat.completions.create(model=str(model_path), messages=QUESTION, temperature=1.0,
                                               max_tokens=128, response_format=fmt, extra_body=NO_THINKING)
                for _ in range(20)])

    answers = asyncio.run(main())
    for r in answers:
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert len({r.choices[0].message.content for r in answers}) > 1  # sampled, not one answer


def test_anthropic_plain_streamed_and_system(claude, model_path):
    model = str(model_path)
    # SDK 2.14 has no temperature argument; the API still takes the field.
    ask = dict(model=model, max_tokens=8, extra_body={"temperature": 0},
               messages=[{"role": "user", "content": "Hello"}])
    r = claude.messages.create(**ask)
    assert r.role == "assistant" and r.stop_reason in ("end_turn", "max_tokens")
    text = "".join(b.text for b in r.content if b.type == "text")
    with claude.messages.stream(**ask) as s:
        streamed = s.get_final_message()
    assert "".join(b.text for b in streamed.content if b.type == "text") == text
    assert streamed.usage.output_tokens == r.usage.output_tokens

    counted = claude.messages.count_tokens(model=model, messages=ask["messages"], system="Be brief.")
    r = claude.messages.create(system="Be brief.", **ask)
    assert r.usage.input_tokens == counted.input_tokens > claude.messages.count_tokens(
        model=model, messages=ask["messages"]).input_tokens
    assert claude.models.retrieve(model).id == model
    assert [m.id for m in claude.models.list()] == [model]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(**{**ask, "model": "nope"})


def test_anthropic_tool_use_and_result(claude, model_path):
    ask = dict(model=str(model_path), max_tokens=64, extra_body={"temperature": 0}, thinking={"type": "disabled"},
               tools=[{"name": "get_weather", "description": "Weather now", "input_schema": CITY}])
    question = [{"role": "user", "content": "Weather in Paris?"}]
    r = claude.messages.create(messages=question, tool_choice={"type": "tool", "name": "get_weather"}, **ask)
    assert r.stop_reason == "tool_use"
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, CITY)

    history = question + [{"role": "assistant", "content": r.content},
                          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                        "content": "21 C"}]}]
    r = claude.messages.create(messages=history, tool_choice={"type": "none"}, **{**ask, "max_tokens": 4})
    assert r.stop_reason in ("end_turn", "max_tokens")
    # The call and its result are in the prompt (tool_choice none leaves the tools out).
    assert r.usage.input_tokens > claude.messages.count_tokens(
        model=ask["model"], messages=question, tools=ask["tools"], tool_choice={"type": "none"}).input_tokens + 10


def _get(url, key=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


def test_status_page_and_data(server, oai, model_path, tmp_path):
    for _ in range(2):
        oai.completions.create(model=str(model_path), prompt="hello", max_tokens=4)
    status, kind, body = _get(server + "/")  # open: the page asks for the key itself
    assert status == 200 and "text/html" in kind
    assert _get(server + "/v1/status")[0] == 401
    status, _, body = _get(server + "/v1/status", KEY)
    s = json.loads(body)
    assert status == 200 and s["state"] == "ready"
    assert s["cluster"]["size"] == 2 and s["cluster"]["strategy"] and len(s["cluster"]["ranks"]) == 2
    assert s["requests"]["running"] == 0 and sum(n for _, n in s["requests"]["tokens_per_second"]) >= 8
    layers = s["experts"]["layers"]
    assert layers and all(sum(layer["rank_totals"]) > 0 for layer in layers)

    # In a browser, without the key: the page loads, its data is refused, it asks for the key.
    dom = chromium(tmp_path, server + "/", "--dump-dom")
    assert re.search(r'<form id="key" style="display: flex;?"', dom), dom[:2000]
    assert dom.count('class="cell"') == 0


def _post(server, path, body, headers=None):
    req = urllib.request.Request(server + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "x-api-key": KEY, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


HI = [{"role": "user", "content": "hi"}]
UNENFORCEABLE = {"type": "json_schema", "json_schema": {"name": "r", "schema": {
    "type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}}}


@pytest.mark.parametrize("body,param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"presence_penalty": 5}, "presence_penalty"),  # OpenAI's range is -2 to 2
    ({"n": 17}, "n"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"response_format": UNENFORCEABLE}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
    ({"messages": [{"role": "tool", "content": "21"}]}, "messages.0"),  # no tool_call_id
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
], ids=["unknown field", "penalty out of range", "n", "reserved template kwarg", "unenforceable schema", "required without tools",
        "tool message without id", "image"])
def test_unsupported_chat_fields_get_400_naming_them(server, model_path, body, param):
    status, out = _post(server, "/v1/chat/completions", {"model": str(model_path), "messages": HI, **body})
    assert status == 400 and out["error"]["param"].startswith(param), out
    assert _post(server, "/v1/chat/completions", {"model": str(model_path), "messages": HI, "max_tokens": 1,
                                                  "presence_penalty": 0, "user": "u1"})[0] == 200


def test_models_by_id_and_api_key_headers(server, model_path):
    status, _, body = _get(server + "/v1/models/nope", KEY)
    assert status == 404 and "does not exist" in json.loads(body)["error"]["message"]
    status, _, body = _get(server + "/v1/models/" + model_path.name, KEY)
    assert status == 200 and json.loads(body)["id"] == str(model_path)
    status, _, body = _get(server + "/v1/models", KEY)
    listed = json.loads(body)
    assert listed["object"] == "list" and listed["has_more"] is False and listed["data"][0]["type"] == "model"
    ask = {"model": str(model_path), "messages": HI, "max_tokens": 1}
    assert _post(server, "/v1/chat/completions", ask, {"x-api-key": "wrong"})[0] == 401
    status, out = _post(server, "/v1/messages", {**ask, "top_k": 5})
    assert status == 200 and out["type"] == "message"


def test_completions_take_lists_and_token_ids(oai, model_path, tokenizer):
    model = str(model_path)
    one = oai.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0)
    ids = tokenizer.encode("hello")
    assert oai.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0).choices[0].text == \
        one.choices[0].text
    r = oai.completions.create(model=model, prompt=["hello", "river", "hello"], max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.choices[0].text == r.choices[2].text == one.choices[0].text
    assert r.usage.prompt_tokens == 2 * len(ids) + len(tokenizer.encode("river"))
    r = oai.completions.create(model=model, prompt=[ids, ids], max_tokens=4, temperature=0)
    assert [c.text for c in r.choices] == [one.choices[0].text] * 2

    texts = {}
    for chunk in oai.completions.create(model=model, prompt=["hello", "river"], max_tokens=4, temperature=0,
                                        stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts[0] == one.choices[0].text and set(texts) == {0, 1}
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        oai.completions.create(model=model, prompt=[10**9], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        oai.completions.create(model=model, prompt=["hello", ids], max_tokens=1)  # mixed, as OpenAI refuses
