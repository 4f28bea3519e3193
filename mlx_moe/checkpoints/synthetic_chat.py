"""A synthesized checkpoint whose chat template does what real ones do for
agents: tools, assistant tool calls, tool results and <think> reasoning, in
Qwen3's format, so mlx-lm infers thinking and its `json_tools` parser for
it. Built on `synthetic.synthesize`: the same model, plus the four tags as
added tokens (not special, as in Qwen3; the embedding grows by four rows)
and this template."""

import json
from pathlib import Path

from .synthetic import DEFAULT_VOCAB, _train_tokenizer, synthesize

TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

# Qwen3's template, shortened: tools are listed in the system turn, calls are
# <tool_call> JSON, consecutive tool results share one user turn, and
# enable_thinking=false closes an empty think block in the prompt.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if (loop.first and message.content) or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
MARKER = "synthetic_chat.json"


def synthesize_chat(path, arch="qwen3_moe", **kw) -> Path:
    """`synthesize(path, arch, **kw)` with TAGS as added tokens and
    CHAT_TEMPLATE (reused when `path` already holds it)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    base = _train_tokenizer(kw.get("vocab") or DEFAULT_VOCAB).get_vocab_size()
    overrides = {**kw.pop("overrides", {}), "vocab_size": base + len(TAGS)}
    synthesize(path, arch, overrides=overrides, **kw)
    meta = {"tags": TAGS, "chat_template": CHAT_TEMPLATE}
    marker = path / MARKER
    if marker.exists() and json.loads(marker.read_text()) == meta:
        return path
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.add_tokens(TAGS)  # added but not special, as in Qwen3: they stay in decoded text
    if len(tok) != base + len(TAGS):
        raise RuntimeError(f"{path}: the tokenizer has {len(tok)} tokens, expected {base + len(TAGS)}")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    marker.write_text(json.dumps(meta))
    return path
