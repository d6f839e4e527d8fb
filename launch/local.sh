#!/usr/bin/env bash
# Run one minitron command as N local processes joined by jax.distributed on 127.0.0.1 (CPU test of
# multi-host code paths; each process gets DEVICES fake CPU devices).
#   launch/local.sh N DEVICES distill key=value ...      e.g. launch/local.sh 2 4 distill teacher=... mesh=[2,2,2]
set -euo pipefail
n=${1:?number of processes}; devices=${2:?fake CPU devices per process}; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
port=${MINITRON_PORT:-$($py -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  MINITRON_COORDINATOR=127.0.0.1:$port MINITRON_NUM_PROCESSES=$n MINITRON_PROCESS_ID=$i JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "$py" -m minitron_jax "$@" > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
