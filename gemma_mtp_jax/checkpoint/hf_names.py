"""Name and layout table between HF Gemma 4 tensors and the Flax param trees (in memory).

Each `Entry` maps one HF tensor to one Flax leaf with an exact, invertible layout change (transpose,
reshape, or a slice of a fused tensor), so HF -> Flax -> HF is bit-exact. Only names and layouts live
here. The per-model tables are `hf_base` (the base) and `hf_assistant` (the drafter); file I/O is
`safetensors_io`, and `hf_read` / `hf_export` (package `gemma_mtp_jax.checkpoint`) use them all.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import vision_config
from gemma_mtp_jax.utils.errors import UserError

Path = tuple[str, ...]


class ConversionError(UserError, ValueError):
  """A checkpoint does not match the model; the message names the tensor at fault."""


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # HF tensor name (prefix-free, e.g. "layers.3.self_attn.q_proj.weight")
  path: Path  # Flax param path
  hf_shape: tuple[int, ...]
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _ident(x):
  return x


def _t(x):
  return np.ascontiguousarray(x.T)


def copy(hf, path, shape):
  """An entry stored the same way in both trees (no layout change)."""
  return Entry(hf, path, tuple(shape), _ident, _ident)


def linear(hf, path, out_dim, in_dim):
  """HF Linear weight [out, in] <-> Flax kernel [in, out]."""
  return Entry(hf, path, (out_dim, in_dim), _t, _t)


def heads_in(hf, path, d, n, h):
  """HF q/k/v proj [N*H, D] <-> Flax [D, N, H]."""
  return Entry(hf, path, (n * h, d), lambda w: np.ascontiguousarray(w.T.reshape(d, n, h)),
               lambda w: np.ascontiguousarray(w.reshape(d, n * h).T))


def heads_out(hf, path, d, n, h):
  """HF o proj [D, N*H] <-> Flax [N, H, D]."""
  return Entry(hf, path, (d, n * h), lambda w: np.ascontiguousarray(w.T.reshape(n, h, d)),
               lambda w: np.ascontiguousarray(w.reshape(n * h, d).T))


def layer_entries(cfg: config_lib.ModelConfig, i: int, hf_prefix: str, path: Path) -> list[Entry]:
  """Entries of decoder layer i (base or drafter: query-only layers simply have no k/v)."""
  d, n, h = cfg.embed_dim, cfg.num_heads, cfg.layer_head_dim(i)
  kh, f = cfg.layer_kv_heads(i), cfg.layer_hidden_dim(i)
  p = hf_prefix
  e = [
      copy(f"{p}layer_scalar", path + ("layer_scalar",), (1,)),
      heads_in(f"{p}self_attn.q_proj.weight", path + ("attn", "q"), d, n, h),
      copy(f"{p}self_attn.q_norm.weight", path + ("attn", "q_norm", "scale"), (h,)),
      heads_out(f"{p}self_attn.o_proj.weight", path + ("attn", "o"), d, n, h),
      linear(f"{p}mlp.gate_proj.weight", path + ("mlp", "gate"), f, d),
      linear(f"{p}mlp.up_proj.weight", path + ("mlp", "up"), f, d),
      linear(f"{p}mlp.down_proj.weight", path + ("mlp", "down"), d, f),
      copy(f"{p}input_layernorm.weight", path + ("pre_attention_norm", "scale"), (d,)),
      copy(f"{p}post_attention_layernorm.weight", path + ("post_attention_norm", "scale"), (d,)),
      copy(f"{p}pre_feedforward_layernorm.weight", path + ("pre_ffw_norm", "scale"), (d,)),
      copy(f"{p}post_feedforward_layernorm.weight", path + ("post_ffw_norm", "scale"), (d,)),
  ]
  if not cfg.is_kv_shared(i):
    e += [
        heads_in(f"{p}self_attn.k_proj.weight", path + ("attn", "k"), d, kh, h),
        copy(f"{p}self_attn.k_norm.weight", path + ("attn", "k_norm", "scale"), (h,)),
    ]
    if not cfg.layer_k_eq_v(i):
      e.append(heads_in(f"{p}self_attn.v_proj.weight", path + ("attn", "v"), d, kh, h))
  if cfg.ple_dim:
    e += [
        linear(f"{p}per_layer_input_gate.weight", path + ("ple_gate",), cfg.ple_dim, d),
        linear(f"{p}per_layer_projection.weight", path + ("ple_proj",), d, cfg.ple_dim),
        copy(f"{p}post_per_layer_input_norm.weight", path + ("post_ple_norm", "scale"), (d,)),
    ]
  if cfg.enable_moe:
    ne, mf = cfg.num_experts, cfg.moe_hidden_dim
    e += [
        copy(f"{p}router.scale", path + ("moe", "router_scale"), (d,)),
        copy(f"{p}router.per_expert_scale", path + ("moe", "per_expert_scale"), (ne,)),
        linear(f"{p}router.proj.weight", path + ("moe", "router_proj"), ne, d),
        # HF fuses gate and up as [E, 2F, D]; two entries read the two halves (see `fused`).
        Entry(f"{p}experts.gate_up_proj#gate", path + ("moe", "gate"), (ne, 2 * mf, d),
              lambda w, mf=mf: np.ascontiguousarray(w[:, :mf, :].transpose(0, 2, 1)), None),
        Entry(f"{p}experts.gate_up_proj#up", path + ("moe", "up"), (ne, 2 * mf, d),
              lambda w, mf=mf: np.ascontiguousarray(w[:, mf:, :].transpose(0, 2, 1)), None),
        Entry(f"{p}experts.down_proj", path + ("moe", "down"), (ne, d, mf),
              lambda w: np.ascontiguousarray(w.transpose(0, 2, 1)),
              lambda w: np.ascontiguousarray(w.transpose(0, 2, 1))),
        copy(f"{p}post_feedforward_layernorm_1.weight", path + ("post_ffw_norm_1", "scale"), (d,)),
        copy(f"{p}pre_feedforward_layernorm_2.weight", path + ("pre_ffw_norm_2", "scale"), (d,)),
        copy(f"{p}post_feedforward_layernorm_2.weight", path + ("post_ffw_norm_2", "scale"), (d,)),
    ]
  return e


def base_entries(cfg: config_lib.ModelConfig) -> list[Entry]:
  """All entries of the base text model, HF names without the `model.` / `model.language_model.`
  prefix (the tied `lm_head.weight` is handled by the caller)."""
  d = cfg.embed_dim
  e = [
      copy("embed_tokens.weight", ("embedding",), (cfg.vocab_size, d)),
      copy("norm.weight", ("final_norm", "scale"), (d,)),
  ]
  if cfg.ple_dim:
    lp = cfg.num_layers * cfg.ple_dim
    e += [
        copy("embed_tokens_per_layer.weight", ("ple_embedding",), (cfg.ple_vocab_size, lp)),
        linear("per_layer_model_projection.weight", ("ple_projection",), lp, d),
        copy("per_layer_projection_norm.weight", ("ple_norm", "scale"), (cfg.ple_dim,)),
    ]
  for i in range(cfg.num_layers):
    e += layer_entries(cfg, i, f"layers.{i}.", (f"layer_{i}",))
  return e


VISION_TOWER = "vision_tower."
EMBED_VISION = "embed_vision."
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def _clippable(hf: str, path: Path, entry: Entry, clipped: bool) -> list[Entry]:
  """A `Gemma4ClippableLinear` (weight at `hf`.linear.weight) and, when clipped, its four scalar
  bounds, which live beside the kernel at `path` (see `model.vision`)."""
  out = [dataclasses.replace(entry, hf=f"{hf}.linear.weight", path=path + ("kernel",))]
  if clipped:
    out += [copy(f"{hf}.{b}", path + (b,), ()) for b in _CLIP_BOUNDS]
  return out


VISION_EMBEDDER = "vision_embedder."  # the 12B's patch embedder, as stored on disk


def vision_prefixes(cfg: config_lib.ModelConfig) -> tuple[str, ...]:
  """The HF name prefixes (under `model.`) of the image front end's tensors: gemma4's tower and
  embedder, or the 12B's patch embedder and its projection."""
  if isinstance(cfg.vision, vision_config.UnifiedVisionConfig):
    return (VISION_EMBEDDER, f"{EMBED_VISION}embedding_projection.")
  return (VISION_TOWER, EMBED_VISION)


