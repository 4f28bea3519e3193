"""Constrained decoding with llguidance: `response_format` (json_object,
json_schema) and forced tool calls (tool_choice required or named).

Rank 0 turns a request into a grammar (Lark text, `build_grammar`) and
checks it (`Grammars.check`, which raises RequestError for a 400); the text
travels with the job, and every rank builds the same logits processor from
it (`Grammars.processor`), one per request, as mlx-lm's batch generator
takes them. A thinking model may reason first: the grammar lets the think
block through unconstrained and constrains what follows.
"""

import json
import threading
from typing import Any, Dict, List, Literal, Optional, Union

import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from ..loader import log


class RequestError(ValueError):
    """A request the server cannot honour as asked (a 400); `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: StrictStr = "response"
    description: Optional[StrictStr] = None
    schema_: Dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`. `strict` or not, the schema is enforced."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaSpec] = None


ANY_TEXT = r"/(.|\n)*/"
SPACE = r"/[ \t\n]*/"


def _marker(vocab: dict, text: str) -> str:
    """`text` in Lark: a token reference when it is one token of the vocab
    (llguidance keeps added tokens apart from plain text), else a string."""
    token = vocab.get(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


def _escape(text: str) -> str:
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$/-" else c for c in text)


def _until(vocab: dict, name: str, marker: str) -> List[str]:
    """Rules for any text up to and including `marker` (rule `name`)."""
    if marker in vocab:
        return [f"{name}: {ANY_TEXT} {_marker(vocab, marker)}"]
    # Plain text would also match the free text before it: end at the first.
    return [f"{name}[lazy]: /(.|\\n)*{_escape(marker)}/"]


def think_open(tokenizer, prompt: List[int]) -> bool:
    """Whether the prompt leaves a think block open (some templates open
    it), so the answer starts as reasoning: mlx-lm's server's test."""
    return tokenizer.has_thinking and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)


def _think_rules(tokenizer, vocab: dict, prompt: List[int]) -> List[str]:
    """The `think` rule: an optional reasoning block, its rest when the
    prompt opened it, nothing when the prompt closed it."""
    if not tokenizer.has_thinking:
        return ['think: ""']
    end = tokenizer.rfind_think_end(prompt)
    if end >= 0 and not tokenizer.decode(prompt[end + 1:]).strip():
        return ['think: ""']  # the template closed it (enable_thinking false): no reasoning now
    rules = _until(vocab, "think_rest", tokenizer.think_end)
    if think_open(tokenizer, prompt):
        return rules + [f"think: think_rest {SPACE}"]
    return rules + [f'think: "" | {_marker(vocab, tokenizer.think_start)} think_rest {SPACE}']


def _json(schema: dict) -> str:
    # Compact JSON, as OpenAI writes it: with flexible whitespace a weak
    # model can pad forever.
    options = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return "%json " + json.dumps({**schema, "x-guidance": options})  # key order is the schema's


def _call_schema(tools: List[dict], name: Optional[str]) -> dict:
    """json_tools' call object, {"name": ..., "arguments": {...}}, for the tools allowed."""
    options = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": t["function"]["name"]},
                               "arguments": t["function"].get("parameters") or {"type": "object"}}}
               for t in tools if name is None or t["function"]["name"] == name]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _tool_rules(tokenizer, vocab: dict, tools: List[dict], name: Optional[str], parallel: bool) -> List[str]:
    """The `body` rule: one tool call (more if `parallel`) in the model family's syntax;
    for mlx-lm's json_tools parser (Qwen, Hermes) each call's arguments
    follow the tool's schema, for other families only the markers are forced."""
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    if start is None:
        raise RequestError("tool_choice asks for a tool call but this model has no tool-call format "
                           "mlx-lm recognizes; use tool_choice \"auto\" or \"none\".", "tool_choice")
    parser = getattr(tokenizer.tool_parser, "__module__", "")
    if parser.endswith(".json_tools"):
        # Laid out as the family's templates write calls.
        call = [f'call: {_marker(vocab, start)} "\\n" {_json(_call_schema(tools, name))} "\\n" '
                f'{_marker(vocab, end)}']
    elif end:
        call = _until(vocab, "call_rest", end) + [f"call: {_marker(vocab, start)} call_rest"]
    else:  # the call runs to the end of the answer (mistral)
        call = [f"call: {_marker(vocab, start)} {ANY_TEXT}"]
    return call + ['body: call ("\\n" call)*' if parallel else "body: call"]


