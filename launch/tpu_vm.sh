#!/usr/bin/env bash
# Cloud TPU VM slice: every worker runs the same command; JAX finds the slice by itself
# (coordinator_address=auto calls jax.distributed.initialize() with no arguments).
# Not run by this project's CI (no TPU here). Assumes the repo is checked out at ~/minitron-jax on all workers.
#   launch/tpu_vm.sh TPU_NAME ZONE configs/llama31_8b_to_4b_width_tpu.yaml [key=value ...]
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/minitron-jax && (test -d .venv || (python3.11 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2')) && .venv/bin/minitron distill $* coordinator_address=auto"
