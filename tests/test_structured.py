"""Structured output (mlx_moe.serve.structured): llguidance grammars as
mlx-lm logits processors, sampled at temperature 1 on small synthesized
models, alone and inside a BatchGenerator batch."""

import json

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm import load, stream_generate
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_moe.serve.front.chat import ChatFields, ChatOutput, build_prompt
from mlx_moe.serve.structured import Grammars, RequestError, build_grammar
from mlx_moe.checkpoints.synthetic_chat import synthesize_chat

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "member": {"type": "boolean"},
                         "tier": {"enum": ["gold", "silver"]}}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def model(checkpoint):
    return load(str(checkpoint("qwen3_moe")))


def _prompt(tokenizer, text="Describe a person as JSON."):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


@pytest.fixture(autouse=True)
def seeded():
    mx.random.seed(7)  # sampled, and the same draws every run


def _sample(model, tokenizer, prompt, processors, max_tokens=96):
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens,
                                                   sampler=make_sampler(1.0), logits_processors=processors))


def test_json_schema_output_validates_on_20_samples(model):
    m, tok = model
    prompt = _prompt(tok)
    grammars = Grammars(tok)
    grammar = build_grammar(tok, prompt, SCHEMA_FORMAT)
    grammars.check(grammar)
    outs = [_sample(m, tok, prompt, [grammars.processor(grammar)]) for _ in range(20)]
    for out in outs:
        jsonschema.validate(json.loads(out), PERSON)
    assert len(set(outs)) > 1  # sampled, not one forced string


def test_json_object_output_parses(model):
    m, tok = model
    prompt = _prompt(tok)
    grammars = Grammars(tok)
    grammar = build_grammar(tok, prompt, {"type": "json_object"})
    # Random weights never choose to close a string: a bias toward quotes
    # and braces lets the answer end; the grammar decides what is valid.
    bias = {tok.encode(c)[0]: 6.0 for c in ['"', "}"]}
    for _ in range(3):
        out = _sample(m, tok, prompt, [*make_logits_processors(logit_bias=bias), grammars.processor(grammar)],
                      max_tokens=200)
        assert isinstance(json.loads(out), dict)


def test_unsupported_schema_keywords_are_named(model):
    _, tok = model
    schema = {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}
    grammar = build_grammar(tok, _prompt(tok), {"type": "json_schema", "json_schema": {"schema": schema}})
    with pytest.raises(RequestError, match="dependentSchemas") as e:
        Grammars(tok).check(grammar)
    assert e.value.param == "response_format"
    with pytest.raises(RequestError, match="needs \"json_schema\""):
        build_grammar(tok, [], {"type": "json_schema"})
    assert build_grammar(tok, [], {"type": "text"}) is None


def test_constrained_and_free_requests_share_a_batch(model):
    m, tok = model
    prompt = _prompt(tok)
    grammars = Grammars(tok)
    grammar = build_grammar(tok, prompt, SCHEMA_FORMAT)
    gen = BatchGenerator(m, stop_tokens=[[t] for t in tok.eos_token_ids], completion_batch_size=4)
    processors = [[grammars.processor(grammar)], [], [grammars.processor(grammar)]]
    uids = gen.insert([prompt] * 3, max_tokens=[96] * 3, samplers=[make_sampler(1.0)] * 3,
                      logits_processors=processors)
    tokens = {u: [] for u in uids}
    finish = {}
    while len(finish) < 3:
        for r in gen.next()[1]:
            if r.finish_reason != "stop":
                tokens[r.uid].append(r.token)
            if r.finish_reason:
                finish[r.uid] = r.finish_reason
    for uid in (uids[0], uids[2]):
        assert finish[uid] == "stop"
        jsonschema.validate(json.loads(tok.decode(tokens[uid])), PERSON)
    with pytest.raises(ValueError):  # the free one is not held to the schema
        jsonschema.validate(json.loads(tok.decode(tokens[uids[1]])), PERSON)


