"""Chat with tools and reasoning: OpenAI's message shapes, the prompt they
make through the model's chat template, and the answer split back into
reasoning, content and tool calls, streamed or whole.

The split uses mlx-lm's own pieces, as its server does: the text state
machine that follows the tokenizer's think and tool-call markers, and the
tool parser mlx-lm picks for the model family (`tokenizer.tool_parser`).
"""

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Union

from jinja2 import TemplateError
from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.server import ToolCallFormatter
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator

from ..structured import Grammars, RequestError, ResponseFormat, build_grammar, think_open


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[StrictStr, List[TextPart]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[StrictStr] = None
    reasoning_content: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant message with "
                             "tool_calls may have null content)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(BaseModel):
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: Optional[StrictStr] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[StrictBool] = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: StrictStr


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatFields(BaseModel):
    """The chat-specific fields of a chat completions request (app.py's
    ChatRequest can inherit them next to its sampling fields)."""
    messages: List[ChatMessage] = Field(min_length=1)
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    reasoning_effort: Optional[Literal["minimal", "low", "medium", "high"]] = None
    response_format: Optional[ResponseFormat] = None


def template_messages(messages: List[ChatMessage]) -> List[dict]:
    """The messages as chat templates take them: text content, and tool-call
    arguments as objects (as mlx-lm's server passes them; Qwen's and most
    templates serialize them themselves)."""
    out = []
    for m in messages:
        # OpenAI's "developer" is the system prompt of newer models; templates know "system".
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            calls = []
            for i, c in enumerate(m.tool_calls):
                try:
                    args = json.loads(c.function.arguments or "{}")
                except ValueError as e:
                    raise RequestError(f"messages: tool call {c.id!r} has arguments that are not JSON ({e}).",
                                       f"messages.tool_calls.{i}.function.arguments") from e
                calls.append({"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": args}})
            d["tool_calls"] = calls
        out.append(d)
    return out


RESERVED = {"messages", "tools", "add_generation_prompt", "tokenize", "documents", "return_dict"}


@dataclass
class Prompt:
    ids: List[int]
    tools: Optional[List[dict]]  # what the template was given (for the tool parser)
    grammar: Optional[str]  # Lark text the answer must follow (structured.Grammars), or None


def build_prompt(tokenizer, req: ChatFields, grammars: Optional[Grammars] = None) -> Prompt:
    """The prompt tokens for a chat request, its tools and its output
    constraint. tool_choice "none" drops the tools; "required" or a named
    function forces a call through the grammar (structured.build_grammar),
    which `grammars` checks. Raises RequestError (a 400) naming the field.
    Rendering is CPU work (and the first check builds llguidance's
    tokenizer, about a second): call it off the event loop."""
    choice = req.tool_choice
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
    if choice == "none":
        tools = None
    if tools and not tokenizer.has_tool_calling:
        raise RequestError("This model's chat template has no tool-call format mlx-lm recognizes, so its "
                           "tool calls could not be read back; send the request without tools.", "tools")
    kwargs = dict(req.chat_template_kwargs or {})
    clash = RESERVED & set(kwargs)
    if clash:
        raise RequestError(f"chat_template_kwargs cannot set {sorted(clash)}; use the request's own fields.",
                           "chat_template_kwargs")
    if req.reasoning_effort is not None:
        kwargs["reasoning_effort"] = req.reasoning_effort
    try:
        ids = tokenizer.apply_chat_template(template_messages(req.messages), tools=tools,
                                            add_generation_prompt=True, tokenize=True, **kwargs)
    except TemplateError as e:
        raise RequestError(f"The model's chat template rejected the messages: {e}", "messages") from e
    ids = list(ids)
    choice = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice
    grammar = build_grammar(tokenizer, ids, req.response_format, tools, choice, req.parallel_tool_calls is not False)
    if grammar is not None and grammars is not None:
        forced = choice == "required" or isinstance(choice, dict)
        grammars.check(grammar, "tools" if forced else "response_format")
    return Prompt(ids, tools, grammar)


class ChatOutput:
    """Splits an answer's text, fed piece by piece as generated, into
    OpenAI deltas: {"reasoning_content": ...}, {"content": ...} and
    {"tool_calls": [{index, id, type, function: {name, arguments}}]} (a
    call is sent whole, once its end marker arrives). `finish` ends it;
    `message` is the whole answer, as a non-streamed response has it."""

    def __init__(self, tokenizer, prompt: List[int], tools: Optional[List[dict]] = None):
        initial = tokenizer.response_initial_state or ("reasoning" if think_open(tokenizer, prompt) else "normal")
        self._state = make_text_state_machine(tokenizer).make_state(initial)
        self._parse = ToolCallFormatter(tokenizer.tool_parser, tools, streaming=True)
        self._tool_start, self._tool_end = tokenizer.tool_call_start, tokenizer.tool_call_end
        self._tool_text: Optional[str] = None  # inside a call
        self.content, self.reasoning = [], []
        self.tool_calls: List[dict] = []

    def feed(self, text: str) -> List[dict]:
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._segments(segments)

    def finish(self, finish_reason: str):
        """(last deltas, finish_reason): held-back text is flushed, a call cut
        short is parsed if it can be, and "stop" becomes "tool_calls" when
        the answer made a call."""
        self._state, rest, state = TextStateMachine.flush(self._state)
        deltas = self._segments([(state, rest)])
        if self._tool_text is not None:
            deltas += self._end_call(closed=False)
        if finish_reason == "stop" and self.tool_calls:
            finish_reason = "tool_calls"
        return deltas, finish_reason

    def message(self) -> dict:
        text = "".join(self.content)
        # Beside tool calls, blank text (the newlines after </think>) is no content.
        msg = {"role": "assistant", "content": text if text.strip() or not self.tool_calls else None}
        if self.reasoning:
            msg["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls]
        return msg

    def _segments(self, segments) -> List[dict]:
        deltas = []
        for state, text in segments:
            if state == "tool":
                self._tool_text = (self._tool_text or "") + text
                continue
            if self._tool_text is not None:
                deltas += self._end_call(closed=True)
            if text and state == "reasoning":
                self.reasoning.append(text)
                deltas.append({"reasoning_content": text})
            elif text:
                self.content.append(text)
                deltas.append({"content": text})
        return deltas

    def _end_call(self, closed: bool) -> List[dict]:
        text, self._tool_text = self._tool_text, None
        try:
            calls = self._parse([text])
        except (KeyError, TypeError, AttributeError, IndexError):
            # mlx-lm's formatter skips text that is not JSON but trusts its
            # shape: {"name": "x"} without arguments, or [1], ends here.
            calls = []
        if not calls:
            # What the model wrote stays visible rather than vanishing.
            raw = self._tool_start + text + (self._tool_end or "" if closed else "")
            self.content.append(raw)
            return [{"content": raw}]
        self.tool_calls += calls
        return [{"tool_calls": calls}]

