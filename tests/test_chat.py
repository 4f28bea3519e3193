"""Chat with tools and reasoning (mlx_moe.serve.front.chat) on a synthesized
checkpoint with a Qwen3-style template: the prompt of a full tool round
trip, enable_thinking, tool_choice, and the answer split into reasoning,
content and tool calls, streamed piece by piece or whole."""

import json

import pytest
from mlx_lm.utils import load_tokenizer
from pydantic import ValidationError

from mlx_moe.serve.front.chat import ChatFields, ChatOutput, build_prompt
from mlx_moe.serve.structured import Grammars, RequestError
from mlx_moe.checkpoints.synthetic_chat import synthesize_chat

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ROUND_TRIP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture(scope="module")
def tokenizer(ckpt_dir):
    return load_tokenizer(synthesize_chat(ckpt_dir / "chat-qwen3_moe"))


def _prompt_text(tokenizer, **req):
    p = build_prompt(tokenizer, ChatFields.model_validate(req))
    return tokenizer.decode(p.ids), p


def test_synthesize_chat_reuses_its_checkpoint(ckpt_dir, tokenizer):
    path = ckpt_dir / "chat-qwen3_moe"
    stamps = {f.name: f.stat().st_mtime_ns for f in path.iterdir()}
    assert synthesize_chat(path) == path
    assert {f.name: f.stat().st_mtime_ns for f in path.iterdir()} == stamps


def test_mlx_lm_finds_thinking_and_the_json_tools_parser(tokenizer):
    assert tokenizer.has_thinking and tokenizer.think_start == "<think>"
    assert tokenizer.tool_parser.__module__ == "mlx_lm.tool_parsers.json_tools"


def test_the_template_renders_a_full_tool_round_trip(tokenizer):
    text, p = _prompt_text(tokenizer, messages=ROUND_TRIP, tools=[WEATHER])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(WEATHER) in text and p.tools == [WEATHER]
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>'
            in text)
    assert text.endswith("<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n")
    assert p.grammar is None  # tool_choice auto constrains nothing


