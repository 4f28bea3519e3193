"""A checkpoint directory's weight files and their dtypes, and reading only
a rank's experts straight from them.

Experts are stacked on axis 0, so one rank's experts are one contiguous byte
range of the file (a few, under a placement). A checkpoint in the original
Hugging Face layout holds one tensor per expert, which the model's sanitize
stacks: `Checkpoint.trace_stacks` finds which tensor each row came from and
the rank reads only its own experts' tensors. Either way a rank never reads
or holds another rank's experts, not even for a moment.
"""

import json
import re
import struct
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import mlx.core as mx
import numpy as np


class Dtype(NamedTuple):
    numpy: type  # what to read the bytes as
    mlx: Optional[mx.Dtype]  # what to view them as (None: mlx has no such dtype)
    loaded_bytes: int  # per element once mlx-lm has loaded it


# Every safetensors dtype. fp8 loads as 2 bytes: mlx-lm dequantizes fp8
# checkpoints to bfloat16.
SAFETENSORS_DTYPES = {
    "F64": Dtype(np.float64, None, 8),
    "F32": Dtype(np.float32, mx.float32, 4),
    "F16": Dtype(np.float16, mx.float16, 2),
    "BF16": Dtype(np.uint16, mx.bfloat16, 2),
    "F8_E4M3": Dtype(np.uint8, None, 2),
    "F8_E5M2": Dtype(np.uint8, None, 2),
    "I64": Dtype(np.int64, mx.int64, 8),
    "I32": Dtype(np.int32, mx.int32, 4),
    "I16": Dtype(np.int16, mx.int16, 2),
    "I8": Dtype(np.int8, mx.int8, 1),
    "U64": Dtype(np.uint64, mx.uint64, 8),
    "U32": Dtype(np.uint32, mx.uint32, 4),
    "U16": Dtype(np.uint16, mx.uint16, 2),
    "U8": Dtype(np.uint8, mx.uint8, 1),
    "BOOL": Dtype(np.bool_, mx.bool_, 1),
}


def mlx_dtype(name: str) -> Optional[mx.Dtype]:
    """The mlx dtype of safetensors dtype `name`; None if mlx has none."""
    entry = SAFETENSORS_DTYPES.get(name)
    return entry.mlx if entry else None


# What a checkpoint directory's weights are: the files its index names, else
# those mlx-lm's load globs (so a `consolidated.safetensors` beside them is not).
INDEX = "model.safetensors.index.json"
WEIGHTS = "model*.safetensors"
# The decoder layer a tensor's name lies in.
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def local_checkpoint(model_id: str) -> Optional[Path]:
    """The directory `model_id` names, None if it is a hub repo id."""
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not an mlx-lm checkpoint")
        return path
    if model_id.startswith((".", "/", "~")) or model_id.count("/") != 1:
        raise FileNotFoundError(
            f"No checkpoint directory at {model_id!r}, and it is not a Hugging Face repo id (owner/name)."
        )
    return None


def read_header(file: Path) -> Tuple[int, Dict[str, dict]]:
    """(offset of the data section, {name: {dtype, shape, data_offsets}})."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def weight_map(path: Path) -> Dict[str, str]:
    """The index's {tensor: file}; empty without an index."""
    index = Path(path) / INDEX
    return json.loads(index.read_text())["weight_map"] if index.exists() else {}


def weight_files(path: Path) -> List[str]:
    """The checkpoint's weight files (INDEX, WEIGHTS)."""
    return sorted(set(weight_map(path).values())) or sorted(p.name for p in Path(path).glob(WEIGHTS))


