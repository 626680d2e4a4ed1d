"""sharded == unsharded: the base model's loss and gradients on 8 fake CPU devices.

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
  from gemma_mtp_jax import config as config_lib, sharding, transformer
  from tests import hf_helpers

  variant, meshes = sys.argv[1], json.loads(sys.argv[2])
  cfg = config_lib.ModelConfig.from_hf_config(hf_helpers.hf_text_config(variant).to_dict())
  init = lambda r: transformer.init_params(cfg, r, batch=8, length=8)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (8, 10)))
  pos = jnp.broadcast_to(jnp.arange(10), (8, 10))

  def loss(p, tokens, pos):
    logits = transformer.Transformer(cfg).apply({"params": p}, tokens, pos).logits
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

  ref_params = nn.unbox(init(jax.random.PRNGKey(0)))
  ref_l, ref_g = jax.jit(jax.value_and_grad(loss))(ref_params, tokens, pos)
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
    t, q = jax.device_put(tokens, bs), jax.device_put(pos, bs)
    with sharding.use_mesh(mesh):
      l, g = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))(params, t, q)
    gd = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g),
                                                          jax.tree.leaves(ref_g)))
    out[name] = dict(loss_diff=abs(float(l) - float(ref_l)), grad_diff=gd, init_diff=init_diff,
                     sharded_params=int(nontrivial))
  print("RESULT" + json.dumps(out))
""")


def run_sharded(variant, meshes):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, variant, json.dumps(meshes)], cwd=root,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("variant,meshes", [
    ("e_style", {"dp8": {"data": 8}, "fsdp8": {"fsdp": 8},
                 "fsdp4_tp2": {"fsdp": 4, "tensor": 2}}),
    ("moe", {"ep4_fsdp2": {"expert": 4, "fsdp": 2}}),
])
def test_sharded_loss_and_grads_equal_single_device(variant, meshes):
  res = run_sharded(variant, meshes)
  for name, r in res.items():
    assert r["init_diff"] <= 1e-6, (name, r)  # sharded init draws the same params
    assert r["loss_diff"] <= 1e-5, (name, r)
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
