"""Gemma 4 (26B-A4B) mixture of experts: one router, two implementations, router statistics.

The dense reference (`DenseMoE`, `moe_impl="dense"`) runs every token through all E experts and
zeroes the unselected ones with a combine matrix: E/k times the FLOPs a token needs (16x for 128
experts, top-8) and a [B, T, E, F] activation. The default (`RoutedMoE`, `moe_impl="routed"`) is
dropless and routed: each token visits only its k experts.

  route            HF's router, unchanged (`router_logits` + softmax + `top_k_weights`): the one
                   router of both implementations.
  routed_experts   repeat each token k times, stable-sort the (token, expert) pairs by expert,
                   run the expert MLPs as grouped matmuls over the sorted rows, unsort, weight by
                   the router weights and sum over k. Dropless: no capacity, no token is lost.
  routed_experts_sharded
                   the same under `jax.shard_map` with the experts split over the `expert` mesh axis
                   (see its docstring for the dispatch scheme and its communication cost).
  cotangents_together
                   wraps both: the backward hands out the tokens' and the expert weights' gradients
                   at once (one optimization barrier), which bounds the row buffers XLA keeps live.
  DenseMoE, RoutedMoE
                   the Flax modules: the same parameters (names, shapes, logical axes, init), so
                   checkpoints and converters do not depend on the implementation; `IMPLS` maps
                   `ModelConfig.moe_impl` to them.
  router_stats, router_losses
                   per-layer router statistics, sown when asked, and the optional load-balancing
                   and z losses computed from them (Gemma 4 publishes none; off by default).

Grouped matmuls (`grouped_mlp`): `jax.lax.ragged_dot` lowers to the native grouped matmul on TPU and
GPU, but on the CPU backend JAX lowers it to a dense masked product over all E groups (E times the
rows' FLOPs plus an [E, rows, D] mask: slower than the dense MoE). `impl="auto"` therefore picks, per
lowering platform (`jax.lax.platform_dependent`, so an AOT lowering for TPU on a CPU host still gets
ragged_dot), `ragged_dot` on accelerators and `blocked` on the CPU: each expert's rows padded to
whole blocks of W rows, one batched matmul over the blocks with the block's expert weights
gathered ([I, D, F]). Both are exact; neither builds a [tokens, experts, ffn] tensor.

Shape letters (the package table, gemma_mtp_jax/model/__init__.py): X tokens flattened (B * T),
Y routed rows (X * k), I blocks of the blocked grouped matmul, W rows of one block, k the top-k.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gemma_mtp_jax.model import layers

Array = jax.Array

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
# The mesh axes that split tokens, as `activation_batch` in sharding.DEFAULT_RULES.
BATCH_AXES = ("data", "fsdp", "expert")
GMM_IMPLS = ("auto", "ragged_dot", "blocked")


# ---------------------------------------------------------------------------- router
def router_logits(router_in_xD: Array, scale_D: Array, proj_DE: Array, eps: float) -> Array:
  """HF Gemma 4's router scores [..., E] (float32, before the softmax).

  Scale-free RMSNorm of the router input (in its own dtype, as HF), times the learned per-dim scale
  and D^-1/2, linear to E scores (in the input's dtype, then float32 for the softmax).
  """
  d = router_in_xD.shape[-1]
  r = layers.rms_normalize(router_in_xD, eps).astype(router_in_xD.dtype)
  r = r * scale_D.astype(r.dtype) * jnp.asarray(d ** -0.5, r.dtype)
  return jnp.einsum("...d,de->...e", r, proj_DE.astype(r.dtype)).astype(jnp.float32)


def top_k_weights(probs_xE: Array, per_expert_scale_E: Array, top_k: int) -> tuple[Array, Array]:
  """(weights [..., k] float32, expert ids [..., k] int32) from the router's probabilities: top-k,
  the k weights renormalised to sum 1, times the chosen experts' learned scales."""
  top_w_xk, top_i_xk = jax.lax.top_k(probs_xE, top_k)
  top_w_xk = top_w_xk / jnp.sum(top_w_xk, axis=-1, keepdims=True)
  top_w_xk = top_w_xk * per_expert_scale_E.astype(jnp.float32)[top_i_xk]
  return top_w_xk, top_i_xk.astype(jnp.int32)


def route(router_in_BTD: Array, scale_D: Array, proj_DE: Array, per_expert_scale_E: Array,
          top_k: int, eps: float) -> tuple[Array, Array]:
  """HF Gemma 4's router: (weights [..., k] float32, expert ids [..., k] int32).

  `router_logits`, softmax in float32, `top_k_weights`. Leading dims are kept (BTD -> BTk,
  XD -> Xk). The one router of both MoE implementations.
  """
  probs_BTE = jax.nn.softmax(router_logits(router_in_BTD, scale_D, proj_DE, eps), axis=-1)
  return top_k_weights(probs_BTE, per_expert_scale_E, top_k)


# ---------------------------------------------------------------------------- grouped matmuls
def _ragged_mlp(x_YD, sizes_E, gate_EDF, up_EDF, down_EFD, act):
  """The expert MLPs with `jax.lax.ragged_dot` (rows past sum(sizes) come out 0)."""
  g_YF = jax.lax.ragged_dot(x_YD, gate_EDF, sizes_E)
  u_YF = jax.lax.ragged_dot(x_YD, up_EDF, sizes_E)
  return jax.lax.ragged_dot(layers.activation(act)(g_YF) * u_YF, down_EFD, sizes_E)


def block_rows(num_rows: int, num_groups: int, max_rows: int = 128) -> int:
  """Rows per block for `_blocked_mlp`: a power of two near the mean group size, in [8, max_rows].

  Padding costs up to one block per group (E * W rows), a small block costs one weight gather
  ([D, F]) per W rows: the mean group size balances the two.
  """
  mean = max(1, -(-num_rows // num_groups))
  return max(8, min(max_rows, 1 << (mean - 1).bit_length()))


def _blocked_mlp(x_YD, sizes_E, gate_EDF, up_EDF, down_EFD, act, rows_per_block=None):
  """The expert MLPs as one batched matmul over blocks of W rows, each block one expert's.

  Each group is padded to whole blocks, so I = ceil(Y / W) + E blocks always suffice (a group adds
  less than one block of padding). Rows past sum(sizes) come out 0, as with ragged_dot.
  """
  y, d = x_YD.shape
  e = sizes_E.shape[0]
  w = rows_per_block or block_rows(y, e)
  nb = -(-y // w) + e
  ends_E = jnp.cumsum(sizes_E)
  starts_E = ends_E - sizes_E
  blocks_E = -(-sizes_E // w)
  bends_E = jnp.cumsum(blocks_E)
  bstarts_E = bends_E - blocks_E
  # Forward map: block -> its expert, padded row -> source row (or none).
  expert_I = jnp.searchsorted(bends_E, jnp.arange(nb), side="right")
  used_I = expert_I < e
  expert_I = jnp.minimum(expert_I, e - 1)
  off_IW = (jnp.arange(nb)[:, None] - bstarts_E[expert_I][:, None]) * w + jnp.arange(w)
  valid_IW = used_I[:, None] & (off_IW < sizes_E[expert_I][:, None])
  src_IW = jnp.clip(starts_E[expert_I][:, None] + off_IW, 0, y - 1)
  xb_IWD = jnp.where(valid_IW[..., None], x_YD[src_IW], 0).astype(x_YD.dtype)
  g_IWF = jnp.einsum("iwd,idf->iwf", xb_IWD, gate_EDF[expert_I])
  u_IWF = jnp.einsum("iwd,idf->iwf", xb_IWD, up_EDF[expert_I])
  h_IWF = layers.activation(act)(g_IWF) * u_IWF
  yb_ID = jnp.einsum("iwf,ifd->iwd", h_IWF, down_EFD[expert_I]).reshape(nb * w, d)
  # Back to the sorted rows: row r of group g sits at padded row bstarts[g] * W + (r - starts[g]).
  group_Y = jnp.searchsorted(ends_E, jnp.arange(y), side="right")
  in_group_Y = group_Y < e
  group_Y = jnp.minimum(group_Y, e - 1)
  dst_Y = bstarts_E[group_Y] * w + jnp.arange(y) - starts_E[group_Y]
  return jnp.where(in_group_Y[:, None], yb_ID[jnp.clip(dst_Y, 0, nb * w - 1)], 0)


def grouped_mlp(x_YD: Array, sizes_E: Array, gate_EDF: Array, up_EDF: Array, down_EFD: Array,
                act: str, impl: str = "auto") -> Array:
  """down_g(act(x @ gate_g) * (x @ up_g)) for rows grouped by expert g: [Y, D] -> [Y, D].

  Rows are sorted by group, `sizes_E` counts them per group; rows past sum(sizes) give 0.
  impl: "ragged_dot", "blocked" (see the module docstring), or "auto" (blocked on CPU only).
  """
  ragged = functools.partial(_ragged_mlp, act=act)
  blocked = functools.partial(_blocked_mlp, act=act)
  args = (x_YD, sizes_E, gate_EDF, up_EDF, down_EFD)
  if impl == "ragged_dot":
    return ragged(*args)
  if impl == "blocked":
    return blocked(*args)
  if impl == "auto":
    return jax.lax.platform_dependent(*args, cpu=blocked, default=ragged)
  raise ValueError(f"unknown grouped matmul impl {impl!r}; expected one of {GMM_IMPLS}")


# ---------------------------------------------------------------------------- routed experts
def cotangents_together(fn):
  """`fn` with the same values and gradients, whose input cotangents all appear at once.

  Its backward runs `jax.vjp(fn)` and passes every floating cotangent through one optimization
  barrier, so the expert weights' gradients are ready no later than the gradient of the tokens.
  Without it XLA:TPU postponed the grouped-matmul weight gradients of a scanned period's layers to
  the end of the period's backward, keeping each layer's [rows, D] buffers alive until then (26B-A4B,
  v5p-32: six MoE layers' worth at once).
  """

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    return jax.vjp(fn, *args)

  def bwd(vjp_fn, g):
    leaves, tree = jax.tree.flatten(vjp_fn(g))
    floats = [j for j, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    for j, leaf in zip(floats, jax.lax.optimization_barrier([leaves[j] for j in floats])):
      leaves[j] = leaf
    return jax.tree.unflatten(tree, leaves)

  wrapped.defvjp(fwd, bwd)
  return wrapped


def _local_experts(x_XD, weights_Xk, ids_Xk, gate_EDF, up_EDF, down_EFD, first_expert, act, dtype,
                   impl):
  """Routed experts for the E experts [first_expert, first_expert + E) held here: [X, D].

  Pairs routed to other experts sort last, out of every group: they cost no matmul row on
  ragged_dot and contribute 0 (their weight is masked too, so any value there is harmless).
  """
  x_tokens, k = ids_Xk.shape
  e = gate_EDF.shape[0]
  local_Y = ids_Xk.reshape(-1) - first_expert
  mine_Y = (local_Y >= 0) & (local_Y < e)
  key_Y = jnp.where(mine_Y, local_Y, e)
  order_Y = jnp.argsort(key_Y, stable=True)  # stable: a fixed order, whatever the sort backend
  sizes_E = jnp.zeros((e + 1,), jnp.int32).at[key_Y].add(1)[:e]
  x_YD = x_XD.astype(dtype)[order_Y // k]
  cast = lambda w: w.astype(dtype)
  y_YD = grouped_mlp(x_YD, sizes_E, cast(gate_EDF), cast(up_EDF), cast(down_EFD), act, impl)
  inverse_Y = jnp.zeros_like(order_Y).at[order_Y].set(jnp.arange(order_Y.shape[0]))
  y_XkD = y_YD[inverse_Y].reshape(x_tokens, k, -1)
  w_Xk = jnp.where(mine_Y.reshape(x_tokens, k), weights_Xk, 0).astype(dtype)
  return jnp.einsum("xkd,xk->xd", jnp.where(mine_Y.reshape(x_tokens, k, 1), y_XkD, 0), w_Xk)


def routed_experts(x_XD: Array, weights_Xk: Array, ids_Xk: Array, gate_EDF: Array, up_EDF: Array,
                   down_EFD: Array, act: str, dtype: Any = jnp.float32,
                   impl: str = "auto") -> Array:
  """Dropless routed expert MLPs on one device: sum_k w[x, k] * MLP_{ids[x, k]}(x), [X, D].

  (token, expert) pairs are sorted by expert (stable argsort), counted per expert, run as grouped
  matmuls (gate and up, act(gate) * up, down) and unsorted. Experts that get no token are empty
  groups. Works under jit and grad; compute and memory are O(X * k * D * F), not O(X * E * F).
  """
  run = cotangents_together(functools.partial(_local_experts, first_expert=0, act=act, dtype=dtype,
                                              impl=impl))
  return run(x_XD, weights_Xk, ids_Xk, gate_EDF, up_EDF, down_EFD)


def _token_axes(mesh, num_tokens: int) -> tuple[str, ...]:
  """The batch mesh axes that split the X tokens (greedily, those whose sizes divide X)."""
  axes, n = [], 1
  for a in BATCH_AXES:
    size = mesh.shape.get(a, 1)
    if size > 1 and num_tokens % (n * size) == 0:
      axes.append(a)
      n *= size
  return tuple(axes)


def _weight_d_axes(mesh, d: int, axes: tuple[str, ...] | None, taken) -> tuple[str, ...]:
  """The mesh axes splitting the expert weights' D dim: `axes`, or (None) those the active logical
  rules give `embed` (the params' stored split); axes of size 1, already used on E / F, or that do
  not divide D are dropped (the weights are then gathered on them before the shard_map)."""
  if axes is None:
    spec = nn.logical_to_mesh_axes(("embed",)) if nn.get_logical_axis_rules() else None
    entry = spec[0] if spec else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  out, n = [], 1
  for a in axes:
    size = mesh.shape.get(a, 1)
    if size > 1 and a not in taken and d % (n * size) == 0:
      out.append(a)
      n *= size
  return tuple(out)


def routed_experts_sharded(x_XD: Array, weights_Xk: Array, ids_Xk: Array, gate_EDF: Array,
                           up_EDF: Array, down_EFD: Array, act: str, dtype: Any = jnp.float32,
                           impl: str = "auto", mesh=None,
                           weight_d_axes: tuple[str, ...] | None = None) -> Array:
  """`routed_experts` with expert parallelism: experts split over the mesh's `expert` axis.

  Scheme (all-gather dispatch, reduce-scatter combine; MaxText calls it "ring of experts"), under
  `jax.shard_map` on `mesh` (default: the context mesh):
    - tokens X, their router weights and ids are split over the batch axes (data, fsdp, expert);
      expert weights over `expert` on E and, when `tensor` > 1 divides F, over `tensor` on F;
      they enter in their stored split of D (the mesh axes the logical rules give `embed`,
      `weight_d_axes`), are cast to `dtype` and all-gathered on D inside: the gather moves
      `dtype` bytes, not float32, and its transpose reduce-scatters the weight gradients (each
      chip keeps its D slice) instead of all-reducing full [E, D, F] gradients;
    - each expert shard all-gathers the tokens (x, ids, weights: the ids travel, not a dispatch
      mask) of its `expert` group, runs the grouped MLP on the pairs routed to its E / ep experts
      (the others sort last, outside every group: `_local_experts`), and a psum_scatter over
      `expert` (plus a psum over `tensor` for the F split) sums each token's k contributions and
      hands every shard back its own tokens.
  Dropless by construction: no capacity, no overflow; a shard's row buffer is sized for the worst
  case (all ep * X_local * k pairs routed to its experts). ragged_dot spends no matmul rows past the
  routed ones; the CPU `blocked` fallback computes the whole buffer (exact, but ep times the work).
  Communication per layer and device, X_local tokens of width D, ep expert shards: all-gather
  (ep - 1) * X_local * D in, reduce-scatter (ep - 1) * X_local * D out (backward: the same,
  transposed). A ragged all-to-all dispatch moves 2 * k * X_local * D * (ep - 1) / ep: more bytes
  whenever ep <= k (26B-A4B: k = 8, ep <= 8 on one slice), and `jax.lax.ragged_all_to_all` does
  not run on XLA:CPU (jax 0.10.2: "UNIMPLEMENTED ... ThunkEmitter"), so it could not be tested
  here. When the tokens are not split over `expert` (X not divisible), each shard already holds
  all of them: no all-gather, and a psum replaces the psum_scatter. With no `expert` axis (or
  expert = 1) every shard runs all experts on its own tokens: the sort stays local to the shard
  (GSPMD would gather the tokens of every shard to sort them).
  """
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  ep = mesh.shape.get(EXPERT_AXIS, 1)
  e, _, f = gate_EDF.shape
  if e % ep:
    raise ValueError(f"{e} experts do not split over expert={ep} shards")
  e_local = e // ep
  tok = _token_axes(mesh, x_XD.shape[0])
  gather = EXPERT_AXIS in tok
  tp = mesh.shape.get(TENSOR_AXIS, 1)
  f_axis = TENSOR_AXIS if tp > 1 and f % tp == 0 else None
  tok_spec = P(tok or None, None)
  d_axes = _weight_d_axes(mesh, gate_EDF.shape[1], weight_d_axes, (EXPERT_AXIS, f_axis))

  def body(x_XD, w_Xk, i_Xk, gate_EDF, up_EDF, down_EFD):
    # Cast before gathering D: the gather and the gradient's reduce-scatter move `dtype`.
    gate_EDF, up_EDF, down_EFD = (a.astype(dtype) for a in (gate_EDF, up_EDF, down_EFD))
    if d_axes:
      gate_EDF, up_EDF = (jax.lax.all_gather(a, d_axes, axis=1, tiled=True)
                          for a in (gate_EDF, up_EDF))
      down_EFD = jax.lax.all_gather(down_EFD, d_axes, axis=2, tiled=True)
    if gather:  # every expert shard sees the tokens of its whole `expert` group
      x_XD, w_Xk, i_Xk = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
                          for a in (x_XD, w_Xk, i_Xk))
    first = jax.lax.axis_index(EXPERT_AXIS) * e_local if ep > 1 else 0
    y_XD = _local_experts(x_XD, w_Xk, i_Xk, gate_EDF, up_EDF, down_EFD, first, act, dtype, impl)
    if gather:
      y_XD = jax.lax.psum_scatter(y_XD, EXPERT_AXIS, scatter_dimension=0, tiled=True)
    elif ep > 1:
      y_XD = jax.lax.psum(y_XD, EXPERT_AXIS)
    if f_axis:  # down_proj over an F slice is a partial sum
      y_XD = jax.lax.psum(y_XD, f_axis)
    return y_XD

  e_axis = EXPERT_AXIS if ep > 1 else None
  d_spec = d_axes or None
  specs = (tok_spec, tok_spec, tok_spec, P(e_axis, d_spec, f_axis), P(e_axis, d_spec, f_axis),
           P(e_axis, f_axis, d_spec))
  return cotangents_together(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=tok_spec))(
      x_XD, weights_Xk, ids_Xk, gate_EDF, up_EDF, down_EFD)


def sharded_mesh():
  """The context mesh if it splits tokens or experts (an axis of BATCH_AXES or tensor > 1)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(mesh.shape.get(a, 1) <= 1 for a in BATCH_AXES + (TENSOR_AXIS,)):
    return None
  return mesh


# ---------------------------------------------------------------------------- modules
class _MoEBlock(nn.Module):
  """Gemma 4 (26B-A4B) sparse experts with HF's router; subclasses say how the experts run.

  Parameters (names, shapes, logical axes, init): router_scale [D], router_proj [D, E],
  per_expert_scale [E], gate / up [E, D, F], down [E, F, D]: the same for both implementations, so
  checkpoints, converters and sharding rules do not depend on `moe_impl`.
  When the `intermediates` collection is mutable (`apply(..., mutable=[STATS_COLLECTION])`), each
  call sows its router statistics under the name "router" (`router_stats`; `router_losses` reads
  them); otherwise nothing is computed for them.
  """

  num_experts: int
  top_k: int
  hidden_dim: int
  eps: float = 1e-6
  act: str = "gelu_pytorch_tanh"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, router_in_BTD: Array, x_BTD: Array) -> Array:
    d = x_BTD.shape[-1]
    e, f = self.num_experts, self.hidden_dim
    p = functools.partial(layers.param_with_axes, self, dtype=self.param_dtype)
    r_scale_D = p("router_scale", nn.initializers.ones, (d,), axes=("norm",))
    r_proj_DE = p("router_proj", layers.default_kernel_init, (d, e), axes=("embed", "exp"))
    per_expert_scale_E = p("per_expert_scale", nn.initializers.ones, (e,), axes=("exp",))
    gate_EDF = p("gate", layers.default_kernel_init, (e, d, f), axes=("exp", "embed", "mlp"))
    up_EDF = p("up", layers.default_kernel_init, (e, d, f), axes=("exp", "embed", "mlp"))
    down_EFD = p("down", layers.default_kernel_init, (e, f, d), axes=("exp", "mlp", "embed"))

    logits_BTE = router_logits(router_in_BTD, r_scale_D, r_proj_DE, self.eps)
    w_BTk, i_BTk = top_k_weights(jax.nn.softmax(logits_BTE, axis=-1), per_expert_scale_E,
                                 self.top_k)
    if self.is_mutable_collection(STATS_COLLECTION):
      self.sow(STATS_COLLECTION, "router", router_stats(logits_BTE, i_BTk))
    return self.experts(x_BTD, w_BTk, i_BTk, gate_EDF, up_EDF, down_EFD)

  def experts(self, x_BTD, w_BTk, i_BTk, gate_EDF, up_EDF, down_EFD) -> Array:
    """sum_k w[b, t, k] * MLP_{i[b, t, k]}(x[b, t]): [B, T, D]."""
    raise NotImplementedError


class DenseMoE(_MoEBlock):
  """The reference (`moe_impl="dense"`): every token through all E experts, zeroed by a combine
  matrix for the unselected ones. E/k times the routed FLOPs and a [B, T, E, F] activation; no
  data-dependent shapes, so GSPMD shards it like any einsum."""

  def experts(self, x_BTD, w_BTk, i_BTk, gate_EDF, up_EDF, down_EFD) -> Array:
    dt = self.dtype
    combine_BTE = jnp.sum(jax.nn.one_hot(i_BTk, self.num_experts, dtype=jnp.float32)
                          * w_BTk[..., None], axis=-2)
    x = x_BTD.astype(dt)
    g_BTEF = jnp.einsum("btd,edf->btef", x, gate_EDF.astype(dt))
    u_BTEF = jnp.einsum("btd,edf->btef", x, up_EDF.astype(dt))
    h_BTEF = layers.activation(self.act)(g_BTEF) * u_BTEF
    h_BTEF = h_BTEF * combine_BTE.astype(dt)[..., None]
    return jnp.einsum("btef,efd->btd", h_BTEF, down_EFD.astype(dt))


class RoutedMoE(_MoEBlock):
  """The default (`moe_impl="routed"`): each token runs only its top-k experts (dropless).

  expert_parallel: True runs `routed_experts_sharded` on the context mesh (experts split over its
  `expert` axis, tokens over its batch axes), False runs `routed_experts` (GSPMD shards it as it
  can), None (the default) the former whenever a context mesh splits tokens or experts.
  gmm_impl: see `grouped_mlp`.
  """

  expert_parallel: bool | None = None
  gmm_impl: str = "auto"

  def experts(self, x_BTD, w_BTk, i_BTk, gate_EDF, up_EDF, down_EFD) -> Array:
    b, t, d = x_BTD.shape
    args = (x_BTD.reshape(b * t, d), w_BTk.reshape(b * t, -1), i_BTk.reshape(b * t, -1),
            gate_EDF, up_EDF, down_EFD, self.act, self.dtype, self.gmm_impl)
    mesh = sharded_mesh() if self.expert_parallel is None else None
    if self.expert_parallel or mesh is not None:
      y_XD = routed_experts_sharded(*args, mesh=mesh)
    else:
      y_XD = routed_experts(*args)
    return y_XD.reshape(b, t, d)


IMPLS = {"routed": RoutedMoE, "dense": DenseMoE}


# ---------------------------------------------------------------------------- router losses
STATS_COLLECTION = "intermediates"


def router_stats(logits_xE: Array, ids_xk: Array) -> dict[str, Array]:
  """One MoE layer's router statistics over the tokens of a call (padding included: the block
  does not see the mask; packed batches carry little of it).

  tokens_E: (token, expert) pairs routed to each expert (sums to tokens * k); probs_E: the mean
  router probability of each expert (softmax over all E, before top-k); z: the mean over tokens
  of logsumexp(router logits)^2. All float32; only `probs_E` and `z` carry gradients.
  """
  e = logits_xE.shape[-1]
  logits_XE = logits_xE.reshape(-1, e)
  tokens_E = jnp.zeros((e,), jnp.float32).at[ids_xk.reshape(-1)].add(1.0)
  probs_E = jnp.mean(jax.nn.softmax(logits_XE, axis=-1), axis=0)
  z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_XE, axis=-1)))
  return {"tokens_E": jax.lax.stop_gradient(tokens_E), "probs_E": probs_E, "z": z}


def _collect(tree) -> list[dict]:
  """Every sown "router" entry of an intermediates tree (sow keeps a tuple per call)."""
  out = []
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      if k == "router" and isinstance(v, (tuple, list)):
        out.extend(v)
      else:
        out.extend(_collect(v))
  return out


def router_losses(intermediates) -> dict[str, Array]:
  """Router losses and load statistics, averaged over the MoE layers, from sown `router_stats`.

  intermediates: the `intermediates` collection of a base forward (`Transformer.apply(...,
  mutable=[STATS_COLLECTION])[1][STATS_COLLECTION]`, or that dict itself); scanned layers carry a
  leading repeats dim, which counts as that many layers. Returns float32 scalars:
    router_aux_loss: load balancing (Switch Transformer / GShard), per layer
      E * sum_e f_e * p_e with f_e = tokens_E / sum(tokens_E), the fraction of the routed
      (token, expert) pairs that went to e, and p_e = probs_E; 1 when the load is uniform (HF's
      Mixtral form sums over the k choices instead: k times this). Gradients flow through p_e.
    router_z_loss: mean over tokens of logsumexp(router logits)^2 (ST-MoE).
    expert_tokens_min / expert_tokens_max: the fewest / most pairs any expert of any layer got.
  """
  stats = _collect(intermediates.get(STATS_COLLECTION, intermediates))
  if not stats:
    raise ValueError("no router statistics: the model has no MoE layer, or it was applied "
                     f"without mutable=[{STATS_COLLECTION!r}]")
  e = stats[0]["tokens_E"].shape[-1]
  tokens_LE = jnp.concatenate([s["tokens_E"].reshape(-1, e) for s in stats])
  probs_LE = jnp.concatenate([s["probs_E"].reshape(-1, e) for s in stats])
  z_L = jnp.concatenate([s["z"].reshape(-1) for s in stats])
  f_LE = tokens_LE / jnp.maximum(jnp.sum(tokens_LE, axis=-1, keepdims=True), 1.0)
  return {"router_aux_loss": jnp.mean(e * jnp.sum(f_LE * probs_LE, axis=-1)),
          "router_z_loss": jnp.mean(z_L),
          "expert_tokens_min": jnp.min(tokens_LE), "expert_tokens_max": jnp.max(tokens_LE)}