@pytest.fixture(scope="module")
def chat_model(ckpt_dir):
    return load(str(synthesize_chat(ckpt_dir / "chat-qwen3_moe")))


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_a_forced_tool_call_is_made_with_valid_arguments(chat_model, choice):
    """One call each (parallel_tool_calls false): random weights would
    otherwise keep calling until max_tokens."""
    m, tok = chat_model
    zone = {"type": "object", "additionalProperties": False, "required": ["zone"],
            "properties": {"zone": {"enum": ["UTC", "CET"]}}}
    tools = [{"type": "function", "function": {"name": name, "parameters": zone}} for name in ("get_weather", "get_time")]
    req = ChatFields.model_validate({"messages": [{"role": "user", "content": "Time?"}], "tools": tools,
                                     "tool_choice": choice, "parallel_tool_calls": False,
                                     "chat_template_kwargs": {"enable_thinking": False}})
    p = build_prompt(tok, req)
    grammars = Grammars(tok)
    grammars.check(p.grammar)
    names = set()
    for _ in range(4):
        out = ChatOutput(tok, p.ids, p.tools)
        for r in stream_generate(m, tok, p.ids, max_tokens=64, sampler=make_sampler(1.0),
                                 logits_processors=[grammars.processor(p.grammar)]):
            out.feed(r.text)
        _, reason = out.finish(r.finish_reason)
        msg = out.message()
        assert reason == "tool_calls" and len(msg["tool_calls"]) == 1, msg
        for call in msg["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), zone)
            names.add(call["function"]["name"])
    assert names <= ({"get_weather", "get_time"} if choice == "required" else {"get_time"})


@pytest.fixture(scope="module")
def chat_tokenizer(chat_model):
    return chat_model[1]


def _matcher(tokenizer, grammar):
    return Grammars(tokenizer).processor(grammar).matcher


def _accepts(tokenizer, grammar, text):
    m = _matcher(tokenizer, grammar)
    return m.consume_tokens(tokenizer.encode(text)) and m.is_accepting()


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_reasoning_is_allowed_before_the_constrained_part_unless_the_prompt_closed_it(chat_tokenizer):
    tok = chat_tokenizer

    def grammar(**template):
        ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, **template)
        return build_grammar(tok, ids, tools=WEATHER, tool_choice="required")

    thinking, closed = grammar(), grammar(enable_thinking=False)
    assert _accepts(tok, thinking, "<think>Let me see.\nOK.</think>\n\n" + CALL)
    assert _accepts(tok, thinking, CALL) and _accepts(tok, closed, CALL)
    assert not _accepts(tok, closed, "<think>x</think>" + CALL)
    assert not _accepts(tok, thinking, "Sure! " + CALL)  # a call, and nothing but a call
    opened = build_grammar(tok, tok.encode("<|im_start|>assistant\n<think>\n"), tools=WEATHER, tool_choice="required")
    assert _accepts(tok, opened, "Still thinking.</think>\n" + CALL)
    assert not _accepts(tok, opened, CALL)
    parallel = CALL + "\n" + CALL.replace("Paris", "Oslo")
    assert _accepts(tok, thinking, parallel)
    single = build_grammar(tok, [], tools=WEATHER, tool_choice="required", parallel_tool_calls=False)
    assert not _accepts(tok, single, parallel) and _accepts(tok, single, CALL)


@pytest.mark.parametrize("parser,start,end,call", [
    # Single-token markers (the synthesized vocab has <tool_call>): glm47's syntax inside.
    ("glm47", "<tool_call>", "</tool_call>", "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"),
    # Plain-text markers: minicpm5.
    ("minicpm5", '<function name=', "</function>", '<function name="get_weather"><param name="city">Paris</param></function>'),
])
def test_other_families_get_their_markers_forced(chat_tokenizer, parser, start, end, call):
    import importlib

    from mlx_lm.tokenizer_utils import TokenizerWrapper

    module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
    assert (module.tool_call_start, module.tool_call_end) == (start, end)
    tok = TokenizerWrapper(chat_tokenizer._tokenizer, eos_token_ids=chat_tokenizer.eos_token_ids,
                           tool_call_start=start, tool_call_end=end, tool_parser=module.parse_tool_call)
    grammar = build_grammar(tok, [], tools=WEATHER, tool_choice="required", parallel_tool_calls=False)
    m = _matcher(tok, grammar)
    assert m.consume_tokens(tok.encode(call)) and m.is_stopped()  # nothing but the end may follow
    assert not _accepts(tok, grammar, "No call.")
    out = ChatOutput(tok, [], WEATHER)
    out.feed(call)
    _, reason = out.finish("stop")
    assert reason == "tool_calls"
    assert json.loads(out.message()["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_a_forced_call_needs_a_tool_format_and_tools(model):
    _, plain = model  # ChatML without tools
    with pytest.raises(RequestError, match="no tool-call format"):
        build_grammar(plain, [], tools=WEATHER, tool_choice="required")
    with pytest.raises(RequestError, match="has no tools"):
        build_grammar(plain, [], tools=None, tool_choice="required")
    with pytest.raises(RequestError, match="cannot both apply"):
        build_grammar(plain, [], {"type": "json_object"}, WEATHER, "required")
