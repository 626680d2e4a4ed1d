"""Test-session setup shared by every test module.

JAX reads JAX_PLATFORMS when it is first imported, so it is set here, before any test module imports
jax: the suite runs on the CPU unless the caller chose a platform (a GPU/TPU run sets it explicitly).
Parity tests compare float32 results against PyTorch/HF; XLA's default matmul precision on
accelerators is bf16-pass, so "highest" is forced for the whole session. XLA_FLAGS are left alone.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after JAX_PLATFORMS is set)

jax.config.update("jax_default_matmul_precision", "highest")
