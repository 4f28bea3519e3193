"""Every sampling parameter changes the answer the way it says, on real
ranks inside the batching server: penalties at temperature 0 give exactly
what one process gives with mlx-lm's same processors; top_k and min_p at
their strictest sample only the most likely token."""

import pytest
from mlx_lm.sample_utils import make_logits_processors

import oracle
from mlx_moe.serve.engine import PENALTY_CONTEXT
from test_serve import client, model_path, server  # noqa: F401 (fixtures)

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
