#!/usr/bin/env bash
# Install gemma_mtp_jax with the `tpu` extra on every worker of the slice.
#
#   PROJECT=my-proj ZONE=us-west4-a TPU_NAME=gemma-mtp REPO=https://github.com/you/gemma_mtp_jax \
#     bash tools/tpu/setup_workers.sh
set -euo pipefail
: "${PROJECT:?}" "${ZONE:?}" "${TPU_NAME:?}" "${REPO:?set REPO to this project's git URL}"
REF=${REF:-main}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
  --command="set -e; python3 -m pip install -U pip; \
    if [ -d gemma_mtp_jax ]; then git -C gemma_mtp_jax fetch -q && git -C gemma_mtp_jax checkout -q $REF && git -C gemma_mtp_jax pull -q; \
    else git clone -q -b $REF $REPO gemma_mtp_jax; fi; \
    cd gemma_mtp_jax && python3 -m pip install -q -e '.[tpu]' && python3 -c 'import jax; print(jax.process_index(), jax.device_count())'"
