"""The files of a pair dir (and of a train workdir, which shares them): names, pair.json, params.

The formats are described in the package docstring (`gemma_mtp_jax.checkpoint`). This module
writes and reads their pieces; `pair.load_pair` and `pair.hf_to_jax` put them together.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from gemma_mtp_jax.checkpoint import hf_config
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
CHECKPOINTS_DIR = "checkpoints"  # a train workdir's orbax steps (`workdir`)


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


def pair_configs(pj: dict) -> tuple[config_lib.ModelConfig, config_lib.DrafterConfig | None]:
  """The (base, drafter or None) configs of a pair.json dict. Dicts written before a family field
  of ModelConfig existed get their family's value (`hf_config.with_family_fields`): an old 12B
  pair dir or workdir still computes the 12B's image masks."""
  base = config_lib.model_config_from_dict(hf_config.with_family_fields(pj["base"]), "base")
  d = pj.get("drafter")
  return base, (config_lib.drafter_config_from_dict(hf_config.drafter_with_family_fields(d))
                if d else None)


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


# Kinds of project dirs (`files.MARKER`) that `--overwrite` may replace: outputs, which can be
# made again. A train workdir is never replaced: its checkpoints are the run.
REPLACEABLE = ("pair", "hf_export")


def dir_kind(path: str) -> str | None:
  """The project kind of an existing dir: its marker's, else (dirs written before the marker
  existed) "pair" / "workdir" from a pair.json of this format, "hf_export" for a train workdir's
  own `hf/` export; None for any other dir."""
  kind = files.read_marker(path)
  if kind is not None:
    return kind
  pj = os.path.join(path, PAIR_JSON)
  if os.path.isfile(pj):
    try:
      fmt = safetensors_io.read_json(pj).get("format")
    except ConversionError:
      return None
    if fmt == PAIR_FORMAT:
      return "workdir" if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)) else "pair"
  parent = os.path.dirname(os.path.realpath(path))
  if os.path.basename(os.path.realpath(path)) == "hf" and dir_kind(parent) == "workdir":
    return "hf_export"
  return None


def check_output(out_dir: str, overwrite: bool, inputs=()) -> str:
  """The absolute output path, after refusing (before any work, whatever `overwrite` says) an
  output that is, contains or lies inside a local input path (symlinks resolved), and an existing
  output unless `overwrite` is on and the dir is empty or one this project wrote (`REPLACEABLE`).
  """
  out = os.path.abspath(out_dir)
  for inp in inputs:
    if inp and os.path.exists(inp):
      how = files.relation(out, inp)
      if how is not None:
        raise ConversionError(f"output directory {out} {how} the input {os.path.abspath(inp)}; "
                              "refused (nothing was written): choose an output outside the inputs")
  if not os.path.lexists(out):
    return out
  if not overwrite:
    raise ConversionError(f"output directory {out} exists (pass --overwrite to replace it)")
  if not os.path.isdir(out) or os.path.islink(out):
    raise ConversionError(f"output {out} exists and is not a directory; --overwrite replaces only "
                          "a directory this project wrote")
  kind = dir_kind(out)
  if kind == "workdir":
    raise ConversionError(f"output directory {out} is a train workdir; --overwrite never replaces "
                          "one (its checkpoints would be lost)")
  if kind not in REPLACEABLE and os.listdir(out):
    raise ConversionError(f"output directory {out} was not written by this project (no "
                          f"{files.MARKER}); --overwrite replaces only such directories, never "
                          "other files: remove it yourself or choose another output")
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
