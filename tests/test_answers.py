"""The front makes each answer's text from the token ids rank 0 sends:
stop strings, log-prob offsets, usage, and the engine told to drop an
answer a stop string ended. No model: a detokenizer of one letter per id."""

import threading
import types

from mlx_moe.serve.channel import Cancel, Job, Step
from mlx_moe.serve.front.answers import Answer
from mlx_moe.serve.front.process import EngineClient


class Letters:
    """mlx-lm's streaming detokenizer interface: token id i is chr(i)."""

    def __init__(self):
        self.text, self.read = "", 0

    def add_token(self, token):
        self.text += chr(token)

    def finalize(self):
        pass

    @property
    def last_segment(self):  # the text since the last read
        segment, self.read = self.text[self.read:], len(self.text)
        return segment


def _client():
    client = EngineClient.__new__(EngineClient)  # no channel: what a step's message does
    client.lock, client.jobs, client.failure, client.sent = threading.Lock(), {}, None, []
    client.tokenizer = types.SimpleNamespace(detokenizer=Letters())
    client._send = client.sent.append
    client.on_step = lambda *counts: None
    return client


def _step(*events):
    return Step(list(events), running=1, waiting=0, decoded=len(events), kv_bytes=[0])


def _token(id, letter, finish=None, logprobs=None):
    return id, ("token", ord(letter), finish, logprobs, 2)


def test_a_stop_string_across_tokens_ends_the_answer_and_the_engine_drops_it():
    client, events = _client(), []
    client.jobs[5] = Answer(Job(prompt=[1, 2, 3], max_tokens=50, stop=["ND", "END"], emit=events.append),
                            Letters())
    client._step(_step(_token(5, "a"), _token(5, "E")))
    assert events == [("text", "a")]  # "E" may start the stop string: held back
    client._step(_step(_token(5, "N")))
    assert events == [("text", "a")] and client.sent == []
    client._step(_step(_token(5, "D"), _token(5, "x")))
    assert client.sent == [Cancel(5)] and 5 not in client.jobs
    done = events[-1]
    assert done[:2] == ("done", "stop") and events[:-1] == [("text", "a")]
    assert done[2]["completion_tokens"] == 4 and done[2]["prompt_tokens"] == 3 and done[2]["cached_tokens"] == 2
    assert done[2]["stop_sequence"] == "END"  # the first to start, as Anthropic's API names it
    client._step(_step(_token(5, "y")))  # the engine's tokens until it drops it: nobody's
    assert len(events) == 2


def test_held_back_text_that_is_no_stop_string_is_sent_at_the_end():
    client, events = _client(), []
    client.jobs[0] = Answer(Job(prompt=[1], max_tokens=3, stop=["xyz"], emit=events.append), Letters())
    client._step(_step(_token(0, "a"), _token(0, "x"), _token(0, "y", finish="length")))
    assert [e for e in events if e[0] == "text"] == [("text", "a"), ("text", "xy")]
    assert events[-1][:2] == ("done", "length") and client.sent == []
    assert "stop_sequence" not in events[-1][2]


def test_end_of_sequence_gives_no_text_and_log_probs_carry_their_offsets():
    events = []
    answer = Answer(Job(prompt=[1], max_tokens=9, logprobs=1, emit=events.append), Letters())
    assert answer.token(ord("h"), None, (104, -0.1, [(104, -0.1)]), 0) is None
    assert answer.token(ord("i"), None, (105, -0.2, [(105, -0.2)]), 0) is None
    assert answer.token(0, "stop", None, 0) == "stop"
    assert events[0] == ("text", "h", [(104, -0.1, [(104, -0.1)], 0)])
    assert events[1] == ("text", "i", [(105, -0.2, [(105, -0.2)], 1)])
    assert events[2][:2] == ("done", "stop") and events[2][2]["completion_tokens"] == 3
