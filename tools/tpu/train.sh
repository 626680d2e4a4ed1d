#!/usr/bin/env bash
# Run the joint trainer on all workers of the slice. Every worker runs the same command;
# jax.distributed.initialize() auto-detects the TPU slice, each process reads its own rows of every
# global batch, and only process 0 writes metrics, plots and the HF export.
#
#   PROJECT=my-proj ZONE=us-west4-a TPU_NAME=gemma-mtp CKPT=gs://my-bucket/runs/e4b/checkpoints \
#     bash tools/tpu/train.sh --config=configs/e4b.py [--config.train.freeze_base=True ...]
#
# CKPT (orbax writes GCS paths directly) holds the checkpoints; WORKDIR (default runs/<name> on each
# worker's disk) holds metrics, plots and the HF export of process 0. The run resumes from the
# latest checkpoint in CKPT, so after a preemption (spot / queued resources, even on a new VM) run
# this script again with the same CKPT.
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${TPU_NAME:?}" "${CKPT:?set CKPT to a gs:// checkpoint directory}"
WORKDIR=${WORKDIR:-}
args=$(printf ' %q' "$@")
workdir_flag=${WORKDIR:+--workdir=$WORKDIR}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
  --command="cd gemma_mtp_jax && HF_TOKEN=${HF_TOKEN:-} python3 -m gemma_mtp_jax.train \
    $workdir_flag --config.train.checkpoint_dir=$CKPT --config.mesh.initialize_distributed=True \
    $args 2>&1 | tee -a train_\$(hostname).log"
