#!/usr/bin/env bash
# The GPU check of docs/clusters.md "GPU check": one table, about 5-8 minutes on one H100.
#   experiments/gpu_check.sh           # on a GPU machine
#   experiments/gpu_check.sh --smoke   # tiny shapes, to check the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# XLA's own GPU flags that help bf16 training throughput; harmless elsewhere.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec timeout 900 "$PY" -m experiments.gpu_check "$@"
