#!/usr/bin/env bash
# Cloud TPU VM slice: every worker runs the same `minitron` command as one job; JAX finds the slice by itself
# (MINITRON_COORDINATOR=auto: jax.distributed.initialize() with no arguments). By default the whole pipeline,
# `minitron run`; MINITRON_CMD=distill (score, prune, eval, tokenize, teacher-logits, ...) runs one subcommand.
# `out` must be storage every worker shares: a gs://bucket/prefix (read and written directly: checkpoints, scores,
# students, metrics) or a mount such as Filestore; a local path is checked before any weights load and the run
# stops on every worker if one cannot read what worker 0 wrote. teacher= and data= may be gs:// too.
# Not run by this project's CI (no TPU here). Assumes the repo is checked out at ~/minitron-jax on all workers.
#   launch/tpu_vm.sh TPU_NAME ZONE configs/pipeline_llama31_8b_width_tpu.yaml out=gs://BUCKET/runs/width [key=value ...]
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
cmd=${MINITRON_CMD:-run}
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/minitron-jax && (test -d .venv || (python3.11 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2')) && MINITRON_COORDINATOR=auto .venv/bin/minitron $cmd $*"
