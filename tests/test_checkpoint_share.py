"""Each rank reads and downloads only its share of a checkpoint in the
original Hugging Face layout (one tensor per expert, stacked by mlx-lm's
sanitize): which files it fetches, what it reads, against the
single-process model."""

import json
import re
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.utils import load_model

import oracle
from conftest import launch
from mlx_moe import loader
from mlx_moe.checkpoints.checkpoint import Checkpoint, read_header
from mlx_moe.parallel.plan import plan as make_plan
from mlx_moe.parallel.simulate import LocalGroup
from mlx_moe.checkpoints.synthetic import main as synth_main
from mlx_moe.checkpoints.synthetic import synthesize
from workers.fake_hub import FakeHub

IO = Path("/proc/self/io")
EXPERT = re.compile(r"\.experts\.(\d+)\.")
MAX_TOKENS = 16
# Read beyond the tensors: config, index, safetensors headers, tokenizer files.
SLACK = 512 * 1024


@pytest.fixture(scope="module")
def qwen(checkpoint):
    return checkpoint("qwen3_moe", hidden=128, layout="hf")


@pytest.fixture(scope="module")
def mixtral(checkpoint):
    return checkpoint("mixtral", hidden=128, layout="hf")


def rchar():
    return int(next(l for l in IO.read_text().splitlines() if l.startswith("rchar:")).split()[1])


def tensor_bytes(path):
    """{name: bytes} of every tensor in the checkpoint's files."""
    return {k: m["data_offsets"][1] - m["data_offsets"][0]
            for k, (_, _, m) in Checkpoint(path).tensors.items()}


def share_bytes(path, experts):
    """Bytes of the tensors a rank holding `experts` (every layer) needs."""
    return sum(n for k, n in tensor_bytes(path).items()
               if not EXPERT.search(k) or int(EXPERT.search(k).group(1)) in experts)


def weight_map(path):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def plan_for(path, size, rank, placement=None):
    model, _ = load_model(path, lazy=True)
    return model, make_plan(model, LocalGroup(size, rank), "expert", placement=placement)


def test_hf_layout_is_what_sanitize_stacks(qwen, mixtral, checkpoint):
    """One tensor per expert under the family's own names, over an index
    and several files; mlx-lm loads it as exactly the stacked checkpoint."""
    for path, arch, proj in [(qwen, "qwen3_moe", "mlp.experts.{}.gate_proj"),
                             (mixtral, "mixtral", "block_sparse_moe.experts.{}.w1")]:
        names = weight_map(path)
        assert not any("switch_mlp" in k for k in names)
        for e in range(8):
            assert f"model.layers.3.{proj.format(e)}.weight" in names
        files = sorted(set(names.values()))
        assert len(files) == 5 and files == sorted(p.name for p in path.glob("model*.safetensors"))
        # Experts 0-1, 2-3, ... in files 2-5: different ranks' experts in different files.
        assert {names[f"model.layers.0.{proj.format(e)}.weight"] for e in (0, 1)} == {files[1]}
        assert names[f"model.layers.0.{proj.format(7)}.weight"] == files[4]
        for k, (_, _, m) in Checkpoint(path).tensors.items():
            assert m["dtype"] == "F32", k
        stacked = checkpoint(arch, hidden=128)
        ids = mx.array([[1, 5, 9, 33, 100, 7]])
        want = load(str(stacked))[0](ids)
        assert mx.array_equal(load(str(path))[0](ids), want)


