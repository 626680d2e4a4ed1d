"""HF Gemma 4 model dirs -> JAX params, streamed one tensor at a time and placed as they come.

The name/layout tables are `hf_base` (the base) and `hf_assistant` (the drafter); the files are
read by `safetensors_io.Reader`. What the exporter needs to write the source's files back bit for
bit is kept as the pair's `hf_extra` info (see the package docstring).
"""

from __future__ import annotations

import collections
import logging
import os

import numpy as np

from gemma_mtp_jax.checkpoint import hf_assistant
from gemma_mtp_jax.checkpoint import hf_base
from gemma_mtp_jax.checkpoint import hf_config as hf_config_lib
from gemma_mtp_jax.checkpoint import layout
from gemma_mtp_jax.checkpoint import safetensors_io
from gemma_mtp_jax.checkpoint import trees
from gemma_mtp_jax.checkpoint.hf_names import ConversionError
from gemma_mtp_jax.model import config as config_lib

log = logging.getLogger("gemma_mtp_jax.convert")

# gemma4, gemma4_text, gemma4_assistant and the 12B's gemma4_unified{,_text,_assistant}: the
# model types of `hf_config.FAMILIES` (the readers below ask the table itself, so a family
# registered at run time counts too).
HF_MODEL_TYPES = hf_config_lib.model_types()
ASSISTANT_MODEL_TYPES = hf_config_lib.assistant_types()


def hf_model_type(path: str) -> str | None:
  """The `model_type` of an HF model dir's config.json if it is a Gemma 4 one, else None."""
  p = os.path.join(path, safetensors_io.CONFIG_NAME)
  if not os.path.isfile(p):
    return None
  mt = safetensors_io.read_json(p).get("model_type")
  return mt if mt in hf_config_lib.model_types() else None


class _Stream:
  """Reads tensors one at a time from a Reader; with `dtype`, casts float tensors (counted)."""

  def __init__(self, reader: safetensors_io.Reader, dtype, label: str):
    self.reader, self.dtype, self.label = reader, dtype, label
    self.casts: collections.Counter = collections.Counter()

  def get(self, name: str) -> np.ndarray:
    x = self.reader.get(name)
    trees.check_tensor(name, x, self.reader.file_of(name))  # dtype kind and NaN/inf, as stored
    if self.dtype is not None and trees.is_float(x.dtype) and x.dtype != self.dtype:
      self.casts[(x.dtype.name, self.dtype.name)] += 1
      x = x.astype(self.dtype)
    return x

  def log(self) -> None:
    for (a, b), n in sorted(self.casts.items()):
      log.info("%s: cast %d tensors %s -> %s (dtype=%s requested)", self.label, n, a, b,
               self.dtype.name)
    if self.dtype is None:
      kept = collections.Counter(s.dtype.name for s in self.reader.specs.values())
      log.info("%s: kept stored dtypes %s", self.label, dict(kept))


def _hf_info(reader: safetensors_io.Reader, src_dir: str, hf_config: dict) -> dict:
  gen_path = os.path.join(src_dir, safetensors_io.GENERATION_CONFIG_NAME)
  return dict(
      config=hf_config,
      generation_config=safetensors_io.read_json(gen_path) if os.path.isfile(gen_path) else None,
      tensors={n: s.to_json() for n, s in reader.specs.items()},
      layout=dict(reader.weight_map),
      index_metadata=reader.index_metadata,
  )


def read_base(src_dir: str, dtype, shardings):
  """(ModelConfig, params, hf_extra info) of an HF Gemma 4 base dir, streamed and placed."""
  cfg_path = os.path.join(src_dir, safetensors_io.CONFIG_NAME)
  hf_config = safetensors_io.read_json(cfg_path)
  if hf_config.get("model_type") in hf_config_lib.assistant_types():
    raise ConversionError(f"{cfg_path}: this is an assistant (drafter) checkpoint; pass it as the "
                          "drafter (--drafter), with the base model as the base")
  try:
    cfg = hf_config_lib.model_config_from_hf(hf_config)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{cfg_path}: {e}") from None
  with safetensors_io.Reader(src_dir) as reader:
    stream = _Stream(reader, dtype, f"base {src_dir}")
    params, extra = hf_base.hf_to_params(cfg, stream.get, reader.keys(), where=reader.where(),
                                         place=trees.placer(shardings, "base"))
    stream.log()
    info = _hf_info(reader, src_dir, hf_config)
  info["prefix"] = hf_base.detect_prefix(info["tensors"])
  info["extra"] = sorted(extra)
  if extra:
    log.info("base: carrying %d tensors outside the model's params (audio tower / embedder, or "
             "a vision front end the config lacks) through untouched", len(extra))
  return trees.with_param_dtype(cfg, params), params, info


def read_drafter(src_dir: str, base_cfg: config_lib.ModelConfig, base_where: str, dtype,
                 shardings):
  """(DrafterConfig, variables, hf_extra info) of an HF assistant dir, checked against the base."""
  cfg_path = os.path.join(src_dir, safetensors_io.CONFIG_NAME)
  hf_config = safetensors_io.read_json(cfg_path)
  assistant_types = hf_config_lib.assistant_types()
  if hf_config.get("model_type") not in assistant_types:
    raise ConversionError(f"{cfg_path}: model_type is {hf_config.get('model_type')!r}; the drafter "
                          f"must be a {' or '.join(map(repr, assistant_types))} checkpoint")
  try:
    dcfg = hf_config_lib.drafter_config_from_hf(hf_config)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{cfg_path}: {e}") from None
  try:
    dcfg.check_fits(base_cfg)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{cfg_path}: the drafter does not fit the base ({base_where}): {e}") from None
  with safetensors_io.Reader(src_dir) as reader:
    stream = _Stream(reader, dtype, f"drafter {src_dir}")
    variables = hf_assistant.hf_to_variables(dcfg, stream.get, reader.keys(), where=reader.where())
    stream.log()
    info = _hf_info(reader, src_dir, hf_config)
  # The drafter is small next to the base: placed after conversion, leaf by leaf.
  variables = trees.place_tree(variables, trees.placer(shardings, "drafter"))
  dcfg = dcfg.replace(text=trees.with_param_dtype(dcfg.text, variables["params"]))
  return dcfg, variables, info


def _tokenizer_dir(src_dir: str) -> str | None:
  names = set(os.listdir(src_dir))
  if names & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
    return src_dir
  return None


def load_hf(base: str, drafter: str | None, dtype, shardings) -> layout.Pair:
  """The Pair of an HF base dir or hub id (+ an HF assistant), converted in memory.

  dtype: a numpy float dtype to cast to, or None; shardings: see `trees`.
  """
  base_dir, base_repo = safetensors_io.resolve_model_dir(base)
  base_cfg, params, base_info = read_base(base_dir, dtype, shardings)
  dcfg, variables, d_info, d_src = None, None, None, None
  if drafter is not None:
    d_dir, d_repo = safetensors_io.resolve_model_dir(drafter)
    dcfg, variables, d_info = read_drafter(
        d_dir, base_cfg, os.path.join(base_dir, safetensors_io.CONFIG_NAME), dtype, shardings)
    d_src = d_repo or d_dir
  all_params = {"base": params, "drafter": variables}
  pj = layout.pair_json(base_cfg, dcfg, all_params,
                        {"base": base_repo or base_dir, "drafter": d_src},
                        {"base": base_info, "drafter": d_info})
  return layout.Pair(base_cfg, dcfg, all_params, _tokenizer_dir(base_dir),
                     dict(kind="hf", path=base_dir, step=None, pair=pj, train=None,
                          extra_dir=base_dir))
