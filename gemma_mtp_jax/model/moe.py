"""Dropless routed MoE (Gemma 4 26B-A4B) with expert parallelism.

`layers.MoE` runs every token through all E experts and zeroes the unselected ones with a combine
matrix: E/k times the FLOPs a token needs (16x for 128 experts, top-8) and a [B, T, E, F]
activation. Here each token visits only its k experts:

  route            HF's router, unchanged (a pure function, shared with the dense reference).
  routed_experts   repeat each token k times, stable-sort the (token, expert) pairs by expert,
                   run the expert MLPs as grouped matmuls over the sorted rows, unsort, weight by
                   the router weights and sum over k. Dropless: no capacity, no token is lost.
  routed_experts_sharded
                   the same under `jax.shard_map` with the experts split over the `expert` mesh axis
                   (see its docstring for the dispatch scheme and its communication cost).
  RoutedMoE        the Flax module: the parameters of `layers.MoE` (names, shapes, logical axes),
                   so checkpoints and converters do not change.

Grouped matmuls (`grouped_mlp`): `jax.lax.ragged_dot` lowers to the native grouped matmul on TPU and
GPU, but on the CPU backend JAX lowers it to a dense masked product over all E groups (E times the
rows' FLOPs plus an [E, rows, D] mask: slower than the dense MoE). `impl="auto"` therefore picks, per
lowering platform (`jax.lax.platform_dependent`, so an AOT lowering for TPU on a CPU host still gets
ragged_dot), `ragged_dot` on accelerators and `blocked` on the CPU: each expert's rows padded to
whole blocks of W rows, one batched matmul over the blocks with the block's expert weights
gathered ([I, D, F]). Both are exact; neither builds a [tokens, experts, ffn] tensor.

Shape letters beyond the package table (gemma_mtp_jax/model/__init__.py), local to this module:
  X tokens, flattened (B * T)             Y routed rows, one per (token, chosen expert) pair (X * k)
  I blocks of the blocked grouped matmul  W rows of one block
  k (lower case) the router's top-k
"""

from __future__ import annotations

import functools
from typing import Any

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
def route(router_in_BTD: Array, scale_D: Array, proj_DE: Array, per_expert_scale_E: Array,
          top_k: int, eps: float) -> tuple[Array, Array]:
  """HF Gemma 4's router: (weights [..., k] float32, expert ids [..., k] int32).

  Scale-free RMSNorm of the router input (in its own dtype, as HF), times the learned per-dim scale
  and D^-1/2, linear to E scores, softmax in float32, top-k, the k weights renormalised to sum 1,
  times the chosen experts' learned scales. Leading dims are kept (BTD -> BTk, XD -> Xk).
  """
  d = router_in_BTD.shape[-1]
  r = layers.rms_normalize(router_in_BTD, eps).astype(router_in_BTD.dtype)
  r = r * scale_D.astype(r.dtype) * jnp.asarray(d ** -0.5, r.dtype)
  scores_BTE = jnp.einsum("...d,de->...e", r, proj_DE.astype(r.dtype))
  probs_BTE = jax.nn.softmax(scores_BTE.astype(jnp.float32), axis=-1)
  top_w_BTk, top_i_BTk = jax.lax.top_k(probs_BTE, top_k)
  top_w_BTk = top_w_BTk / jnp.sum(top_w_BTk, axis=-1, keepdims=True)
  top_w_BTk = top_w_BTk * per_expert_scale_E.astype(jnp.float32)[top_i_BTk]
  return top_w_BTk, top_i_BTk.astype(jnp.int32)


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
  return _local_experts(x_XD, weights_Xk, ids_Xk, gate_EDF, up_EDF, down_EFD, 0, act, dtype, impl)


def _token_axes(mesh, num_tokens: int) -> tuple[str, ...]:
  """The batch mesh axes that split the X tokens (greedily, those whose sizes divide X)."""
  axes, n = [], 1
  for a in BATCH_AXES:
    size = mesh.shape.get(a, 1)
    if size > 1 and num_tokens % (n * size) == 0:
      axes.append(a)
      n *= size
  return tuple(axes)


