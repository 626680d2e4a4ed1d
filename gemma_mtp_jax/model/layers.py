"""Small building blocks shared by the base model and the drafter: norms, RoPE, MLP (MoE: `moe`).

Every parameter carries logical axis names (MaxText style) so sharding is a rule change in the
config, never an edit here. Shape letters: the package's table (`gemma_mtp_jax.model`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp_jax.model.common import ACTIVATIONS, REMAT_POLICIES, ConfigError

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype) -> Any:
  if isinstance(name_or_dtype, str):
    return DTYPES[name_or_dtype]
  return name_or_dtype


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes: tuple[str | None, ...]):
  """`module.param` whose init is tagged with logical axis names for the sharding rules."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


default_kernel_init = nn.initializers.normal(stddev=0.02)


def activation(name: str):
  """The MLP activation of an HF `hidden_activation` name (one of `common.ACTIVATIONS`)."""
  if name not in ACTIVATIONS:
    raise ConfigError(f"unsupported activation {name!r}; expected one of {ACTIVATIONS}")
  if name == "silu":
    return jax.nn.silu
  return functools.partial(jax.nn.gelu, approximate=name == "gelu_pytorch_tanh")


def embed_lookup(table_VD: Array, tokens: Array, dtype) -> Array:
  """Gemma's scaled embedding: table[tokens] * sqrt(D), with sqrt(D) rounded to the table's dtype
  first, as HF does (in bfloat16, sqrt(2560) = 50.596 becomes 50.5)."""
  scale = jnp.asarray(table_VD.shape[1] ** 0.5, dtype=table_VD.dtype)
  return (jnp.take(table_VD, tokens, axis=0) * scale).astype(dtype)


def softcap(x: Array, cap: float | None) -> Array:
  """tanh soft-capping to (-cap, cap); the identity when cap is None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap


def head_logits(hidden_xD: Array, head_VD: Array, dtype, cap: float | None = None,
                constrain: bool = True) -> Array:
  """The one LM head: float32 logits [..., V] of `hidden @ head^T` in `dtype`, soft-capped by `cap`.

  Every head goes through here: the base's (tied embedding or lm_head, see
  `transformer.head_VD`), the drafter's tied head, and the chunked loss. `constrain`: pin [B, T, V]
  logits to the activation sharding (off for the loss's chunks, which are reduced at once).
  """
  logits_xV = jnp.einsum("...d,vd->...v", hidden_xD.astype(dtype), head_VD.astype(dtype),
                         preferred_element_type=jnp.float32)
  if constrain and logits_xV.ndim == 3:
    logits_xV = nn.with_logical_constraint(
        logits_xV, ("activation_batch", "activation_length", "activation_vocab"))
  return softcap(logits_xV, cap)


class RMSNorm(nn.Module):
  """HF Gemma 4 RMSNorm: float32 x * (mean(x^2) + eps)^-1/2, times a plain (not 1+w) scale."""

  eps: float = 1e-6
  with_scale: bool = True
  param_dtype: Any = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = rms_normalize(x, self.eps)
    if self.with_scale:
      scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],),
                              self.param_dtype, (self.axis_name,))
      y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_normalize(x: Array, eps: float) -> Array:
  """Scale-free RMS normalisation in float32 (returns float32)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.pow(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps, -0.5)


# ---------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, rope_type: str, partial_rotary_factor: float) -> np.ndarray:
  """Inverse frequencies, length head_dim // 2, exactly as HF computes them (float32).

  "proportional" (global layers): only the first `partial * head_dim / 2` frequencies rotate, with
  exponents relative to the full head_dim; the rest are 0 (cos=1, sin=0: those dims pass through).
  """
  if rope_type == "default":
    dim = int(head_dim * partial_rotary_factor)
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
    if dim < head_dim:  # HF "default" never does this for Gemma 4; keep the shape regardless.
      inv = np.concatenate([inv, np.zeros(head_dim // 2 - inv.shape[0], np.float32)])
    return inv
  if rope_type == "proportional":
    rope_angles = int(partial_rotary_factor * head_dim // 2)
    exps = np.arange(0, 2 * rope_angles, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
    nope = head_dim // 2 - rope_angles
    if nope > 0:
      inv = np.concatenate([inv, np.zeros(nope, np.float32)])
    return inv
  raise ValueError(f"unknown rope type {rope_type!r}")


def rope_cos_sin(positions_BT: Array, inv_freq: np.ndarray, dtype) -> tuple[Array, Array]:
  """cos/sin tables [B, T, H] (the two halves repeat, HF `rotate_half` layout), cast to dtype."""
  freqs_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
  return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
  """x * cos + rotate_half(x) * sin, broadcast over heads."""
  half = x_BTNH.shape[-1] // 2
  x1, x2 = x_BTNH[..., :half], x_BTNH[..., half:]
  rot = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
  return x_BTNH * cos + rot * sin


# ---------------------------------------------------------------------------- remat
# What `jax.checkpoint` keeps for the backward pass ("full": nothing, everything is recomputed).
_SAVED = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots,
          "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


def remat(cls: type[nn.Module], policy: str) -> type[nn.Module]:
  """`cls` under `nn.remat` with the named policy, or `cls` itself for "none": the one table of
  remat policies, for the text blocks (base and drafter) and the vision tower's layers alike."""
  if policy == "none":
    return cls
  if policy not in _SAVED:
    raise ConfigError(f"unknown remat policy {policy!r}; expected one of {REMAT_POLICIES}")
  return nn.remat(cls, policy=_SAVED[policy])


# ---------------------------------------------------------------------------- MLP
class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x))."""

  hidden_dim: int
  act: str = "gelu_pytorch_tanh"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    d = x_BTD.shape[-1]
    p = functools.partial(param_with_axes, self, init=default_kernel_init, dtype=self.param_dtype)
    gate_DF = p("gate", shape=(d, self.hidden_dim), axes=("embed", "mlp"))
    up_DF = p("up", shape=(d, self.hidden_dim), axes=("embed", "mlp"))
    down_FD = p("down", shape=(self.hidden_dim, d), axes=("mlp", "embed"))
    x = x_BTD.astype(self.dtype)
    g_BTF = jnp.einsum("btd,df->btf", x, gate_DF.astype(self.dtype))
    u_BTF = jnp.einsum("btd,df->btf", x, up_DF.astype(self.dtype))
    h_BTF = activation(self.act)(g_BTF) * u_BTF
    h_BTF = nn.with_logical_constraint(h_BTF, ("activation_batch", "activation_length", "activation_mlp"))
    return jnp.einsum("btf,fd->btd", h_BTF, down_FD.astype(self.dtype))
