"""Routed MoE (`model.moe`) == the dense reference (`moe.DenseMoE`), and sharded == single device.

All float32. The dense block runs every expert with a combine matrix; the routed one sorts the
(token, expert) pairs and runs grouped matmuls: the same function, so outputs and gradients w.r.t.
every parameter and the input agree to float32 rounding. The multi-device half runs in a
subprocess with 8 fake CPU devices (the device count is fixed when JAX first initialises).
"""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_mtp_jax.model import moe

E, K, D, F, B, T = 8, 2, 16, 8, 2, 7
TOL = 1e-5


def _inputs(load: str, b: int = B, t: int = T):
  """(router input, x, params) with O(1) outputs; `load` picks the routing.

  "random": random router. "skewed": expert 3 is in every token's top-k (a constant router-input
  component aligned with its column) and experts 5, 6, 7 in none (that column's opposite).
  """
  kr, kx, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  router_in_BTD = jax.random.normal(kr, (b, t, D))
  x_BTD = jax.random.normal(kx, (b, t, D))
  params = nn.unbox(moe.DenseMoE(E, K, F).init(jax.random.PRNGKey(1), router_in_BTD, x_BTD))["params"]
  params = jax.tree.map(lambda p: p * 10.0 if p.ndim == 3 else p, params)  # std 0.2
  rng = np.random.default_rng(0)
  params["router_scale"] = jnp.asarray(rng.uniform(0.5, 1.5, D), jnp.float32)
  params["per_expert_scale"] = jnp.asarray(rng.uniform(0.5, 1.5, E), jnp.float32)
  params["router_proj"] = jnp.asarray(rng.normal(0, 1, (D, E)), jnp.float32)
  if load == "skewed":
    router_in_BTD = router_in_BTD + 4.0
    proj = params["router_proj"].at[:, 3].add(3.0)
    params["router_proj"] = proj.at[:, 5:].add(-3.0)
  return router_in_BTD, x_BTD, {"params": params}


def _loads(router_in_BTD, params):
  """Tokens per expert under the router."""
  p = params["params"]
  _, ids = moe.route(router_in_BTD, p["router_scale"], p["router_proj"], p["per_expert_scale"],
                     K, 1e-6)
  return np.bincount(np.asarray(ids).reshape(-1), minlength=E)


def _value_and_grads(module, router_in_BTD, x_BTD, params, jit=False):
  c_BTD = jax.random.normal(jax.random.PRNGKey(7), x_BTD.shape)

  def loss(p, x):
    y = module.apply(p, router_in_BTD, x)
    return jnp.sum(jnp.sin(y) * c_BTD), y

  f = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, y), grads = (jax.jit(f) if jit else f)(params, x_BTD)
  return y, grads


def _max_diff(a, b):
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_params_match_dense_moe():
  """Same names, shapes, logical axes and initial values: checkpoints and converters unchanged."""
  router_in_BTD, x_BTD, _ = _inputs("random")
  dense = moe.DenseMoE(E, K, F).init(jax.random.PRNGKey(3), router_in_BTD, x_BTD)
  routed = moe.RoutedMoE(E, K, F).init(jax.random.PRNGKey(3), router_in_BTD, x_BTD)
  assert jax.tree.structure(dense) == jax.tree.structure(routed)
  assert nn.get_partition_spec(dense) == nn.get_partition_spec(routed)
  assert _max_diff(nn.unbox(dense), nn.unbox(routed)) == 0.0


def test_skewed_inputs_are_skewed():
  """The "skewed" case really has empty experts and one expert in every token's top-k."""
  loads = _loads(*_inputs("skewed")[::2])
  assert list(loads[5:]) == [0, 0, 0], loads
  assert loads[3] == B * T, loads
  assert (loads == 0).sum() >= 3


@pytest.mark.parametrize("load", ["random", "skewed"])
@pytest.mark.parametrize("impl", ["auto", "ragged_dot", "blocked"])
@pytest.mark.parametrize("jit", [False, True])
def test_routed_equals_dense(load, impl, jit):
  router_in_BTD, x_BTD, params = _inputs(load)
  y_ref, g_ref = _value_and_grads(moe.DenseMoE(E, K, F), router_in_BTD, x_BTD, params)
  y, g = _value_and_grads(moe.RoutedMoE(E, K, F, gmm_impl=impl), router_in_BTD, x_BTD, params, jit)
  assert float(jnp.abs(y_ref).max()) > 0.1  # outputs of O(1): the tolerance means something
  assert float(jnp.abs(y - y_ref).max()) <= TOL
  assert jax.tree.structure(g) == jax.tree.structure(g_ref)
  assert _max_diff(g, g_ref) <= TOL, jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g, g_ref)


