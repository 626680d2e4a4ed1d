"""The `train` section of a preset, typed: `TrainConfig`, and the checks of a whole run config.

Every key of a preset's `train` section is one field of `TrainConfig` (type, default and meaning
written once, below); `train_fields` builds a preset's `train` dict from the dataclass, so each field
is overridable with `--config.train.X=value`, and `TrainConfig.from_config` turns the (overridden)
section back into the frozen dataclass the objective, the optimizer and the loop read. The objective
(`objective.joint_forward` / `loss_fn`) reads its fields by these names too.

`validate_config` checks every section of a run config (a typo names the closest valid keys);
`explain_override_error` turns ml_collections' traceback for a bad `--config.a.b=value` into one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from typing import Any, Mapping, Sequence

import ml_collections
from ml_collections.config_dict import placeholder

from gemma_mtp_jax import presets
from gemma_mtp_jax import sharding
from gemma_mtp_jax.data import pipeline as data_lib
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.model import drafter as drafter_lib
from gemma_mtp_jax.training import objectives

ConfigError = config_lib.ConfigError
DEFAULT_CONFIG = "tiny"  # the embedded default run: configs/tiny.py into runs/tiny
EXPORT_DTYPES = ("", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One run's training options: the joint objective, schedule, optimizer, eval, checkpoints and
  export (hashable: compiled programs are cached on it, see `program_key`)."""

  # --- the joint objective (training/objective.py)
  num_draft_steps: int = 4  # K: drafter steps unrolled per position in training (and drafted at decode)
  drafter_loss_weight: float = 0.01  # lambda: weight of the drafter loss next to the base LM loss
  step_weights: tuple[float, ...] | None = None  # w_k of the K step losses; None: all 1
  draft_query_position: str = "next"  # RoPE position of the drafter queries: "next" (HF) or "anchor"
  # A name of the registry in training/objectives.py: "aligned" (default), each draft step trains
  # the task it meets at inference; "nemo_composite", NeMo's composite forward (shifted pairing,
  # whole-row K/V, anchor positions, N_base normaliser)
  drafter_objective: str = objectives.INFERENCE_ALIGNED
  freeze_base: bool = False  # drafter-only: the base gets no gradient and no optimizer state
  # A base with a vision tower: the tower and its projection into the text model (base params
  # "vision") stay frozen, as NeMo's Gemma 4 recipe keeps them; False trains them with the base.
  freeze_vision: bool = True
  share_embedding_with_base: bool = True  # the drafter reads the base's (tied) embedding table
  drafter_grads_to_base: bool = True  # the drafter loss also trains the base through h_t and K/V
  # The full tied head in training even with ordered embeddings: the masked (centroid) head's top-k
  # selection has no gradient; its selected entries equal these logits.
  dense_head: bool = True
  centroid_loss_weight: float = 1.0  # ordered embeddings: weight of the centroid (cluster) loss
  drafter_logit_softcap: float | None = None  # HF's assistant caps nothing; match your inference
  z_loss_weight: float = 0.0
  # MoE bases only (off by default: Gemma 4 publishes no router loss): weights of the router's
  # load-balancing loss and z-loss (model/moe.py `router_losses`), added to L. The router's load
  # (fewest / most (token, expert) pairs of any expert) is logged for every MoE base either way.
  router_aux_loss_weight: float = 0.0
  router_z_loss_weight: float = 0.0
  # > 0: the heads + cross-entropies in chunks of this many positions, never materialising
  # [B, T, V] logits (a 262144-token vocab needs it); 0: plain logits
  loss_chunk_size: int = 0
  # --- batches and schedule
  seq_len: int = 4096
  batch_size: int = 64  # global rows per optimizer step
  grad_accum_steps: int = 1  # batch_size rows are split into this many micro-batches (one update)
  num_steps: int = 10_000  # optimizer steps (not draft steps: that is num_draft_steps)
  learning_rate: float = 1e-5  # peak, after linear warmup; then cosine decay
  warmup_steps: int = 100
  min_learning_rate_ratio: float = 0.1  # the cosine ends at learning_rate * this
  # --- optimizer (optax AdamW; weight decay on matrices only, see optimizer.decay_mask)
  weight_decay: float = 0.0
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-8
  grad_clip_norm: float = 1.0  # global-norm clipping; 0: none
  seed: int = 0  # random init and the data mixture order
  # random init only (no hf_base): embedding tables drawn with this std (0: the modules' init,
  # std 1, which with a tied head gives logits far too large to train from scratch)
  init_embedding_std: float = 0.0
  # --- logging, eval, checkpoints, export
  log_every: int = 10
  eval_every: int = 500  # 0: eval only at the end
  save_every: int = 500
  keep_checkpoints: int = 3
  # "" : WORKDIR/checkpoints. Any orbax path, e.g. gs://bucket/run/checkpoints on Cloud TPU:
  # checkpoints outlive the VM, and a run on a new VM with the same value resumes from them.
  checkpoint_dir: str = ""
  # Resume a workdir whose run fingerprint (model, drafter, data-shaping keys: `loop.fingerprint`)
  # differs from this config's; the workdir's pair.json, config.json and fingerprint are rewritten.
  allow_config_change: bool = False
  eval_prompts: int = 32  # held-out prompts the base continues greedily for the accepted length
  eval_new_tokens: int = 64
  eval_max_prompt_len: int = 256
  export_hf: bool = True  # write WORKDIR/hf/{base,drafter} at the end
  export_dtype: str = ""  # "" keeps the trained dtype; "bfloat16" / "float32"
  hf_check: bool = False  # measure HF assisted generation's acceptance with the export (needs torch)
  compilation_cache_dir: str = ""  # jax's persistent compilation cache ("": off); resumes skip compiles

  def __post_init__(self):
    if self.step_weights is not None:
      object.__setattr__(self, "step_weights", tuple(float(w) for w in self.step_weights))
    for key in ("num_draft_steps", "num_steps", "seq_len", "batch_size", "grad_accum_steps",
                "log_every", "save_every", "keep_checkpoints"):
      _need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
    _need(self.draft_query_position in drafter_lib.QUERY_POSITIONS, "draft_query_position",
          f"must be one of {drafter_lib.QUERY_POSITIONS}, got {self.draft_query_position!r}")
    objectives.get(self.drafter_objective)  # ConfigError listing the registered names
    _need(self.step_weights is None or len(self.step_weights) == self.num_draft_steps,
          "step_weights", f"has {len(self.step_weights or ())} entries for "
          f"{self.num_draft_steps} draft steps")
    _need(self.batch_size % self.grad_accum_steps == 0, "grad_accum_steps",
          f"batch_size {self.batch_size} is not divisible by {self.grad_accum_steps} micro-batches")
    _need(self.seq_len > self.num_draft_steps + 1, "seq_len",
          f"{self.seq_len} leaves no room for {self.num_draft_steps} draft steps")
    self._check_ranges()
    _need(self.export_dtype in EXPORT_DTYPES, "export_dtype",
          f"must be '', 'bfloat16' or 'float32', got {self.export_dtype!r}")

  def _check_ranges(self) -> None:
    """Every numeric knob in its range; NaN and inf fail every check (they compare False)."""
    for key in ("drafter_loss_weight", "centroid_loss_weight", "z_loss_weight",
                "router_aux_loss_weight", "router_z_loss_weight", "learning_rate",
                "weight_decay", "grad_clip_norm", "init_embedding_std", "warmup_steps",
                "loss_chunk_size", "seed", "eval_every", "eval_prompts"):
      v = getattr(self, key)
      _need(math.isfinite(v) and v >= 0, key, f"must be a finite number >= 0, got {v}")
    for key in ("eval_new_tokens", "eval_max_prompt_len"):
      _need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
    for key in ("adam_b1", "adam_b2"):
      _need(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}")
    _need(math.isfinite(self.adam_eps) and self.adam_eps > 0, "adam_eps",
          f"must be a finite number > 0, got {self.adam_eps}")
    _need(0 <= self.min_learning_rate_ratio <= 1, "min_learning_rate_ratio",
          f"must be in [0, 1], got {self.min_learning_rate_ratio}")
    _need(all(math.isfinite(w) and w >= 0 for w in self.step_weights or ()), "step_weights",
          f"must be finite numbers >= 0, got {self.step_weights}")
    cap = self.drafter_logit_softcap
    _need(cap is None or (math.isfinite(cap) and cap > 0), "drafter_logit_softcap",
          f"must be None or a finite number > 0, got {cap}")

  @classmethod
  def from_config(cls, train: Mapping[str, Any]) -> "TrainConfig":
    """From a preset's `train` ConfigDict (or dict): every key must be a field; each value is
    checked against the field's type (an int is accepted for a float, a list for a tuple)."""
    train = as_dict(train)
    check_keys("train", train, field_names())
    hints = _field_types()
    return cls(**{k: _typed(k, v, hints[k]) for k, v in train.items()})

  def program_key(self) -> "TrainConfig":
    """This config with the fields that do not change a compiled program (logging, eval, export,
    checkpoints, seed) at their defaults: what `step.programs` is cached on, so a rerun that only
    changes e.g. `save_every` compiles nothing again."""
    return dataclasses.replace(self, **{k: _DEFAULTS[k] for k in _NOT_IN_PROGRAMS})