def unified_vision_entries(cfg: config_lib.ModelConfig) -> list[Entry]:
  """The 12B's `Gemma4UnifiedVisionEmbedder` under its on-disk names (transformers renames
  `vision_embedder.*` -> `embed_vision.*` and `embed_vision.embedding_projection` ->
  `embed_vision.multimodal_embedder.embedding_projection` on load, back on save); Flax paths of
  `model.unified_vision` under ("vision",)."""
  v, root, p = cfg.vision, ("vision",), VISION_EMBEDDER
  c, d = v.channels, v.mm_embed_dim
  e = [linear(f"{p}patch_dense.weight", root + ("patch_dense",), d, c),
       copy(f"{p}patch_dense.bias", root + ("patch_dense_bias",), (d,)),
       copy(f"{p}pos_embedding", root + ("pos_embedding",), (v.mm_posemb_size, 2, d)),
       linear(f"{EMBED_VISION}embedding_projection.weight", root + ("projection",), cfg.embed_dim,
              v.output_proj_dims)]
  for norm, n in (("patch_ln1", c), ("patch_ln2", d), ("pos_norm", d)):
    e += [copy(f"{p}{norm}.weight", root + (norm, "scale"), (n,)),
          copy(f"{p}{norm}.bias", root + (norm, "bias"), (n,))]
  return e


