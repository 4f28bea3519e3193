"""Serving benchmark: OpenAI-compatible servers under 1, 4 and 16 concurrent
streaming clients, then a long first chat turn and its follow-up.

Servers, one at a time on the same synthesized checkpoint, in one run:
mlx-moe serve (expert parallel on --ranks local ranks), mlx-lm's own
single-process server (continuous batching, prompt cache) and mlx-lm's
server on mlx.launch ranks (its distributed mode), where it runs. Columns:
aggregate tok/s (completion tokens of all clients / wall time), time to
first token and inter-token latency, p50/p99.

    python tools/serve_bench.py --json docs/serve-bench.json
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

from mlx_moe.bench import MODEL
from mlx_moe.cluster.launch import free_port, launch_command, stop_group, wait_ready
from mlx_moe.checkpoints.synthetic import synthesize

from load_test import percentile  # tools/ is on the path when run as a script

WORDS = ("river stone light market garden letter winter station music paper engine forest "
         "harbor window village summer mountain doctor kitchen bridge").split()


def prompt_for(client: int, request: int, words: int) -> str:
    """A distinct prompt of about `words` words per (client, request)."""
    picked = [WORDS[(client * 7 + request * 3 + i * i) % len(WORDS)] for i in range(words)]
    return f"Client {client}, question {request}: tell me about " + " ".join(picked)


def servers(path: Path, ranks: int, port: int):
    """name -> the command line that serves `path` on `port`."""
    mlx_lm = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port", str(port),
              "--log-level", "WARNING"]
    mlx_moe = [sys.executable, "-m", "mlx_moe.cli", "serve", "--model", str(path), "--port", str(port),
               "--hosts", ",".join(["127.0.0.1"] * ranks)]
    return {
        f"mlx-moe serve ({ranks} ranks, auto: data-parallel attention when batched)": mlx_moe,
        f"mlx-moe serve ({ranks} ranks, replicated attention)": mlx_moe + ["--attention", "replicated"],
        "mlx-lm server (1 process)": mlx_lm,
        f"mlx-lm server ({ranks} ranks)": launch_command(mlx_lm[1:], hosts=["127.0.0.1"] * ranks),
    }


BIAS = {}  # logit_bias of every request (--no-eos)


def stream_chat(client, model, messages, max_tokens):
    """(completion tokens, time to first token, gaps between tokens, text)."""
    t0 = time.perf_counter()
    stamps, text, tokens = [], "", None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, logit_bias=BIAS or None,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                stamps.append(time.perf_counter())
                text += c.delta.content
    if not stamps:
        return tokens or 0, time.perf_counter() - t0, [], text
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return tokens if tokens is not None else len(stamps), stamps[0] - t0, gaps, text


def load(url, model, clients, requests, max_tokens, words):
    """`clients` threads, each sending `requests` streamed chats in turn."""
    results, errors, lock = [], [], threading.Lock()

    def loop(c):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
        for r in range(requests):
            messages = [{"role": "user", "content": prompt_for(c, r, words)}]
            try:
                out = stream_chat(client, model, messages, max_tokens)
            except Exception as e:  # counted: a lost request must show
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                results.append(out)

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    gaps = [g for r in results for g in r[2]]
    ttfts = [r[1] for r in results]
    return {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "tok_s": sum(r[0] for r in results) / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99),
            "first_error": errors[0] if errors else None}


def conversation(url, model, words, max_tokens):
    """TTFT of a first chat turn of `words` words and of its follow-up."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
    first = [{"role": "user", "content": prompt_for(99, 0, words)}]
    _, ttft1, _, answer = stream_chat(client, model, first, max_tokens)
    follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    _, ttft2, _, _ = stream_chat(client, model, follow, max_tokens)
    return {"first_turn_words": words, "first_turn_ttft_s": ttft1, "follow_up_ttft_s": ttft2,
            "follow_up_ratio": ttft2 / ttft1}