class Checkpoint:
    """The tensors of a checkpoint directory, located by name.

    `known` ({name: headers.Tensor}, e.g. from the hub) gives the dtype and
    shape of tensors in files this rank did not download; without it such
    files' tensors are unknown here (a pipeline stage never reads them)."""

    def __init__(self, path: Path, known: Optional[dict] = None):
        self.path = Path(path)
        # name -> (file, start of its data section or None if not on disk, meta)
        self.tensors: Dict[str, Tuple[Path, Optional[int], dict]] = {}
        absent = []
        for name in weight_files(self.path):
            if (self.path / name).exists():
                start, header = read_header(self.path / name)
                for key, meta in header.items():
                    self.tensors[key] = (self.path / name, start, meta)
            else:
                absent.append(name)
        if absent and known is not None:
            files = {name: self.path / name for name in absent}
            for key, name in weight_map(self.path).items():
                if name in files:
                    meta = {"dtype": known[key].dtype, "shape": list(known[key].shape)}
                    self.tensors[key] = (files[name], None, meta)
        # stacked model tensor -> the file tensor of each row (trace_stacks)
        self.stacks: Dict[str, List[str]] = {}
        self.bytes_read = 0

    def stand_ins(self) -> Dict[str, mx.array]:
        """A lazy stand-in for each tensor not on disk, for sanitize to find
        every name it expects; they feed only other ranks' expert rows,
        which are dropped unevaluated."""
        return {k: _zeros(m) for k, (_, start, m) in self.tensors.items() if start is None}

    def trace_stacks(self, sanitize: Callable[[dict], dict],
                     prefixes: Tuple[str, ...]) -> Dict[str, List[str]]:
        """Which file tensor each row of each model tensor under `prefixes`
        (the experts containers) came from, for those `sanitize` builds by
        stacking one tensor per expert. Each per-expert tensor goes through
        sanitize as a marker: shape (1,)*ndim, holding its number. A stack of
        them comes out [E, 1, ...], float32 still, its values naming its
        rows' sources; a cast, a concatenation or arithmetic changes the
        dtype, shape or values, and that tensor is not traced. The other
        tensors go in as lazy zeros of their real shape, never evaluated.
        May raise whatever sanitize raises on markers."""
        keys = list(self.tensors)
        weights = {}
        for i, key in enumerate(keys):
            meta = self.tensors[key][2]
            if per_expert(key):
                weights[key] = mx.full((1,) * len(meta["shape"]), i + 1, dtype=mx.float32)
            else:
                weights[key] = _zeros(meta)
        out = {k: v for k, v in sanitize(weights).items()
               if k.startswith(prefixes) and v.dtype == mx.float32 and v.ndim and v.size == v.shape[0]}
        mx.eval(list(out.values()))
        for key, v in out.items():
            ids = np.array(v).reshape(-1)
            if not np.all((ids == np.round(ids)) & (ids >= 1) & (ids <= len(keys))):
                continue
            sources = [keys[int(i) - 1] for i in ids]
            metas = [self.tensors[s][2] for s in sources]
            if (len(set(sources)) == len(sources)
                    and all(m["dtype"] == metas[0]["dtype"] and m["shape"] == metas[0]["shape"]
                            for m in metas)):
                self.stacks[key] = sources
        return self.stacks

    def read_rows(self, key: str, like: mx.array, rows: List[int]) -> Optional[mx.array]:
        """Rows `rows` of the model's stacked tensor `key`, read from the
        file: from the file's tensor of that name (one read per run of
        consecutive rows), or from each row's own tensor (trace_stacks).
        None when the file holds no such tensor (sanitize changed it)."""
        if key in self.stacks:
            sources = self.stacks[key]
            meta = self.tensors[sources[0]][2]
            if not _matches(like, meta, (len(sources), *meta["shape"])):
                if any(self.tensors[s][1] is None for s in sources):
                    raise RuntimeError(f"{key}: sanitize made it unlike the per-expert tensors it "
                                       "stacks, and some of them were not downloaded")
                return None
            out = np.empty((len(rows), *meta["shape"]), SAFETENSORS_DTYPES[meta["dtype"]].numpy)
            for i, r in enumerate(rows):
                self._read_into(out[i : i + 1], sources[r], 0)
            return _to_mlx(out, meta["dtype"])
        if key not in self.tensors:
            return None
        meta = self.tensors[key][2]
        if not _matches(like, meta, meta["shape"]):
            return None
        out = np.empty((len(rows), *meta["shape"][1:]), SAFETENSORS_DTYPES[meta["dtype"]].numpy)
        row_bytes = out[0].nbytes
        i = 0
        for lo, hi in _runs(rows):
            self._read_into(out[i : i + hi - lo], key, lo * row_bytes)
            i += hi - lo
        return _to_mlx(out, meta["dtype"])

    def _read_into(self, dest: np.ndarray, key: str, skip: int) -> None:
        """Fill `dest` with the bytes of tensor `key` from byte `skip` on."""
        file, start, meta = self.tensors[key]
        if start is None:
            raise FileNotFoundError(f"{file} holds {key} but was not downloaded")
        with open(file, "rb") as f:
            f.seek(start + meta["data_offsets"][0] + skip)
            n = f.readinto(memoryview(dest).cast("B"))
        if n != dest.nbytes:
            raise EOFError(f"{file} ends inside {key}")
        self.bytes_read += n


def per_expert(key: str) -> bool:
    """A name with an index below the layer's, like
    model.layers.3.mlp.experts.17.gate_proj.weight: maybe one expert's."""
    return sum(part.isdigit() for part in key.split(".")) >= 2


def _zeros(meta: dict) -> mx.array:
    return mx.zeros(meta["shape"], dtype=mlx_dtype(meta["dtype"]) or mx.uint8)


def _matches(like: mx.array, meta: dict, shape) -> bool:
    return mlx_dtype(meta["dtype"]) == like.dtype and tuple(shape) == tuple(like.shape)


def _to_mlx(data: np.ndarray, dtype: str) -> mx.array:
    out = mx.array(data)
    if dtype == "BF16":
        out = out.view(mx.bfloat16)
    mx.eval(out)
    return out


def _runs(rows: List[int]) -> List[Tuple[int, int]]:
    """[lo, hi) runs of consecutive rows, in the given order."""
    runs = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [tuple(run) for run in runs]
