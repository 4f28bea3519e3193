"""The prefix (prompt) cache: the KV caches of finished sequences, kept so
a new request whose prompt starts with their tokens prefills only the rest
(a chat's follow-up turn reads only its new message). No cache crosses the
network.

Two LRUs (mlx-lm's LRUPromptCache) per rank, each bounded by half the bytes:
- `shared`, the caches of sequences every rank ran (replicated attention):
  every rank keeps, evicts and finds the same ones, because every rank
  applies the same plan and the caches have the same size everywhere; a
  replicated request reads only from it, so every rank prefills the same
  tokens;
- `own`, the caches of the sequences this rank was home to (data-parallel
  attention); rank 0 sends a chat's next turn to the rank that holds its
  earlier turn (serve/homes.py). A request living here reads from either,
  whichever holds more of its prompt (reading leaves an LRU unchanged).
Rank 0 reports what was reused as `cached_tokens`.
"""

from typing import List, Optional, Tuple

from mlx_lm.models.cache import LRUPromptCache

MAX_ENTRIES = 64
_MODEL = "model"  # the LRU's key space: one model per server


class PrefixCache:
    def __init__(self, max_bytes: int):
        make = lambda: LRUPromptCache(max_size=MAX_ENTRIES, max_bytes=max_bytes // 2) if max_bytes > 0 else None
        self.shared, self.own = make(), make()

    @property
    def enabled(self) -> bool:
        return self.shared is not None

    @property
    def nbytes(self) -> int:
        return self.shared.nbytes + self.own.nbytes if self.enabled else 0

    def take(self, prompt: List[int], replicated: bool = True) -> Tuple[Optional[list], List[int], int]:
        """(a cache to start from or None, the tokens still to prefill, how
        many prompt tokens the cache holds). The last prompt token is always
        prefilled: the first sample needs its logits."""
        if not self.enabled or len(prompt) < 2:
            return None, prompt, 0
        found = [lru.fetch_nearest_cache(_MODEL, prompt[:-1])
                 for lru in ([self.shared] if replicated else [self.shared, self.own])]
        cache, rest = min(found, key=lambda f: len(f[1]))
        cached = len(prompt) - 1 - len(rest)
        return (cache if cached else None), rest + prompt[-1:], cached

    def keep(self, tokens: List[int], cache: Optional[list], replicated: bool = True) -> None:
        """Keep a sequence's cache (it holds `tokens`) for later prompts."""
        if self.enabled and cache and tokens:
            (self.shared if replicated else self.own).insert_cache(_MODEL, list(tokens), cache)
