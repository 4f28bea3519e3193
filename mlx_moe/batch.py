"""batch_generate for a sharded model: mlx-lm's BatchGenerator run in
lockstep on every rank, as `mlx_lm.batch_generate` runs it in one process.

What a sharded model adds to mlx-lm's loop:
- every rank must pass the same batch: before any model step the ranks
  exchange a digest of their prompts and settings, and a difference fails
  every rank with the rank, the prompt and the field;
- every rank must feed the model the same tokens: rank 0 draws them, each
  prompt with its own seeded key (`sampling.request_sampler`, so a seeded
  prompt gets the same text alone or in any batch), and before each step
  the others take rank 0's, lazily (ranks on different Macs compute
  slightly different floats and would draw apart at a near tie);
- the last step's collectives may still be in flight when the batch ends:
  they are settled before the ranks go on.
"""

from typing import List, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, BatchResponse

from .parallel import comm
from .cluster.consistency import ClusterMismatch, digest, exchange
from .sampling import request_sampler

# mlx-lm's BatchGenerator options that batch_generate passes on (plain
# numbers, so every rank's can be compared).
GENERATOR_OPTIONS = ("completion_batch_size", "prefill_batch_size", "prefill_step_size", "max_kv_size")
SHOWN = 5  # differences named in a mismatch error; the rest are counted


