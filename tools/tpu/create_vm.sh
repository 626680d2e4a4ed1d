#!/usr/bin/env bash
# Create a Cloud TPU VM slice for training, as a queued resource (waits for capacity; spot optional).
#
#   PROJECT=my-proj ZONE=us-west4-a TPU_NAME=gemma-mtp ACCELERATOR=v5litepod-16 \
#     bash tools/tpu/create_vm.sh [--spot]
#
# ACCELERATOR is the Cloud TPU type: v5litepod-8 / v5litepod-16 (v5e), v5p-32 / v5p-64, v6e-16 ...
# RUNTIME is the TPU VM software version for that generation (v5e: v2-alpha-tpuv5-lite,
# v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e).
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
extra=()
[[ "${1:-}" == "--spot" ]] && extra+=(--spot)

gcloud compute tpus queued-resources create "${TPU_NAME}-qr" \
  --project="$PROJECT" --zone="$ZONE" \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
  "${extra[@]}"
echo "queued; watch with:"
echo "  gcloud compute tpus queued-resources describe ${TPU_NAME}-qr --project=$PROJECT --zone=$ZONE"
