"""A Pair -> HF model dirs `OUT/base/` and `OUT/drafter/` that torch `from_pretrained` reads.

A pair converted from HF dirs is written back bit for bit: same tensors, dtypes, shard layout,
config.json and generation_config.json (kept in its `hf_extra` info, see the package docstring).
A pair whose architecture changed, or one made from scratch, gets configs generated from the JAX
config by transformers' own config classes. The image front end (gemma4's vision tower, the 12B's
patch embedder) is written from its params (`hf_base`); the carried-through tensors (audio tower or
embedder, a vision front end the config lacks) come back from its hf_extra/ dir.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import os
from typing import Mapping

import numpy as np

from gemma_mtp_jax.checkpoint import hf_assistant
from gemma_mtp_jax.checkpoint import hf_base
from gemma_mtp_jax.checkpoint import hf_config as hf_config_lib
from gemma_mtp_jax.checkpoint import layout
from gemma_mtp_jax.checkpoint import safetensors_io
from gemma_mtp_jax.checkpoint import trees
from gemma_mtp_jax.checkpoint.hf_names import ConversionError
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import vision_config as vision_lib
from gemma_mtp_jax.utils import files

log = logging.getLogger("gemma_mtp_jax.convert")

DEFAULT_NUM_ASSISTANT_TOKENS = 4
DEFAULT_ASSISTANT_SCHEDULE = "constant"
# Tensors HF keeps as buffers, not parameters: left out of the index's "total_parameters".
_BUFFER_SUFFIXES = ("layer_scalar", "token_ordering") + vision_lib.BUFFER_NAMES


def _same_model(a: config_lib.ModelConfig, b: config_lib.ModelConfig) -> bool:
  """Equal architectures (numerics and compilation settings aside)."""
  return a.architecture() == b.architecture()


def _cast_for_export(tensors: dict, dtype, source_tensors: Mapping | None, label: str) -> dict:
  """Casts float tensors to `dtype` (logged); without it, warns where dtypes differ from the source."""
  if dtype is not None:
    casts = collections.Counter()
    for n, x in tensors.items():
      if trees.is_float(x.dtype) and x.dtype != dtype:
        casts[(x.dtype.name, dtype.name)] += 1
        tensors[n] = x.astype(dtype)
    for (a, b), n in sorted(casts.items()):
      log.info("%s: cast %d tensors %s -> %s (dtype=%s requested)", label, n, a, b, b)
    return tensors
  if source_tensors:
    stored = {n: safetensors_io.TensorSpec.from_json(source_tensors[n]).dtype
              for n in tensors if n in source_tensors}
    changed = collections.Counter((stored[n].name, x.dtype.name) for n, x in tensors.items()
                                  if n in stored and stored[n] != x.dtype)
    for (a, b), n in sorted(changed.items()):
      log.warning("%s: writing %d tensors as %s (as held in the checkpoint); the source stored %s "
                  "(pass --dtype %s to match it)", label, n, b, a, a)
  return tensors


def _shard_layout(specs: Mapping[str, safetensors_io.TensorSpec], info: Mapping, max_shard_size):
  """The source's shard layout when the same tensors (names, shapes, dtypes) are written and no
  shard size was asked for: the files then equal the source's byte for byte."""
  src = info.get("tensors") or {}
  if (max_shard_size is not None or not info.get("layout") or set(src) != set(specs)
      or any(safetensors_io.TensorSpec.from_json(src[n]) != s for n, s in specs.items())):
    return None, None
  return info["layout"], (info.get("index_metadata") or {}).get("total_parameters")


def _count_parameters(specs: Mapping[str, safetensors_io.TensorSpec]) -> int:
  return sum(int(np.prod(s.shape)) for n, s in specs.items() if not n.endswith(_BUFFER_SUFFIXES))


def _write_weights(out: str, specs, get, info, max_shard_size) -> None:
  shard_of, total = _shard_layout(specs, info, max_shard_size)
  safetensors_io.write_safetensors(
      out, specs, get, max_shard_size or safetensors_io.DEFAULT_MAX_SHARD_SIZE, shard_of,
      total if total is not None else _count_parameters(specs))


def _fresh_config_json(hf_config) -> dict:
  """What `save_pretrained` writes for a transformers config object (its diff to the defaults)."""
  return json.loads(hf_config.to_json_string())