@pytest.mark.parametrize("jit", [False, True])
def test_bf16_compute_with_f32_params(jit):
  """f32 params, bf16 compute (the presets' numerics): bf16 outputs within bf16 rounding of the f32
  dense reference, f32 gradients equal to those of pre-cast bf16 weights, and a NaN input token
  does not leak into the other tokens."""
  router_in_BTD, x_BTD, params = _inputs("random")
  block = moe.RoutedMoE(E, K, F, dtype=jnp.bfloat16)
  y, g = _value_and_grads(block, router_in_BTD, x_BTD, params, jit)
  pre = jax.tree.map(lambda p: p.astype(jnp.bfloat16) if p.ndim == 3 else p, params)
  y_pre, g_pre = _value_and_grads(block, router_in_BTD, x_BTD, pre, jit)
  big = [a for a in jax.tree.leaves(g[0]) if a.ndim == 3]  # the expert weights' gradients
  assert y.dtype == jnp.bfloat16 and len(big) == 3 and all(a.dtype == jnp.float32 for a in big)
  assert _max_diff(y, y_pre) == 0.0
  assert _max_diff(g, jax.tree.map(lambda a, b: a.astype(b.dtype), g_pre, g)) == 0.0
  y_ref, _ = _value_and_grads(moe.DenseMoE(E, K, F), router_in_BTD, x_BTD, params)
  assert 0 < float(jnp.abs(y.astype(jnp.float32) - y_ref).max()) <= 0.05
  y_nan = block.apply(params, router_in_BTD, x_BTD.at[0, 0, 0].set(jnp.nan))
  assert bool(jnp.isnan(y_nan[0, 0]).any()) and bool(jnp.isfinite(y_nan[1]).all())


def test_expert_cotangents_come_out_together():
  """The routed block's backward releases the tokens' and the expert weights' gradients through one
  optimization barrier (`moe.cotangents_together`), so XLA cannot postpone the weight gradients,
  and with them the layer's row buffers, past the input gradient; values and gradients unchanged
  (test_routed_equals_dense), an integer argument gets its float0 cotangent."""
  router_in_BTD, x_BTD, params = _inputs("random")
  module = moe.RoutedMoE(E, K, F)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(module.apply(p, router_in_BTD, x)),
                                  argnums=(0, 1)))(params, x_BTD)
  barriers = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "optimization_barrier"]
  shapes = sorted(tuple(v.aval.shape) for e in barriers for v in e.invars)
  assert shapes == sorted([(B * T, D), (B * T, K), (E, D, F), (E, D, F), (E, F, D)]), shapes

  f = lambda x, i, w: jnp.sum(jnp.sin(x[i] * w))
  x, i, w = jnp.arange(6.0), jnp.asarray([0, 5, 5]), jnp.asarray([1.0, 2.0, 3.0])
  g_ref = jax.grad(f, argnums=(0, 2))(x, i, w)
  g = jax.grad(lambda x, w: moe.cotangents_together(f)(x, i, w), argnums=(0, 1))(x, w)
  assert _max_diff(g, g_ref) == 0.0 and float(jnp.abs(g_ref[0]).max()) > 0.5


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in its equations' params."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def test_route_keeps_leading_dims_and_matches_flat():
  router_in_BTD, _, params = _inputs("random")
  p = params["params"]
  args = (p["router_scale"], p["router_proj"], p["per_expert_scale"], K, 1e-6)
  w_BTk, i_BTk = moe.route(router_in_BTD, *args)
  w_Xk, i_Xk = moe.route(router_in_BTD.reshape(B * T, D), *args)
  assert w_BTk.shape == i_BTk.shape == (B, T, K) and w_BTk.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(i_BTk).reshape(B * T, K), np.asarray(i_Xk))
  np.testing.assert_allclose(np.asarray(w_BTk).reshape(B * T, K), np.asarray(w_Xk), atol=1e-7)


