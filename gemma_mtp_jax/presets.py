"""Named presets: ml_collections config files in the repo's `configs/` directory.

A preset file is a plain Python file with `get_config()` returning a ConfigDict with `model` (ModelConfig
fields), `drafter` (DrafterConfig fields, `text` holding ModelConfig fields), `hf_base`, `hf_drafter`,
`train` (`training.config.train_fields`: the fields of `TrainConfig`, the joint objective, schedule,
optimizer, eval, checkpoints, export), `data` (a `gemma_mtp_jax.data` config: sources, mixture
weights, eval split, tokenizer), `mesh` (`mesh_fields`: mesh axes and logical sharding rules) and
`eval` (`eval_fields`: the draft-length advice's cost ratio).
`training.config.validate_config` checks every key of every section, so a typo fails with the
closest valid key. The files are loaded by path
(the `ml_collections.config_flags` convention, `path:arg` included), so `configs/` is a directory, not
a package.

The small builders below (`text_fields`, `drafter_fields`, `mesh_fields`) and
`training.config.train_fields` (which lives with the TrainConfig dataclass it reads, one layer up) are
what the preset files call, so the defaults live in one place (the ModelConfig and TrainConfig
dataclasses) and each preset only states what its released config.json states.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.model.config import (
    FAMILY_FIELDS,
    ConfigError,
    DrafterConfig,
    ModelConfig,
    closest,
    drafter_config_from_dict,
    model_config_from_dict,
)

# The checkout's configs/ (editable installs, source trees) first; then the copy setup.py installs as
# data files, for a plain `pip install .`.
CONFIG_DIRS = (
    Path(__file__).resolve().parent.parent / "configs",
    Path(sys.prefix) / "share" / "gemma_mtp_jax" / "configs",
)

# Fields whose default is None: ConfigDict cannot infer a type from None, so they become typed
# placeholders, which keeps `--config.model.num_global_kv_heads=2` style overrides working.
_NONE_FIELD_TYPES = {"num_global_kv_heads": int, "final_logit_softcap": float,
                     "attn_logit_softcap": float, "image_token_id": int, "boi_token_id": int,
                     "eoi_token_id": int, "use_bidirectional_attention": str}


# ---------------------------------------------------------------------- builders used by configs/*.py
def text_fields(**fields: Any) -> dict[str, Any]:
  """Every ModelConfig field: the dataclass defaults (the Gemma 4 family values) updated by `fields`,
  with the family fields (`FAMILY_FIELDS`) of `hf_family` from the family table
  (`checkpoint.hf_config.FAMILIES`) unless `fields` sets them.

  Writing all fields into the preset makes each one overridable from the command line and visible
  in a dumped config; unknown names raise ConfigError with a suggestion.
  """
  names = [f.name for f in dataclasses.fields(ModelConfig)]
  for k in fields:
    if k not in names:
      raise ConfigError(f"unknown ModelConfig field '{k}'{closest(k, names)}")
  family = hf_config.family_fields(fields.get("hf_family", ModelConfig.hf_family))
  out = {}
  for f in dataclasses.fields(ModelConfig):
    if f.name in fields:
      v = fields[f.name]
    elif f.name in FAMILY_FIELDS:
      v = family[f.name]
    elif f.default is not dataclasses.MISSING:
      v = f.default
    else:
      raise ConfigError(f"ModelConfig field '{f.name}' has no default; the preset must set it")
    if v is None and f.name in _NONE_FIELD_TYPES:
      v = placeholder(_NONE_FIELD_TYPES[f.name])
    out[f.name] = tuple(v) if isinstance(v, list) else v
  return out


def drafter_fields(text: dict[str, Any], backbone_hidden_size: int, *,
                   use_ordered_embeddings: bool = False, num_centroids: int = 2048,
                   centroid_intermediate_top_k: int = 32) -> dict[str, Any]:
  """The `drafter` entry of a preset: DrafterConfig fields, with `text` from `text_fields`."""
  return dict(text=text, backbone_hidden_size=backbone_hidden_size,
              use_ordered_embeddings=use_ordered_embeddings, num_centroids=num_centroids,
              centroid_intermediate_top_k=centroid_intermediate_top_k)


def mesh_fields(**overrides: Any) -> dict[str, Any]:
  """The `mesh` entry of a preset: mesh axis sizes (-1: the rest of the devices) and the logical
  axis rules (`gemma_mtp_jax.sharding`), so multi-device runs are a config change."""
  from gemma_mtp_jax import sharding  # jax: imported only when a preset is built

  out = dict(
      axes=dict(data=1, fsdp=-1, tensor=1, expert=1),
      rules=tuple((name, axis) for name, axis in sharding.DEFAULT_RULES),
      # Call jax.distributed.initialize() first (multi-host TPU slices: it finds its peers itself).
      initialize_distributed=False,
      # Elsewhere (GPU hosts, CPU processes) name the peers: host:port of process 0, the process
      # count and this process's id. Setting coordinator_address implies initialize_distributed.
      coordinator_address="",
      num_processes=0,
      process_id=-1,
  )
  return _overridden("mesh", out, overrides)


def eval_fields(**overrides: Any) -> dict[str, Any]:
  """The `eval` entry of a preset: the draft-length advice of the held-out eval.

  cost_ratio: c, the cost of one drafter step over one base forward on the hardware you will serve
  on; the eval advises the draft length K' maximising E(K') / (1 + K' c) with it (0: with the c it
  measures on the machine running the eval, `training.evaluate.measure_cost_ratio`).
  """
  return _overridden("eval", dict(cost_ratio=0.0), overrides)


def _overridden(section: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
  """`defaults` updated with `overrides`; a key that is not a default is an error naming the
  closest ones."""
  unknown = set(overrides) - set(defaults)
  if unknown:
    k = sorted(unknown)[0]
    raise ConfigError(f"unknown {section} key '{k}'{closest(k, sorted(defaults))}")
  return {**defaults, **overrides}


def make_config(*, name: str, model: dict, drafter: dict | None, hf_base: str | None,
                hf_drafter: str | None, train: dict, data: Any = None,
                mesh: dict | None = None, eval_cfg: dict | None = None) -> ml_collections.ConfigDict:
  """Assembles a preset's ConfigDict (the one layout every preset file returns).

  data: a `gemma_mtp_jax.data` config (`default_data_config()` / `tulu_magicoder_data_config()`);
  None: the local corpus for a random-init pair, the Tulu-3 / Magicoder mix (with the base's
  tokenizer) for a pair loaded from `hf_base`. mesh: `mesh_fields()` by default; eval_cfg:
  `eval_fields()` by default.
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = name
  cfg.hf_base = hf_base if hf_base is not None else placeholder(str)
  cfg.hf_drafter = hf_drafter if hf_drafter is not None else placeholder(str)
  cfg.model = model
  cfg.drafter = drafter
  cfg.train = train
  if data is None:
    from gemma_mtp_jax.data import pipeline as data_lib  # datasets: imported only when a preset is built

    data = data_lib.default_data_config() if hf_base is None else data_lib.tulu_magicoder_data_config()
    if hf_base is not None:
      data.tokenizer = hf_base
  cfg.data = data
  cfg.mesh = mesh if mesh is not None else mesh_fields()
  cfg.eval = eval_cfg if eval_cfg is not None else eval_fields()
  return cfg