def _fresh_base_config(cfg: config_lib.ModelConfig) -> dict:
  """config.json of `cfg` by transformers' classes: the text config, or with a vision tower the
  multimodal one (text + vision config + image token ids, no audio tower)."""
  import transformers
  d = hf_config_lib.model_config_to_hf(cfg)  # refuses a config its family cannot describe
  fam = hf_config_lib.FAMILIES[cfg.hf_family]
  if cfg.vision is None:
    return _fresh_config_json(getattr(transformers, fam.text_config_class)(**d))
  text = getattr(transformers, fam.text_config_class)(**d.pop("text_config"))
  vision = getattr(transformers, fam.vision_config_class)(**d.pop("vision_config"))
  return _fresh_config_json(getattr(transformers, fam.multimodal_config_class)(
      text_config=text, vision_config=vision, **d))


def _base_config_json(cfg: config_lib.ModelConfig, info: Mapping, dtype_name: str | None) -> dict:
  orig = info.get("config")
  if orig is not None and _same_model(hf_config_lib.model_config_from_hf(orig), cfg):
    out = copy.deepcopy(orig)
  else:
    fresh = _fresh_base_config(cfg)
    fam = hf_config_lib.FAMILIES[cfg.hf_family]
    if orig is not None and orig.get("model_type") == fam.multimodal_type:
      out = copy.deepcopy(orig)  # the audio config (and anything else) carried through
      if cfg.vision is None:
        fresh = {"text_config": fresh}
      for k in ("text_config", "vision_config") + vision_lib.MULTIMODAL_TOKEN_FIELDS:
        if k in fresh:
          out[k] = fresh[k]
          if isinstance(out[k], dict):
            out[k].pop("dtype", None)
    else:
      arch = fam.conditional_generation if cfg.vision is not None else fam.causal_lm
      out = dict(fresh, architectures=[arch])
    log.info("base config.json generated from the JAX config (%s)",
             "no source config" if orig is None else "the architecture differs from the source's")
  if dtype_name in trees.DTYPES and out.get("dtype") != dtype_name:
    if "dtype" in out:
      log.info("base config.json: dtype %s -> %s", out["dtype"], dtype_name)
    out["dtype"] = dtype_name
  return out


def _drafter_config_json(dcfg: config_lib.DrafterConfig, info: Mapping,
                         dtype_name: str | None) -> dict:
  orig = info.get("config")
  src = hf_config_lib.drafter_config_from_hf(orig) if orig is not None else None
  if src is not None and _same_model(src.text, dcfg.text) and src.replace(text=dcfg.text) == dcfg:
    out = copy.deepcopy(orig)
  else:
    import transformers
    d = hf_config_lib.drafter_config_to_hf(dcfg)
    fam = hf_config_lib.FAMILIES[dcfg.text.hf_family]
    text = _fresh_config_json(getattr(transformers, fam.text_config_class)(**d.pop("text_config")))
    out = _fresh_config_json(getattr(transformers, fam.assistant_config_class)(text_config=text,
                                                                               **d))
    out["architectures"] = [fam.assistant_lm]
    log.info("drafter config.json generated from the JAX config")
  if dtype_name in trees.DTYPES and out.get("dtype") != dtype_name:
    out["dtype"] = dtype_name
  return out


def _generation_config(cfg: config_lib.ModelConfig, orig: Mapping | None) -> dict:
  if orig is not None:
    return copy.deepcopy(dict(orig))
  eos = cfg.eos_token_id
  return {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(eos) if isinstance(eos, tuple)
          else eos, "pad_token_id": cfg.pad_token_id}


def _hf_extra(pair: layout.Pair, model: str) -> dict:
  return ((pair.meta.get("pair") or {}).get("hf_extra") or {}).get(model) or {}


