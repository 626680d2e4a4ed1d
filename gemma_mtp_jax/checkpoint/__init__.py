"""Checkpoints of a (base, drafter) pair: the JAX-side formats, HF conversion, and one loader.

Modules, lowest first (each imports only the ones above it):
  hf_config       HF config dicts <-> ModelConfig / DrafterConfig / vision configs, and the table
                  of Gemma 4 families (HF model types, class names, defaults, family fields)
  hf_names        HF tensor name <-> Flax leaf table entries, ConversionError
  hf_base         the base's table (Gemma4ForCausalLM / Gemma4ForConditionalGeneration)
  hf_assistant    the assistant's table (Gemma4AssistantForCausalLM)
  safetensors_io  safetensors files and HF model dirs on disk (streamed Reader, sharded writer)
  trees           float casts, shardings and restore targets of param trees
  layout          the pair-dir files below: names, pair.json, params/, Pair
  workdir         the train workdir's orbax CheckpointManager (checkpoints/), init_workdir, and
                  the fallback past unreadable steps (latest_intact_step, restore_newest_intact)
  hf_read         HF dir -> Pair, streamed one tensor at a time onto the target sharding
  hf_export       Pair -> HF dirs base/ + drafter/ (export_hf)
  pair            load_pair (any source), hf_to_jax, jax_to_hf

Pair dir (what `python -m gemma_mtp_jax.convert hf-to-jax` writes):
  pair.json    {"format": PAIR_FORMAT, "base": ModelConfig dict, "drafter": DrafterConfig dict or null,
                "dtype": stored float dtype of the base, "source": {"base", "drafter"},
                "hf_extra": {"base": ..., "drafter": ...}}  (see below)
  params/      orbax checkpoint of {"base": params, "drafter": variables} (loop layout `layer_{i}`)
  tokenizer/   the base's tokenizer, chat template and processor files, as HF ships them
  hf_extra/    safetensors of tensors carried through untouched (Gemma4ForConditionalGeneration's
               vision/audio towers and projectors), when the base has any

Train workdir (what the trainer writes; the same pair.json, tokenizer/ and hf_extra/):
  checkpoints/ an `ocp.CheckpointManager` (`open_manager`); each step holds items "params"
               ({"base", "drafter"}), "opt_state" and "meta" (JSON: step, data position, rng, ...)

`hf_extra[model]` keeps what the exporter needs to write HF dirs that equal the source bit for bit:
  config / generation_config: the source's JSON dicts (None if absent)
  prefix: where the text model's tensors live (`model.` causal LM, `model.language_model.` multimodal)
  tensors: name -> [dtype, shape] of every source tensor (the source dtypes, and the shard-layout check)
  layout: name -> shard file of the source; index_metadata: its index.json "metadata" (or None)
  extra: names of the carried-through tensors (base only)

Every directory is published atomically (`gemma_mtp_jax.utils.files.atomic_dir`), with the
project's ownership marker (`files.MARKER`: kind "pair", "hf_export" or "workdir"); `--overwrite`
replaces only a pair dir or HF export this project wrote, and no output may be, contain or lie
inside an input (`layout.check_output`). Every loaded tensor is checked: float dtypes except the
drafter's int `token_ordering`, and no NaN/inf (`trees.check_tensor`, `trees.check_tree`).

The public API is importable from the package (`from gemma_mtp_jax import checkpoint;
checkpoint.load_pair(...)`) and from `pair`. The package resolves these names on first use, so that
importing a light submodule (e.g. `hf_names` for ConversionError) does not import JAX and orbax.
"""

from __future__ import annotations

import importlib

# name -> submodule defining it.
_PUBLIC = {
    "ConversionError": "hf_names",
    "DTYPES": "trees",
    "PAIR_FORMAT": "layout", "PAIR_JSON": "layout", "PARAMS_DIR": "layout",
    "TOKENIZER_DIR": "layout", "HF_EXTRA_DIR": "layout", "Pair": "layout", "make_pair": "layout",
    "read_pair_json": "layout", "pair_configs": "layout", "write_pair_files": "layout", "save_params": "layout",
    "CHECKPOINTS_DIR": "workdir", "open_manager": "workdir", "save_args": "workdir",
    "restore_train_state": "workdir", "init_workdir": "workdir",
    "latest_intact_step": "workdir", "restore_newest_intact": "workdir", "step_problem": "workdir",
    "HF_MODEL_TYPES": "hf_read", "hf_model_type": "hf_read",
    "export_hf": "hf_export",
    "detect_kind": "pair", "load_pair": "pair", "restore_params": "pair", "hf_to_jax": "pair",
    "jax_to_hf": "pair",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