def routed_experts_sharded(x_XD: Array, weights_Xk: Array, ids_Xk: Array, gate_EDF: Array,
                           up_EDF: Array, down_EFD: Array, act: str, dtype: Any = jnp.float32,
                           impl: str = "auto", mesh=None) -> Array:
  """`routed_experts` with expert parallelism: experts split over the mesh's `expert` axis.

  Scheme (all-gather dispatch, reduce-scatter combine; MaxText calls it "ring of experts"), under
  `jax.shard_map` on `mesh` (default: the context mesh):
    - tokens X, their router weights and ids are split over the batch axes (data, fsdp, expert);
      expert weights over `expert` on E (the entry gathers their `fsdp` split, as FSDP does) and,
      when `tensor` > 1 divides F, over `tensor` on F;
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

  def body(x_XD, w_Xk, i_Xk, gate_EDF, up_EDF, down_EFD):
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
  specs = (tok_spec, tok_spec, tok_spec, P(e_axis, None, f_axis), P(e_axis, None, f_axis),
           P(e_axis, f_axis, None))
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=tok_spec)(
      x_XD, weights_Xk, ids_Xk, gate_EDF, up_EDF, down_EFD)


def sharded_mesh():
  """The context mesh if it splits tokens or experts (an axis of BATCH_AXES or tensor > 1)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or all(mesh.shape.get(a, 1) <= 1 for a in BATCH_AXES + (TENSOR_AXIS,)):
    return None
  return mesh


# ---------------------------------------------------------------------------- module
class RoutedMoE(nn.Module):
  """Gemma 4 (26B-A4B) sparse experts, routed: a drop-in for `layers.MoE`.

  Same fields, parameters (router_scale, router_proj, per_expert_scale, gate, up, down: names,
  shapes, logical axes) and call as `layers.MoE`; each token runs only its top-k experts.
  expert_parallel: True runs `routed_experts_sharded` on the context mesh (experts split over its
  `expert` axis, tokens over its batch axes), False runs `routed_experts` (GSPMD shards it as it
  can), None (the default) the former whenever a context mesh splits tokens or experts.
  gmm_impl: see `grouped_mlp`.
  """

  num_experts: int
  top_k: int
  hidden_dim: int
  eps: float = 1e-6
  act: str = "gelu_pytorch_tanh"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  expert_parallel: bool | None = None
  gmm_impl: str = "auto"

  @nn.compact
  def __call__(self, router_in_BTD: Array, x_BTD: Array) -> Array:
    b, t, d = x_BTD.shape
    e, f = self.num_experts, self.hidden_dim
    p = functools.partial(layers.param_with_axes, self, dtype=self.param_dtype)
    r_scale_D = p("router_scale", nn.initializers.ones, (d,), axes=("norm",))
    r_proj_DE = p("router_proj", layers.default_kernel_init, (d, e), axes=("embed", "exp"))
    per_expert_scale_E = p("per_expert_scale", nn.initializers.ones, (e,), axes=("exp",))
    gate_EDF = p("gate", layers.default_kernel_init, (e, d, f), axes=("exp", "embed", "mlp"))
    up_EDF = p("up", layers.default_kernel_init, (e, d, f), axes=("exp", "embed", "mlp"))
    down_EFD = p("down", layers.default_kernel_init, (e, f, d), axes=("exp", "mlp", "embed"))

    w_BTk, i_BTk = route(router_in_BTD, r_scale_D, r_proj_DE, per_expert_scale_E, self.top_k,
                         self.eps)
    args = (x_BTD.reshape(b * t, d), w_BTk.reshape(b * t, -1), i_BTk.reshape(b * t, -1),
            gate_EDF, up_EDF, down_EFD, self.act, self.dtype, self.gmm_impl)
    mesh = sharded_mesh() if self.expert_parallel is None else None
    if self.expert_parallel or mesh is not None:
      y_XD = routed_experts_sharded(*args, mesh=mesh)
    else:
      y_XD = routed_experts(*args)
    return y_XD.reshape(b, t, d)