# ---------------------------------------------------------------------- loading
def valid_presets() -> list[str]:
  """Names accepted by `load_config` (the configs/*.py stems, private `_*.py` files excluded)."""
  names = set()
  for d in CONFIG_DIRS:
    if d.is_dir():
      names.update(p.stem for p in d.glob("*.py") if not p.stem.startswith("_"))
  return sorted(names)


def _resolve(spec: str) -> Path:
  if spec.endswith(".py") or "/" in spec or "\\" in spec:
    path = Path(spec).expanduser()
    if not path.is_file():
      raise ConfigError(f"config file {spec!r} does not exist")
    return path
  # Accept "26B-A4B" for the file 26b_a4b.py: names on the Hub use dashes and capitals.
  stem = spec.lower().replace("-", "_")
  for d in CONFIG_DIRS:
    path = d / f"{stem}.py"
    if path.is_file():
      return path
  valid = valid_presets()
  raise ConfigError(f"unknown preset {spec!r}{closest(stem, valid)}; valid presets: "
                    f"{', '.join(valid) or '(none found in ' + str(CONFIG_DIRS[0]) + ')'}")


def load_config(path_or_name: str) -> ml_collections.ConfigDict:
  """Loads a preset by name ("tiny", "e4b", "26b_a4b") or path ("configs/e4b.py").

  An optional ":arg" suffix is passed to `get_config(arg)`, as `ml_collections.config_flags` does.
  Raises ConfigError naming the preset for an unknown name, a missing file or a bad `get_config`.
  """
  spec, sep, arg = path_or_name.partition(":")
  path = _resolve(spec)
  module_name = f"_gemma_mtp_jax_config_{path.stem}"
  loader_spec = importlib.util.spec_from_file_location(module_name, path)
  if loader_spec is None or loader_spec.loader is None:
    raise ConfigError(f"cannot load config file {str(path)!r}")
  module = importlib.util.module_from_spec(loader_spec)
  loader_spec.loader.exec_module(module)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"config file {str(path)!r} defines no get_config()")
  if sep:
    if not inspect.signature(get_config).parameters:
      raise ConfigError(f"config {spec!r} got argument {arg!r} but its get_config() takes none")
    cfg = get_config(arg)
  else:
    cfg = get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() in {str(path)!r} returned {type(cfg).__name__}, "
                      "expected ml_collections.ConfigDict")
  return cfg


def model_configs(cfg: ml_collections.ConfigDict) -> tuple[ModelConfig, DrafterConfig | None]:
  """Builds the frozen (base, drafter) pair from a loaded preset; checks the drafter fits the base
  and that each config is one its `hf_family` describes (`hf_config.check_family`; a section
  without the family fields gets its family's).

  The drafter is None when the preset has no `drafter` entry (a base-only config).
  """
  if cfg.get("model") is None:
    raise ConfigError("config has no 'model' entry")
  base = model_config_from_dict(hf_config.with_family_fields(cfg.model), where="model")
  hf_config.check_family(base, "model")
  if cfg.get("drafter") is None:
    return base, None
  drafter = drafter_config_from_dict(hf_config.drafter_with_family_fields(cfg.drafter),
                                     where="drafter")
  hf_config.check_family(drafter.text, "drafter.text")
  drafter.check_fits(base)
  return base, drafter