# Fields read only by the loop around the compiled step.
_NOT_IN_PROGRAMS = ("seed", "log_every", "eval_every", "save_every",
                    "keep_checkpoints", "checkpoint_dir", "eval_prompts", "eval_new_tokens",
                    "eval_max_prompt_len", "allow_config_change", "export_hf", "export_dtype", "hf_check",
                    "compilation_cache_dir")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _need(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config key 'train.{key}': {msg}")


def field_names() -> list[str]:
  """The keys of a `train` section, in TrainConfig order."""
  return [f.name for f in dataclasses.fields(TrainConfig)]


@functools.cache
def _field_types() -> dict[str, Any]:
  return typing.get_type_hints(TrainConfig)


def _typed(key: str, value: Any, hint) -> Any:
  """`value` as the field's type; ConfigError naming `train.<key>` if it is not one."""
  optional = type(None) in typing.get_args(hint)
  base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
  if value is None:
    _need(optional, key, "must be set (None is not a value of this key)")
    return None
  origin = typing.get_origin(base) or base
  ok = {bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        tuple: isinstance(value, (tuple, list)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)}[origin]
  _need(ok, key, f"expects {getattr(base, '__name__', str(base))}, got {value!r}")
  return origin(value)


def train_fields(**overrides: Any) -> dict[str, Any]:
  """The `train` entry of a preset: TrainConfig's defaults updated by `overrides`.

  Every field is written into the preset, so each one is overridable from the command line and
  visible in a dumped config; a None default becomes a typed placeholder, so that
  `--config.train.drafter_logit_softcap=30.0` still parses. Unknown names and bad values raise
  ConfigError naming the key.
  """
  check_keys("train", overrides, field_names())
  hints = _field_types()
  values = {k: _typed(k, v, hints[k]) for k, v in {**_DEFAULTS, **overrides}.items()}
  TrainConfig(**values)  # checks the values now, not when the run starts
  for k, v in values.items():
    if v is None:
      base = next(a for a in typing.get_args(hints[k]) if a is not type(None))
      values[k] = placeholder(typing.get_origin(base) or base)
  return values


# ------------------------------------------------------------------------------ the run config
_TOP_KEYS = ("name", "hf_base", "hf_drafter", "model", "drafter", "train", "data", "mesh", "eval")
_SOURCE_KEYS = ("name", "path", "weight", "schema", "split", "subset", "limit", "columns")
# data.vision (image data only: `data.pipeline.vision_qa_data_config`): the image processor's sizes.
_VISION_DATA_KEYS = ("max_soft_tokens", "patch_size", "pooling_kernel_size", "max_images_per_row")


def check_keys(where: str, keys, valid: Sequence[str]) -> None:
  """ConfigError naming the first key not in `valid` (and the closest valid ones)."""
  for k in keys:
    if k not in valid:
      full = f"{where}.{k}" if where else k
      hint = config_lib.closest(k, valid) or f"; valid keys: {', '.join(sorted(valid))}"
      raise ConfigError(f"unknown config key '{full}'{hint}")


def as_dict(x) -> dict:
  """A ConfigDict section (or any mapping) as a plain dict."""
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def validate_config(cfg: ml_collections.ConfigDict) -> tuple:
  """Checks every section's keys and the values the trainer needs; returns the (base ModelConfig,
  DrafterConfig, TrainConfig) of the run. A typo anywhere (`train.num_stpes`) raises ConfigError
  naming the key and the closest valid ones; model/drafter fields are checked by
  `presets.model_configs`, train values by `TrainConfig`."""
  check_keys("", cfg.keys(), _TOP_KEYS)
  for section in ("train", "data", "mesh"):
    if cfg.get(section) is None:
      raise ConfigError(f"config has no '{section}' section (build presets with "
                        "presets.make_config)")
  check_keys("train", as_dict(cfg.train), field_names())
  mesh = as_dict(cfg.mesh)
  check_keys("mesh", mesh, list(presets.mesh_fields()))
  check_keys("mesh.axes", mesh["axes"], sharding.MESH_AXES)
  data = as_dict(cfg.data)
  check_keys("data", data, list(data_lib.default_data_config().keys()) + ["vision"])
  if data.get("vision"):
    check_keys("data.vision", as_dict(data["vision"]), _VISION_DATA_KEYS)
  for i, src in enumerate(data.get("sources") or ()):
    if isinstance(src, Mapping) or hasattr(src, "keys"):
      check_keys(f"data.sources[{i}]", as_dict(src), _SOURCE_KEYS)
  eval_cost_ratio(cfg)  # the optional `eval` section: keys and value
  base_cfg, dcfg = presets.model_configs(cfg)
  if dcfg is None:
    raise ConfigError("config has no 'drafter': the joint trainer trains a (base, drafter) pair")
  _check_image_sizes(base_cfg, data.get("vision"))
  tcfg = TrainConfig.from_config(cfg.train)
  for key in ("router_aux_loss_weight", "router_z_loss_weight"):
    _need(not getattr(tcfg, key) or base_cfg.enable_moe, key,
          f"is {getattr(tcfg, key)} but the base has no MoE layer (model.enable_moe is False)")
  return base_cfg, dcfg, tcfg


def _check_image_sizes(base_cfg: config_lib.ModelConfig, vision) -> None:
  """Image data needs a base with a vision tower whose patch and pooling sizes are the data's."""
  if not vision:
    return
  vision = as_dict(vision)
  if base_cfg.vision is None:
    raise ConfigError("config key 'data.vision': the data has images but the base has no vision "
                      "tower (model.vision is None)")
  for key in ("patch_size", "pooling_kernel_size"):
    theirs = getattr(base_cfg.vision, key)
    if key in vision and int(vision[key]) != theirs:
      raise ConfigError(f"config key 'data.vision.{key}': {vision[key]} but the base's vision "
                        f"tower has model.vision.{key}={theirs}; they must match")


def eval_cost_ratio(cfg: ml_collections.ConfigDict) -> float:
  """`eval.cost_ratio` of a run config (0.0 without an `eval` section: configs written before it);
  ConfigError for an unknown key there (naming the closest) or a value that is not a number >= 0."""
  section = cfg.get("eval")
  if section is None:
    return 0.0
  section = as_dict(section)
  check_keys("eval", section, list(presets.eval_fields()))
  c = section.get("cost_ratio", 0.0)
  if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0:
    raise ConfigError(f"config key 'eval.cost_ratio': must be a number >= 0 (0: the ratio "
                      f"measured by the eval), got {c!r}")
  return float(c)


# ------------------------------------------------------------------------------ CLI errors
def _flat_keys(cfg, prefix: str = "") -> list[str]:
  out = []
  for k in cfg.keys():
    v = cfg[k]
    path = f"{prefix}{k}"
    out.append(path)
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out += _flat_keys(v, path + ".")
  return out


def _parse_overrides(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
  """(the --config spec, [(key, value)] of the --config.a.b overrides) of a command line."""
  spec, overrides = None, []
  args = list(argv[1:])
  i = 0
  while i < len(args):
    a = args[i]
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(args):
      spec, i = args[i + 1], i + 1
    elif a.startswith("--config."):
      name, eq, value = a[len("--config."):].partition("=")
      if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
        value, i = args[i + 1], i + 1
      overrides.append((name, value))
    i += 1
  return spec, overrides


def explain_override_error(argv: Sequence[str], error: BaseException) -> str:
  """One clear line for a bad `--config.a.b=value` flag (ml_collections raises a traceback).

  An unknown key is named with the closest valid keys; a known key with a bad value is named with
  the type it expects.
  """
  spec, overrides = _parse_overrides(argv)
  try:
    cfg = presets.load_config(spec or default_config_path())
  except Exception as e:  # the config file itself is the problem
    return f"cannot load config {spec!r}: {e}"
  valid = _flat_keys(cfg)
  for name, value in overrides:
    node, parts = cfg, name.split(".")
    for depth, part in enumerate(parts):
      keys = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      if part not in keys:
        where = ".".join(parts[:depth])
        near = difflib.get_close_matches(name, valid, n=3, cutoff=0.6) or [
            f"{where + '.' if where else ''}{c}" for c in difflib.get_close_matches(part, keys, n=3)]
        hint = (f"; closest valid keys: {', '.join(near)}" if near else
                f"; valid keys under '{where or 'config'}': {', '.join(sorted(keys))}")
        return f"unknown config key '{name}'{hint}"
      node = node[part]
    if name in str(error) or len(overrides) == 1:
      field = cfg
      for part in parts[:-1]:
        field = field[part]
      want = type(field[parts[-1]]).__name__ if field[parts[-1]] is not None else "a value"
      return f"bad value {value!r} for config key '{name}' (expects {want}): {error}"
  return f"bad config override: {error}"


def default_config_path() -> str:
  """configs/tiny.py of the checkout (or the installed copy)."""
  for d in presets.CONFIG_DIRS:
    p = d / f"{DEFAULT_CONFIG}.py"
    if p.is_file():
      return str(p)
  return DEFAULT_CONFIG
