"""`mlx-moe plan` and its cost model, on config-only checkpoints: published
configs with header-only safetensors (no weights), and small synthesized
checkpoints whose sharded bytes are checked against the strategies' own
apply."""

import itertools
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm.utils import load_model

from mlx_moe.planner import batchmodel
from mlx_moe.planner.batchmodel import DP_SLOTS, batch_estimates, distinct_experts, expected_max_of
from mlx_moe.parallel.comm import max_message_bytes
from mlx_moe.planner.costmodel import expected_max, make_report
from mlx_moe.planner.model import Model
from mlx_moe.planner.profiles import load_profiles, make_hosts
from mlx_moe.checkpoints.checkpoint import weight_files
from mlx_moe.checkpoints.headers import Tensor, header_only_checkpoint, read_local, write_header_only
from mlx_moe.loader import param_bytes
from mlx_moe.parallel.simulate import shard_in_process

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
CHIPS, LINKS = load_profiles()


def published(name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    config.pop("_source")
    return config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Full-size published shapes, header-only: a few KB on disk each."""
    root = tmp_path_factory.mktemp("header-only")
    out = {}
    for key, name, bits in [("qwen3", "qwen3-235b-a22b", 8), ("dsv3", "deepseek-v3", 4),
                            ("llama", "llama-3.1-70b", None)]:
        path = header_only_checkpoint(root / key, published(name), bits)
        assert sum(f.stat().st_size for f in path.iterdir()) < 2_000_000
        out[key] = Model.read(read_local(path))
    return out


def report(model, hosts="2", chip=None, memory=None, link="tb5-rdma", context=32768, position=0):
    return make_report(model, make_hosts(hosts, chip, memory, None, CHIPS), LINKS[link], context, position)


def by_strategy(r):
    return {e.strategy: e for e in r.estimates}


def test_checkpoint_sizes_match_the_published_conversions(models):
    # mlx-community's 8-bit Qwen3-235B-A22B is ~250 GB, 4-bit DeepSeek-V3 ~378 GB, bf16 Llama 3.1 70B ~141 GB.
    assert models["qwen3"].info.total_bytes == pytest.approx(250e9, rel=0.02)
    assert models["dsv3"].info.total_bytes == pytest.approx(378e9, rel=0.02)
    assert models["llama"].info.total_bytes == pytest.approx(141e9, rel=0.02)
    # KV per token: Qwen3 94 layers x 2 x 4 heads x 128 x 2 bytes; DeepSeek's MLA caches 512 + 64 per layer.
    assert sum(kv.per_token for kv in models["qwen3"].kv) == 94 * 2 * 4 * 128 * 2
    assert sum(kv.per_token for kv in models["dsv3"].kv) == 61 * (512 + 64) * 2


@pytest.mark.parametrize("indexed", [True, False])
def test_a_consolidated_file_beside_the_shards_is_not_counted(tmp_path, indexed):
    """Mistral's repos hold model-*.safetensors and a consolidated.safetensors
    of the same weights under other names; mlx-lm loads only the former."""
    shape = (64, 64)
    tensors = {f"model.layers.{i}.mlp.weight": Tensor("BF16", shape) for i in range(4)}
    path = write_header_only(tmp_path / "ckpt", {"model_type": "llama"}, tensors, max_file_bytes=2 * 64 * 64 * 2)
    other = write_header_only(tmp_path / "other", {}, {f"layers.{i}.w": Tensor("BF16", shape) for i in range(4)})
    (other / "model.safetensors").rename(path / "consolidated.safetensors")
    if not indexed:
        (path / "model.safetensors.index.json").unlink()
    assert weight_files(path) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert read_local(path).total_bytes == sum(t.nbytes for t in tensors.values())


def test_strategy_choice(models):
    assert report(models["qwen3"]).auto == "expert"
    assert report(models["dsv3"], "4").auto == "expert"
    r = report(models["llama"])
    assert r.auto == "pipeline" and "no MoE block" in r.reason
    assert not by_strategy(r)["expert"].runs
    assert report(models["qwen3"], "1").auto == "single"


def test_expert_ranges_follow_memory(models):
    r = report(models["dsv3"], "mac1,mac2", "m3-ultra,m4-max", "512G,128G")
    e = by_strategy(r)["expert"]
    assert r.expert_weights and r.expert_weights[0] > r.expert_weights[1]
    assert e.weights[0] > 3 * e.weights[1] and all(e.fits)


def test_fits_and_does_not_fit(models):
    assert all(by_strategy(report(models["qwen3"], "2", memory="512G"))["expert"].fits)
    small = by_strategy(report(models["qwen3"], "2", memory="128G"))
    assert not any(small["expert"].fits) and not any(small["single"].fits)
    assert all(small["pipeline"].weights[i] > small["pipeline"].usable[i] for i in range(2))
    # 4-bit DeepSeek-V3 (378 GB) just fits one 512 GB Mac at 75%, not a 256 GB one.
    assert all(by_strategy(report(models["dsv3"], "1", memory="512G"))["single"].fits)
    assert not any(by_strategy(report(models["dsv3"], "1", memory="256G"))["single"].fits)
    # bf16 Llama 3.1 70B: 2 x 64 GB is too small, 2 x 128 GB holds it in two stages.
    assert not all(by_strategy(report(models["llama"], "2", "m4-pro", "64G"))["pipeline"].fits)
    assert all(by_strategy(report(models["llama"], "2", "m4-max", "128G"))["pipeline"].fits)
    # A longer context needs more KV cache on every host.
    short, long = (by_strategy(report(models["qwen3"], context=c))["expert"] for c in (4096, 32768))
    assert long.kv[0] == pytest.approx(8 * short.kv[0])


@pytest.mark.parametrize("key", ["qwen3", "dsv3", "llama"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_bytes_per_host_sum_to_the_checkpoint(models, key, n):
    m = models[key]
    inv = m.inv
    assert inv.total + inv.dropped == m.info.total_bytes
    est = by_strategy(report(m, str(n)))
    whole = sum(l.tp_whole for l in inv.layers) + inv.embed + inv.other
    assert sum(est["tensor"].weights) == pytest.approx(inv.total + (n - 1) * whole)
    assert sum(est["pipeline"].weights) == pytest.approx(inv.total + (n - 1) * (inv.embed + inv.other))
    if est["expert"].runs:
        assert sum(est["expert"].weights) == pytest.approx(inv.total + (n - 1) * inv.replicated)


def test_predictions_move_the_right_way(models):
    for key in ("qwen3", "dsv3", "llama"):
        speeds = {link: by_strategy(report(models[key], "4", link=link)) for link in ("ethernet", "tb-ip", "tb5-rdma")}
        for strategy in ("expert", "tensor", "pipeline"):
            tok_s = [speeds[link][strategy].tok_s for link in ("ethernet", "tb-ip", "tb5-rdma")]
            assert tok_s == sorted(tok_s), (key, strategy, tok_s)
        slow, fast = (by_strategy(report(models[key], "2", chip)) for chip in ("m4-pro", "m3-ultra"))
        assert all(fast[s].tok_s > slow[s].tok_s for s in ("tensor", "pipeline", "single"))
        near, far = (by_strategy(report(models[key], "2", position=p)) for p in (0, 30000))
        assert all(far[s].tok_s < near[s].tok_s for s in ("tensor", "pipeline", "single"))
    # Over TCP expert parallel's one collective per layer beats tensor parallel's two.
    tcp = by_strategy(report(models["qwen3"], "2", link="tb-ip"))
    assert tcp["expert"].collectives * 2 == tcp["tensor"].collectives == 188
    assert tcp["expert"].tok_s > tcp["tensor"].tok_s


def test_expected_max_is_exact():
    counts, k = [3, 3, 2], 3
    experts = [h for h, n in enumerate(counts) for _ in range(n)]
    draws = list(itertools.combinations(range(len(experts)), k))
    brute = sum(max(sum(experts[e] == h for e in d) * (h + 1) for h in range(3)) for d in draws) / len(draws)
    assert expected_max(counts, k, lambda h, x: x * (h + 1)) == pytest.approx(brute)
    assert expected_max([8], 3, lambda h, x: x) == 3
    # 2 hosts x 64 experts, top-8: the busier host holds ~5.1 of a token's 8 experts.
    assert 5.0 < expected_max([64, 64], 8, lambda h, x: x) < 5.3


def _rank_bytes(path, n, strategy):
    """Parameter bytes each of n ranks holds after the strategy's own apply
    (what load_sharded reports as param_bytes["total"])."""
    model, _ = load_model(Path(path))
    return [param_bytes(m) for m, _ in shard_in_process(model, n, strategy=strategy)]


@pytest.mark.parametrize("arch,kw,n,strategy", [
    ("qwen3_moe", dict(experts=8, top_k=2), 2, "expert"),
    ("qwen3_moe", dict(experts=10, top_k=3, quantize=4), 3, "expert"),
    ("deepseek_v3", dict(experts=8, top_k=2), 2, "expert"),
    ("llama", dict(), 2, "pipeline"),
])
def test_plan_bytes_match_the_loaded_shards(checkpoint, arch, kw, n, strategy):
    path = checkpoint(arch, **kw)
    r = report(Model.read(read_local(path)), str(n))
    assert r.auto == strategy
    predicted = by_strategy(r)[strategy].weights
    for got, want in zip(predicted, _rank_bytes(path, n, strategy)):
        assert got == pytest.approx(want, rel=0.02), (predicted, want)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_moe.cli", "plan", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli(models, tmp_path):
    path = models["qwen3"].info.source
    out = _cli("--model", path, "--hosts", "mac1,mac2", "--link", "tb5-rdma", "--memory", "512G")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "strategy (auto): expert" in text
    assert "experts 0-63" in text and "experts 64-127" in text
    for row in ("expert parallel *", "tensor parallel (mlx-lm)", "pipeline", "single (mac1)"):
        assert row in text
    small = _cli("--model", path, "--hosts", "2", "--memory", "96G", "--json")
    data = json.loads(small.stdout)
    assert data["strategy"] == "expert" and not any(e["fits"] for e in data["estimates"])
    expert = data["estimates"][0]
    assert sum(expert["weights_bytes"]) == pytest.approx(data["loaded_bytes"] + models["qwen3"].inv.replicated)
    bad = _cli("--model", path, "--chip", "m9-ultra")
    assert bad.returncode == 2 and "m3-ultra" in bad.stderr and "m9-ultra" in bad.stderr
    bad = _cli("--model", path, "--link", "pigeon")
    assert bad.returncode == 2 and "tb5-rdma" in bad.stderr
    (tmp_path / "empty").mkdir()
    bad = _cli("--model", str(tmp_path / "empty"))
    assert bad.returncode == 2 and "no config.json" in bad.stderr


# ------------------------------------------------ batches (--concurrency)


def batch(r, *requests):
    return {(e.strategy, e.requests): e for e in batch_estimates(r, requests)}


def test_distinct_experts_is_the_expected_union():
    experts, k, tokens = 6, 2, 3
    picks = list(itertools.combinations(range(experts), k))
    unions = [len(set().union(*d)) for d in itertools.product(picks, repeat=tokens)]
    assert distinct_experts(experts, k, tokens) == pytest.approx(sum(unions) / len(unions))
    assert distinct_experts(128, 8, 1) == 8
    assert 127.9 < distinct_experts(128, 8, 1000) <= 128


def test_expected_max_of_is_costmodels_between_whole_draws():
    rng = random.Random(0)
    for _ in range(50):
        counts = [rng.randint(1, 10) for _ in range(rng.randint(2, 4))]
        table = [[rng.random() for _ in range(c + 1)] for c in counts]
        cost = lambda h, x: table[h][x]
        k = rng.randint(1, sum(counts) - 1)
        exact = expected_max(counts, k, cost)
        assert expected_max_of(counts, k, cost) == pytest.approx(exact, rel=1e-12)
        upper = expected_max(counts, k + 1, cost)
        assert expected_max_of(counts, k + 0.25, cost) == pytest.approx(exact + 0.25 * (upper - exact), rel=1e-12)


@pytest.mark.parametrize("key", ["qwen3", "dsv3", "llama"])
@pytest.mark.parametrize("n", [2, 4])
def test_one_request_is_the_single_stream_prediction(models, key, n):
    cases = [("tb5-rdma", None, 0), ("tb-ip", None, 30000), ("loopback-ring", "cpu-here-shared", 500)]
    for link, chip, position in cases:
        r = report(models[key], str(n), chip, link=link, position=position)
        rows = batch(r, 1)
        for e in r.estimates:
            b = rows[e.strategy, 1]
            assert b.runs == e.runs and b.weights == e.weights and b.kv == pytest.approx(e.kv)
            if e.runs:
                for got, want in [(b.tok_s, e.tok_s), (b.memory_s, e.memory_s), (b.overhead_s, e.overhead_s),
                                  (b.comm_s, e.comm_s)]:
                    assert got == pytest.approx(want, rel=1e-9), (e.strategy, link)
                assert b.collectives == e.collectives
        replicated, dp = rows["expert", 1], rows["expert-dp", 1]
        if replicated.runs:
            # One request under data-parallel attention: an all_gather more per MoE layer, and the slots.
            assert dp.collectives == 2 * replicated.collectives + DP_SLOTS
            assert dp.tok_s < replicated.tok_s


@pytest.mark.parametrize("n", [2, 3, 4])
def test_kv_cache_per_host(models, n):
    r = report(models["qwen3"], str(n))
    one = by_strategy(r)
    for b in (1, 5, 8, 32):
        rows = batch(r, b)
        dp, replicated = rows["expert-dp", b], rows["expert", b]
        assert replicated.kv == pytest.approx([b * one["expert"].kv[0]] * n)
        assert max(dp.kv) == pytest.approx(math.ceil(b / n) / b * max(replicated.kv))
        assert sum(dp.kv) == pytest.approx(b * one["expert"].kv[0])  # each request's cache on one host
        for s in ("tensor", "pipeline", "single"):
            assert rows[s, b].kv == pytest.approx([b * x for x in one[s].kv])
    # Qwen3 8-bit on two 512 GB Macs: 48 requests of 32k tokens fit only with the cache split.
    rows = batch(report(models["qwen3"], "2", memory="512G"), 48)
    assert all(rows["expert-dp", 48].fits) and not any(rows["expert", 48].fits)


@pytest.mark.parametrize("key", ["qwen3", "dsv3"])
def test_aggregate_rises_with_requests_on_macs(models, key):
    requests = [1, 2, 4, 8, 16, 32]
    for n, link, position in itertools.product((2, 4), ("tb5-rdma", "tb-ip"), (0, 8192)):
        rows = batch(report(models[key], str(n), link=link, position=position), *requests)
        for s in ("expert-dp", "expert", "tensor", "pipeline", "single"):
            tok_s = [rows[s, b].tok_s for b in requests]
            assert tok_s == sorted(tok_s), (s, n, link, position, tok_s)
            # Weights are read once per step: 32 requests at least twice one's tokens.
            assert tok_s[-1] > 2 * tok_s[0], (s, tok_s)
            per_request = [rows[s, b].stream_tok_s for b in requests]
            assert per_request == sorted(per_request, reverse=True)
        if link == "tb5-rdma":  # over TCP its second collective per layer costs more than it saves
            # Split attention: data-parallel overtakes replicated by 32 requests.
            assert rows["expert-dp", 32].tok_s > rows["expert", 32].tok_s


def test_a_cpu_gains_little_from_a_batch(models):
    """The CPU profiles' bandwidth is a quantized matmul's throughput, which
    grows with every token (as the next test measures): a batch saves only
    the fixed per-op cost. docs/BENCHMARKS.md saw the same in serving."""
    for n, chip in (("1", "cpu-here"), ("2", "cpu-here-shared")):
        rows = batch(report(models["qwen3"], n, chip, link="loopback-ring"), 1, 16)
        for s in {s for s, _ in rows}:
            if rows[s, 1].runs:
                assert rows[s, 1].tok_s < rows[s, 16].tok_s < 1.5 * rows[s, 1].tok_s, s


def test_this_cpu_is_compute_bound_in_a_batch():
    import time

    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("measures the CPU backend")
    w, s, b = mx.quantize(mx.random.normal((1024, 2048)), group_size=32, bits=4)
    timed = {}
    for m in (1, 8):
        x = mx.random.normal((m, 2048))
        mx.eval(x, w, s, b)
        runs = []
        for _ in range(7):
            t = time.perf_counter()
            mx.eval(mx.quantized_matmul(x, w, s, b, group_size=32, bits=4))
            runs.append(time.perf_counter() - t)
        timed[m] = min(runs)
    assert timed[8] > 3 * timed[1], timed  # a GPU's would be about the same


def test_collectives_split_at_the_message_bound():
    link, bound = LINKS["tb-ip"], max_message_bytes()
    assert batchmodel.all_sum_s(link, 2, bound) == link.all_sum_s(2, bound)
    # Twice the bound: two messages, each paying the ring's latency.
    assert batchmodel.all_sum_s(link, 2, 2 * bound) == pytest.approx(
        link.all_sum_s(2, 2 * bound) + link.latency_us * 1e-6)
    # sum_scatter's message holds every host's block.
    mesh = LINKS["tb5-rdma"]
    assert batchmodel.sum_scatter_s(mesh, 4, bound / 4) == pytest.approx(mesh.send_s(bound / 4))
    assert batchmodel.sum_scatter_s(mesh, 4, bound / 2) == pytest.approx(2 * mesh.send_s(bound / 4))


def test_batch_model_constants_follow_the_code_and_profiles():
    source = (Path(batchmodel.__file__).parents[1] / "parallel" / "expert.py").read_text()
    assert re.search(r"GATHER_MIN_TOKENS = 1 if mx.default_device\(\) == mx.cpu else (\d+)", source).group(1) \
        == str(batchmodel.GPU_GATHER_MIN_TOKENS)
    assert {c.name for c in CHIPS.values() if c.gpu} <= set(batchmodel.MATMUL_TFLOPS)


def test_cli_concurrency(checkpoint):
    path = str(checkpoint("qwen3_moe", experts=8, top_k=2))
    plain = _cli("--model", path, "--hosts", "2", "--json")
    out = _cli("--model", path, "--hosts", "2", "--concurrency", "8", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    rows = {row["strategy"]: row for row in data.pop("batch")}
    assert data == json.loads(plain.stdout)  # the rest is the report without --concurrency
    assert set(rows) == {"expert-dp", "expert", "tensor", "pipeline", "single"}
    assert all(row["concurrency"] == 8 and row["runs"] and row["tok_s"] > 0 for row in rows.values())
    assert rows["expert-dp"]["kv_bytes"] == pytest.approx([x / 2 for x in rows["expert"]["kv_bytes"]])
    assert rows["expert-dp"]["collectives_per_step"] == 2 * rows["expert"]["collectives_per_step"] + DP_SLOTS
    text = _cli("--model", path, "--hosts", "2", "--concurrency", "1,8").stdout
    assert "concurrent requests" in text and "expert, data-parallel attn" in text
    assert "concurrent requests" not in _cli("--model", path, "--hosts", "2").stdout
    bad = _cli("--model", path, "--concurrency", "0")
    assert bad.returncode == 2 and "--concurrency" in bad.stderr
