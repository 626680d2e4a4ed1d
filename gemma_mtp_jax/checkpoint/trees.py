"""Dtypes and placement of param trees as checkpoints are read: float casts, shardings, restore targets.

Shared by the HF reader (`hf_read`), the orbax restore (`pair`) and the HF exporter (`hf_export`).
`shardings` everywhere means: None (default device), one Sharding for all leaves, a callable
path -> Sharding, or a pytree shaped like {"base": params, "drafter": variables} (loop layout).
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gemma_mtp_jax.checkpoint.hf_names import ConversionError
from gemma_mtp_jax.model import config as config_lib

log = logging.getLogger("gemma_mtp_jax.convert")

DTYPES = ("bfloat16", "float32")


def is_float(dtype) -> bool:
  """Whether `dtype` is a floating dtype (bfloat16 included)."""
  return jnp.issubdtype(dtype, jnp.floating)


def dtype_name(dtypes) -> str | None:
  """"bfloat16" / "float32" if all float dtypes agree, "mixed(...)" otherwise, None if none."""
  names = sorted({np.dtype(d).name for d in dtypes if is_float(d)})
  if not names:
    return None
  return names[0] if len(names) == 1 else f"mixed({','.join(names)})"


def as_dtype(dtype: str | None):
  """The numpy dtype of a `--dtype` value (one of DTYPES), or None."""
  if dtype is None:
    return None
  if dtype not in DTYPES:
    raise ConversionError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  return np.dtype(jnp.dtype(dtype))


def path_keys(path) -> tuple[str, ...]:
  """A jax key path as a tuple of strings."""
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def sharding_lookup(shardings) -> Callable[[tuple[str, ...]], Any]:
  """path -> Sharding or None, for any of the `shardings` forms in the module docstring."""
  if shardings is None:
    return lambda path: None
  if isinstance(shardings, jax.sharding.Sharding):
    return lambda path: shardings
  if callable(shardings):
    return shardings

  def lookup(path):
    node = shardings
    for k in path:
      if not isinstance(node, Mapping) or k not in node:
        raise ConversionError(f"shardings have no entry for param {'/'.join(path)}")
      node = node[k]
    return node
  return lookup


def placer(shardings, root: str):
  """(path, numpy array) -> jax.Array on the sharding of `(root, *path)`."""
  lookup = sharding_lookup(shardings)

  def place(path, x):
    s = lookup((root,) + tuple(path))
    return jax.device_put(x, s) if s is not None else jax.device_put(x)
  return place


def place_tree(tree: dict, place, prefix=()) -> dict:
  """Places a numpy tree leaf by leaf, dropping each host copy once its device copy exists."""
  out = {}
  for k in list(tree):
    v = tree.pop(k)
    out[k] = place_tree(v, place, prefix + (k,)) if isinstance(v, Mapping) else place(
        prefix + (k,), v)
  return out


def with_param_dtype(cfg: config_lib.ModelConfig, tree) -> config_lib.ModelConfig:
  """`cfg` with `param_dtype` set to the tree's float dtype (unchanged if mixed or none)."""
  name = dtype_name(x.dtype for x in jax.tree.leaves(tree))
  return cfg.replace(param_dtype=name) if name in DTYPES else cfg


def restore_target(tree_metadata, shardings, dtype):
  """ShapeDtypeStructs for an orbax restore: saved shapes, `dtype` for float leaves (logged),
  target shardings (default device where none)."""
  lookup = sharding_lookup(shardings)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  casts = collections.Counter()

  def leaf(path, m):
    dt = m.dtype
    if dtype is not None and is_float(dt) and np.dtype(dt) != dtype:
      casts[(np.dtype(dt).name, dtype.name)] += 1
      dt = dtype
    return jax.ShapeDtypeStruct(m.shape, dt, sharding=lookup(path_keys(path)) or default)

  out = jax.tree_util.tree_map_with_path(leaf, tree_metadata)
  for (a, b), n in sorted(casts.items()):
    log.info("restore: cast %d tensors %s -> %s (dtype=%s requested)", n, a, b, b)
  return out


# ------------------------------------------------------------------------------ checks on load
# The one integer leaf a checkpoint holds: the drafter's fixed vocab permutation (HF buffer
# `masked_embedding.token_ordering`, Flax `buffers/token_ordering`). Every other leaf is a float.
INT_LEAVES = ("token_ordering",)


def _leaf_name(name: str) -> str:
  return name.replace("/", ".").rsplit(".", 1)[-1]


def check_dtype(name: str, dtype, where: str) -> None:
  """Refuses a tensor whose dtype is of the wrong kind for its name: integers only for
  `INT_LEAVES`, floats for everything else. The error names the tensor and where it was read."""
  want_int = _leaf_name(name) in INT_LEAVES
  ok = jnp.issubdtype(dtype, jnp.integer) if want_int else is_float(dtype)
  if not ok:
    raise ConversionError(f"{where}: tensor {name!r} has dtype {np.dtype(dtype).name}; expected "
                          f"{'an integer' if want_int else 'a float'} dtype")


def check_tensor(name: str, x: np.ndarray, where: str) -> None:
  """`check_dtype`, then refuses NaN/inf in a float tensor (one `np.isfinite` pass)."""
  check_dtype(name, x.dtype, where)
  if is_float(x.dtype) and not np.isfinite(x).all():
    raise ConversionError(f"{where}: tensor {name!r} holds non-finite values (NaN or inf)")


@jax.jit
def _finite(leaves):
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def check_tree(tree, where: str) -> None:
  """`check_tensor` for every leaf of a loaded tree (jax.Arrays or numpy), the finiteness of all
  float leaves in one compiled pass on their own devices; errors name the leaf by its path."""
  named = [("/".join(path_keys(p)), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
  for name, x in named:
    check_dtype(name, x.dtype, where)
  floats = [(name, x) for name, x in named if is_float(x.dtype)]
  if not floats:
    return
  for (name, _), ok in zip(floats, _finite([x for _, x in floats])):
    if not bool(ok):
      raise ConversionError(f"{where}: tensor {name!r} holds non-finite values (NaN or inf)")
