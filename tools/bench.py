"""Benchmark: expert parallel vs mlx-lm tensor and pipeline parallel vs one
process (the same as `mlx-moe bench`; --help for options)."""

import sys

from mlx_moe.bench import main

if __name__ == "__main__":
    sys.exit(main())
