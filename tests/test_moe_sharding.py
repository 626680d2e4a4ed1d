"""A tiny MoE base's loss and gradients: expert-parallel (routed, `jax.shard_map`) on 8 fake CPU
devices == one device, for expert=4 x fsdp=2 and expert=8; and == the dense reference.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is
fixed when JAX first initialises). The MoE *layer* alone is covered on more meshes by
tests/test_moe.py; the joint (base + drafter) loss on an expert mesh by tests/test_sharding.py.
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
  from gemma_mtp_jax import sharding
  from gemma_mtp_jax.model import transformer
  from tests import test_transformer as tt

  cfg = tt._cfg("moe")
  params = tt._moe_params(cfg, "skewed")  # uneven loads: empty experts, one in every top-k
  rng = np.random.default_rng(0)
  b, t = 8, 8  # 64 tokens: split over every batch axis of both meshes
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)), jnp.int32)
  seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 3], b, 0), jnp.int32)
  pos = jnp.asarray(np.repeat([list(range(5)) + list(range(3))], b, 0), jnp.int32)
  c_BTV = jnp.asarray(rng.normal(size=(b, t, cfg.vocab_size)), jnp.float32)

  def loss(p, c, tok, ps, sg):
    logits = transformer.Transformer(c).apply({"params": p}, tok, ps, sg > 0, sg).logits
    return jnp.mean(logits * c_BTV)

  grad = jax.value_and_grad(loss)
  ref_l, ref_g = jax.jit(grad, static_argnums=1)(params, cfg, tokens, pos, seg)
  dense_l, dense_g = jax.jit(grad, static_argnums=1)(params, cfg.replace(moe_impl="dense"), tokens,
                                                     pos, seg)

  def rel(a, b):  # max |a - b| relative to each leaf's own scale (at least 1)
    return max(float(jnp.abs(x - y).max() / jnp.maximum(jnp.abs(y).max(), 1.0))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  out = {"dense": dict(loss_diff=abs(float(dense_l) - float(ref_l)), grad_diff=rel(dense_g, ref_g))}
  for name, axes in json.loads(sys.argv[1]).items():
    mesh = sharding.make_mesh(axes)
    boxed = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.PRNGKey(0)))
    shardings = nn.unbox(sharding.logical_shardings(boxed, mesh))
    p = sharding.shard_like(params, shardings)
    bs = sharding.batch_sharding(mesh)
    tok, ps, sg = (jax.device_put(x, bs) for x in (tokens, pos, seg))
    with sharding.use_mesh(mesh):
      jaxpr = str(jax.make_jaxpr(lambda p: loss(p, cfg, tok, ps, sg))(p))
      l, g = jax.jit(grad, static_argnums=1, out_shardings=(None, shardings))(p, cfg, tok, ps, sg)
    gate = p["layer_0"]["moe"]["gate"].sharding.spec
    out[name] = dict(loss_diff=abs(float(l) - float(ref_l)), grad_diff=rel(g, ref_g),
                     shard_map="shard_map" in jaxpr, gate_spec=[str(a) for a in gate],
                     loss=float(ref_l))
  print("RESULT" + json.dumps(out))
""")

MESHES = {"ep4_fsdp2": {"expert": 4, "fsdp": 2}, "ep8": {"expert": 8}}


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(MESHES)], cwd=root, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("mesh", sorted(MESHES) + ["dense"])
def test_moe_base_loss_and_grads_sharded_equal_single_device(mesh, results):
  r = results[mesh]
  assert r["loss_diff"] <= 1e-5, r
  assert r["grad_diff"] <= 1e-5, r
  if mesh != "dense":
    assert r["shard_map"], r  # the expert-parallel path ran
    assert r["gate_spec"][0] == "expert", r  # expert weights split on E
