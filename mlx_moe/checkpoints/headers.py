"""What a checkpoint holds, without its weights: config.json and every
tensor's name, dtype and shape from the safetensors headers.

A local directory is read directly (each file's 8-byte header length and
JSON header); a Hugging Face repo id fetches config.json and the
safetensors headers only (HTTP range requests), never the weights.
`write_header_only` writes the reverse: a checkpoint directory whose
safetensors files hold headers and no data, for planning models whose
weights are far too big to have here.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .checkpoint import INDEX, SAFETENSORS_DTYPES, local_checkpoint, read_header, weight_files

_FLOATS = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = SAFETENSORS_DTYPES[self.dtype].loaded_bytes if self.dtype in SAFETENSORS_DTYPES else 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class CheckpointInfo:
    source: str  # the directory or repo id it was read from
    config: dict
    tensors: Dict[str, Tensor]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def activation_dtype(self) -> str:
        """The float dtype the model computes in: that of its unquantized
        weights (or of its quantization scales); bfloat16 if none."""
        counts: Dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in _FLOATS:
                counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else "BF16"


def _tensors(header: dict) -> Dict[str, Tensor]:
    return {k: Tensor(m["dtype"], tuple(m["shape"])) for k, m in header.items() if k != "__metadata__"}


def read_local(path) -> CheckpointInfo:
    path = Path(path).expanduser()
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a model checkpoint directory")
    files = weight_files(path)
    if not files:
        raise FileNotFoundError(f"{path} has no safetensors files (or index) to read tensor shapes from")
    tensors: Dict[str, Tensor] = {}
    for name in files:
        tensors.update(_tensors(read_header(path / name)[1]))
    return CheckpointInfo(str(path), json.loads(config_file.read_text()), tensors)


def read_hub(repo_id: str, revision: Optional[str] = None) -> CheckpointInfo:
    """config.json and the safetensors headers of a hub repo: the headers
    come by HTTP range requests, so nothing near the weights' size moves."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as e:
        raise FileNotFoundError(
            f"Could not read {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass a local directory with config.json and the safetensors files (or their headers).") from e
    tensors: Dict[str, Tensor] = {}
    for file in meta.files_metadata.values():
        tensors.update({k: Tensor(t.dtype, tuple(t.shape)) for k, t in file.tensors.items()})
    return CheckpointInfo(repo_id, config, tensors)


def read_checkpoint(model: str, revision: Optional[str] = None) -> CheckpointInfo:
    """A local directory if `model` names one, else a hub repo id."""
    path = local_checkpoint(model)
    return read_local(path) if path else read_hub(model, revision)


def safetensors_dtype(mx_dtype) -> str:
    return next(name for name, d in SAFETENSORS_DTYPES.items() if d.mlx is not None and d.mlx == mx_dtype)


def write_header_only(path, config: dict, tensors: Dict[str, Tensor], max_file_bytes: int = 5 << 30) -> Path:
    """A checkpoint directory whose safetensors files hold valid headers
    (names, dtypes, shapes, offsets) and no data, split into files and
    indexed the way mlx-lm saves checkpoints. Only header readers can use it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: List[Dict[str, Tensor]] = []
    size = 0
    for name, t in tensors.items():
        if not shards or size + t.nbytes > max_file_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        file = pattern.format(i + 1, len(shards))
        header, offset = {"__metadata__": {"format": "header-only"}}, 0
        for name, t in shard.items():
            header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        (path / file).write_bytes(struct.pack("<Q", len(raw)) + raw)
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values()), "header_only": True},
             "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX).write_text(json.dumps(index, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def header_only_checkpoint(path, config: dict, bits: Optional[int] = None, group_size: int = 64,
                           dtype: str = "BF16") -> Path:
    """The header-only checkpoint mlx-lm's converter would write for
    `config` (quantized to `bits` the way `mlx_lm.convert -q` does), from a
    lazily built model: shapes and dtypes only, no weights, small on disk."""
    import contextlib
    import sys

    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if bits:
        # quantize_model prints a bits-per-weight line; keep stdout clean.
        with contextlib.redirect_stdout(sys.stderr):
            model, config = quantize_model(model, config, group_size, bits)
    tensors = {}
    for name, p in tree_flatten(model.parameters()):
        kind = safetensors_dtype(p.dtype)
        tensors[name] = Tensor(dtype if kind in _FLOATS else kind, tuple(p.shape))
    return write_header_only(path, config, tensors)
