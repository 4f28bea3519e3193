"""Serving: the lockstep engine (every rank), the HTTP API (rank 0), and
the rank program that `mlx-moe serve` starts on each host."""
