"""Load test: many concurrent streaming clients against a running
`mlx-moe serve`; prints latency percentiles and checks every answer.

    python tools/load_test.py --url http://127.0.0.1:8000 --model MODEL --clients 32 --requests 4
"""

import argparse
import json
import sys
import threading
import time

import openai


def _stream(client, model, prompt, max_tokens):
    t0 = time.perf_counter()
    first, text = None, ""
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            text += chunk.choices[0].text
    end = time.perf_counter()
    return text, (first or end) - t0, end - t0


def run(url, model, clients=32, requests=4, max_tokens=8, timeout=600):
    """Every client sends `requests` streamed completions one after the
    other. Returns {prompt: [texts]}, the latencies and time to first token."""
    answers, latencies, ttfts, errors = {}, [], [], []
    lock = threading.Lock()

    def client_loop(c):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
        for r in range(requests):
            prompt = f"Client {c} asks question {r} about the river"
            try:
                text, ttft, latency = _stream(client, model, prompt, max_tokens)
            except Exception as e:  # recorded, so a lost request is visible
                with lock:
                    errors.append(f"{prompt}: {e}")
                continue
            with lock:
                answers.setdefault(prompt, []).append(text)
                latencies.append(latency)
                ttfts.append(ttft)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return {"answers": answers, "latencies": latencies, "ttfts": ttfts, "errors": errors,
            "wall": time.perf_counter() - t0}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    r = run(args.url, args.model, args.clients, args.requests, args.max_tokens)
    done = len(r["latencies"])
    summary = {
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "completed": done, "errors": len(r["errors"]), "wall_s": r["wall"],
        "latency_p50_s": percentile(r["latencies"], 50), "latency_p99_s": percentile(r["latencies"], 99),
        "ttft_p50_s": percentile(r["ttfts"], 50), "ttft_p99_s": percentile(r["ttfts"], 99),
        "requests_per_s": done / r["wall"],
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if not r["errors"] and done == args.clients * args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
