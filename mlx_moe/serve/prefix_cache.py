"""The prefix (prompt) cache, the same on every rank.

A finished sequence's KV cache is kept in mlx-lm's LRUPromptCache, keyed
by its tokens; a new request whose prompt starts with kept tokens starts
from a copy of that cache and prefills only the rest (a chat's follow-up
turn reads only its new message). Every rank holds its own copy, and no
cache crosses the network: every rank applies the same plan, so it keeps
and evicts the same sequences (their caches have the same size
everywhere, attention being replicated) and finds the same prefix for the
same prompt. Rank 0 reports what it reused as `cached_tokens`.
"""

from typing import List, Optional, Tuple

from mlx_lm.models.cache import LRUPromptCache

MAX_ENTRIES = 64
_MODEL = "model"  # the LRU's key space: one model per server


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.lru = LRUPromptCache(max_size=MAX_ENTRIES, max_bytes=max_bytes) if max_bytes > 0 else None

    @property
    def nbytes(self) -> int:
        return self.lru.nbytes if self.lru else 0

    def take(self, prompt: List[int]) -> Tuple[Optional[list], List[int], int]:
        """(a cache to start from or None, the tokens still to prefill, how
        many prompt tokens the cache holds). The last prompt token is always
        prefilled: the first sample needs its logits."""
        if self.lru is None or len(prompt) < 2:
            return None, prompt, 0
        cache, rest = self.lru.fetch_nearest_cache(_MODEL, prompt[:-1])
        cached = len(prompt) - 1 - len(rest)
        return (cache if cached else None), rest + prompt[-1:], cached

    def keep(self, tokens: List[int], cache: Optional[list]) -> None:
        """Keep a sequence's cache (it holds `tokens`) for later prompts."""
        if self.lru is not None and cache and tokens:
            self.lru.insert_cache(_MODEL, list(tokens), cache)
