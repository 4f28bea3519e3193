"""Imported at start by a rank whose PYTHONPATH a test points here: its
local experts raise, as a Metal out-of-memory error on that rank alone
would, once the file $FAULT_TRIGGER exists."""

import os

_trigger = os.environ.get("FAULT_TRIGGER")
if _trigger:
    from mlx_moe.parallel.expert import LocalExperts

    _compute = LocalExperts.__call__

    def _failing(self, x, indices):
        if os.path.exists(_trigger):
            raise RuntimeError("[metal::malloc] Attempting to allocate 137438953472 bytes which is greater "
                               "than the maximum allowed buffer size (injected by the test)")
        return _compute(self, x, indices)

    LocalExperts.__call__ = _failing
