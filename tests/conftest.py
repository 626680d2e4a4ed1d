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


# Mappings above which the compiled programs are dropped after a module: a third of the kernel's
# default per-process limit (vm.max_map_count 65530), leaving far more headroom than any one module
# uses (a few thousand).
_MAX_MAPS = 20_000


def _memory_maps() -> int | None:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:  # no procfs (macOS): count unknown
    return None


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
  """Drops every compiled program after a test module once the process holds many.

  Each XLA:CPU executable maps its code into the process; a session that kept every one it ever
  compiled (jax's jit caches, the decoder's and the trainer's program caches) grows by thousands of
  memory mappings per module and ends at the kernel's per-process limit, where the next compile
  crashes (seen: a segfault at 64,401 mappings, 90% through the suite). Dropping them only past
  `_MAX_MAPS` keeps the reuse between neighbouring modules (the same tiny train step, say). No
  test relies on a compile made by another module.
  """
  yield
  maps = _memory_maps()
  if maps is not None and maps < _MAX_MAPS:
    return
  from gemma_mtp_jax.decoding import speculative
  from gemma_mtp_jax.training import step
  speculative.clear_executables()
  step.clear_program_caches()
  jax.clear_caches()
