"""Meshes and logical-axis rules (MaxText style): sharding is a config change, not a model edit.

Every param is created with logical axis names (`layers.param_with_axes`) and the big activations
carry `nn.with_logical_constraint`. The rules below map those names onto mesh axes:
  data   - pure data parallelism (params replicated);
  fsdp   - data parallelism with params/optimizer state sharded on their `embed` dim (ZeRO-3 style);
  tensor - Megatron-style tensor parallelism over heads, MLP hidden, vocab;
  expert - expert parallelism for the MoE weights (26B-A4B); it also splits the batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from gemma_mtp_jax.utils.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Logical name -> mesh axis (or axes, or None = replicated). First match wins (flax semantics).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("backbone_embed", "fsdp"),  # drafter pre/post projections: the base's hidden size
    ("centroids", None),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", None),  # 1-2 KV heads in the released models: too few to split
    ("head_dim", None),
    ("kv_head_dim", None),
    ("exp", "expert"),
    ("ple", None),
    ("ple_layers", "tensor"),
    # The PLE table ([262144, L * 256] on E2B/E4B: 11 GB in float32) splits its rows over fsdp:
    # its columns already take `tensor`, so `vocab`'s rule cannot serve it.
    ("ple_vocab", "fsdp"),
    ("norm", None),
    ("layers", None),
    # the vision tower (model/vision.py): sharded like the text model's matrices
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_kv_heads", "tensor"),
    ("vision_head_dim", None),
    ("vision_patch", None),
    ("vision_pos", None),
)


class ShardingError(UserError, ValueError):
  """A mesh configuration does not fit the devices; the message names the axis."""


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves one -1 ("the rest") and checks the product equals the device count."""
  for name in axes:
    if name not in MESH_AXES:
      raise ShardingError(f"unknown mesh axis '{name}'; expected one of {MESH_AXES}")
  sizes = {a: int(axes.get(a, 1)) for a in MESH_AXES}
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ShardingError(f"mesh axes {rest} are all -1; at most one may be")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if rest:
    if num_devices % known:
      raise ShardingError(f"{num_devices} devices do not divide by the other mesh axes ({known})")
    sizes[rest[0]] = num_devices // known
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ShardingError(f"mesh {sizes} has {int(np.prod(list(sizes.values())))} devices, "
                        f"but {num_devices} are available")
  return sizes


def make_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None):
  """A mesh over all (or the given) devices with Auto axis types, as the logical rules need."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(axes or {"fsdp": -1}, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Rules from a config list of [name, axis] pairs (axis: str, list of str, or None)."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for pair in rules:
    name, axis = pair
    out.append((name, tuple(axis) if isinstance(axis, (list, tuple)) else axis))
  return tuple(out)


@contextlib.contextmanager
def use_mesh(mesh, rules=DEFAULT_RULES):
  """Activates the mesh and the logical rules (for `nn.with_logical_constraint` in the model)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(boxed_tree, mesh, rules=DEFAULT_RULES):
  """NamedShardings for a tree of boxed (logically partitioned) values or their shapes."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis split like `activation_batch`, the rest replicated."""
  spec = nn.logical_to_mesh_axes(("activation_batch",), rules)
  return NamedSharding(mesh, spec)


def sharded_init(init_fn, mesh, rules=DEFAULT_RULES, *args):
  """Runs `init_fn(*args)` (returning boxed params) directly into its shardings.

  `jax.eval_shape` gives the boxed shapes and their logical axes, which give the shardings, and
  `jax.jit(..., out_shardings=...)` materialises each param already sharded: no device ever holds
  the unsharded model. Returns (unboxed params, their shardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  with use_mesh(mesh, rules):
    params = jax.jit(init_fn, out_shardings=shardings)(*args)
  return nn.unbox(params), nn.unbox(shardings)


def shard_like(tree, shardings):
  """Places a host/device tree onto the given shardings (leaf by leaf)."""
  return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)
