"""Predictions for Qwen3-235B-A22B and DeepSeek-V3 on 1, 2 and 4 M3 Ultras
(512 GB each) next to the published exo figures, for docs/PLAN.md.

    python tools/plan_examples.py                  # markdown tables
    python tools/plan_examples.py --fit --write    # refit the Apple chips' op_us first
    python tools/plan_examples.py --batch          # aggregate tok/s at 1, 8, 32 concurrent requests
    python tools/plan_examples.py --batch-here     # this CPU: batched decode steps measured vs predicted

The checkpoints are header-only (no weights): the published config.json
(tests/fixtures/configs) converted the way `mlx_lm.convert -q` would, to
8 and 4 bits (group 64, bfloat16 scales), in a temporary directory.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_moe.planner.batchmodel import batch_estimates  # noqa: E402
from mlx_moe.planner.costmodel import make_report  # noqa: E402
from mlx_moe.planner.model import Model  # noqa: E402
from mlx_moe.planner.profiles import PROFILES_FILE, load_profiles, make_hosts  # noqa: E402
from mlx_moe.checkpoints.headers import header_only_checkpoint, read_local  # noqa: E402

MODELS = [("Qwen3-235B-A22B", "qwen3-235b-a22b"), ("DeepSeek-V3", "deepseek-v3")]
# exo tensor parallel over RDMA on M3 Ultras, decode tok/s on 1 / 2 / 4 nodes, from Jeff Geerling's charts
# (https://www.jeffgeerling.com/blog/2025/15-tb-vram-on-mac-studio-rdma-over-thunderbolt-5, also in
# https://github.com/exo-explore/exo#benchmarks; DeepSeek's are labelled V3.1 there).
EXO = {("Qwen3-235B-A22B", 8): {1: 19.5, 2: 26.2, 4: 31.9}, ("DeepSeek-V3", 8): {1: 21.1, 2: 27.8, 4: 32.5}}
# The one published point the Apple chips' per-op cost is fitted to.
FIT = ("Qwen3-235B-A22B", 8, 19.5)


def read_models(root: Path):
    out = {}
    for name, file in MODELS:
        config = json.loads((ROOT / "tests" / "fixtures" / "configs" / f"{file}.json").read_text())
        config.pop("_source")
        for bits in (8, 4):
            out[name, bits] = Model.read(read_local(header_only_checkpoint(root / f"{file}-{bits}bit", config, bits)))
    return out


def fit_op_us(models, chips) -> float:
    """op_us that makes one M3 Ultra decode FIT's model at FIT's speed."""
    name, bits, tok_s = FIT
    m = models[name, bits]
    single = make_report(m, make_hosts("1", "m3-ultra", "512G", None, chips), None, 4096).estimates[0]
    return (1 / tok_s - single.memory_s) / m.ops * 1e6


def write_op_us(op_us: float) -> None:
    data = json.loads(PROFILES_FILE.read_text())
    for chip in data["chips"].values():
        if chip["gpu"]:
            chip["op_us"] = round(op_us, 3)
    PROFILES_FILE.write_text(json.dumps(data, indent=1) + "\n")


def table(models, chips, links, link: str) -> str:
    lines = ["| model | quant | Macs | GB/Mac (expert) | expert parallel | tensor parallel (mlx-lm) | pipeline | exo TP (published) |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, bits), m in models.items():
        for n in (1, 2, 4):
            r = make_report(m, make_hosts(str(n), "m3-ultra", "512G", None, chips), links[link], 32768)
            est = {e.strategy: e for e in r.estimates}

            def cell(s):
                e = est.get(s)
                if e is None or not e.runs:
                    return "-"
                return f"{e.tok_s:.1f}" + ("" if all(e.fits) else " (does not fit)")

            main = est.get("expert") or est["single"]
            gb = max(w + k for w, k in zip(main.weights, main.kv)) / 1e9
            exo = EXO.get((name, bits), {}).get(n)
            lines.append(f"| {name} | {bits}-bit | {n} | {gb:.0f} | "
                         + (f"{cell('single')} (one Mac)" if n == 1 else cell("expert"))
                         + f" | {cell('tensor') if n > 1 else '-'} | {cell('pipeline') if n > 1 else '-'} | "
                         + (f"{exo}" if exo else "") + " |")
    return "\n".join(lines)


def batch_table(models, chips, links, link: str, positions=(0, 8192), requests=(1, 8, 32)) -> str:
    """Aggregate decode tok/s of every strategy with B concurrent requests
    (one number per decode position, "a / b"), and the KV cache per Mac
    (32k tokens per request) of expert parallel's two attention modes."""
    lines = ["| model | quant | Macs | requests | expert, DP attn | expert, replicated attn | tensor parallel (mlx-lm) "
             "| pipeline | one Mac | KV/Mac DP | KV/Mac replicated |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, bits), m in models.items():
        for n in (2, 4):
            rows = {}
            for position in positions:
                r = make_report(m, make_hosts(str(n), "m3-ultra", "512G", None, chips), links[link], 32768, position)
                rows.update({(e.strategy, e.requests, position): e for e in batch_estimates(r, requests)})
            for b in requests:
                def cell(s):
                    es = [rows[s, b, p] for p in positions]
                    if not es[0].runs:
                        return "-"
                    return " / ".join(f"{e.tok_s:.0f}" for e in es) + ("" if all(es[0].fits) else " (no fit)")

                kv = lambda s: f"{max(rows[s, b, positions[0]].kv) / 1e9:.0f} GB"
                lines.append(f"| {name} | {bits}-bit | {n} | {b} | " + " | ".join(
                    cell(s) for s in ("expert-dp", "expert", "tensor", "pipeline", "single"))
                    + f" | {kv('expert-dp')} | {kv('expert')} |")
    return "\n".join(lines)


def batch_here(requests=(1, 2, 4, 8, 16), prompt=96) -> None:
    """Decode steps of one process on this machine for B sequences at once
    (the benchmark's model, a batched KV cache after a `prompt`-token
    prefill), against the cpu-here profile's prediction."""
    import time

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from mlx_moe.bench import MODEL
    from mlx_moe.checkpoints.synthetic import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        path = synthesize(Path(tmp) / "bench-model", "qwen3_moe", **MODEL)
        model, _ = load_model(path)
        m = Model.read(read_local(path))
        measured = {}
        for b in requests:
            cache = make_prompt_cache(model)
            mx.eval(model(mx.zeros((b, prompt), dtype=mx.int32), cache=cache))
            token = mx.zeros((b, 1), dtype=mx.int32)
            runs = []
            for i in range(13):
                t = time.perf_counter()
                mx.eval(model(token, cache=cache))
                runs.append(time.perf_counter() - t)
            measured[b] = sorted(runs[3:])[5]  # median after 3 warm-up steps
    chips, links = load_profiles()
    r = make_report(m, make_hosts("1", "cpu-here", None, None, chips), links["loopback-ring"], 4096, prompt + 6)
    predicted = {e.requests: e.seconds for e in batch_estimates(r, requests)}
    print("| requests | measured ms/step | predicted | measured tok/s | predicted "
          "| step / one request's, measured | predicted |")
    print("|---|---|---|---|---|---|---|")
    for b in requests:
        print(f"| {b} | {measured[b] * 1e3:.1f} | {predicted[b] * 1e3:.1f} | {b / measured[b]:.1f} | "
              f"{b / predicted[b]:.1f} | {measured[b] / measured[1]:.2f} | {predicted[b] / predicted[1]:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", action="store_true", help=f"fit the Apple chips' op_us to {FIT}")
    p.add_argument("--write", action="store_true", help="with --fit: write it into mlx_moe/planner/profiles.json")
    p.add_argument("--links", default="tb5-rdma,tb-ip")
    p.add_argument("--batch", action="store_true", help="the concurrent-request tables (docs/PLAN.md, Batches)")
    p.add_argument("--decode-at", default="0,8192",
                   help="with --batch: decode positions (each cell: one tok/s per position)")
    p.add_argument("--batch-here", action="store_true", help="measure batched decode on this CPU against cpu-here")
    args = p.parse_args()
    if args.batch_here:
        return batch_here()
    with tempfile.TemporaryDirectory() as tmp:
        models = read_models(Path(tmp))
    chips, links = load_profiles()
    if args.fit:
        op_us = fit_op_us(models, chips)
        print(f"fitted op_us for Apple GPUs: {op_us:.3f} us ({models[FIT[:2]].ops} ops per token)", file=sys.stderr)
        if args.write:
            write_op_us(op_us)
            chips, links = load_profiles()
    if args.batch:
        positions = tuple(int(p) for p in args.decode_at.split(","))
        for link in args.links.split(","):
            print(f"\nAggregate decode tok/s of B concurrent requests at decode positions "
                  f"{' / '.join(map(str, positions))}, 32k tokens of KV cache per request, M3 Ultra 512 GB each, "
                  f"link {link}:\n")
            print(batch_table(models, chips, links, link, positions))
        return
    for link in args.links.split(","):
        print(f"\nDecode tok/s, batch 1, 32k-token KV budget, M3 Ultra 512 GB each, link {link}:\n")
        print(table(models, chips, links, link))
    for (name, bits), m in models.items():
        one = make_report(m, make_hosts("1", "m3-ultra", "512G", None, chips), None, 32768).estimates[0]
        print(f"\n{name} {bits}-bit: {m.info.total_bytes / 1e9:.1f} GB, {m.ops} ops/token, "
              f"one Mac reads {one.memory_s * chips['m3-ultra'].bandwidth_GBps:.1f} GB/token", file=sys.stderr)


if __name__ == "__main__":
    main()
