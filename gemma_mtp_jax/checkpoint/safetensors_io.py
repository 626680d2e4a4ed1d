"""Safetensors checkpoints on disk, as HF `save_pretrained` writes them, and HF model dirs' other files.

Reading (`Reader`) streams: names, shapes and dtypes come from the file headers, and `get(name)` reads
one tensor, keeping at most one shard file mapped, so a converter holds one tensor (plus its converted
copy) at a time however large the checkpoint. Bytes come back exactly as stored: bfloat16 stays
bfloat16 (ml_dtypes), int64 stays int64.

Writing (`write_safetensors`) splits tensors into shards with huggingface_hub's splitter (the one
transformers uses), writes each shard with `safetensors.numpy.save_file` and metadata
`{"format": "pt"}`, and the `model.safetensors.index.json` HF writes, so torch `from_pretrained`
reads the result unchanged. Given the source's shard layout it reproduces the files byte for byte.

Output dirs are published with `gemma_mtp_jax.utils.files.atomic_dir` (built beside the final path,
renamed into place); this module writes only into the dir it is given.

Only safetensors are read: pickle checkpoints (`.bin`, `.pt`, ...) can run code on load and are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Callable, Mapping, Sequence

import huggingface_hub
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from gemma_mtp_jax.checkpoint.hf_names import ConversionError
from gemma_mtp_jax.utils import files

log = logging.getLogger("gemma_mtp_jax.convert")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"  # HF: model-00001-of-00003.safetensors
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files of an HF model dir that are not weights or model configs: tokenizer, chat template, processor
# configs, README/LICENSE. They travel with the base model unchanged.
_NOT_AUX = {CONFIG_NAME, GENERATION_CONFIG_NAME, INDEX_NAME, "pytorch_model.bin.index.json"}
_NOT_AUX_SUFFIXES = (".safetensors", ".msgpack", ".h5", ".gguf", ".onnx") + PICKLE_SUFFIXES

# safetensors header dtype -> numpy dtype (ml_dtypes for the types numpy lacks).
_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """Shape and dtype of a tensor that need not be in memory."""

  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

  @classmethod
  def of(cls, x) -> "TensorSpec":
    return cls(tuple(int(d) for d in x.shape), np.dtype(x.dtype))

  def to_json(self) -> list:
    return [np.dtype(self.dtype).name, list(self.shape)]

  @classmethod
  def from_json(cls, j) -> "TensorSpec":
    return cls(tuple(j[1]), np.dtype(getattr(ml_dtypes, j[0], None) or j[0]))


def refuse_pickle(path: str) -> None:
  """Raises the ConversionError for a pickle checkpoint at `path`."""
  raise ConversionError(f"{path}: refusing a pickle checkpoint (unpickling can run arbitrary code); "
                        "only safetensors are read. Re-save it with `save_pretrained(..., "
                        "safe_serialization=True)` or convert it to safetensors first.")


def read_json(path: str) -> dict:
  """A JSON file holding an object, as a dict; errors name the file."""
  try:
    with open(path, encoding="utf-8") as f:
      j = json.load(f)
  except FileNotFoundError:
    raise ConversionError(f"{path}: file not found") from None
  except IsADirectoryError:
    raise ConversionError(f"{path}: is a directory, expected a JSON file") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(j, dict):
    raise ConversionError(f"{path}: expected a JSON object, got a JSON {type(j).__name__}")
  return j


class Reader:
  """A safetensors checkpoint: one file, or a dir with `model.safetensors` or shards + index.json.

  Headers are read and cross-checked against the index on construction (so a corrupt, truncated
  or inconsistent file fails before any conversion work); tensors are read on demand.
  """

  def __init__(self, path: str):
    path = os.path.abspath(path)
    self.path = path
    self.index_metadata: dict | None = None
    if os.path.isfile(path):
      if path.endswith(PICKLE_SUFFIXES):
        refuse_pickle(path)
      if path.endswith(".json"):
        self._from_index(path)
      else:
        self.dir, self.location = os.path.dirname(path), path
        self._scan_files({os.path.basename(path): None})
      return
    if not os.path.isdir(path):
      raise ConversionError(f"{path}: no such file or directory")
    self.dir = path
    index = os.path.join(path, INDEX_NAME)
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(index):
      self._from_index(index)
    elif os.path.isfile(single):
      self.location = single
      self._scan_files({WEIGHTS_NAME: None})
    else:
      files = sorted(os.listdir(path))
      pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
      if pickles:
        refuse_pickle(os.path.join(path, pickles[0]))
      shards = [f for f in files if f.endswith(".safetensors")]
      if shards:
        raise ConversionError(f"{path}: safetensors shards {shards[:3]} but no {INDEX_NAME}")
      raise ConversionError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (not a safetensors "
                            "checkpoint)")

  # ---------------------------------------------------------------------------- header scan
  def _from_index(self, index: str) -> None:
    self.dir, self.location = os.path.dirname(index), index
    j = read_json(index)
    if not isinstance(j.get("weight_map"), dict):
      raise ConversionError(f"{index}: no 'weight_map'")
    self.index_metadata = j.get("metadata")
    by_file: dict[str, set[str]] = {}
    for name, fname in j["weight_map"].items():
      by_file.setdefault(fname, set()).add(name)
    self._scan_files(by_file)

  def _scan_files(self, by_file: Mapping[str, set[str] | None]) -> None:
    """Reads every header; `by_file[f]` are the names the index puts in f (None: no index)."""
    self.specs: dict[str, TensorSpec] = {}
    self.weight_map: dict[str, str] = {}
    self.file_metadata: dict[str, dict | None] = {}
    for fname, listed in by_file.items():
      fpath = os.path.join(self.dir, fname)
      if fname.endswith(PICKLE_SUFFIXES):
        refuse_pickle(fpath)
      if not os.path.isfile(fpath):
        raise ConversionError(f"{self.location}: shard file {fname!r} is listed but missing "
                              f"({fpath})")
      with self._open(fpath) as f:
        names = list(f.keys())
        self.file_metadata[fname] = f.metadata()
        for name in names:
          sl = f.get_slice(name)
          dt = sl.get_dtype()
          if dt not in _DTYPES:
            raise ConversionError(f"{fpath}: tensor {name!r} has unsupported dtype {dt}")
          if name in self.specs:
            raise ConversionError(f"{fpath}: tensor {name!r} also stored in "
                                  f"{self.weight_map[name]!r}")
          self.specs[name] = TensorSpec(tuple(sl.get_shape()), np.dtype(_DTYPES[dt]))
          self.weight_map[name] = fname
      if listed is not None:
        absent = sorted(listed - set(names))
        if absent:
          raise ConversionError(f"{fpath}: tensor {absent[0]!r} is listed in {self.location} but "
                                "not stored in this shard (corrupt or mismatched shard)")
        extra = sorted(set(names) - listed)
        if extra:
          raise ConversionError(f"{fpath}: tensor {extra[0]!r} is stored in this shard but not "
                                f"listed in {self.location}")
    self._handle = None
    self._handle_file = None

  @staticmethod
  def _open(fpath: str):
    try:
      return safetensors.safe_open(fpath, framework="numpy")
    except (safetensors.SafetensorError, OSError, ValueError) as e:
      raise ConversionError(f"{fpath}: corrupt or truncated safetensors file ({e})") from None

  # ---------------------------------------------------------------------------- access
  def where(self) -> str:
    """What error messages call this checkpoint: the single file, or the index."""
    return self.location

  def keys(self) -> list[str]:
    return list(self.specs)

  def file_of(self, name: str) -> str:
    return os.path.join(self.dir, self.weight_map[name])

  def get(self, name: str) -> np.ndarray:
    """Reads one tensor with its stored dtype and shape."""
    if name not in self.specs:
      raise ConversionError(f"{self.location}: no tensor {name!r}")
    fname = self.weight_map[name]
    if self._handle_file != fname:
      # One shard mapped at a time: a mapped shard's touched pages count as resident memory.
      self.close()
      self._handle = self._open(os.path.join(self.dir, fname)).__enter__()
      self._handle_file = fname
    try:
      x = self._handle.get_tensor(name)
    except Exception as e:  # the header was valid; the data region is not readable
      raise ConversionError(f"{self.file_of(name)}: cannot read tensor {name!r} ({e})") from None
    spec = self.specs[name]
    if tuple(x.shape) != spec.shape or x.dtype != spec.dtype:
      raise ConversionError(f"{self.file_of(name)}: tensor {name!r} read as {x.dtype}{x.shape}, "
                            f"header says {spec.dtype}{spec.shape}")
    return x

  def close(self) -> None:
    if self._handle is not None:
      self._handle.__exit__(None, None, None)
      self._handle = self._handle_file = None

  def __enter__(self) -> "Reader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------ writing
def plan_shards(specs: Mapping[str, TensorSpec], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                layout: Mapping[str, str] | None = None) -> dict[str, list[str]]:
  """Shard file name -> tensor names, in `specs` order.

  With `layout` (name -> file name of a source checkpoint, covering exactly these names) the source's
  grouping is kept; otherwise huggingface_hub's greedy splitter (what `save_pretrained` uses) fills
  shards up to `max_shard_size` bytes.
  """
  if layout is not None:
    if set(layout) != set(specs):
      raise ValueError("layout must name exactly the tensors written")
    out: dict[str, list[str]] = {}
    for name in specs:
      out.setdefault(layout[name], []).append(name)
    return out
  if isinstance(max_shard_size, str) and max_shard_size.strip().isdigit():
    max_shard_size = int(max_shard_size)  # plain bytes
  try:
    split = huggingface_hub.split_state_dict_into_shards_factory(
        dict(specs), get_storage_size=lambda s: s.nbytes, filename_pattern=SHARD_PATTERN,
        max_shard_size=max_shard_size)
  except ValueError as e:  # an unparsable size string
    raise ConversionError(f"max shard size {max_shard_size!r}: {e}") from None
  return {f: list(names) for f, names in split.filename_to_tensors.items()}


def _write_shard(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
  """One safetensors file (its own function so tests can make it fail mid-checkpoint)."""
  safetensors.numpy.save_file(tensors, path, metadata=metadata)


def write_safetensors(out_dir: str, specs: Mapping[str, TensorSpec], get: Callable[[str], np.ndarray],
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      layout: Mapping[str, str] | None = None,
                      total_parameters: int | None = None) -> list[str]:
  """Writes tensors as an HF safetensors checkpoint, one shard in memory at a time.

  Args:
    specs: name -> TensorSpec of every tensor, in the order shards are filled.
    get: returns a tensor by name; called once per tensor while its shard is written.
    layout: keep a source checkpoint's shard grouping (see `plan_shards`).
    total_parameters: goes into the index metadata as transformers writes it.
  Returns:
    The file names written (shards, then the index if sharded).
  """
  plan = plan_shards(specs, max_shard_size, layout)
  sharded = len(plan) > 1 or next(iter(plan), WEIGHTS_NAME) != WEIGHTS_NAME
  written = []
  for fname, names in plan.items():
    shard = {}
    for n in names:
      x = get(n)
      if not x.flags.c_contiguous:  # (np.ascontiguousarray would also turn 0-d into 1-d)
        x = np.ascontiguousarray(x)
      if TensorSpec.of(x) != specs[n]:
        raise ConversionError(f"tensor {n!r} is {x.dtype}{x.shape}, expected "
                              f"{specs[n].dtype}{specs[n].shape}")
      shard[n] = x
    _write_shard(shard, os.path.join(out_dir, fname), {"format": "pt"})
    del shard
    written.append(fname)
  if sharded:
    meta = {"total_size": sum(s.nbytes for s in specs.values())}
    if total_parameters is not None:
      meta["total_parameters"] = total_parameters
    weight_map = {n: f for f, names in plan.items() for n in names}
    files.write_json(os.path.join(out_dir, INDEX_NAME), {"metadata": meta, "weight_map": weight_map})
    written.append(INDEX_NAME)
  return written


# ------------------------------------------------------------------------------ HF model dirs
def aux_files(src_dir: str) -> list[str]:
  """Top-level files of an HF model dir other than weights and model configs (tokenizer, chat
  template, processor configs, README, ...): what travels with the model unchanged."""
  out = []
  for name in sorted(os.listdir(src_dir)):
    p = os.path.join(src_dir, name)
    if (name.startswith(".") or not os.path.isfile(p) or name in _NOT_AUX
        or name.endswith(_NOT_AUX_SUFFIXES)):
      continue
    out.append(name)
  return out


def copy_files(src_dir: str, names: Sequence[str], dst_dir: str) -> None:
  """Copies the named files of `src_dir` into `dst_dir` (made if missing), metadata included."""
  os.makedirs(dst_dir, exist_ok=True)
  for name in names:
    shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def looks_like_repo_id(s: str) -> bool:
  """Whether `s` (naming no existing local path) is a hub id; see `files.is_hub_id` for the rule."""
  return files.is_hub_id(s)


def _hub_error(e: Exception) -> bool:
  """Whether `e` is huggingface_hub's (or its HTTP stack's) way of saying a download failed."""
  mod = type(e).__module__.split(".")[0]
  return isinstance(e, (OSError, ValueError)) or mod in ("huggingface_hub", "httpx", "requests")


def resolve_model_dir(path_or_repo: str) -> tuple[str, str | None]:
  """(local dir, hub repo id or None). A local path wins; a missing path is reported as such
  unless it is a hub id (`files.is_hub_id`: `org/name` with no local `org/`), which is downloaded
  (safetensors, JSON and tokenizer files only: never pickles) with huggingface_hub."""
  if os.path.exists(path_or_repo):
    if os.path.isfile(path_or_repo) and path_or_repo.endswith(PICKLE_SUFFIXES):
      refuse_pickle(os.path.abspath(path_or_repo))
    return os.path.abspath(path_or_repo), None
  if not looks_like_repo_id(path_or_repo):
    raise ConversionError(f"no such directory: {path_or_repo}")
  try:
    local = huggingface_hub.snapshot_download(
        path_or_repo, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt",
                                      "*.md", "LICENSE*"])
  except Exception as e:  # noqa: BLE001 (narrowed by _hub_error; anything else is re-raised)
    if not _hub_error(e):
      raise
    cause = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConversionError(f"{path_or_repo}: no such local directory, and not available as a Hub "
                          f"repo id ({type(e).__name__}: {cause})") from None
  return local, path_or_repo
