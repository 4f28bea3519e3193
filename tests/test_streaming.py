"""Even streaming at one client: `mlx-moe serve` on 2 ranks sends its chunks
as evenly as mlx-lm's own one-process server, on a small float32
checkpoint and on a 4-bit one, measured in the same run. Evenness: the
median gap between streamed chunks over the mean time per token (1 when a
chunk comes per token at a steady pace; near 0 when chunks come in
clumps). Both stream the same greedy tokens (end-of-sequence banned)
through mlx-lm's detokenizer; the test checks the texts are equal."""

import os
import statistics
import subprocess
import sys
import time

import openai
import pytest

from mlx_moe.cluster.launch import free_port, stop_group, wait_ready
from test_reliability import no_eos

TOKENS = 96
PROMPT = "The river ran past the mill and"
CHECKPOINTS = {
    "small float32": dict(layers=3, hidden=128, experts=12, top_k=3, vocab=512),
    "4-bit": dict(layers=8, hidden=256, experts=16, top_k=4, quantize=4),
}


def evenness(url: str, model: str):
    """(median gap between chunks / mean time per token, the text) of one streamed greedy answer."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    stamps, text = [], ""
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0,
                                           stream=True, logit_bias=no_eos(model)):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
            text += chunk.choices[0].text
    per_token = (stamps[-1] - stamps[0]) / (TOKENS - 1)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])) / per_token, text


def measured(cmd, model: str):
    """evenness() of the server `cmd` starts on `port`, after a warm-up answer
    (the first compiles and allocates). The server runs in this session (a
    process group of its own): Linux schedules each session as a group, and
    two ranks spinning on this machine's 2 cores kept a client in another
    session waiting for a core at each chunk, which measures the scheduler,
    not the server. Clients on other machines have cores of their own."""
    port = free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port)], preexec_fn=os.setpgrp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        evenness(url, model)
        return evenness(url, model)
    finally:
        stop_group(proc)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_chunks_come_as_evenly_as_from_mlx_lms_server(checkpoint, name):
    model = str(checkpoint("qwen3_moe", **CHECKPOINTS[name]))
    theirs, their_text = measured([sys.executable, "-m", "mlx_lm", "server", "--model", model,
                                   "--log-level", "WARNING"], model)
    ours, our_text = measured([sys.executable, "-m", "mlx_moe.cli", "serve", "--model", model,
                               "--max-context", "4096"], model)
    assert our_text == their_text  # the same tokens, so the pace is comparable
    assert ours >= 0.8 * theirs, f"{name}: evenness {ours:.2f} against mlx-lm's {theirs:.2f}"
