"""Predictions for Qwen3-235B-A22B and DeepSeek-V3 on 1, 2 and 4 M3 Ultras
(512 GB each) next to the published exo figures, for docs/PLAN.md.

    python tools/plan_examples.py                  # markdown tables
    python tools/plan_examples.py --fit --write    # refit the Apple chips' op_us first

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

from mlx_moe.costmodel import PROFILES_FILE, Model, load_profiles, make_hosts, make_report  # noqa: E402
from mlx_moe.headers import header_only_checkpoint, read_local  # noqa: E402

MODELS = [("Qwen3-235B-A22B", "qwen3-235b-a22b"), ("DeepSeek-V3", "deepseek-v3")]
# exo tensor parallel over RDMA on M3 Ultras, decode tok/s on 1 / 2 / 4 nodes (shared/FIELD_NOTES.md).
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", action="store_true", help=f"fit the Apple chips' op_us to {FIT}")
    p.add_argument("--write", action="store_true", help="with --fit: write it into mlx_moe/profiles.json")
    p.add_argument("--links", default="tb5-rdma,tb-ip")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = read_models(Path(tmp))
    chips, links = load_profiles()
    if args.fit:
        op_us = fit_op_us(models, chips)
        print(f"fitted op_us for Apple GPUs: {op_us:.3f} us ({models[FIT[:2]].ops} ops per token)", file=sys.stderr)
        if args.write:
            write_op_us(op_us)
            chips, links = load_profiles()
    for link in args.links.split(","):
        print(f"\nDecode tok/s, batch 1, 32k-token KV budget, M3 Ultra 512 GB each, link {link}:\n")
        print(table(models, chips, links, link))
    for (name, bits), m in models.items():
        one = make_report(m, make_hosts("1", "m3-ultra", "512G", None, chips), None, 32768).estimates[0]
        print(f"\n{name} {bits}-bit: {m.info.total_bytes / 1e9:.1f} GB, {m.ops} ops/token, "
              f"one Mac reads {one.memory_s * chips['m3-ultra'].bandwidth_GBps:.1f} GB/token", file=sys.stderr)


if __name__ == "__main__":
    main()
