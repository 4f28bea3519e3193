#!/usr/bin/env bash
# Used as mlx.launch's --python in tests: rank 1 gets the checkpoint in
# $OTHER_CHECKPOINT instead of the one on the command line, as if one host
# held different (or missing) files.
args=("$@")
if [ "${MLX_RANK:-0}" = "1" ]; then
  for i in "${!args[@]}"; do
    if [ "${args[$i]}" = "--model" ]; then args[$((i + 1))]="$OTHER_CHECKPOINT"; fi
  done
fi
exec "$REAL_PYTHON" "${args[@]}"
