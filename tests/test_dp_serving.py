"""`mlx-moe serve --attention data-parallel|auto` on real ranks: each request
lives on one home rank, which alone holds its KV cache; answers still equal
single-process greedy decoding, on 2 and 3 ranks, with requests joining and
leaving mid-batch; the KV cache per rank is about half the replicated
mode's; a killed rank ends every stream naming it; auto keeps a single
stream replicated."""

import pytest

import oracle
from test_batching import (QUESTIONS, THREE_RANKS, _client, _scrape, in_threads,
                           killed_rank_ends_every_stream, serving)
from test_metrics import value
from test_reliability import no_eos
from test_serve import _chat


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("qwen3_moe")  # float32


def _ask_in_waves(url, model_path, questions, clients):
    """`clients` threads, each asking its share of `questions` one after the
    other (so requests join while others run and leave at different
    lengths): {question: (answer, max_tokens)}."""
    answers = {}

    def ask(c):
        for i in range(c, len(questions), clients):
            n = 6 + 3 * (i % 5)
            answers[questions[i]] = (_chat(_client(url), model_path, questions[i], stream=i % 2 == 0,
                                           max_tokens=n)[0], n)

    in_threads(ask, [(c,) for c in range(clients)])
    return answers


def _assert_greedy(answers, model_path):
    assert answers, "no answers"
    for q, (answer, n) in answers.items():
        assert answer == oracle.greedy_text(model_path, oracle.chat_prompt(model_path, q), n), q


def test_answers_equal_single_process_with_requests_joining_and_leaving(model_path):
    with serving(model_path, "--attention", "data-parallel") as url:
        # 5 clients on 2 ranks (uneven homes), 10 questions: each client's
        # second question joins a running batch.
        answers = _ask_in_waves(url, model_path, QUESTIONS[:10], 5)
        page = _scrape(url)
    _assert_greedy(answers, model_path)
    assert len(answers) == 10
    assert value(page, "mlx_moe_requests_running") == 0


def test_one_request_on_three_ranks(model_path):
    with serving(model_path, "--attention", "data-parallel", "--hosts", THREE_RANKS) as url:
        answers = _ask_in_waves(url, model_path, QUESTIONS[10:13], 1)
    _assert_greedy(answers, model_path)


# Tokens each KV measurement generates: more than the 32 steps in which the
# replicated mode reads its second prompt batch of 8 (so both batches are in
# the caches together), and few enough that no row outgrows the 256-token
# cache block its first token opened: the peak is then the caches with every
# prompt in, however late it is read.
KV_TOKENS = 64


def _kv_peak(url, model_path, streams: int, prompt_tokens: int) -> list:
    """The most KV cache bytes each rank held (mlx_moe_kv_cache_peak_bytes,
    from its caches after each step) while `streams` completions of
    `prompt_tokens` tokens each ran. One request with a list of prompts, so
    all join the batch in the same step: a prompt that joins a prompt batch
    late is left-padded to the others' progress, and how late would depend
    on the client's timing, not on the mode."""
    prompt = [(7 * i) % 200 + 10 for i in range(prompt_tokens)]
    ids = [prompt[:-1] + [200 + s] for s in range(streams)]  # distinct: no prefix reuse
    out = _client(url).completions.create(model=str(model_path), prompt=ids, max_tokens=KV_TOKENS,
                                          temperature=0, logit_bias=no_eos(str(model_path)))
    assert [c.finish_reason for c in out.choices] == ["length"] * streams
    page = _scrape(url)
    return [value(page, "mlx_moe_kv_cache_peak_bytes", rank=str(r)) for r in range(2)]


def test_kv_cache_per_rank_is_about_half_of_replicated(model_path):
    """16 streams of 2048 tokens on 2 ranks: the most any rank holds, from
    its caches, is at most 0.55x what each rank holds replicated."""
    got = {}
    for mode in ("replicated", "data-parallel"):
        with serving(model_path, "--attention", mode, "--prompt-cache-bytes", "0") as url:
            got[mode] = _kv_peak(url, model_path, 16, 2048)
    replicated, split = got["replicated"], got["data-parallel"]
    assert replicated[0] > 16 * 2048 * 2  # K and V of every token, at least a byte each
    assert 0 < max(split) <= 0.55 * replicated[0], got
    assert min(split) > 0  # both ranks are homes


def test_killed_rank_ends_every_stream(model_path):
    killed_rank_ends_every_stream(model_path, "--attention", "data-parallel")


def test_auto_keeps_a_single_stream_replicated_and_splits_a_batch(model_path):
    """auto: one request alone runs replicated (every rank holds its cache);
    once two share the batch they live on different ranks, each holding one
    sequence's cache, no more."""
    with serving(model_path, "--attention", "auto", "--prompt-cache-bytes", "0") as url:
        first = _kv_peak(url, model_path, 1, 300)
        assert first[0] == first[1] > 0  # replicated: the same cache on both
        pair = _kv_peak(url, model_path, 2, 300)
        assert pair == first  # each rank held one of the two; replicated, each would hold both
        answers = _ask_in_waves(url, model_path, QUESTIONS[13:16], 3)
    _assert_greedy(answers, model_path)