def test_developer_messages_are_the_system_prompt(tokenizer):
    text, _ = _prompt_text(tokenizer, messages=[{"role": "developer", "content": "Be brief."},
                                                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")


def test_enable_thinking_false_closes_the_think_block(tokenizer):
    msgs = [{"role": "user", "content": "Hi"}]
    on, _ = _prompt_text(tokenizer, messages=msgs)
    off, _ = _prompt_text(tokenizer, messages=msgs, chat_template_kwargs={"enable_thinking": False})
    assert on.endswith("assistant\n") and off == on + "<think>\n\n</think>\n\n"


def test_tool_choice_none_drops_the_tools_and_required_makes_a_grammar(tokenizer):
    text, p = _prompt_text(tokenizer, messages=ROUND_TRIP, tools=[WEATHER], tool_choice="none")
    assert "# Tools" not in text and p.tools is None and p.grammar is None
    _, p = _prompt_text(tokenizer, messages=ROUND_TRIP, tools=[WEATHER],
                        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert '"const": "get_weather"' in p.grammar


def test_bad_requests_name_the_problem(tokenizer, checkpoint):
    with pytest.raises(ValidationError, match="tool_call_id"):
        ChatFields.model_validate({"messages": [{"role": "tool", "content": "x"}]})
    with pytest.raises(ValidationError, match="null content"):
        ChatFields.model_validate({"messages": [{"role": "user", "content": None}]})
    with pytest.raises(RequestError, match="'nope', which is not among the tools"):
        _prompt_text(tokenizer, messages=ROUND_TRIP, tools=[WEATHER],
                     tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(RequestError, match="cannot set \\['tools'\\]"):
        _prompt_text(tokenizer, messages=ROUND_TRIP, chat_template_kwargs={"tools": []})
    odd = {"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}
    req = ChatFields.model_validate({"messages": ROUND_TRIP, "tools": [odd], "tool_choice": "required"})
    with pytest.raises(RequestError, match=r'Unimplemented keys: \["if", "then"\]; remove them') as e:
        build_prompt(tokenizer, req, Grammars(tokenizer))
    assert e.value.param == "tools"
    with pytest.raises(RequestError, match="has no tools"):
        _prompt_text(tokenizer, messages=ROUND_TRIP, tool_choice="required")
    plain = load_tokenizer(checkpoint("qwen3_moe"))  # its ChatML template has no tool format
    with pytest.raises(RequestError, match="no tool-call format") as e:
        _prompt_text(plain, messages=ROUND_TRIP, tools=[WEATHER])
    assert e.value.param == "tools"


ANSWER = ('<think>The user wants weather.</think>\n\nChecking.<tool_call>\n'
          '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')


CALL_ONLY = '<think>x</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def _run(tokenizer, pieces, prompt=(), finish="stop"):
    out = ChatOutput(tokenizer, list(prompt), [WEATHER])
    deltas = [d for piece in pieces for d in out.feed(piece)]
    last, reason = out.finish(finish)
    return out, deltas + last, reason


@pytest.mark.parametrize("size", [1, 3, 7, len(ANSWER)])
def test_the_answer_splits_the_same_in_any_pieces(tokenizer, size):
    out, deltas, reason = _run(tokenizer, [ANSWER[i:i + size] for i in range(0, len(ANSWER), size)])
    msg = out.message()
    assert reason == "tool_calls"
    assert msg["reasoning_content"] == "The user wants weather."
    assert msg["content"] == "\n\nChecking."
    assert [json.loads(c["function"]["arguments"]) for c in msg["tool_calls"]] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert all(c["type"] == "function" and c["function"]["name"] == "get_weather" for c in msg["tool_calls"])
    assert len({c["id"] for c in msg["tool_calls"]}) == 2
    streamed = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in streamed] == [0, 1] and [c["id"] for c in streamed] == [c["id"] for c in msg["tool_calls"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == msg["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == msg["content"]


def test_a_call_after_reasoning_has_no_content(tokenizer):
    out, _, reason = _run(tokenizer, [CALL_ONLY])
    msg = out.message()
    assert reason == "tool_calls" and msg["content"] is None and len(msg["tool_calls"]) == 1
    out, _, _ = _run(tokenizer, [""])
    assert out.message() == {"role": "assistant", "content": ""}


def test_a_prompt_that_opens_the_think_block_starts_in_reasoning(tokenizer):
    prompt = tokenizer.encode("<|im_start|>assistant\n<think>\n")
    out, _, reason = _run(tokenizer, ["Hmm.", "</think>", "Hello"], prompt)
    assert out.message() == {"role": "assistant", "content": "Hello", "reasoning_content": "Hmm."}
    assert reason == "stop"


def test_a_call_cut_short_or_unparsable_stays_in_content(tokenizer):
    out, _, reason = _run(tokenizer, ['Sure<tool_call>\n{"name": "get_weather", "argu'], finish="length")
    msg = out.message()
    assert reason == "length" and "tool_calls" not in msg
    assert msg["content"] == 'Sure<tool_call>\n{"name": "get_weather", "argu'
    for bad in ["not json", '{"name": "get_weather"}', "[1]", '"text"']:
        out, _, reason = _run(tokenizer, [f"<tool_call>\n{bad}</tool_call>"])
        assert reason == "stop" and out.message()["content"] == f"<tool_call>\n{bad}</tool_call>"


def test_template_arguments_reach_the_template():
    class Recording:
        has_tool_calling, has_thinking = True, False

        def apply_chat_template(self, messages, **kwargs):
            self.messages, self.kwargs = messages, kwargs
            return [1, 2, 3]

    tok = Recording()
    p = build_prompt(tok, ChatFields.model_validate({
        "messages": ROUND_TRIP, "tools": [WEATHER], "reasoning_effort": "low",
        "chat_template_kwargs": {"enable_thinking": False, "custom": 1}}))
    assert p.ids == [1, 2, 3]
    assert tok.kwargs == {"tools": [WEATHER], "add_generation_prompt": True, "tokenize": True,
                          "enable_thinking": False, "custom": 1, "reasoning_effort": "low"}
    assistant, result = tok.messages[2], tok.messages[3]
    assert assistant["content"] == "" and assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert result == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}
