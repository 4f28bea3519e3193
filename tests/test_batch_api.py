"""mlx_moe.batch_generate on real ranks: every rank gets the same texts,
each the single-process greedy answer, even with noise on rank 1's logits
(the ranks follow rank 0's tokens); a seeded prompt samples the same text
alone and in a batch; ranks that pass different batches all fail, naming
the difference, and stay in step for the next call."""

import pytest

import oracle
from conftest import launch

QUESTIONS = ["hi", "Where does the river run?", "Name three birds that sing at dawn near the water", "Why?"]
SEEDED = "Tell me a story"
SAMPLED = {"temperature": 1.0, "max_tokens": 12}
NOISE = 0.05  # uniform in +-NOISE on every logit of rank 1 (as test_noisy_rank's)


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe")  # float32: batched and single-process logits agree closely


def greedy_batch(path) -> dict:
    """Five prompts of different lengths: four strings (chat template) and one token-id list."""
    ids = oracle.chat_prompt(path, "A prompt given as token ids, about the sea and its tides")
    return {"prompts": QUESTIONS + [ids], "max_tokens": [8, 12, 16, 10, 14]}


def single_process(path, call) -> list:
    prompts = [oracle.chat_prompt(path, p) if isinstance(p, str) else p for p in call["prompts"]]
    return [oracle.greedy_text(path, p, n) for p, n in zip(prompts, call["max_tokens"])]


def test_two_ranks(model_path, tmp_path):
    greedy = greedy_batch(model_path)
    calls = [
        {"prompts": ["hi", "Why?"], "max_tokens": 4, "on_rank": {"1": {"prompts": ["hi", "Why not?"]}}},
        greedy,
        {"prompts": [SEEDED], "seed": 7, **SAMPLED},
        {"prompts": ["hi", SEEDED, "Why?"], "seed": [3, 7, 5], **SAMPLED},
    ]
    outs = launch("batch_api_worker", {"checkpoint": str(model_path), "calls": calls, "noise": NOISE}, 2,
                  tmp_path)
    assert outs[0] == outs[1]  # the same texts, and the same error, on every rank
    mismatch, batch, alone, together = outs[0]
    assert "rank 1 and rank 0 differ in prompt 1's tokens" in mismatch["error"], mismatch
    assert batch["texts"] == single_process(model_path, greedy)
    assert together["texts"][1] == alone["texts"][0]
    # ... and it was sampled, not the greedy answer.
    assert alone["texts"][0] != oracle.greedy_text(model_path, oracle.chat_prompt(model_path, SEEDED), SAMPLED["max_tokens"])


def test_three_ranks(model_path, tmp_path):
    greedy = greedy_batch(model_path)
    calls = [{**greedy, "on_rank": {"2": {"max_tokens": [8, 12, 16, 10, 15]}}}, greedy]
    outs = launch("batch_api_worker", {"checkpoint": str(model_path), "calls": calls, "noise": NOISE}, 3,
                  tmp_path)
    assert outs[0] == outs[1] == outs[2]
    mismatch, batch = outs[0]
    assert "rank 2 and rank 0 differ in prompt 4's max_tokens: 15 vs 14" in mismatch["error"], mismatch
    assert batch["texts"] == single_process(model_path, greedy)