@pytest.mark.parametrize("rows_per_block", [None, 2, 8])
def test_blocked_grouped_mlp_equals_ragged_dot(rows_per_block):
  """Empty groups, groups spanning several blocks, and trailing rows outside every group (-> 0)."""
  rng = np.random.default_rng(1)
  sizes_E = jnp.asarray([0, 5, 0, 1, 9, 0, 3, 2], jnp.int32)  # sum 20 of 24 rows
  x_YD = jnp.asarray(rng.normal(size=(24, D)), jnp.float32)
  w = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
  ref = moe._ragged_mlp(x_YD, sizes_E, *w, act="gelu_pytorch_tanh")
  out = moe._blocked_mlp(x_YD, sizes_E, *w, act="gelu_pytorch_tanh", rows_per_block=rows_per_block)
  assert float(jnp.abs(ref[20:]).max()) == 0.0
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


def test_unknown_impl_is_an_error():
  router_in_BTD, x_BTD, params = _inputs("random")
  with pytest.raises(ValueError, match="bogus"):
    moe.RoutedMoE(E, K, F, gmm_impl="bogus").apply(params, router_in_BTD, x_BTD)


# ---------------------------------------------------------------------------- sharded
SCRIPT = textwrap.dedent(r"""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
  jax.config.update("jax_default_matmul_precision", "highest")
  from gemma_mtp_jax import sharding
  from gemma_mtp_jax.model import moe
  from tests import test_moe as tm

  def run(name, axes, b, t, skew):
    router_in, x, params = tm._inputs("skewed" if skew else "random", b, t)
    ref_y, ref_g = tm._value_and_grads(moe.RoutedMoE(tm.E, tm.K, tm.F), router_in, x, params,
                                       jit=True)
    dense_y, _ = tm._value_and_grads(moe.DenseMoE(tm.E, tm.K, tm.F), router_in, x, params)
    mesh = sharding.make_mesh(axes)
    boxed = jax.eval_shape(lambda: moe.DenseMoE(tm.E, tm.K, tm.F).init(
        jax.random.PRNGKey(1), router_in, x))
    p = sharding.shard_like(params, nn.unbox(sharding.logical_shardings(boxed, mesh)))
    bs = sharding.batch_sharding(mesh)
    if b % int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")])) == 0:
      router_in, x = jax.device_put(router_in, bs), jax.device_put(x, bs)
    module = moe.RoutedMoE(tm.E, tm.K, tm.F)  # expert_parallel=None: detects the mesh
    with sharding.use_mesh(mesh):
      jaxpr = str(jax.make_jaxpr(lambda p, x: module.apply(p, router_in, x))(p, x))
      y, g = tm._value_and_grads(module, router_in, x, p, jit=True)
    return dict(out_diff=float(jnp.abs(y - ref_y).max()), grad_diff=tm._max_diff(g, ref_g),
                dense_diff=float(jnp.abs(y - dense_y).max()),
                shard_map="shard_map" in jaxpr, all_gather="all_gather" in jaxpr,
                psum_scatter="reduce_scatter" in jaxpr or "psum_scatter" in jaxpr,
                gate_spec=[str(a) for a in p["params"]["gate"].sharding.spec])

  cases = json.loads(sys.argv[1])
  print("RESULT" + json.dumps({n: run(n, **c) for n, c in cases.items()}))
""")

CASES = {
    # 32 tokens split over every batch axis: all-gather dispatch, reduce-scatter combine.
    "ep4_fsdp2": dict(axes={"expert": 4, "fsdp": 2}, b=8, t=4, skew=False),
    "ep8": dict(axes={"expert": 8}, b=8, t=4, skew=False),
    "ep8_skewed": dict(axes={"expert": 8}, b=8, t=4, skew=True),
    "ep2_tp2_fsdp2": dict(axes={"expert": 2, "tensor": 2, "fsdp": 2}, b=8, t=4, skew=False),
    # 14 tokens: not divisible by the expert axis, so every shard holds all tokens (psum path).
    "ep4_fsdp2_replicated_tokens": dict(axes={"expert": 4, "fsdp": 2}, b=2, t=7, skew=True),
    # No expert axis: every shard runs all experts on its own tokens (a shard-local sort).
    "fsdp8": dict(axes={"fsdp": 8}, b=8, t=4, skew=True),
}


