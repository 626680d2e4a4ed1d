"""HF Gemma 4 assistant (`Gemma4AssistantForCausalLM`, and the 12B's
`Gemma4UnifiedAssistantForCausalLM`: the same tensors) state dict <-> Flax drafter variables, in
memory.

HF tensors and where they go:
  model.embed_tokens.weight            [V, D]     params/embedding (also the tied lm_head)
  model.layers.{i}.*                              params/layer_{i}/... (query-only layers, hf_names)
  model.norm.weight                    [D]        params/final_norm/scale
  pre_projection.weight                [D, 2M]    params/pre_projection [2M, D]
  post_projection.weight               [M, D]     params/post_projection [D, M]
  masked_embedding.centroids.weight    [C, D]     params/centroids [D, C]   (ordered embeddings)
  masked_embedding.token_ordering      int64 [V]  buffers/token_ordering int32 [V]
`lm_head.weight` is tied to the embedding: accepted on input when equal to it, never written. The
token ordering is a permutation of the vocab, so int32 holds it exactly (JAX runs without x64); export
writes int64 again, so HF -> Flax -> HF is bit-exact.

The Flax drafter itself is `gemma_mtp_jax.model.drafter`; this module is only its HF name/layout
table (`hf_names` holds the shared entries). Files are read by `hf_read` and written by `hf_export`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.checkpoint import hf_names as names

LM_HEAD = "lm_head.weight"
TOKEN_ORDERING = "masked_embedding.token_ordering"


def drafter_entries(cfg: config_lib.DrafterConfig) -> list[names.Entry]:
  """Float tensors of the assistant (full HF names; the token ordering buffer is separate)."""
  t = cfg.text
  d, m, v = t.embed_dim, cfg.backbone_hidden_size, t.vocab_size
  e = [
      names.copy("model.embed_tokens.weight", ("embedding",), (v, d)),
      names.copy("model.norm.weight", ("final_norm", "scale"), (d,)),
      names.linear("pre_projection.weight", ("pre_projection",), d, 2 * m),
      names.linear("post_projection.weight", ("post_projection",), m, d),
  ]
  for i in range(t.num_layers):
    e += names.layer_entries(t, i, f"model.layers.{i}.", (f"layer_{i}",))
  if cfg.use_ordered_embeddings:
    e.append(names.linear("masked_embedding.centroids.weight", ("centroids",), cfg.num_centroids, d))
  return e


def hf_to_variables(cfg: config_lib.DrafterConfig, get: Callable[[str], np.ndarray], keys,
                    where: str = "checkpoint") -> dict:
  """Flax drafter variables {"params", "buffers"} from HF tensors read with `get(name)`."""
  keys = set(keys)
  entries = drafter_entries(cfg)
  expected = {e.hf for e in entries} | {LM_HEAD}
  if cfg.use_ordered_embeddings:
    expected.add(TOKEN_ORDERING)
  unexpected = sorted(keys - expected)
  if unexpected:
    raise names.ConversionError(f"{where}: unexpected tensor(s) for this drafter config "
                                f"{unexpected[:5]}")
  params = names.to_flax(entries, get, keys, where)
  if LM_HEAD in keys:
    w = np.asarray(get(LM_HEAD))
    if w.shape != params["embedding"].shape or not np.array_equal(w, params["embedding"]):
      raise names.ConversionError(f"{where}: {LM_HEAD!r} differs from the tied "
                                  "'model.embed_tokens.weight'")
  variables = {"params": params}
  if cfg.use_ordered_embeddings:
    if TOKEN_ORDERING not in keys:
      raise names.ConversionError(f"{where}: missing tensor {TOKEN_ORDERING!r} "
                                  "(use_ordered_embeddings=True)")
    variables["buffers"] = {"token_ordering": ordering_to_flax(get(TOKEN_ORDERING), cfg, where)}
  return variables


def ordering_to_flax(w, cfg: config_lib.DrafterConfig, where: str = "checkpoint") -> np.ndarray:
  """int64 [V] -> int32 [V], refusing anything int32 cannot hold exactly or that indexes outside V."""
  w = np.asarray(w)
  v = cfg.text.vocab_size
  if w.shape != (v,):
    raise names.ConversionError(f"{where}: tensor {TOKEN_ORDERING!r} has shape {w.shape}, the "
                                f"config expects {(v,)}")
  if not np.issubdtype(w.dtype, np.integer):
    raise names.ConversionError(f"{where}: tensor {TOKEN_ORDERING!r} has dtype {w.dtype}, "
                                "expected an integer type")
  if w.size and (w.min() < 0 or w.max() >= v):
    raise names.ConversionError(f"{where}: tensor {TOKEN_ORDERING!r} holds ids outside [0, {v})")
  return w.astype(np.int32)


def variables_to_hf(cfg: config_lib.DrafterConfig, variables: Mapping) -> dict[str, np.ndarray]:
  """HF tensors of the assistant (tied lm_head not written; HF re-ties it on load)."""
  out = names.to_hf(drafter_entries(cfg), variables["params"])
  if cfg.use_ordered_embeddings:
    try:
      ordering = variables["buffers"]["token_ordering"]
    except KeyError:
      raise names.ConversionError("drafter variables have no buffers/token_ordering "
                                  f"(for HF tensor {TOKEN_ORDERING!r})")
    out[TOKEN_ORDERING] = np.asarray(ordering).astype(np.int64)
  return out


def state_dict_to_variables(cfg: config_lib.DrafterConfig, state: Mapping[str, np.ndarray],
                            where: str = "state dict") -> dict:
  """Convenience for in-memory dicts (e.g. a torch state_dict turned into numpy)."""
  return hf_to_variables(cfg, lambda n: state[n], state.keys(), where)
