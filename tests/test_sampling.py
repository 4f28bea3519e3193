"""Every sampling parameter changes the answer the way it says, on real
ranks inside the batching server: penalties at temperature 0 give exactly
what one process gives with mlx-lm's same processors; top_k and min_p at
their strictest sample only the most likely token; log-probs are the
model's log-softmax; n choices are n sequences; stop token ids end the
answer before the token."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.utils import load_tokenizer

import oracle
from mlx_moe.serve.engine.core import PENALTY_CONTEXT
from test_batching import CONTEXT, _client, _poll, _scrape, serving as batching_server
from test_metrics import value
from test_serve import _chat, _post_raw, client, model_path, server  # noqa: F401 (fixtures)

MAX_TOKENS = 24
PROMPT = "The river ran past the mill, and the mill"


def _text(client, model_path, **kw):
    r = client.completions.create(model=str(model_path), prompt=PROMPT, max_tokens=MAX_TOKENS, **kw)
    return r.choices[0].text


PENALTIES = [
    ("repetition_penalty", 1.8, "repetition"),
    ("presence_penalty", 1.5, "presence"),
    ("frequency_penalty", 1.5, "frequency"),
]


@pytest.mark.parametrize("field,value,name", PENALTIES, ids=[p[0] for p in PENALTIES])
def test_penalty_changes_the_answer_as_mlx_lm_does(client, model_path, field, value, name):
    plain = oracle.greedy_text(model_path, PROMPT, MAX_TOKENS)
    want = oracle.greedy_text(model_path, PROMPT, MAX_TOKENS, logits_processors=make_logits_processors(
        **{f"{name}_penalty": value, f"{name}_context_size": PENALTY_CONTEXT}))
    assert want != plain  # the penalty matters on this prompt
    assert _text(client, model_path, temperature=0, extra_body={field: value}) == want


@pytest.mark.parametrize("field,value", [("top_k", 1), ("min_p", 1.0)])
def test_strictest_top_k_and_min_p_sample_the_greedy_answer(client, model_path, field, value):
    greedy = oracle.greedy_text(model_path, PROMPT, MAX_TOKENS)
    sampled = _text(client, model_path, temperature=1.0, seed=5)
    assert sampled != greedy  # at temperature 1 the seed matters
    # The openai client sends fields OpenAI does not have through extra_body.
    assert _text(client, model_path, temperature=1.0, seed=5, extra_body={field: value}) == greedy


# Log-probs, n choices and stop token ids.
QUESTION = "Where does the river run?"


@functools.lru_cache(maxsize=None)
def _tokenizer(model_path):
    return load_tokenizer(Path(model_path))


def _greedy_steps(model_path, ids, max_tokens):
    """[(token, log-softmax it was chosen from)] of single-process greedy
    decoding after `ids`, feeding the prompt and the tokens so far each
    step; end-of-sequence ends it (and is not listed)."""
    ids, steps = list(ids), []
    for _ in range(max_tokens):
        logits = oracle.last_logits(model_path, ids)
        logprobs = logits - np.logaddexp.reduce(logits)
        token = int(np.argmax(logprobs))
        if token in _tokenizer(model_path).eos_token_ids:
            break
        steps.append((token, logprobs))
        ids.append(token)
    return steps


def _assert_the_models(model_path, steps, got, k):
    """`got`: [(token text, logprob, [(token text, logprob)] best first)] against `steps`."""
    decode = lambda t: _tokenizer(model_path).decode([t])
    assert len(got) == len(steps) and steps
    for (token, logprob, top), (want, logprobs) in zip(got, steps):
        assert token == decode(want) and abs(logprob - logprobs[want]) < 1e-3
        assert 0 < len(top) <= k and top[0] == (token, logprob)  # greedy: the chosen one is the most likely
        # Near-ties may come in either order: the values in order, and each name's value.
        assert np.allclose([lp for _, lp in top], np.sort(logprobs)[::-1][:len(top)], atol=1e-3)
        for name, lp in top:
            assert any(decode(t) == name for t in np.flatnonzero(np.abs(logprobs - lp) < 1e-3))


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_models_log_softmax(client, model_path, stream):
    steps = _greedy_steps(model_path, oracle.chat_prompt(model_path, QUESTION), MAX_TOKENS)
    kw = dict(model=str(model_path), messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS,
              temperature=0, logprobs=True, top_logprobs=3)
    if stream:
        content = [c for chunk in client.chat.completions.create(stream=True, **kw) for choice in chunk.choices
                   if choice.logprobs for c in choice.logprobs.content]
    else:
        content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert all(bytes(c.bytes) == c.token.encode() and len(c.top_logprobs) == 3 for c in content)
    _assert_the_models(model_path, steps, [(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs])
                                           for c in content], 3)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_in_the_legacy_shape(client, model_path, stream):
    steps = _greedy_steps(model_path, _tokenizer(model_path).encode(PROMPT), MAX_TOKENS)
    kw = dict(model=str(model_path), prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=2)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
        text, parts = "".join(c.text for c in chunks), [c.logprobs for c in chunks if c.logprobs]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, parts = choice.text, [choice.logprobs]
    tokens, logprobs, tops, offsets = ([x for p in parts for x in getattr(p, f)] for f in
                                       ("tokens", "token_logprobs", "top_logprobs", "text_offset"))
    # Where each token's text starts in the answer (the answer's first space
    # is trimmed, as mlx-lm does; a part of a character shows as U+FFFD and
    # its text comes with the next token).
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    assert all(text[o:].startswith(t) for t, o, before in zip(tokens[1:], offsets[1:], tokens)
               if "\ufffd" not in t + before)
    assert all(t in top for t, top in zip(tokens, tops))  # the chosen token, beside the 2 most likely
    got = [(t, lp, sorted(top.items(), key=lambda kv: -kv[1])) for t, lp, top in zip(tokens, logprobs, tops)]
    _assert_the_models(model_path, steps, got, 2)


def test_logprobs_are_the_models_before_logit_bias(client, model_path):
    """OpenAI and vLLM report the model's own log-probs, before the logits are changed."""
    (first, logprobs), = _greedy_steps(model_path, _tokenizer(model_path).encode(PROMPT), 1)
    r = client.completions.create(model=str(model_path), prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1,
                                  logit_bias={str(first): -100})
    lp, name = r.choices[0].logprobs, _tokenizer(model_path).decode([first])
    assert lp.tokens[0] != name  # the bias steered it, to the model's second choice
    assert abs(lp.token_logprobs[0] - np.sort(logprobs)[-2]) < 1e-3
    assert abs(lp.top_logprobs[0][name] - logprobs[first]) < 1e-3  # the first, as the model has it


