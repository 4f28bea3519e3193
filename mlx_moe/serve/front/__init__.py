"""The front process of `mlx-moe serve` (process.py): HTTP, templates,
tokenizing, tool and reasoning parsing, metrics and the status page. It
talks to rank 0's engine only through ..channel."""