def test_hf_layout_options(tmp_path, capsys):
    with pytest.raises(ValueError, match="float32"):
        synthesize(tmp_path / "q", layout="hf", quantize=4)
    with pytest.raises(ValueError, match="does not stack"):
        synthesize(tmp_path / "g", "granitemoe", layout="hf")  # its experts come stacked
    out = tmp_path / "cli"
    assert synth_main(["--layers", "1", "--experts", "4", "--layout", "hf", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in weight_map(out)
    assert json.loads((out / "synthetic.json").read_text())["layout"] == "hf"


def test_trace_names_each_rows_tensor(mixtral):
    model, p = plan_for(mixtral, 2, 0)
    prefixes = tuple(f"{l.path}.switch_mlp." for l in p.moe_layers)
    stacks = Checkpoint(mixtral).trace_stacks(model.sanitize, prefixes)
    assert len(stacks) == 4 * 3
    for n, w in [("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")]:
        assert stacks[f"model.layers.2.block_sparse_moe.switch_mlp.{n}.weight"] == [
            f"model.layers.2.block_sparse_moe.experts.{e}.{w}.weight" for e in range(8)]
    # Rows read from their own tensors, in any order, equal the stacked rows.
    ckpt = Checkpoint(mixtral)
    ckpt.trace_stacks(model.sanitize, prefixes)
    key = "model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"
    like = dict(tree_flatten(model.parameters()))[key]
    rows = [6, 1, 2]
    assert mx.array_equal(ckpt.read_rows(key, like, rows), like[mx.array(rows)])
    assert ckpt.bytes_read == 3 * like[0].nbytes


def test_trace_skips_what_sanitize_changes(qwen):
    """A stack that sanitize casts is not traced: its rows are not the
    files' tensors. A sanitize that fails on markers raises."""
    model, p = plan_for(qwen, 2, 0)
    prefixes = tuple(f"{l.path}.switch_mlp." for l in p.moe_layers)
    cast = lambda w: {k: v.astype(mx.bfloat16) if "switch_mlp" in k else v
                      for k, v in model.sanitize(w).items()}
    assert Checkpoint(qwen).trace_stacks(cast, prefixes) == {}

    def reshaping(w):
        return {k: v.reshape(2, -1) if "experts" in k else v for k, v in w.items()}

    with pytest.raises(ValueError):
        Checkpoint(qwen).trace_stacks(reshaping, prefixes)


@pytest.mark.parametrize("size,placement", [(2, None), (3, None), (2, [[0, 1, 6, 7], [2, 3, 4, 5]])])
def test_files_for_skips_other_ranks_experts(qwen, size, placement):
    names = weight_map(qwen)
    layers = {f"model.layers.{l}.mlp": placement for l in range(4)} if placement else None
    chosen = []
    for rank in range(size):
        model, p = plan_for(qwen, size, rank, layers)
        mine = set(p.moe_layers[0].experts_of(rank))
        want = sorted({f for k, f in names.items() if not EXPERT.search(k)
                       or int(EXPERT.search(k).group(1)) in mine})
        got = loader.files_for(qwen, p, model)
        assert got == want and len(got) < 5, (rank, got)
        chosen.append(got)
    assert set().union(*chosen) == set(names.values())  # together the ranks have everything


def test_files_for_keeps_stacked_and_pipeline_choices(qwen, checkpoint):
    # Stacked experts: every file holds every rank's rows.
    stacked = checkpoint("qwen3_moe", hidden=128)
    model, p = plan_for(stacked, 2, 1)
    assert loader.files_for(stacked, p, model) == sorted(set(weight_map(stacked).values()))
    # A pipeline stage: the files with its layers, here all of them.
    model, _ = load_model(qwen, lazy=True)
    stage = make_plan(model, LocalGroup(2, 1), "pipeline")
    assert loader.files_for(qwen, stage, model) == sorted(set(weight_map(qwen).values()))


def test_hub_download_fetches_only_the_ranks_files(qwen, tmp_path, monkeypatch):
    """The real hub path against a local stand-in: metadata first, the
    headers (not the weights), then only this rank's files."""
    hub = FakeHub(qwen, tmp_path / "snapshot")
    for name, fn in hub.patches():
        monkeypatch.setattr(huggingface_hub, name, fn)
    path = loader._download("owner/model", None, loader.METADATA_PATTERNS)
    assert not list(path.glob("*.safetensors"))
    skeleton, _ = load_model(path, lazy=True, strict=False)
    p = make_plan(skeleton, LocalGroup(2, 1), "expert")
    known = loader.read_hub("owner/model").tensors
    files = loader.files_for(path, p, skeleton, known)
    assert files == loader.files_for(qwen, *reversed(plan_for(qwen, 2, 1)))
    loader._download("owner/model", None, files)
    assert hub.requests == [loader.METADATA_PATTERNS, files]
    assert sorted(f.name for f in path.glob("*.safetensors")) == files
    # What was not downloaded stands in lazily; reading it fails loudly.
    ckpt = Checkpoint(path, known)
    absent = ckpt.stand_ins()
    assert absent and all(EXPERT.search(k) and int(EXPERT.search(k).group(1)) < 4 for k in absent)
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        ckpt.read_rows("model.layers.0.mlp.experts.0.up_proj.weight", next(iter(absent.values())), [0])


def test_lazy_load_reads_only_headers(qwen):
    """mlx-lm's load_model(lazy=True) reads the safetensors headers, not the
    tensors: mx.load is lazy, and so is sanitize's mx.stack."""
    if not IO.exists():
        pytest.skip("no /proc/self/io to count bytes read on this OS")
    load_model(qwen, lazy=True)  # imports and caches outside the count
    weights = sum(tensor_bytes(qwen).values())
    before = rchar()
    model, _ = load_model(qwen, lazy=True)
    headers = sum(read_header(f)[0] for f in qwen.glob("model*.safetensors"))
    assert rchar() - before < headers + 64 * 1024 < weights / 20
    before = rchar()
    mx.eval(model.model.layers[0].mlp.switch_mlp.up_proj.weight)  # the stack reads all 8 experts
    assert rchar() - before >= 8 * 128 * 128 * 4


def test_ranks_read_only_their_experts(qwen, mixtral, tmp_path):
    """Two real ranks: each reads (and holds) the replicated tensors and its
    own experts' tensors, no one else's, and computes the single-process
    logits and text. The last run fetches from a (stand-in) hub."""
    rng = np.random.RandomState(0)
    inputs = [[int(rng.randint(400))], rng.randint(0, 400, 40).tolist()]
    runs = [{"checkpoint": str(p), "inputs": inputs, "prompt": oracle.chat_prompt(p),
             "max_tokens": MAX_TOKENS} for p in (qwen, mixtral, qwen)]
    runs[2]["hub_repo"] = "owner/qwen3-moe-hf"
    outs = launch("share_worker", {"runs": runs}, 2, tmp_path)
    for i, run in enumerate(runs):
        path = Path(run["checkpoint"])
        want = [oracle.last_logits(path, ids) for ids in inputs]
        text = oracle.greedy_text(path, run["prompt"], MAX_TOKENS)
        whole = sum(tensor_bytes(path).values())
        largest = max(tensor_bytes(path).values())
        for rank, out in enumerate(outs):
            r = out[i]
            for got, ref in zip(r["logits"], want):
                assert oracle.max_diff(got, ref) <= 1e-4, (i, rank)
            assert r["text"] == text and text.strip()
            experts = set(r["experts"][0])
            assert all(set(e) == experts for e in r["experts"]) and len(experts) == 4
            total = r["param_bytes"]["total"]
            assert total == share_bytes(path, experts)
            # The full stacks never materialize: at most one tensor's read buffer on top.
            assert r["peak_load_bytes"] <= total + largest, (i, rank, r["peak_load_bytes"], total)
            if "hub_repo" in run:
                mine = {f for k, f in weight_map(path).items()
                        if not EXPERT.search(k) or int(EXPERT.search(k).group(1)) in experts}
                assert r["downloads"] == [loader.METADATA_PATTERNS, sorted(mine)]
                continue  # the stand-in hub's copying is read too
            if r["read_bytes"] is None:
                assert not IO.exists()
                continue  # no /proc/self/io on this OS: bytes read are not counted
            share = share_bytes(path, experts)
            assert share <= r["read_bytes"] <= share + SLACK, (i, rank, r["read_bytes"], share)
            assert r["read_bytes"] < 0.7 * whole
