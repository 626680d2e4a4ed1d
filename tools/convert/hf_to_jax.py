"""HF safetensors (base + assistant) -> JAX pair dir; same flags as `python -m gemma_mtp_jax.convert
hf-to-jax` (this script only forwards to it).

  python tools/convert/hf_to_jax.py --base HF_DIR_OR_REPO [--drafter HF_DIR_OR_REPO] --out JAX_DIR
"""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from gemma_mtp_jax import cli  # noqa: E402
from gemma_mtp_jax.convert import main  # noqa: E402

if __name__ == "__main__":
  cli.exit_with(main, ["hf-to-jax", *sys.argv[1:]])
