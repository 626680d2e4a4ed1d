"""JAX pair dir / train workdir -> HF dirs OUT_DIR/base/ + OUT_DIR/drafter/; same flags as
`python -m gemma_mtp_jax.convert jax-to-hf` (this script only forwards to it).

  python tools/convert/jax_to_hf.py --checkpoint JAX_DIR_OR_TRAIN_WORKDIR [--step N] --out OUT_DIR
"""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from gemma_mtp_jax import cli  # noqa: E402
from gemma_mtp_jax.convert import main  # noqa: E402

if __name__ == "__main__":
  cli.exit_with(main, ["jax-to-hf", *sys.argv[1:]])
