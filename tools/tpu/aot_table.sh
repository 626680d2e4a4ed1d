#!/usr/bin/env bash
# Compiles the trainer's step for every preset on its target TPU slice (no TPU needed) and prints
# one JSON plan per line: the README's AOT table. Needs the `tpu` extra. About 5 min per row on a
# 2-core machine (e4b_image: about 30 min each); pass row names (e2b e4b e4b_image 12b 12b_v5e
# 26b_a4b 31b) to run a subset. Each row compiles twice: joint and drafter-only (freeze_base), or
# for e4b_image (one 280-soft-token image per row) the joint step with the tower frozen and trained.
set -euo pipefail
cd "$(dirname "$0")/../.."
export JAX_PLATFORMS=cpu
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(e2b e4b e4b_image 12b 12b_v5e 26b_a4b 31b)
for row in "${rows[@]}"; do
  case "$row" in
    e2b)     args=(--config=configs/e2b.py --topology=v5e-8 --config.train.batch_size=8) ;;
    e4b)     args=(--config=configs/e4b.py --topology=v5e-16 --config.train.batch_size=16) ;;
    e4b_image) args=(--config=configs/e4b.py --topology=v5e-16 --config.train.batch_size=16
                     --images_per_row=1 --image_soft_tokens=280) ;;
    12b)     args=(--config=configs/12b.py --topology=v5p-32 --config.train.batch_size=32) ;;
    12b_v5e) args=(--config=configs/12b.py --topology=v5e-64 --config.train.batch_size=32
                   --config.mesh.axes.fsdp=32 --config.mesh.axes.tensor=2) ;;
    26b_a4b) args=(--config=configs/26b_a4b.py --topology=v5p-32 --config.train.batch_size=32) ;;
    31b)     args=(--config=configs/31b.py --topology=v5p-64 --config.train.batch_size=32) ;;
    *) echo "unknown row $row (e2b e4b e4b_image 12b 12b_v5e 26b_a4b 31b)" >&2; exit 2 ;;
  esac
  toggle=freeze_base
  [ "$row" = e4b_image ] && toggle=freeze_vision
  for freeze in False True; do
    python -m gemma_mtp_jax.aot "${args[@]}" --config.train.seq_len=4096 \
        --config.model.scan_layers=True --config.train.$toggle=$freeze --json 2>/dev/null \
      | tail -n 1 || true
  done
done
