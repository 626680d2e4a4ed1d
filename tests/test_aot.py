"""The AOT plan compiles the real joint train step for a TPU topology on this CPU machine."""

import importlib.util

import pytest

from gemma_mtp_jax import aot


def test_aot_plan_tiny_on_v5e_topology():
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("the AOT path needs the `tpu` extra: pip install -e '.[tpu]' (libtpu)")
  r = aot.plan("tiny", "v5e-4", batch=4, seq=32, mesh_axes={"fsdp": 2, "tensor": 2})
  assert r.mesh == {"fsdp": 2, "tensor": 2}
  assert r.fits and 0 < r.total_gib < 1
  assert r.argument_gib > 0 and r.temp_gib > 0
  assert r.compiled_flops_per_chip > 0
  # XLA's count per chip is of the same order as the model FLOPs split over 4 chips (it also
  # counts attention masks, softmax, remat recompute and the optimizer).
  ratio = r.compiled_flops_per_chip * 4 / r.model_flops_per_step
  assert 0.3 < ratio < 10, ratio


def test_unknown_topology_names_the_flag():
  with pytest.raises(ValueError, match="--topology 'v5e-17'"):
    aot.topology_devices("v5e-17")