@pytest.fixture(scope="module")
def sharded_results():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], cwd=root, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_equals_single_device(case, sharded_results):
  r = sharded_results[case]
  assert r["shard_map"], r  # the expert-parallel path ran, not GSPMD on the single-device code
  ep = CASES[case]["axes"].get("expert", 1)
  if ep > 1:
    assert r["gate_spec"][0] == "expert", r  # the expert weights really are split on E
  if ep > 1 and "replicated" not in case:  # tokens dispatched by all-gather, combined by psum_scatter
    assert r["all_gather"] and r["psum_scatter"], r
  if CASES[case]["axes"].get("fsdp", 1) > 1:
    # The weights enter in their fsdp split of D and are gathered (in the compute dtype) inside;
    # on fsdp8 (no expert axis) that gather is the only all_gather.
    assert r["all_gather"], r
  assert r["out_diff"] <= TOL, r
  assert r["grad_diff"] <= TOL, r
  assert r["dense_diff"] <= TOL, r


# ---------------------------------------------------------------------------- router losses
def test_router_stats_by_hand():
  """Two tokens, E = 2, k = 1: logits [0, 0] and [ln 3, 0] both pick expert 0."""
  logits_XE = jnp.asarray([[0.0, 0.0], [np.log(3.0), 0.0]], jnp.float32)
  ids_Xk = jnp.asarray([[0], [0]], jnp.int32)
  s = moe.router_stats(logits_XE, ids_Xk)
  np.testing.assert_allclose(s["tokens_E"], [2.0, 0.0])
  np.testing.assert_allclose(s["probs_E"], [(0.5 + 0.75) / 2, (0.5 + 0.25) / 2], rtol=1e-6)
  # logsumexp: ln 2 and ln 4 = 2 ln 2 -> mean of squares 2.5 (ln 2)^2
  np.testing.assert_allclose(s["z"], 2.5 * np.log(2.0) ** 2, rtol=1e-6)


def test_router_losses_by_hand():
  """Layer a: uniform load and probs -> 1; layer b (scanned, 2 repeats): all on expert 0 -> E = 4
  and half on 0/1 with probs (.5, .5, 0, 0) -> 4 * (.5 * .5 + .5 * .5) = 2. Mean (1 + 4 + 2) / 3."""
  stat = lambda t, p, z: {"tokens_E": jnp.asarray(t, jnp.float32),
                          "probs_E": jnp.asarray(p, jnp.float32), "z": jnp.asarray(z, jnp.float32)}
  inter = {"intermediates": {
      "layer_0": {"moe": {"router": (stat([2, 2, 2, 2], [0.25] * 4, 1.0),)}},
      "scan_1": {"layer_0": {"moe": {"router": (
          stat([[8, 0, 0, 0], [4, 4, 0, 0]], [[1, 0, 0, 0], [0.5, 0.5, 0, 0]], [3.0, 5.0]),)}}}}}
  out = moe.router_losses(inter)
  np.testing.assert_allclose(out["router_aux_loss"], (1 + 4 + 2) / 3, rtol=1e-6)
  np.testing.assert_allclose(out["router_z_loss"], (1 + 3 + 5) / 3, rtol=1e-6)
  assert float(out["expert_tokens_min"]) == 0 and float(out["expert_tokens_max"]) == 8
  with pytest.raises(ValueError, match="no router statistics"):
    moe.router_losses({"intermediates": {}})


@pytest.mark.parametrize("impl", ["routed", "dense"])
def test_blocks_sow_router_stats_only_when_asked(impl):
  """Both blocks sow the same statistics under `intermediates/router` when that collection is
  mutable, leave the output unchanged, and the losses have gradients w.r.t. the router."""
  router_in_BTD, x_BTD, params = _inputs("skewed")
  module = moe.IMPLS[impl](E, K, F)
  y, state = module.apply(params, router_in_BTD, x_BTD, mutable=[moe.STATS_COLLECTION])
  np.testing.assert_array_equal(y, module.apply(params, router_in_BTD, x_BTD))
  (s,) = state[moe.STATS_COLLECTION]["router"]
  np.testing.assert_array_equal(s["tokens_E"], _loads(router_in_BTD, params))
  assert float(s["tokens_E"].sum()) == B * T * K

  def aux(p):
    _, st = module.apply(p, router_in_BTD, x_BTD, mutable=[moe.STATS_COLLECTION])
    out = moe.router_losses(st)
    return out["router_aux_loss"] + out["router_z_loss"]

  g = jax.grad(aux)(params)["params"]
  assert float(jnp.abs(g["router_proj"]).max()) > 0 and float(jnp.abs(g["gate"]).max()) == 0
