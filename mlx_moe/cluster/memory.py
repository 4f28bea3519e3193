"""How much memory a host has for the weights, and memory sizes as people
write them."""

import os
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx


def parse_bytes(text: str) -> float:
    """'512G', '192GB', '1.5T', '96' (GB) -> GB."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 512G or 192GB")
    scale = {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3, "": 1.0}[m.group(2).upper()]
    return float(m.group(1)) * scale


def available_bytes() -> Optional[int]:
    """Memory this host can give the weights: $MLX_MOE_MEMORY_LIMIT (e.g.
    "96G"), else Metal's recommended working set, else Linux's MemAvailable."""
    limit = os.environ.get("MLX_MOE_MEMORY_LIMIT")
    if limit:
        return int(parse_bytes(limit) * 1e9)
    working_set = mx.device_info().get("max_recommended_working_set_size")
    if working_set:
        return int(working_set)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
