"""The files of a pair dir (and of a train workdir, which shares them): names, pair.json, params.

The formats are described in the package docstring (`gemma_mtp_jax.checkpoint`). This module
writes and reads their pieces; `pair.load_pair` and `pair.hf_to_jax` put them together.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from gemma_mtp_jax.checkpoint import safetensors_io
from gemma_mtp_jax.checkpoint import trees
from gemma_mtp_jax.checkpoint.hf_names import ConversionError
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.utils import files

PAIR_FORMAT = "gemma_mtp_jax.pair/1"
PAIR_JSON = "pair.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
HF_EXTRA_DIR = "hf_extra"


@dataclasses.dataclass
class Pair:
  """A loaded (base, drafter) pair.

  params: {"base": Flax params, "drafter": drafter variables {"params", "buffers"} or None}, as
    jax.Arrays placed on `shardings` (default device otherwise).
  tokenizer_path: a dir with the base's tokenizer files, or None.
  meta: "kind" (hf | pair | workdir | memory), "path", "step", "pair" (the pair.json dict),
    "train" (the workdir's "meta" item or None), "extra_dir" (safetensors dir holding
    carried-through tensors).
  """

  base_cfg: config_lib.ModelConfig
  drafter_cfg: config_lib.DrafterConfig | None
  params: dict
  tokenizer_path: str | None
  meta: dict


def pair_json(base_cfg, drafter_cfg, params, source, hf_extra) -> dict:
  """The pair.json dict of a pair (configs, stored base dtype, sources, `hf_extra` info)."""
  return {
      "format": PAIR_FORMAT,
      "base": config_lib.model_config_to_dict(base_cfg),
      "drafter": config_lib.drafter_config_to_dict(drafter_cfg) if drafter_cfg else None,
      "dtype": trees.dtype_name(x.dtype for x in jax.tree.leaves(params["base"])),
      "source": source,
      "hf_extra": hf_extra,
  }


def read_pair_json(path: str) -> dict:
  """The pair.json of a pair dir or train workdir; refuses another format."""
  p = os.path.join(path, PAIR_JSON)
  j = safetensors_io.read_json(p)
  if j.get("format") != PAIR_FORMAT:
    raise ConversionError(f"{p}: format is {j.get('format')!r}, expected {PAIR_FORMAT!r}")
  return j


def make_pair(base_cfg: config_lib.ModelConfig, drafter_cfg: config_lib.DrafterConfig | None,
              params: dict, tokenizer_path: str | None = None) -> Pair:
  """A Pair for params made in memory (e.g. a from-scratch init); exports generate HF configs.

  params: {"base": ..., "drafter": ... or None} with plain (unboxed) arrays, loop layout.
  """
  params = {"base": params["base"], "drafter": params.get("drafter")}
  pj = pair_json(base_cfg, drafter_cfg, params, {"base": None, "drafter": None},
                 {"base": None, "drafter": None})
  return Pair(base_cfg, drafter_cfg, params, tokenizer_path,
              dict(kind="memory", path=None, step=None, pair=pj, train=None, extra_dir=None))


def check_output(out_dir: str, overwrite: bool) -> str:
  """The absolute output path; raises if it exists and `overwrite` is off (check before working)."""
  out = os.path.abspath(out_dir)
  if os.path.lexists(out) and not overwrite:
    raise ConversionError(f"output directory {out} exists (pass --overwrite to replace it)")
  return out


def write_pair_files(dst: str, pair: Pair,
                     max_shard_size=safetensors_io.DEFAULT_MAX_SHARD_SIZE) -> None:
  """pair.json, tokenizer/ and hf_extra/ of `pair` into dst (shared by pair dirs and workdirs)."""
  pj = pair.meta["pair"]
  pj = pair_json(pair.base_cfg, pair.drafter_cfg, pair.params, pj.get("source"),
                 pj.get("hf_extra"))
  if pair.tokenizer_path:
    safetensors_io.copy_files(pair.tokenizer_path, safetensors_io.aux_files(pair.tokenizer_path),
                              os.path.join(dst, TOKENIZER_DIR))
  extra = ((pj.get("hf_extra") or {}).get("base") or {}).get("extra") or []
  if extra:
    out = os.path.join(dst, HF_EXTRA_DIR)
    os.makedirs(out)
    with safetensors_io.Reader(pair.meta["extra_dir"]) as reader:
      safetensors_io.write_safetensors(out, {n: reader.specs[n] for n in extra}, reader.get,
                                       max_shard_size)
  files.write_json(os.path.join(dst, PAIR_JSON), pj)  # last: its presence marks a complete dir


def save_params(path: str, params: dict) -> None:
  """Writes {"base": ..., "drafter": ...} (None entries dropped) as an orbax checkpoint.

  One zarr array per leaf rather than OCDBT: OCDBT's write path buffers data on the host (about
  0.3-0.5x a 400 MB model in `python -m benchmarks convert`), the per-array layout writes straight
  through. Any orbax restore reads both layouts.
  """
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False))
  ckptr.save(os.path.abspath(path),
             args=ocp.args.StandardSave({k: v for k, v in params.items() if v is not None}))
  ckptr.close()


def restore_params_dir(params_dir: str, target=None, shardings=None, dtype=None) -> dict:
  """An orbax params dir (a pair dir's params/ or a workdir step's params item) as a dict.

  target: abstract tree to restore into; default: the saved shapes, `dtype` (a numpy dtype) for
  float leaves, placed by `shardings` (see `trees`).
  """
  ckptr = ocp.StandardCheckpointer()
  if target is None:
    md = ckptr.metadata(params_dir)
    md = getattr(md, "item_metadata", md)
    target = trees.restore_target(getattr(md, "tree", md), shardings, dtype)
  out = ckptr.restore(params_dir, target)
  ckptr.close()
  return dict(out)
