"""Ranks on different Macs (an M2 Ultra beside an M4 Max) compute slightly
different floats. With noise on rank 1's logits only (tests/workers/noise),
rank 0 still samples every token and the others follow it, so the answers
are those of one process: greedy equals single-process, a seeded request
equals a one-rank server's, a JSON schema validates."""

import json
import os
import sys

import jsonschema
import pytest

from conftest import WORKERS
from test_batching import THREE_RANKS, _ask_all, _assert_single_process_answers, _client
from test_serve import serving

NOISE = 0.05  # uniform in +-NOISE on every logit of rank 1
SEEDED = dict(prompt="Computers process", max_tokens=24, temperature=1.0, seed=4321)
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "count": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "count"],
    "additionalProperties": False}


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe")  # float32, as test_batching's


def noisy(model_path, hosts):
    """`mlx-moe serve` on `hosts` with noise on rank 1's logits (a context: its URL)."""
    env = dict(os.environ, REAL_PYTHON=sys.executable,
               RANK1_ENV=f"PYTHONPATH={WORKERS / 'noise'} LOGIT_NOISE={NOISE}")
    return serving(model_path, "--hosts", hosts, "--python", str(WORKERS / "rank1_differs_python.sh"), env=env)


@pytest.fixture(scope="module")
def one_rank_seeded(model_path):
    """The seeded answer of a one-rank server, which has no one to follow."""
    with serving(model_path, "--hosts", "127.0.0.1") as url:
        return _client(url).completions.create(model=str(model_path), **SEEDED).choices[0].text


@pytest.mark.parametrize("hosts", ["127.0.0.1,127.0.0.1", THREE_RANKS], ids=["2 ranks", "3 ranks"])
def test_a_noisy_rank_changes_no_answer(model_path, one_rank_seeded, hosts):
    with noisy(model_path, hosts) as url:
        _assert_single_process_answers(_ask_all(url, model_path), model_path)
        client = _client(url)
        assert client.completions.create(model=str(model_path), **SEEDED).choices[0].text == one_rank_seeded
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
        for seed in range(3):
            r = client.chat.completions.create(
                model=str(model_path), messages=[{"role": "user", "content": "A name and a count?"}],
                temperature=1.0, seed=seed, max_tokens=96, response_format=fmt)
            assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