def batch_generate(
    model,
    tokenizer,
    prompts: Sequence[Union[str, List[int]]],
    max_tokens: Union[int, List[int]] = 128,
    *,
    temperature: Union[float, List[float]] = 0.0,
    top_p: Union[float, List[float]] = 1.0,
    top_k: Union[int, List[int]] = 0,
    min_p: Union[float, List[float]] = 0.0,
    seed: Union[None, int, List[Optional[int]]] = None,
    raw: bool = False,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    group: Optional[mx.distributed.Group] = None,
    **kwargs,
) -> BatchResponse:
    """Generate an answer for each prompt, batched; every rank calls it with
    the same arguments, like `mlx_lm.batch_generate`, and every rank gets the
    same `mlx_lm.generate.BatchResponse` (`texts` in prompt order).

    prompts: strings (the chat template is applied unless `raw` or the
    tokenizer has none) or lists of token ids (used as they are).
    max_tokens, temperature, top_p, top_k, min_p, seed: one value for every
    prompt or a list with one per prompt. temperature 0 is greedy. A prompt
    with a seed samples with its own key: the same text alone or in any
    batch, on any number of ranks. seed None: a seed per prompt from rank 0's
    `mx.random` (so `mx.random.seed` makes a run repeatable).
    kwargs: mlx-lm's BatchGenerator options (completion_batch_size,
    prefill_batch_size, prefill_step_size, max_kv_size).
    group: the group the model is sharded over (default mx.distributed.init()).

    Raises ClusterMismatch (a ValueError) on every rank, before any model
    step, when the ranks' prompts or settings differ, and ValueError on
    every rank when one rank's arguments are invalid.

    Example (run on every rank, e.g. `mlx.launch -n 2 script.py`):

        import mlx.core as mx
        import mlx_moe

        model, tokenizer = mlx_moe.load_sharded("mlx-community/Qwen3-30B-A3B-4bit")
        out = mlx_moe.batch_generate(model, tokenizer, ["Hello", "Name a river"],
                                     max_tokens=64, temperature=0.7, seed=1)
        if mx.distributed.init().rank() == 0:
            print(out.texts)
    """
    group = group or mx.distributed.init()
    settings = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, min_p=min_p, seed=seed)
    ids, specs, options = [], [], {}
    try:
        ids, specs, options = _requests(tokenizer, prompts, settings, raw, kwargs)
        mine = {"prompts": [dict(tokens=f"{len(t)} tokens, digest {digest(t)}", **s)
                            for t, s in zip(ids, specs)],
                "options": dict(options, raw=raw)}
    except Exception as e:  # on every rank, not only here: the others would wait for this one
        mine = {"error": f"{type(e).__name__}: {e}"}
    # Seeds for the sampled prompts without one; rank 0's are used.
    unseeded = any(s["seed"] is None and s["temperature"] > 0 for s in specs)
    mine["drawn"] = mx.random.randint(0, 2**31 - 1, (len(specs),)).tolist() if unseeded else []
    statements = exchange(mine, group) if group.size() > 1 else [mine]
    errors = [f"rank {r}: {s['error']}" for r, s in enumerate(statements) if "error" in s]
    if errors:
        raise ValueError("batch_generate cannot run: " + "; ".join(errors))
    found = _differences(statements)
    if found:
        more = f"\n  ... and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        raise ClusterMismatch("batch_generate needs the same arguments on every rank:\n  "
                              + "\n  ".join(found[:SHOWN]) + more)
    for spec, drawn in zip(specs, statements[0]["drawn"]):
        if spec["seed"] is None:
            spec["seed"] = drawn

    # mlx_lm.batch_generate's loop. It is not called itself because it
    # gives the generator one sampler for the whole batch; each prompt here
    # needs its own (BatchGenerator.insert takes one per prompt).
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], **options)
    draws = group.rank() == 0  # the others follow rank 0's tokens (greedy until they do)
    uids = gen.insert(ids, [s["max_tokens"] for s in specs],
                      samplers=[request_sampler(s) if draws else None for s in specs])
    verbose = verbose and group.rank() == 0  # one rank prints
    results = {uid: [] for uid in uids}
    logprobs = {uid: [] for uid in uids}
    caches, finished = {}, 0
    with gen.stats() as stats:
        while True:
            _follow_rank0(gen, group)
            prompts_read, responses = gen.next()
            if not (prompts_read or responses):
                break
            for r in responses:
                if r.finish_reason is not None:
                    if return_prompt_caches:
                        caches[r.uid] = r.prompt_cache
                    finished += 1
                    if verbose:
                        print(f"[batch_generate] Finished processing {finished}/{len(uids)} ...", end="\r")
                if r.finish_reason != "stop":
                    results[r.uid].append(r.token)
                    if return_logprobs:
                        logprobs[r.uid].append(r.logprobs[r.token].item())
    gen.close()
    # mlx-lm queued the step after the last one: settle its collectives
    # before the ranks go on to other work together.
    if group.size() > 1:
        comm.barrier(group)
    if verbose:
        print(f"[batch_generate] Finished processing {finished}/{len(uids)}")
        print(f"[batch_generate] Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
        print(f"[batch_generate] Generation: {stats.generation_tokens} tokens, "
              f"{stats.generation_tps:.3f} tokens-per-sec")
        print(f"[batch_generate] Peak memory: {stats.peak_memory:.3f} GB")
    return BatchResponse(
        [tokenizer.decode(results[uid]) for uid in uids], stats,
        [caches[uid] for uid in uids] if return_prompt_caches else None,
        [results[uid] for uid in uids] if return_token_ids else None,
        [logprobs[uid] for uid in uids] if return_logprobs else None)


def _follow_rank0(gen: BatchGenerator, group) -> None:
    """The running sequences' next inputs become rank 0's draws, inside the
    graph (no wait for them here)."""
    batch = gen._generation_batch  # mlx-lm is pinned below 0.33
    if group.size() > 1 and len(batch) > 0:
        with mx.stream(gen._stream):
            batch._next_tokens = comm.broadcast(batch._next_tokens, 0, group)


def _requests(tokenizer, prompts, settings: dict, raw: bool, kwargs: dict):
    """Each prompt's token ids and settings (Job.spec's fields), and the
    generator's options; TypeError or ValueError for invalid arguments."""
    unknown = sorted(set(kwargs) - set(GENERATOR_OPTIONS))
    if unknown:
        hint = (" (a sampler or logits processor of your own cannot be checked to draw alike on every "
                "rank: use temperature, top_p, top_k, min_p and seed)"
                if {"sampler", "logits_processors"} & set(unknown) else "")
        raise TypeError(f"unexpected argument(s) {', '.join(unknown)}; BatchGenerator options taken: "
                        f"{', '.join(GENERATOR_OPTIONS)}{hint}")
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or token-id lists")
    n = len(prompts)
    columns = {}
    for name, value in settings.items():
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{name} has {len(value)} values for {n} prompts")
            columns[name] = list(value)
        else:
            columns[name] = [value] * n
    cast = dict(max_tokens=int, temperature=float, top_p=float, top_k=int, min_p=float,
                seed=lambda s: None if s is None else int(s) % 2**64)
    specs = [{name: cast[name](columns[name][i]) for name in settings} for i in range(n)]
    ids = [_tokens(tokenizer, p, raw) for p in prompts]
    return ids, specs, {k: int(v) for k, v in kwargs.items() if v is not None}


def _tokens(tokenizer, prompt, raw: bool) -> List[int]:
    """A prompt's token ids, as mlx-lm reads it."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if not raw and tokenizer.chat_template is not None:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                  add_generation_prompt=True))
    # mlx_lm.generate's rule: no second BOS when the text starts with one.
    bos = tokenizer.bos_token
    return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))


def _differences(statements: List[dict]) -> List[str]:
    """Each way a rank's prompts or settings differ from rank 0's."""
    first, out = statements[0], []
    for rank, mine in enumerate(statements[1:], start=1):
        if len(mine["prompts"]) != len(first["prompts"]):
            out.append(f"rank {rank} passed {len(mine['prompts'])} prompts, rank 0 {len(first['prompts'])}")
            continue
        for i, (theirs, ours) in enumerate(zip(mine["prompts"], first["prompts"])):
            out += [f"rank {rank} and rank 0 differ in prompt {i}'s {field}: {theirs[field]!r} vs {ours[field]!r}"
                    for field in ours if theirs[field] != ours[field]]
        for field in sorted(set(mine["options"]) | set(first["options"])):
            a, b = mine["options"].get(field), first["options"].get(field)
            if a != b:
                out.append(f"rank {rank} and rank 0 differ in {field}: {a!r} vs {b!r}")
    return out