def _response_rules(fmt: ResponseFormat) -> List[str]:
    if fmt.type == "json_object":
        return ["body: " + _json({"type": "object"})]
    if fmt.json_schema is None:
        raise RequestError('response_format of type "json_schema" needs '
                           '"json_schema": {"name": ..., "schema": {...}}.', "response_format.json_schema")
    return ["body: " + _json(fmt.json_schema.schema_)]


def build_grammar(tokenizer, prompt: List[int], response_format: Union[ResponseFormat, dict, None] = None,
                  tools: Optional[List[dict]] = None, tool_choice: Any = None,
                  parallel_tool_calls: bool = True) -> Optional[str]:
    """The Lark grammar a request's answer must follow, or None when it is
    free. `tool_choice` is "required" or {"type": "function", "function":
    {"name": ...}} to force a call (other values constrain nothing);
    `tools` are OpenAI tool dicts. Raises RequestError."""
    if isinstance(response_format, dict):
        response_format = ResponseFormat.model_validate(response_format)
    forced = tool_choice == "required" or isinstance(tool_choice, dict)
    constrained = response_format is not None and response_format.type != "text"
    if forced and constrained:
        raise RequestError("A forced tool call (tool_choice) and response_format cannot both apply; "
                           "drop one of them.", "response_format")
    if not (forced or constrained):
        return None
    vocab = tokenizer.get_vocab()  # once: a dict of the whole vocabulary
    if forced:
        if not tools:
            raise RequestError("tool_choice asks for a tool call but the request has no tools.", "tool_choice")
        name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        if name is not None and name not in {t["function"]["name"] for t in tools}:
            raise RequestError(f"tool_choice names {name!r}, which is not among the tools.", "tool_choice")
        body = _tool_rules(tokenizer, vocab, tools, name, parallel_tool_calls)
    else:
        body = _response_rules(response_format)
    return "\n".join(["start: think body", *_think_rules(tokenizer, vocab, prompt), *body])


class Grammars:
    """Per tokenizer (one per engine, on every rank): checks grammars and
    makes logits processors. llguidance's tokenizer is built on first use
    (about a second for a large vocabulary)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._lltok = None

    def _llg(self):
        from llguidance.hf import from_tokenizer

        with self._lock:
            if self._lltok is None:
                self._lltok = from_tokenizer(self.tokenizer._tokenizer,
                                             eos_token=sorted(self.tokenizer.eos_token_ids))
            return self._lltok

    def check(self, grammar: str, param: str = "response_format") -> None:
        """Raise RequestError naming what llguidance cannot do (e.g. a schema
        keyword it does not implement); `param`: the field the grammar came
        from, "response_format" or "tools"."""
        from llguidance import LLMatcher

        failed, messages = LLMatcher.validate_grammar_with_warnings(
            LLMatcher.grammar_from_lark(grammar), self._llg())
        if failed:
            # The first line says what; the rest quotes the generated grammar.
            reason = messages[0].splitlines()[0].split("failed to compile JSON schema: ")[-1]
            fix = ('remove them from the tools\' parameters, or use tool_choice "auto"' if param == "tools"
                   else 'remove them from the schema, or use {"type": "json_object"}')
            raise RequestError(f"The {param} schema cannot be enforced: {reason}; {fix}.", param)

    def processor(self, grammar: str) -> "GrammarProcessor":
        from llguidance import LLMatcher

        return GrammarProcessor(LLMatcher(self._llg(), LLMatcher.grammar_from_lark(grammar), log_level=0),
                                sorted(self.tokenizer.eos_token_ids))


class GrammarProcessor:
    """An mlx-lm logits processor, `(tokens, logits) -> logits`: tokens the
    grammar does not allow next get -inf. `tokens` is the prompt and the
    tokens generated so far; the first call marks where the answer begins."""

    def __init__(self, matcher, eos: List[int]):
        self.matcher, self.eos = matcher, eos
        self.start: Optional[int] = None
        self.seen = 0

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        m = self.matcher
        if self.start is None:
            self.start = tokens.size
        else:
            new = tokens.reshape(-1)[self.start + self.seen:].tolist()
            self.seen += len(new)
            if not m.is_error() and not m.is_stopped():
                m.consume_tokens(new)
        width = logits.shape[-1]
        if m.is_error():
            # Never raise inside a step (every rank would stop): end the answer.
            log(f"structured output: {m.get_error()[:300]}; ending the answer")
            allowed = np.zeros(width, bool)
            allowed[self.eos] = True
        else:
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")
            allowed = np.zeros(width, bool)
            n = min(width, bits.size)
            allowed[:n] = bits[:n].astype(bool)
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), logits.dtype))
