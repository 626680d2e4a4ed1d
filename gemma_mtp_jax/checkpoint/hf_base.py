"""HF Gemma 4 base (text) state dict <-> Flax params, in memory.

Handles both HF layouts: `Gemma4ForCausalLM` (`model.*`) and `Gemma4ForConditionalGeneration`
(`model.language_model.*`, with vision/audio towers beside it, which are returned untouched as
`extra` so an export can carry them through). The 12B's `Gemma4UnifiedForCausalLM` /
`Gemma4UnifiedForConditionalGeneration` use the same text names; their multimodal tensors are the
embedders `model.vision_embedder.*`, `model.embed_vision.embedding_projection.weight` and
`model.embed_audio.embedding_projection.weight` (as stored; transformers renames them on load).
`lm_head.weight` is tied to the embedding in every released model: it is accepted on input when
equal to it and never written on output.

A base whose config has an image front end (`ModelConfig.vision`) converts it into real params
under params["vision"] (`hf_names.vision_entries`): gemma4's tower and embedder
(`model.vision_tower.*`, `model.embed_vision.*`; `model.vision`) or the 12B's patch embedder
(`model.vision_embedder.*`, `model.embed_vision.embedding_projection.weight`;
`model.unified_vision`). The audio tower / embedder stays a carried-through extra.

The Flax model is `gemma_mtp_jax.model.transformer`; the per-layer entries are in `hf_names`. Files
are read by `hf_read` and written by `hf_export`.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.checkpoint import hf_names as names

CAUSAL_PREFIX = "model."
MULTIMODAL_PREFIX = "model.language_model."


def detect_prefix(keys) -> str:
  """The prefix under which the text model's tensors live."""
  keys = list(keys)
  if any(k.startswith(MULTIMODAL_PREFIX) for k in keys):
    return MULTIMODAL_PREFIX
  if any(k.startswith(CAUSAL_PREFIX) for k in keys):
    return CAUSAL_PREFIX
  raise names.ConversionError("no Gemma 4 text tensors found (expected names starting with "
                              f"{CAUSAL_PREFIX!r} or {MULTIMODAL_PREFIX!r})")


def split_keys(cfg: config_lib.ModelConfig, keys, prefix: str | None = None):
  """(prefix, text keys without prefix, extra keys outside the text model, lm_head key or None)."""
  keys = list(keys)
  prefix = prefix or detect_prefix(keys)
  text, extra, lm_head = set(), [], None
  for k in keys:
    if k == "lm_head.weight":
      lm_head = k
    elif k.startswith(prefix):
      text.add(k[len(prefix):])
    else:
      extra.append(k)
  return prefix, text, extra, lm_head


def _split_vision(cfg: config_lib.ModelConfig, prefix: str, extra, where: str):
  """(vision tower + embedder names without `model.`, the other extra keys). Without a tower in
  the config, the tower's tensors stay extras (carried through)."""
  if cfg.vision is None:
    return set(), extra
  if prefix != MULTIMODAL_PREFIX:
    raise names.ConversionError(f"{where}: the config has a vision tower but the checkpoint is "
                                f"text-only (no {MULTIMODAL_PREFIX!r} tensors)")
  ours = tuple(CAUSAL_PREFIX + p for p in names.vision_prefixes(cfg))
  vision = {k[len(CAUSAL_PREFIX):] for k in extra if k.startswith(ours)}
  unexpected = sorted(vision - {e.hf for e in names.vision_entries(cfg)})
  if unexpected:
    raise names.ConversionError(f"{where}: unexpected vision tensor(s) for this config "
                                f"{[CAUSAL_PREFIX + u for u in unexpected[:5]]}")
  return vision, [k for k in extra if not k.startswith(ours)]


def hf_to_params(cfg: config_lib.ModelConfig, get: Callable[[str], np.ndarray], keys,
                 where: str = "checkpoint", prefix: str | None = None, place=None):
  """Flax params of the base from HF tensors.

  Args:
    get: reads one tensor by its full HF name (streaming: called once per tensor).
    keys: every tensor name in the checkpoint.
    place: optional `place(path, leaf)` applied to each converted leaf (see `names.to_flax`).
  Returns:
    (params, extra_keys): extra_keys are tensors outside the model's params (the audio tower; the
    vision tower too when the config has none).
  """
  prefix, text, extra, lm_head = split_keys(cfg, keys, prefix)
  vision, extra = _split_vision(cfg, prefix, extra, where)
  entries = names.base_entries(cfg)
  expected = {names.fused_name(e.hf) for e in entries}
  unexpected = sorted(text - expected)
  if prefix == CAUSAL_PREFIX and extra:
    unexpected += sorted(extra)
  if unexpected:
    raise names.ConversionError(f"{where}: unexpected tensor(s) for this config "
                                f"{[prefix + u if u in text else u for u in unexpected[:5]]}")
  params = names.to_flax(entries, lambda n: get(prefix + n), text, where, place)
  if cfg.vision is not None:
    params.update(names.to_flax(names.vision_entries(cfg), lambda n: get(CAUSAL_PREFIX + n), vision,
                                where, place))
  if lm_head is not None:
    w = np.asarray(get(lm_head))
    if cfg.tie_word_embeddings:
      if w.shape != params["embedding"].shape or not np.array_equal(w, params["embedding"]):
        raise names.ConversionError(f"{where}: 'lm_head.weight' differs from the tied embedding "
                                    "but the config says tie_word_embeddings=True")
    else:
      head = np.ascontiguousarray(w.T)
      params["lm_head"] = place(("lm_head",), head) if place else head
  elif not cfg.tie_word_embeddings:
    raise names.ConversionError(f"{where}: missing tensor 'lm_head.weight' (untied head)")
  return params, extra


def params_to_hf(cfg: config_lib.ModelConfig, params: Mapping,
                 prefix: str | None = None) -> dict[str, np.ndarray]:
  """HF tensors of the base; the tied lm_head is not written (HF re-ties it on load). `prefix` of
  the text model: None picks `model.language_model.` with a vision tower, else `model.`."""
  prefix = prefix or (MULTIMODAL_PREFIX if cfg.vision is not None else CAUSAL_PREFIX)
  out = {prefix + k: v for k, v in names.to_hf(names.base_entries(cfg), params).items()}
  if cfg.vision is not None:
    if prefix != MULTIMODAL_PREFIX:
      raise names.ConversionError(f"a base with a vision tower is written under {MULTIMODAL_PREFIX!r}, "
                                  f"not {prefix!r}")
    vision = names.to_hf(names.vision_entries(cfg), params)
    out.update({CAUSAL_PREFIX + k: v for k, v in vision.items()})
  if not cfg.tie_word_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]).T)
  return out


def state_dict_to_params(cfg: config_lib.ModelConfig, state: Mapping[str, np.ndarray],
                         where: str = "state dict"):
  """Convenience for in-memory dicts (e.g. a torch state_dict turned into numpy)."""
  params, _ = hf_to_params(cfg, lambda n: state[n], state.keys(), where)
  return params