def vision_entries(cfg: config_lib.ModelConfig) -> list[Entry]:
  """Entries of the image front end (HF names under `model.`: gemma4's `vision_tower.*`,
  `embed_vision.*`; the 12B's `unified_vision_entries`), Flax paths under ("vision",); [] without
  one."""
  v = cfg.vision
  if v is None:
    return []
  if isinstance(v, vision_config.UnifiedVisionConfig):
    return unified_vision_entries(cfg)
  d, n, k, h, f = (v.hidden_size, v.num_attention_heads, v.num_key_value_heads, v.head_dim,
                   v.intermediate_size)
  clip, root, pe = v.use_clipped_linears, ("vision",), f"{VISION_TOWER}patch_embedder."
  e = [
      linear(f"{pe}input_proj.weight", root + ("input_proj",), d, v.channels),
      copy(f"{pe}position_embedding_table", root + ("position_table",),
           (2, v.position_embedding_size, d)),
      linear(f"{EMBED_VISION}embedding_projection.weight", root + ("projection",), cfg.embed_dim, d),
  ]
  if v.standardize:
    e += [copy(f"{VISION_TOWER}{b}", root + (b,), (d,)) for b in ("std_bias", "std_scale")]
  for j in range(v.num_hidden_layers):
    p, path = f"{VISION_TOWER}encoder.layers.{j}.", root + (f"layer_{j}",)
    a, m = path + ("attn",), path + ("mlp",)
    for name, heads in (("q", n), ("k", k), ("v", k)):
      e += _clippable(f"{p}self_attn.{name}_proj", a + (name,), heads_in("", (), d, heads, h), clip)
    e += _clippable(f"{p}self_attn.o_proj", a + ("o",), heads_out("", (), d, n, h), clip)
    e += _clippable(f"{p}mlp.gate_proj", m + ("gate",), linear("", (), f, d), clip)
    e += _clippable(f"{p}mlp.up_proj", m + ("up",), linear("", (), f, d), clip)
    e += _clippable(f"{p}mlp.down_proj", m + ("down",), linear("", (), d, f), clip)
    e += [copy(f"{p}self_attn.q_norm.weight", a + ("q_norm", "scale"), (h,)),
          copy(f"{p}self_attn.k_norm.weight", a + ("k_norm", "scale"), (h,))]
    for hf_norm, ours in (("input_layernorm", "pre_attention_norm"),
                          ("post_attention_layernorm", "post_attention_norm"),
                          ("pre_feedforward_layernorm", "pre_ffw_norm"),
                          ("post_feedforward_layernorm", "post_ffw_norm")):
      e.append(copy(f"{p}{hf_norm}.weight", path + (ours, "scale"), (d,)))
  return e


