"""Anthropic's Messages API (`POST /v1/messages`) over the same engine:
the request becomes chat messages and tools for the model's chat template
(chat.build_prompt), the answer goes through chat.ChatOutput and comes back
as content blocks (thinking, text, tool_use), whole or as Anthropic's event
stream. Errors have Anthropic's shape, so its SDKs raise their own classes.

`anthropic_router(tokenizer, run)` is the whole endpoint; `run(Generation)`
is app.py's: an async generator that checks the request against the server
(model name, context) and yields the engine's events for it: ("text",
piece)..., then ("done", finish_reason, usage) or ("error", message). An
exception with `status` and `message` (schema.py's APIError) or a RequestError
before the first event becomes an error response; a client that goes away
closes the generator.
"""

import json
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Callable, Dict, List, Literal, Optional, Union

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from .chat import ChatFields, ChatOutput, build_prompt
from ..structured import Grammars, RequestError


@dataclass
class Generation:
    """What the endpoint asks the engine for (app.py makes its Job of it)."""
    model: str
    prompt: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    stop: List[str] = field(default_factory=list)
    grammar: Optional[str] = None  # for structured.Grammars: output_config.format, a forced tool call


class TextBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations
    type: Literal["text"]
    text: StrictStr


class ThinkingBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["thinking"]
    thinking: StrictStr
    signature: Optional[StrictStr] = None


class ToolUseBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["tool_use"]
    id: StrictStr
    name: StrictStr
    input: Dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["tool_result"]
    tool_use_id: StrictStr
    content: Union[StrictStr, List[TextBlock]] = ""
    is_error: StrictBool = False

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


# By "type", so an unsupported block (an image) is named as such.
Block = Annotated[Union[TextBlock, ThinkingBlock, ToolUseBlock, ToolResultBlock], Field(discriminator="type")]


class MessageParam(BaseModel):
    role: Literal["user", "assistant"]
    content: Union[StrictStr, List[Block]]


class ToolParam(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    description: Optional[StrictStr] = None
    input_schema: Dict[str, Any]


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[StrictStr] = None
    disable_parallel_tool_use: StrictBool = False


class Thinking(BaseModel):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: Optional[StrictInt] = None


class OutputFormat(BaseModel):
    type: Literal["json_schema"]
    schema_: Dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    effort: Optional[Literal["low", "medium", "high", "xhigh", "max"]] = None
    format: Optional[OutputFormat] = None


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: StrictInt = Field(gt=0)
    messages: List[MessageParam] = Field(min_length=1)
    system: Optional[Union[StrictStr, List[TextBlock]]] = None
    tools: Optional[List[ToolParam]] = None
    tool_choice: Optional[ToolChoice] = None
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=0)
    stop_sequences: Optional[List[StrictStr]] = None
    stream: StrictBool = False
    metadata: Optional[Dict[str, Any]] = None
    thinking: Optional[Thinking] = None
    output_config: Optional[OutputConfig] = None