@pytest.mark.parametrize("stream", [False, True])
def test_n_greedy_chat_choices_each_equal_single_process_greedy(client, model_path, stream):
    want = oracle.greedy_text(model_path, oracle.chat_prompt(model_path, QUESTION), MAX_TOKENS)
    kw = dict(model=str(model_path), messages=[{"role": "user", "content": QUESTION}], max_tokens=MAX_TOKENS,
              temperature=0)
    one = client.chat.completions.create(**kw).usage
    texts, finishes, usage = {}, {}, None
    if stream:
        for chunk in client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw):
            usage = chunk.usage or usage
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
                finishes[c.index] = c.finish_reason or finishes.get(c.index)
    else:
        r = client.chat.completions.create(n=3, **kw)
        texts = {c.index: c.message.content for c in r.choices}
        finishes, usage = {c.index: c.finish_reason for c in r.choices}, r.usage
    assert texts == {0: want, 1: want, 2: want} and want
    assert set(finishes) == {0, 1, 2} and all(f in ("stop", "length") for f in finishes.values())
    assert usage.prompt_tokens == one.prompt_tokens and usage.completion_tokens == 3 * one.completion_tokens


def test_n_seeded_choices_differ_and_reproduce(client, model_path):
    kw = dict(model=str(model_path), prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    first, again = (client.completions.create(n=3, logprobs=0, **kw) for _ in range(2))
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in again.choices] == texts and len(set(texts)) > 1
    assert client.completions.create(**dict(kw, seed=8)).choices[0].text == texts[1]  # choice i: seed + i
    # Every token of every choice (end-of-sequence has no log-probs), the prompt once.
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) + (c.finish_reason == "stop")
                                                for c in first.choices)
    assert first.usage.prompt_tokens == len(_tokenizer(model_path).encode(PROMPT))


def test_a_client_that_goes_away_cancels_all_n(model_path):
    # A context no answer can reach in the test's time, end-of-sequence
    # banned: the 3 choices leave the batch only by being cancelled.
    with batching_server(model_path) as url:
        no_eos = {str(t): -100 for t in _tokenizer(model_path).eos_token_ids}
        stream = _client(url).completions.create(model=str(model_path), prompt=PROMPT, max_tokens=CONTEXT,
                                                 temperature=0, n=3, stream=True, logit_bias=no_eos)
        next(iter(stream))
        _poll(url, "mlx_moe_requests_running", 3)
        stream.close()
        _poll(url, "mlx_moe_requests_running", 0)
        assert value(_scrape(url), "mlx_moe_generated_tokens_total") == 0  # none ran to its end


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ids_end_the_answer_before_the_token(client, model_path, stream):
    steps = _greedy_steps(model_path, oracle.chat_prompt(model_path, QUESTION), MAX_TOKENS)
    tokens = [t for t, _ in steps]
    k = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])  # its first occurrence
    want = oracle.greedy_text(model_path, oracle.chat_prompt(model_path, QUESTION), k)
    text, finish, usage = _chat(client, model_path, QUESTION, stream, max_tokens=MAX_TOKENS,
                                extra_body={"stop_token_ids": [tokens[k]]})
    assert text == want and finish == "stop" and usage.completion_tokens == k + 1


BAD = [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"n": 17}, "n"),
    ("/v1/chat/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"stop_token_ids": [1, "VOCAB"]}, "stop_token_ids"),
]


@pytest.mark.parametrize("path,fields,param", BAD, ids=[f"{p.split('/')[-1]} {f}" for p, f, _ in BAD])
def test_bad_values_get_400_naming_the_field(server, model_path, path, fields, param):
    vocab = len(_tokenizer(model_path).get_vocab())
    body = {"model": str(model_path), "max_tokens": 2, **{k: ([vocab if x == "VOCAB" else x for x in v]
                                                             if isinstance(v, list) else v) for k, v in fields.items()}}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    code, payload = _post_raw(server + path, json.dumps(body).encode())
    assert code == 400 and set(payload["error"]) == {"message", "type", "param", "code"}
    assert payload["error"]["param"] == param and payload["error"]["message"]