def run_server(name, cmd, port, path, args):
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    log = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    try:
        wait_ready(url, proc, timeout=600)
    except (RuntimeError, TimeoutError) as e:
        stop_group(proc)
        tail = b"".join(log[-20:]).decode(errors="replace")
        return {"server": name, "error": f"{e}: {tail[-1500:]}"}
    try:
        # Warm-up with a prompt no measured request starts with: the prefix
        # cache must not serve the single-stream level a prompt it already read.
        warm = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
        stream_chat(warm, str(path), [{"role": "user", "content": "Warm up."}], 4)
        out = {"server": name, "levels": []}
        for clients in args.clients:
            print(f"  {name}: {clients} client(s) ...", file=sys.stderr, flush=True)
            out["levels"].append(load(url, str(path), clients, args.requests, args.max_tokens, args.words))
        if args.turn_words:
            out["conversation"] = conversation(url, str(path), args.turn_words, args.max_tokens)
        return out
    finally:
        stop_group(proc)


def table(runs) -> str:
    head = f"{'server':<26} {'clients':>7} {'tok/s':>7} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'errors':>6}"
    lines = [head, "-" * len(head)]
    for r in runs:
        if "error" in r:
            lines.append(f"{r['server']:<26} does not run here: {r['error'].splitlines()[0][:80]}")
            continue
        for lv in r["levels"]:
            lines.append(f"{r['server']:<26} {lv['clients']:>7} {lv['tok_s']:>7.1f} {lv['ttft_p50_s']:>8.2f}s "
                         f"{lv['ttft_p99_s']:>6.2f}s {lv['itl_p50_ms']:>6.1f}ms {lv['itl_p99_ms']:>5.0f}ms "
                         f"{lv['errors']:>6}")
        c = r.get("conversation")
        if c:
            lines.append(f"{'':<26} {c['first_turn_words']}-word first turn TTFT {c['first_turn_ttft_s']:.2f}s, "
                         f"follow-up {c['follow_up_ttft_s']:.2f}s ({c['follow_up_ratio']:.2f}x)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--clients", default="1,4,16", help="concurrency levels (default 1,4,16)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default 2)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--words", type=int, default=24, help="words per prompt (default 24)")
    p.add_argument("--turn-words", type=int, default=1200, help="words of the long first chat turn (0: none)")
    p.add_argument("--model", help="a checkpoint directory instead of the synthesized one")
    p.add_argument("--no-eos", action="store_true",
                   help="ban end-of-sequence: every answer is --max-tokens long (random weights end early)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--servers", default=None, help="comma-separated subset of the server names' first word "
                                                   "pairs, e.g. 'mlx-moe serve,mlx-lm server (1'")
    p.add_argument("--json", default="serve-bench.json")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]

    home = Path(os.environ.get("MLX_MOE_HOME", Path.home() / ".cache" / "mlx-moe"))
    spec = dict(MODEL, experts=args.experts, top_k=args.top_k)
    path = Path(args.model) if args.model else synthesize(
        home / f"serve-bench-qwen3-moe-{args.experts}e{args.top_k}k", "qwen3_moe", **spec)
    if args.no_eos:
        from mlx_lm.utils import load_tokenizer

        BIAS.update({str(t): -100 for t in load_tokenizer(path).eos_token_ids})
    port = free_port()
    chosen = servers(path, args.ranks, port)
    if args.servers:
        wanted = [w.strip() for w in args.servers.split(",")]
        chosen = {k: v for k, v in chosen.items() if any(k.startswith(w) for w in wanted)}
    runs = [run_server(name, cmd, port, path, args) for name, cmd in chosen.items()]
    print(table(runs))
    result = {"model": {"arch": "qwen3_moe", **spec, "path": str(path)}, "args": vars(args),
              "machine": {"cpus": os.cpu_count(), "platform": sys.platform}, "runs": runs}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
