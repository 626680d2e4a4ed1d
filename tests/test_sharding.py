"""sharded == unsharded: the joint (base + drafter) loss and gradients on 8 fake CPU devices.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8, because the device
count is fixed when JAX first initialises in the test process.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.config.update("jax_disable_most_optimizations", True)  # equivalence, not speed
  from gemma_mtp_jax.model import drafter
  from gemma_mtp_jax.training import objective as joint
  from gemma_mtp_jax.training.config import TrainConfig
  from gemma_mtp_jax import sharding
  from gemma_mtp_jax.model import transformer
  from tests import test_drafter

  def run(variant, meshes):
    over = dict(enable_moe=True, num_experts=8, top_k_experts=2, moe_hidden_dim=16) \
        if variant == "moe" else {}
    base_cfg, dcfg = test_drafter.tiny_configs(ordered=True, window=3, small=True, **over)
    jcfg = TrainConfig(num_draft_steps=3, drafter_loss_weight=0.5)
    def boxed(r):  # boxed params (logical axes) + the drafter's buffers
      rb, rd = jax.random.split(r)
      v = drafter.init_variables(dcfg, rd)
      return {"base": transformer.init_params(base_cfg, rb), "drafter": v["params"]}, v.get("buffers")
    init = lambda r: boxed(r)[0]
    buffers = boxed(jax.random.PRNGKey(0))[1]
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(3, base_cfg.vocab_size, (8, 10)), jnp.int32),
             "segment_ids": jnp.asarray(np.repeat([[1] * 6 + [2] * 4], 8, 0), jnp.int32),
             "positions": jnp.asarray(np.repeat([list(range(6)) + list(range(4))], 8, 0), jnp.int32)}

    def loss(p, b):
      return joint.loss_fn(p, buffers, b, base_cfg, dcfg, jcfg)[0]

    ref_params = nn.unbox(init(jax.random.PRNGKey(0)))
    ref_l, ref_g = jax.jit(jax.value_and_grad(loss))(ref_params, batch)
    out = {}
    for name, axes in meshes.items():
      mesh = sharding.make_mesh(axes)
      params, shardings = sharding.sharded_init(init, mesh, sharding.DEFAULT_RULES,
                                                jax.random.PRNGKey(0))
      nontrivial = sum(len(s.device_set) > 1 and s.spec != jax.sharding.PartitionSpec()
                       for s in jax.tree.leaves(shardings))
      init_diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params),
                                                                  jax.tree.leaves(ref_params)))
      params = sharding.shard_like(ref_params, shardings)  # identical values, sharded layout
      bs = sharding.batch_sharding(mesh)
      b = jax.tree.map(lambda x: jax.device_put(x, bs), batch)
      with sharding.use_mesh(mesh):
        l, g = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))(params, b)
      # Gradient error relative to each leaf's own scale (random-init logits reach |30|, so
      # raw gradients are large and float32 summation order differs across shardings).
      gd = max(float(jnp.abs(x - y).max() / jnp.maximum(jnp.abs(y).max(), 1.0))
               for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)))
      out[name] = dict(loss_diff=abs(float(l) - float(ref_l)), grad_diff=gd, init_diff=init_diff,
                       sharded_params=int(nontrivial), loss=float(l))
    return out

  # Both model variants in one process: one JAX start-up for the whole test.
  print("RESULT" + json.dumps({v: run(v, m) for v, m in json.loads(sys.argv[1]).items()}))
""")


MESHES = {
    "e_style": {"dp8": {"data": 8}, "fsdp8": {"fsdp": 8}, "fsdp4_tp2": {"fsdp": 4, "tensor": 2}},
    "moe": {"ep4_fsdp2": {"expert": 4, "fsdp": 2}},
}


@pytest.fixture(scope="module")
def sharded_results():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(MESHES)], cwd=root,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("variant", sorted(MESHES))
def test_sharded_loss_and_grads_equal_single_device(variant, sharded_results):
  res = sharded_results[variant]
  assert sorted(res) == sorted(MESHES[variant])
  for name, r in res.items():
    assert r["init_diff"] <= 1e-6, (name, r)  # sharded init draws the same params
    assert r["loss_diff"] <= 1e-5 * max(1.0, abs(r["loss"])), (name, r)
    assert r["grad_diff"] <= 1e-5, (name, r)
    if name != "dp8":  # dp replicates params; every other mesh must actually shard some
      assert r["sharded_params"] > 0, (name, r)


def test_mesh_shape_errors_name_the_axis():
  from gemma_mtp_jax import sharding
  assert sharding.mesh_shape({"fsdp": -1, "tensor": 2}, 8) == {
      "data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
  with pytest.raises(sharding.ShardingError, match="bogus"):
    sharding.mesh_shape({"bogus": 2}, 8)
  with pytest.raises(sharding.ShardingError, match="8 are available"):
    sharding.mesh_shape({"fsdp": 3}, 8)
