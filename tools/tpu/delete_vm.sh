#!/usr/bin/env bash
# Delete the slice and its queued resource (checkpoints in a GCS WORKDIR stay).
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${TPU_NAME:?}"
gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" --project="$PROJECT" --zone="$ZONE" \
  --force --quiet
