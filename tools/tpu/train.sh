#!/usr/bin/env bash
# Run the joint trainer on all workers of the slice. Every worker runs the same command;
# jax.distributed.initialize() auto-detects the TPU slice, each process reads its own slice of the
# data, and only process 0 writes metrics and the HF export.
#
#   PROJECT=my-proj ZONE=us-west4-a TPU_NAME=gemma-mtp WORKDIR=gs://my-bucket/runs/e4b \
#     bash tools/tpu/train.sh --config=configs/e4b.py [--config.train.freeze_base=True ...]
#
# WORKDIR may be a GCS path: orbax writes checkpoints there directly. The run resumes from the
# latest checkpoint in WORKDIR automatically, so after a preemption (spot/queued resources) just run
# this script again with the same WORKDIR.
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${TPU_NAME:?}" "${WORKDIR:?set WORKDIR (gs://bucket/path works)}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
  --command="cd gemma_mtp_jax && HF_TOKEN=${HF_TOKEN:-} python3 -m gemma_mtp_jax.train \
    --workdir=$WORKDIR --config.mesh.initialize_distributed=True $args 2>&1 | tee -a train_\$(hostname).log"