# ------------------------------------------------------------------------------ tree helpers
def set_path(tree: dict, path: Path, value) -> None:
  """tree[path[0]][path[1]]... = value, making the dicts on the way."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def get_path(tree: Mapping, path: Path):
  """tree[path[0]][path[1]]..."""
  for k in path:
    tree = tree[k]
  return tree


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
  """{path: leaf} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def fused_name(hf: str) -> str:
  """`experts.gate_up_proj#gate` -> `experts.gate_up_proj` (the stored tensor)."""
  return hf.split("#", 1)[0]


def to_flax(entries: Iterable[Entry], get: Callable[[str], np.ndarray], names: set[str],
            where: str = "checkpoint",
            place: Callable[[Path, np.ndarray], object] | None = None) -> dict:
  """Builds a Flax param tree, reading HF tensors with `get(name)`; `names` are the names present.

  `place(path, leaf)` (e.g. a `jax.device_put` onto the leaf's sharding) is applied to each leaf as
  soon as it is converted, so a streaming reader never holds more than one converted tensor on the
  host. Errors name the missing, unexpected or mis-shaped tensor.
  """
  entries = list(entries)
  wanted = {fused_name(e.hf) for e in entries}
  missing = sorted(wanted - names)
  if missing:
    raise ConversionError(f"{where}: missing tensor(s) {missing[:5]}"
                          f"{' and %d more' % (len(missing) - 5) if len(missing) > 5 else ''}")
  params: dict = {}
  cache: dict[str, np.ndarray] = {}
  for e in entries:
    name = fused_name(e.hf)
    if "#" not in e.hf:
      w = get(name)
    elif name in cache:  # second half of a fused tensor
      w = cache.pop(name)
    else:
      w = cache[name] = get(name)
    if tuple(w.shape) != e.hf_shape:
      raise ConversionError(f"{where}: tensor {name!r} has shape {tuple(w.shape)}, the config "
                            f"expects {e.hf_shape}")
    leaf = e.to_flax(np.asarray(w))
    set_path(params, e.path, place(e.path, leaf) if place else leaf)
  return params


def to_hf(entries: Iterable[Entry], params: Mapping) -> dict[str, np.ndarray]:
  """HF tensors (name -> array) from a Flax param tree; errors name the missing leaf."""
  out: dict[str, np.ndarray] = {}
  fused: dict[str, dict[str, np.ndarray]] = {}
  for e in entries:
    try:
      leaf = np.asarray(get_path(params, e.path))
    except KeyError:
      raise ConversionError(f"params have no leaf {'/'.join(e.path)} (for HF tensor {e.hf!r})")
    if "#" in e.hf:
      name, part = e.hf.split("#", 1)
      fused.setdefault(name, {})[part] = leaf
      continue
    out[e.hf] = e.to_hf(leaf)
  for name, parts in fused.items():  # MoE gate/up -> [E, 2F, D]
    gate, up = parts["gate"], parts["up"]
    out[name] = np.ascontiguousarray(np.concatenate([gate, up], axis=2).transpose(0, 2, 1))
  return out