def chat_fields(req: MessagesRequest) -> ChatFields:
    """The request as OpenAI-style chat fields: tool_result blocks become
    tool messages, tool_use blocks assistant tool calls, thinking blocks
    the assistant's reasoning_content."""
    messages: List[dict] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "\n\n".join(b.text for b in req.system)
        messages.append({"role": "system", "content": system})
    for m in req.messages:
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
        if m.role == "assistant":
            msg: Dict[str, Any] = {"role": "assistant", "content": text}
            thinking = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
            if thinking:
                msg["reasoning_content"] = thinking
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                     for b in blocks if isinstance(b, ToolUseBlock)]
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
            continue
        # Results first: they answer the previous turn's calls.
        messages += [{"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
                     for b in blocks if isinstance(b, ToolResultBlock)]
        if text or not any(isinstance(b, ToolResultBlock) for b in blocks):
            messages.append({"role": "user", "content": text})
    fields: Dict[str, Any] = {"messages": messages}
    if req.tools:
        fields["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                             "parameters": t.input_schema}} for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise RequestError('tool_choice of type "tool" needs the tool\'s "name".', "tool_choice.name")
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if req.thinking is not None:
        fields["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    config = req.output_config
    if config is not None and config.effort is not None:
        fields["reasoning_effort"] = {"xhigh": "high", "max": "high"}.get(config.effort, config.effort)
    if config is not None and config.format is not None:
        fields["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "output", "schema": config.format.schema_}}
    return ChatFields.model_validate(fields)


def stop_reason(finish: str, usage: dict, made_call: bool):
    """(stop_reason, stop_sequence): usage["stop_sequence"] names the stop
    string met (answers.Answer); otherwise a stop is an end of turn."""
    if usage.get("stop_sequence"):
        return "stop_sequence", usage["stop_sequence"]
    if made_call:
        return "tool_use", None
    return ("max_tokens" if finish == "length" else "end_turn"), None


class Blocks:
    """ChatOutput's deltas as Anthropic content blocks and stream events:
    a block opens when the kind of output changes. Blank text (the newlines
    between reasoning and a call) is held and dropped unless text follows;
    a text block does not start with newlines."""

    def __init__(self):
        self.content: List[dict] = []
        self._open: Optional[str] = None
        self._blank = ""

    def events(self, delta: dict) -> List[dict]:
        if "reasoning_content" in delta:
            return self._to("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                            {"type": "thinking_delta", "thinking": delta["reasoning_content"]})
        if "content" in delta:
            text = self._blank + delta["content"]
            if self._open != "text" and not text.strip():
                self._blank = text
                return []
            self._blank = ""
            if self._open != "text":
                text = text.lstrip("\n")  # the newlines a template puts after </think>
            return self._to("text", {"type": "text", "text": ""}, {"type": "text_delta", "text": text})
        out = []
        for call in delta["tool_calls"]:
            fn = call["function"]
            out += self._to("tool_use", {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": {}},
                            {"type": "input_json_delta", "partial_json": fn["arguments"]}, new=True)
        return out

    def close(self) -> List[dict]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]

    def _to(self, kind: str, start: dict, delta: dict, new: bool = False) -> List[dict]:
        out = []
        if self._open != kind or new:
            out += self.close()
            self.content.append(dict(start))
            self._open = kind
            out.append({"type": "content_block_start", "index": len(self.content) - 1, "content_block": start})
        block = self.content[-1]
        if kind == "tool_use":
            block["input"] = json.loads(delta["partial_json"])
        else:
            block[kind] += delta[kind]
        out.append({"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta})
        return out


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error"}


def error_response(status: int, message: str) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def anthropic_router(tokenizer, run: Callable[[Generation], AsyncIterator[tuple]],
                     grammars: Optional[Grammars] = None) -> APIRouter:
    """POST /v1/messages and /v1/messages/count_tokens. `grammars` checks
    output constraints (a forced tool call, output_config.format) up front,
    so one llguidance cannot enforce is a 400."""
    router = APIRouter()

    def parse(body: bytes):
        try:
            req = MessagesRequest.model_validate_json(body)
        except ValidationError as e:
            # The deepest error: for a union (a string or blocks) it is the one that says what is wrong.
            err = max(e.errors(), key=lambda x: len(x.get("loc", ())))
            where = ".".join(str(p) for p in err.get("loc", ()) if "[" not in str(p))  # not pydantic's type names
            return None, error_response(400, f"{where}: {err.get('msg')}" if where else err.get("msg", "invalid"))
        return req, None

    def prepare(req: MessagesRequest):
        prompt = build_prompt(tokenizer, chat_fields(req), grammars)
        gen = Generation(model=req.model, prompt=prompt.ids, max_tokens=req.max_tokens,
                         temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or 0,
                         stop=req.stop_sequences or [], grammar=prompt.grammar)
        return gen, ChatOutput(tokenizer, prompt.ids, prompt.tools)

    async def first_event(events):
        """The first event, or the error response the runner raised."""
        try:
            return await events.__anext__(), None
        except RequestError as e:
            return None, error_response(400, f"{e.param}: {e}")
        except Exception as e:  # schema.py's APIError: a status and a message
            if getattr(e, "status", None) is None:
                raise
            return None, error_response(e.status, e.message)

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        try:
            data = json.loads(await request.body())
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return error_response(400, "The request body is not a JSON object.")
        # It takes no max_tokens; one makes it a valid MessagesRequest.
        req, error = parse(json.dumps({**data, "max_tokens": 1}).encode())
        if error:
            return error
        try:
            prompt = await run_in_threadpool(build_prompt, tokenizer, chat_fields(req))
            return {"input_tokens": len(prompt.ids)}
        except RequestError as e:
            return error_response(400, f"{e.param}: {e}")

    @router.post("/v1/messages")
    async def messages(request: Request):
        req, error = parse(await request.body())
        if error:
            return error
        try:
            gen, output = await run_in_threadpool(prepare, req)  # templating is CPU work
        except RequestError as e:
            return error_response(400, f"{e.param}: {e}")
        events = run(gen).__aiter__()
        first, error = await first_event(events)
        if error:
            return error
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        head = {"id": mid, "type": "message", "role": "assistant", "model": req.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(gen.prompt), "output_tokens": 0}}

        async def all_events():
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                # A client that went away closes this: close the runner too, so
                # app.py's side cancels the job now rather than at collection.
                await events.aclose()

        async def blocks_and_end():
            """Stream events, then ("end", message delta) or ("error", message)."""
            blocks = Blocks()
            async with aclosing(all_events()) as stream:
                async for event in stream:
                    if event[0] == "text":
                        for d in output.feed(event[1]):
                            yield "event", blocks.events(d)
                    elif event[0] == "error":
                        yield "error", event[1]
                        return
                    else:
                        deltas, finish = output.finish(event[1])
                        for d in deltas:
                            yield "event", blocks.events(d)
                        yield "event", blocks.close()
                        reason, sequence = stop_reason(finish, event[2], bool(output.tool_calls))
                        yield "end", (blocks.content, reason, sequence, event[2].get("completion_tokens", 0))
                        return

        if not req.stream:
            async with aclosing(blocks_and_end()) as stream:
                async for kind, value in stream:
                    if kind == "error":
                        return error_response(500, value)
                    if kind == "end":
                        content, reason, sequence, tokens = value
                        head.update(content=content, stop_reason=reason, stop_sequence=sequence)
                        head["usage"]["output_tokens"] = tokens
                        return head
            return error_response(500, "The generation ended without a result.")

        async def sse():
            yield _sse({"type": "message_start", "message": head})
            async with aclosing(blocks_and_end()) as stream:
                async for kind, value in stream:
                    if kind == "event":
                        for e in value:
                            yield _sse(e)
                    elif kind == "error":
                        yield _sse({"type": "error", "error": {"type": "api_error", "message": value}})
                    else:
                        _, reason, sequence, tokens = value
                        yield _sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                    "usage": {"output_tokens": tokens}})
                        yield _sse({"type": "message_stop"})

        return StreamingResponse(sse(), media_type="text/event-stream")

    return router
