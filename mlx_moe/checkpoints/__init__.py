"""Checkpoints on disk and on the hub: reading only a rank's expert rows
(checkpoint.py, hf_layout.py), the tensors' headers without the weights
(headers.py), and small synthesized checkpoints for tests and the demo."""
