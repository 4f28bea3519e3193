#!/usr/bin/env bash
# Used as mlx.launch's --python in tests: rank 1 differs from the others as
# if its host did. $RANK1_REPLACE: "--flag=value ..." words; rank 1 gets
# that value for the flag instead of the command line's (another checkpoint,
# a stale placement file). $RANK1_ENV: VAR=value words exported on rank 1
# only (less memory, another setting, a fault injected on that host alone).
args=("$@")
if [ "${MLX_RANK:-0}" = "1" ]; then
  for replace in ${RANK1_REPLACE:-}; do
    for i in "${!args[@]}"; do
      if [ "${args[$i]}" = "${replace%%=*}" ]; then args[$((i + 1))]="${replace#*=}"; fi
    done
  done
  for setting in ${RANK1_ENV:-}; do export "$setting"; done
fi
exec "$REAL_PYTHON" "${args[@]}"
