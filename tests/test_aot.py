"""The AOT plan compiles the trainer's step for a TPU topology on this CPU machine."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from gemma_mtp_jax import aot
from gemma_mtp_jax import presets
from gemma_mtp_jax.data import batch_layout


def _needs_libtpu():
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("the AOT path needs the `tpu` extra: pip install -e '.[tpu]' (libtpu)")


def _tiny(**train):
  cfg = presets.load_config("tiny")
  cfg.train.update(dict(batch_size=4, seq_len=32, **train))
  cfg.mesh.axes.update(dict(fsdp=2, tensor=2))
  return cfg


def test_aot_plan_tiny_on_v5e_topology(monkeypatch):
  _needs_libtpu()
  compiled_batches = []

  def abstract_batch(*args):
    compiled_batches.append(real(*args))
    return compiled_batches[-1]

  real = aot.abstract_batch
  monkeypatch.setattr(aot, "abstract_batch", abstract_batch)
  r = aot.plan(_tiny(), "v5e-4")
  # The compiled step's batch is the training batch's one layout (`data.batch_layout`).
  (batch,) = compiled_batches
  assert {k: (x.shape, x.dtype) for k, x in batch.items()} == {
      k: (s.shape, s.dtype) for k, s in batch_layout.batch_layout(4, 32).items()}
  assert r.mesh == {"fsdp": 2, "tensor": 2}
  assert r.mode == "joint"
  assert r.fits and 0 < r.total_gib < 1
  # The arguments are the train state (params + Adam moments of the trained leaves, split by their
  # shardings) plus the batch, in TPU layouts (small dims padded to (8, 128) tiles: +20% on this
  # tiny model); activations this small may live in VMEM (temps can read 0).
  assert r.state_gib <= r.argument_gib <= r.state_gib * 1.3
  assert r.temp_gib >= 0
  # XLA's peak of live buffers holds the arguments at least (and here temps that temp_gib, 0, misses).
  assert r.peak_gib >= r.argument_gib > 0
  assert r.compiled_flops_per_chip > 0
  # XLA's count per chip is of the same order as the model FLOPs split over 4 chips (it also
  # counts attention masks, softmax, remat recompute and the optimizer).
  ratio = r.compiled_flops_per_chip * 4 / r.model_flops_per_step
  assert 0.3 < ratio < 10, ratio


def test_a_program_that_does_not_fit_is_reported_not_raised():
  """Whole [T, T] attention scores at 8192 tokens: the TPU compiler refuses the program (its
  temporaries exceed HBM); the plan says how much it needed instead of failing."""
  _needs_libtpu()
  cfg = presets.load_config("tiny")
  cfg.train.update(dict(batch_size=16, seq_len=8192, loss_chunk_size=512))
  r = aot.plan(cfg, "v5e-4")
  assert not r.fits and r.temp_gib > r.hbm_gib and r.total_gib > r.hbm_gib


def test_cli_overrides_drafter_only_and_errors():
  """`python -m gemma_mtp_jax.aot` takes --config.* overrides (here the drafter-only mode: a frozen
  base has no optimizer state, so the train state is about a third of the joint one's); a bad key
  is one clear error."""
  _needs_libtpu()
  cmd = [sys.executable, "-m", "gemma_mtp_jax.aot", "--config=configs/tiny.py",
         "--topology=v5e-4", "--config.train.batch_size=4", "--config.train.seq_len=32",
         "--config.mesh.axes.fsdp=4", "--config.train.freeze_base=True", "--json"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["mesh"] == {"fsdp": 4} and r["batch"] == 4 and r["seq"] == 32 and r["fits"]
  assert r["mode"] == "drafter_only" and r["argument_gib"] > 0 and r["model_flops_per_token"] > 0
  bad = subprocess.run(cmd[:-1] + ["--config.train.batch_sise=4"], capture_output=True,
                       text=True, env=env, cwd=root, timeout=600)
  assert bad.returncode == 2
  assert "batch_sise" in bad.stderr and "batch_size" in bad.stderr, bad.stderr[-2000:]


def test_unknown_topology_names_the_flag():
  with pytest.raises(ValueError, match="--topology 'v5e-17'"):
    aot.topology_devices("v5e-17")
