"""Imported at start by every rank when a test points PYTHONPATH here: a
rank that has read some of its expert rows reads no more until the file
$LOAD_GATE exists, so the test sees the cluster mid-load for as long as it
needs, then lets it finish."""

import os
import time

_gate = os.environ.get("LOAD_GATE")
if _gate and "MLX_RANK" in os.environ:
    from mlx_moe.checkpoints.checkpoint import Checkpoint

    _read_rows = Checkpoint.read_rows

    def _gated(self, *args, **kw):
        while self.bytes_read and not os.path.exists(_gate):
            time.sleep(0.05)
        return _read_rows(self, *args, **kw)

    Checkpoint.read_rows = _gated
