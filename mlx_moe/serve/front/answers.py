"""Each running answer's text, on the front: rank 0 sends a token id (and
its log-probs) per step; here it becomes text through mlx-lm's streaming
detokenizer, stop strings are found, and the usage is counted. The engine
ranks never see text."""

import time
from typing import List, Optional


class StopMatcher:
    """Holds back text that may be the start of a stop string, and finds
    the first complete one (`hit`)."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit: Optional[str] = None

    def feed(self, text: str):
        """(text safe to emit now, whether a stop string was reached)."""
        self.pending += text
        hits = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            at, self.hit = min(hits, key=lambda hit: hit[0])
            out, self.pending = self.pending[:at], ""
            return out, True
        keep = max((len(s) - 1 for s in self.stops), default=0)
        # Keep the longest tail that is a prefix of some stop string.
        cut = len(self.pending)
        for k in range(min(keep, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                cut = len(self.pending) - k
                break
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Answer:
    """One job's answer as its tokens arrive; its events go to `job.emit`
    as app.py reads them: ("text", str) per piece (with log-probs: ("text",
    str, [(token, logprob, top, offset of its text)...])), then ("done",
    finish_reason, usage); usage names the stop string that ended it
    ("stop_sequence", as Anthropic's API reports it)."""

    def __init__(self, job, detokenizer):
        self.job, self.detokenizer, self.stops = job, detokenizer, StopMatcher(job.stop)
        self.tokens = 0
        self.first = 0.0  # when its first token came
        self.logprobs = None if job.logprobs is None else []  # entries whose text is not sent yet

    def token(self, token: int, finish: Optional[str], logprobs, cached: int) -> Optional[str]:
        """One generated token, `finish` if the engine ended the answer with
        it ("stop": end-of-sequence or a stop token id, which give no text;
        "length"). The answer's finish reason once it has ended, here or by
        a stop string (the engine must then be told to drop it), else None."""
        self.tokens += 1
        if self.tokens == 1:
            self.first = time.perf_counter()
        detok = self.detokenizer
        if finish != "stop":
            if self.logprobs is not None and logprobs is not None:
                self.logprobs.append((*logprobs, len(detok.text)))
            detok.add_token(token)
        if finish:
            detok.finalize()
        text, stopped = self.stops.feed(detok.last_segment)
        self._send(text)
        if not (stopped or finish):
            return None
        self._send(self.stops.flush(), last=True)
        finish = "stop" if stopped else finish
        job, n, elapsed = self.job, self.tokens, time.perf_counter() - self.first
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": n,
                 "total_tokens": len(job.prompt) + n, "cached_tokens": cached,
                 # mlx-lm's rate: from the first token on.
                 "generation_tps": n / elapsed if elapsed > 0 else 0.0}
        if stopped:
            usage["stop_sequence"] = self.stops.hit
        job.emit(("done", finish, usage))
        return finish

    def _send(self, text: str, last: bool = False) -> None:
        """A piece of text to the client, with the log-probs of its tokens
        (held back with the text; the `last` piece takes any left)."""
        if self.logprobs is None:
            if text:
                self.job.emit(("text", text))
        elif text or (last and self.logprobs):
            self.job.emit(("text", text, self.logprobs))
            self.logprobs = []
