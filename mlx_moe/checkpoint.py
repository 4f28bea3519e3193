"""Reading rows of a stacked tensor straight from safetensors files.

Experts are stacked on axis 0, so one rank's experts are one contiguous byte
range of the file (a few, under a placement): reading just those ranges
means a rank never holds the whole tensor, not even for a moment.
"""

import json
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

# safetensors dtype -> (numpy dtype to read the bytes as, mlx dtype to view them as)
SAFETENSORS_DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "F64": (np.float64, None),
    "I64": (np.int64, mx.int64),
    "I32": (np.int32, mx.int32),
    "I16": (np.int16, mx.int16),
    "I8": (np.int8, mx.int8),
    "U64": (np.uint64, mx.uint64),
    "U32": (np.uint32, mx.uint32),
    "U16": (np.uint16, mx.uint16),
    "U8": (np.uint8, mx.uint8),
    "BOOL": (np.bool_, mx.bool_),
}


def read_header(file: Path) -> Tuple[int, Dict[str, dict]]:
    """(offset of the data section, {name: {dtype, shape, data_offsets}})."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class Checkpoint:
    """The tensors of a checkpoint directory, located by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("model*.safetensors"))
        self.tensors: Dict[str, Tuple[Path, int, dict]] = {}
        for name in files:
            start, header = read_header(self.path / name)
            for key, meta in header.items():
                self.tensors[key] = (self.path / name, start, meta)
        self.bytes_read = 0

    def read_rows(self, key: str, like: mx.array, rows: List[int]) -> Optional[mx.array]:
        """Rows `rows` of tensor `key` (one read per run of consecutive rows),
        or None when the file's tensor is not the one the model holds under
        that name (sanitize changed it)."""
        if key not in self.tensors:
            return None
        file, start, meta = self.tensors[key]
        np_dtype, mx_dtype = SAFETENSORS_DTYPES.get(meta["dtype"], (None, None))
        if mx_dtype != like.dtype or tuple(meta["shape"]) != tuple(like.shape):
            return None
        row = int(np.prod(meta["shape"][1:], dtype=np.int64))
        itemsize = np.dtype(np_dtype).itemsize
        pieces = []
        for lo, hi in _runs(rows):
            offset = start + meta["data_offsets"][0] + lo * row * itemsize
            pieces.append(np.fromfile(file, dtype=np_dtype, count=(hi - lo) * row, offset=offset))
        data = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        self.bytes_read += data.nbytes
        out = mx.array(data).reshape(len(rows), *meta["shape"][1:])
        if meta["dtype"] == "BF16":
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
