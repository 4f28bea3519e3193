import hashlib
import json
from pathlib import Path

import pytest

from mlx_moe.cluster.launch import run_ranks
from mlx_moe.checkpoints.synthetic import synthesize
from mlx_moe.parallel import attention

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def checkpoint(ckpt_dir):
    """synthesize into a session cache: the same arguments give the same directory."""

    def make(arch="qwen3_moe", **kw):
        key = json.dumps(kw, sort_keys=True)
        name = f"{arch}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        return synthesize(ckpt_dir / name, arch, **kw)

    return make


def attention_gathers(tokens: int) -> int:
    """The all_gathers a replicated forward of `tokens` tokens on several
    ranks adds per layer by splitting an attention with q, k, v and o
    projections: 4 for their rows, 1 for the heads, by mlx_moe.parallel.attention's
    thresholds on this device (the CPU: from 16 tokens; a GPU: only the
    heads, from 4096)."""
    rows = 4 if attention.MIN_ROWS is not None and tokens >= attention.MIN_ROWS else 0
    return rows + (1 if tokens >= max(attention.MIN_QUERIES, attention.MIN_KEYS) else 0)


def launch(worker: str, spec: dict, n: int, tmp_path: Path, timeout: float = 600):
    """Run tests/workers/<worker>.py on n local ranks; return each rank's JSON."""
    spec = dict(spec, out=str(tmp_path))
    proc = run_ranks([str(WORKERS / f"{worker}.py"), json.dumps(spec)], n=n, timeout=timeout)
    assert proc.returncode == 0, f"ranks failed ({proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    outs = []
    for r in range(n):
        f = tmp_path / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no result\n{proc.stdout}\n{proc.stderr}"
        outs.append(json.loads(f.read_text()))
    return outs
