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


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
  """Drops every compiled program after each test module.

  Each XLA:CPU executable maps its code into the process; a session that kept every one it ever
  compiled (jax's jit caches, the decoder's and the trainer's program caches) grows by thousands of
  memory mappings per module and ends at the kernel's per-process limit (vm.max_map_count, 65530),
  where the next compile crashes. No test relies on a compile made by another module.
  """
  yield
  from gemma_mtp_jax.decoding import speculative
  from gemma_mtp_jax.training import step
  speculative._EXECUTABLES.clear()
  for cached in (step.init_fn, step._plain_init, step._programs):
    cached.cache_clear()
  jax.clear_caches()