def _export_base(pair: layout.Pair, out: str, max_shard_size, dtype) -> None:
  cfg, info = pair.base_cfg, _hf_extra(pair, "base")
  from gemma_mtp_jax.model import transformer  # the scan <-> loop layout helpers

  params = pair.params["base"]
  if any(k.startswith("scan_") for k in params):
    params = transformer.unstack_layer_params(cfg, params)
  # A tower needs the ConditionalGeneration layout whatever the source was (params_to_hf picks it).
  prefix = None if cfg.vision is not None else info.get("prefix", hf_base.CAUSAL_PREFIX)
  tensors = hf_base.params_to_hf(cfg, params, prefix)
  tensors = _cast_for_export(tensors, dtype, info.get("tensors"), "base")
  dtype_name = trees.dtype_name(x.dtype for x in tensors.values())
  specs = {n: safetensors_io.TensorSpec.of(x) for n, x in tensors.items()}
  extra = info.get("extra") or []
  reader = None
  if extra:
    if not pair.meta.get("extra_dir"):
      raise ConversionError(f"{pair.meta.get('path')}: pair.json lists {len(extra)} carried-through "
                            f"tensors (e.g. {extra[0]!r}) but there is no {layout.HF_EXTRA_DIR}/")
    reader = safetensors_io.Reader(pair.meta["extra_dir"])
    missing = [n for n in extra if n not in reader.specs]
    if missing:
      raise ConversionError(f"{reader.where()}: missing carried-through tensor {missing[0]!r}")
    specs.update({n: reader.specs[n] for n in extra})
  os.makedirs(out)
  # pop: each HF tensor is dropped once its shard is written.
  get = lambda n: tensors.pop(n) if n in tensors else reader.get(n)
  try:
    _write_weights(out, specs, get, info, max_shard_size)
  finally:
    if reader is not None:
      reader.close()
  files.write_json(os.path.join(out, safetensors_io.CONFIG_NAME),
                   _base_config_json(cfg, info, dtype_name))
  files.write_json(os.path.join(out, safetensors_io.GENERATION_CONFIG_NAME),
                   _generation_config(cfg, info.get("generation_config")))
  if pair.tokenizer_path:
    safetensors_io.copy_files(pair.tokenizer_path, safetensors_io.aux_files(pair.tokenizer_path),
                              out)


def _export_drafter(pair: layout.Pair, out: str, max_shard_size, dtype, num_assistant_tokens,
                    assistant_schedule) -> None:
  dcfg, info = pair.drafter_cfg, _hf_extra(pair, "drafter")
  tensors = hf_assistant.variables_to_hf(dcfg, pair.params["drafter"])
  tensors = _cast_for_export(tensors, dtype, info.get("tensors"), "drafter")
  dtype_name = trees.dtype_name(x.dtype for x in tensors.values())
  specs = {n: safetensors_io.TensorSpec.of(x) for n, x in tensors.items()}
  os.makedirs(out)
  _write_weights(out, specs, tensors.pop, info, max_shard_size)
  files.write_json(os.path.join(out, safetensors_io.CONFIG_NAME),
                   _drafter_config_json(dcfg, info, dtype_name))
  gen = _generation_config(dcfg.text, info.get("generation_config"))
  # generate(assistant_model=...) reads these from the assistant's generation config.
  for key, flag, default in (("num_assistant_tokens", num_assistant_tokens,
                              DEFAULT_NUM_ASSISTANT_TOKENS),
                             ("num_assistant_tokens_schedule", assistant_schedule,
                              DEFAULT_ASSISTANT_SCHEDULE)):
    value = flag if flag is not None else gen.get(key) or default
    if gen.get(key) != value:
      log.info("drafter generation_config.json: %s = %r", key, value)
    gen[key] = value
  files.write_json(os.path.join(out, safetensors_io.GENERATION_CONFIG_NAME), gen)


def check_num_assistant_tokens(n: int | None) -> None:
  """Refuses a drafter `num_assistant_tokens` below 1 (HF's assisted generation needs >= 1)."""
  if n is not None and not (isinstance(n, int) and n >= 1):
    raise ConversionError(f"num_assistant_tokens must be an integer >= 1, got {n!r}")


def export_hf(pair: layout.Pair, out_dir: str, overwrite: bool = False, max_shard_size=None,
              dtype: str | None = None, num_assistant_tokens: int | None = None,
              assistant_schedule: str | None = None, inputs=()) -> str:
  """Writes `out_dir/base/` and `out_dir/drafter/` (if the pair has one) as HF model dirs, atomically.

  Args:
    max_shard_size: e.g. "5GB"; None keeps the source's shard layout when the tensors are unchanged
      (then the files equal the source's), else transformers' default "5GB".
    dtype: cast float tensors to "bfloat16"/"float32" (logged); None writes them as held.
    num_assistant_tokens / assistant_schedule: the drafter's generation_config values (None: the
      source's, else 4 / "constant").
    inputs: local paths the output must not be, contain or lie inside (`layout.check_output`,
      which also lets `overwrite` replace only a dir this project wrote).
  """
  np_dtype = trees.as_dtype(dtype)
  check_num_assistant_tokens(num_assistant_tokens)
  layout.check_output(out_dir, overwrite, inputs)
  with files.atomic_dir(out_dir, replace=overwrite, kind="hf_export") as tmp:
    _export_base(pair, os.path.join(tmp, "base"), max_shard_size, np_dtype)
    if pair.drafter_cfg is not None:
      _export_drafter(pair, os.path.join(tmp, "drafter"), max_shard_size, np_dtype,
                      num_assistant_tokens, assistant_schedule)
  log.info("wrote %s", os.path.abspath(out_dir))
  return os.path.abspath(out_dir)


