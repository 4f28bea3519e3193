#!/usr/bin/env bash
# Used as mlx.launch's --python in tests: rank 1 differs from the others as
# if its host did. $OTHER_CHECKPOINT: it loads that checkpoint instead of the
# one on the command line (different or missing files). $RANK1_MEMORY_LIMIT:
# it has only that much memory (MLX_MOE_MEMORY_LIMIT).
args=("$@")
if [ "${MLX_RANK:-0}" = "1" ]; then
  if [ -n "${OTHER_CHECKPOINT:-}" ]; then
    for i in "${!args[@]}"; do
      if [ "${args[$i]}" = "--model" ]; then args[$((i + 1))]="$OTHER_CHECKPOINT"; fi
    done
  fi
  if [ -n "${RANK1_MEMORY_LIMIT:-}" ]; then export MLX_MOE_MEMORY_LIMIT="$RANK1_MEMORY_LIMIT"; fi
fi
exec "$REAL_PYTHON" "${args[@]}"
