"""The request layer: one generation request from model dirs and a prompt to the JSON report.

What `python -m gemma_mtp_jax.generate` runs between parsing its flags and printing (`run`), as
library functions that the decode benchmark and the trainer's eval share:

  load            a base (+ drafter) in decoding layout from an HF dir or hub id, a pair dir or a
                  train workdir, after the checks that need no weights (`check_fit`)
  stop_ids_for    the tokens decoding stops on by default: the base config's eos ids, its
                  generation config's `eos_token_id` and the tokenizer's `<turn|>`
                  (`default_stop_ids` of a loaded pair; the trainer's eval calls `stop_ids_for`
                  with its run's values, so it stops where `generate` stops)
  encode          a prompt's ids (+ image slots): a chat through `data.chat.encode_prompt` (the
                  training data's rendering, model turn opened), raw text through the tokenizer
                  or the processor (`<|image|>` placeholders), or ids as given
  generate        one prompt decoded, speculatively when there is a drafter: the CLI's JSON dict

Errors a user can fix are `speculative.GenerateError`s naming the flag (the CLI's names: this
layer is the CLI's body).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from gemma_mtp_jax import checkpoint
from gemma_mtp_jax.checkpoint import hf_config
from gemma_mtp_jax.checkpoint import safetensors_io
from gemma_mtp_jax.data import chat as chat_lib
from gemma_mtp_jax.data import images as images_lib
from gemma_mtp_jax.data import tokenizer as tokenizer_lib
from gemma_mtp_jax.data.errors import DataError
from gemma_mtp_jax.decoding import speculative
from gemma_mtp_jax.model import config as config_lib
from gemma_mtp_jax.utils import files

GenerateError = speculative.GenerateError
QUERY_POSITIONS = ("next", "anchor")


# ------------------------------------------------------------------------------ loading
def _configs_of(path: str):
  """(base ModelConfig, DrafterConfig or None) of a model dir from its JSON files only, or None
  when they cannot be read without loading weights (hub ids). The one place this layer reads an
  HF config itself."""
  if not os.path.isdir(path):
    return None
  if checkpoint.detect_kind(path) == "hf":
    hf = safetensors_io.read_json(os.path.join(path, safetensors_io.CONFIG_NAME))
    if hf.get("model_type") in hf_config.assistant_types():
      return None, hf_config.drafter_config_from_hf(hf)
    return hf_config.model_config_from_hf(hf), None
  return checkpoint.pair_configs(checkpoint.read_pair_json(path))


def check_fit(base: str, drafter: str | None) -> None:
  """Refuses a drafter that does not fit the base from the config files alone (before any weights
  are read); `load_pair` checks again for sources this cannot read."""
  if drafter is None:
    return
  b, d = _configs_of(base), _configs_of(drafter)
  if b is None or d is None:
    return
  if b[0] is None:
    raise GenerateError(f"--base {base} is an assistant (drafter) checkpoint; pass the base model "
                        "as --base and the assistant as --drafter")
  if d[1] is None:
    raise GenerateError(f"--drafter {drafter} is not a Gemma 4 assistant checkpoint")
  try:
    d[1].check_fits(b[0])
  except config_lib.ConfigError as e:
    raise GenerateError(f"the drafter {drafter} does not fit the base {base}: {e}") from None


def load(base: str, drafter: str | None = None, step: int | None = None, dtype: str | None = None,
         plain: bool = False) -> dict:
  """Loads a pair for decoding: {"base_cfg", "params", "drafter_cfg", "drafter_vars", "tokenizer",
  "pair"} with configs and params in decoding layout (`speculative.decode_params`); no drafter
  (None, None) with `plain` or when there is none."""
  check_fit(base, None if plain else drafter)
  pair = checkpoint.load_pair(base, drafter=None if plain else drafter, step=step, dtype=dtype)
  base_cfg, params = speculative.decode_params(pair.base_cfg, pair.params["base"])
  dcfg, dvars = None, None
  if not plain and pair.drafter_cfg is not None and pair.params.get("drafter") is not None:
    dcfg, dvars = speculative.decode_drafter(pair.drafter_cfg, pair.params["drafter"])
  tok = tokenizer_lib.load_tokenizer(pair.tokenizer_path) if pair.tokenizer_path else None
  return dict(base_cfg=base_cfg, params=params, drafter_cfg=dcfg, drafter_vars=dvars,
              tokenizer=tok, pair=pair)


def default_query_position(loaded: Mapping) -> str:
  """The drafter query position the pair was trained with (workdir meta / train config), else the
  HF convention "next"."""
  pair = loaded["pair"]
  if pair is None:
    return "next"
  for where in (pair.meta.get("train") or {}, (pair.meta.get("pair") or {}).get("train") or {}):
    qp = where.get("draft_query_position") if isinstance(where, dict) else None
    if qp in QUERY_POSITIONS:
      return qp
  return "next"


# ------------------------------------------------------------------------------ stop ids
def stop_ids_for(base_cfg: config_lib.ModelConfig, tokenizer=None,
                 generation_config: Mapping | None = None) -> list[int]:
  """The tokens decoding stops on by default, sorted: the base config's eos ids, the generation
  config's `eos_token_id` (Google's released generation_config.json lists [1, 106, 50], more than
  config.json) and the tokenizer's `<turn|>` (the end of a chat turn) when it has one."""
  ids = set()
  for x in (base_cfg.eos_token_id, (generation_config or {}).get("eos_token_id")):
    if x is not None:
      ids.update(int(i) for i in (x if isinstance(x, (list, tuple)) else [x]))
  if tokenizer is not None:
    tid = tokenizer.convert_tokens_to_ids(tokenizer_lib.TURN_CLOSE)
    if tid is not None and tid != tokenizer.unk_token_id:
      ids.add(int(tid))
  return sorted(ids)


def _recorded_generation_config(pair_json: Mapping) -> dict | None:
  """The base's generation config a pair.json kept from its HF source (None: none, or no source)."""
  return ((pair_json.get("hf_extra") or {}).get("base") or {}).get("generation_config")


def generation_config(source: str) -> dict | None:
  """The base's generation config of a model source without loading weights: the one a pair dir's
  or workdir's pair.json recorded, an HF dir's generation_config.json, or (a hub id) that one file
  downloaded. None when the source has none."""
  name = safetensors_io.GENERATION_CONFIG_NAME
  if os.path.isfile(os.path.join(source, checkpoint.PAIR_JSON)):
    return _recorded_generation_config(checkpoint.read_pair_json(source))
  if os.path.isdir(source):
    path = os.path.join(source, name)
    return safetensors_io.read_json(path) if os.path.isfile(path) else None
  if not files.is_hub_id(source):
    raise checkpoint.ConversionError(f"no such directory: {source}")
  import huggingface_hub
  try:
    return safetensors_io.read_json(huggingface_hub.hf_hub_download(source, name))
  except huggingface_hub.errors.RemoteEntryNotFoundError:
    return None  # the repo has no generation config
  except (OSError, ValueError) as e:  # huggingface_hub's errors: not found, gated, offline, ...
    cause = (str(e).strip().splitlines() or [""])[0][:200]
    raise checkpoint.ConversionError(f"{source}: cannot read its {name} (no such local directory, "
                                     f"and the Hub said {type(e).__name__}: {cause})") from None


def default_stop_ids(loaded: Mapping) -> list[int]:
  """`stop_ids_for` of a loaded pair (its generation config as its source recorded it)."""
  pair = loaded["pair"]
  gen = _recorded_generation_config(pair.meta.get("pair") or {}) if pair is not None else None
  return stop_ids_for(loaded["base_cfg"], loaded["tokenizer"], gen)


# ------------------------------------------------------------------------------ images
def check_vision(base: str, cfg: config_lib.ModelConfig | None = None) -> None:
  """Refuses --image for a base without a vision tower: from `cfg`, else from its config files
  (before any weights are read; hub ids are checked once loaded)."""
  if cfg is None:
    configs = _configs_of(base)
    cfg = configs[0] if configs else None
  if cfg is not None and cfg.vision is None:
    raise GenerateError(
        f"--image: the base {base} has no vision tower (its config has no vision section); give "
        "an image-text base (Gemma4ForConditionalGeneration) or drop --image")


def read_images(paths: Sequence[str]) -> list:
  """The --image files as loaded PIL images; a missing or unreadable file, or a URL, is refused
  naming it."""
  out = []
  for path in paths:
    try:
      out.append(images_lib.load_image(path))
    except DataError as e:
      raise GenerateError(f"--image {path}: {e}") from None
  return out


def load_processor(loaded: Mapping):
  """The base's Gemma 4 processor, from the dir its tokenizer came from (the HF dir itself, or a
  pair dir's / workdir's tokenizer/, where `convert` and the trainer put the processor files)."""
  path = loaded["pair"].tokenizer_path
  if not path or not os.path.isfile(os.path.join(path, "processor_config.json")):
    where = f" (looked in {path})" if path else ""
    raise GenerateError(
        f"--image: {loaded['pair'].meta.get('path')} has no image processor files "
        f"(processor_config.json beside the tokenizer{where}); save the processor with the base")
  try:
    return images_lib.load_processor(path)
  except DataError as e:
    raise GenerateError(f"--image: {e}") from None


# ------------------------------------------------------------------------------ prompts
def chat_messages(prompt: str, images: Sequence = ()) -> list[dict]:
  """`generate --chat`'s request as HF chat messages: one user turn, its images first (in order)
  then the text, as HF's content lists put them."""
  if not images:
    return [{"role": "user", "content": prompt}]
  content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt}]
  return [{"role": "user", "content": content}]


def _text_prompt(loaded: Mapping, prompt: str, chat: bool) -> list[int]:
  tok = loaded["tokenizer"]
  if tok is None:
    raise GenerateError(f"{loaded['pair'].meta.get('path')}: no tokenizer files; pass "
                        "--prompt-ids instead of --prompt")
  if chat:
    return chat_lib.encode_prompt(chat_messages(prompt), tok)["tokens"].tolist()
  return list(tok(prompt)["input_ids"])


def _image_prompt(loaded: Mapping, images: Sequence, prompt: str | None, chat: bool,
                  ids: Sequence[int] | None) -> tuple[list[int], tuple]:
  processor = load_processor(loaded)
  if ids is not None:  # already expanded: the images' pixels only
    pixel_values, positions, _ = images_lib.preprocess(images, processor.image_processor)
    return list(ids), (pixel_values, positions)
  if chat:
    doc = chat_lib.encode_prompt(chat_messages(prompt, images), processor.tokenizer,
                                 image_processor=processor.image_processor)
    return doc["tokens"].tolist(), (doc["pixel_values"], doc["pixel_positions"])
  placeholder = processor.image_token
  n = prompt.count(placeholder)
  if n != len(images):
    raise GenerateError(
        f"--prompt has {n} {placeholder} placeholder(s) for {len(images)} --image file(s); "
        f"without --chat put one {placeholder} in --prompt where each image goes (or use --chat)")
  out = processor(text=[prompt], images=[list(images)], return_tensors="np")
  return (np.asarray(out["input_ids"][0]).tolist(),
          (np.asarray(out["pixel_values"], np.float32),
           np.asarray(out["image_position_ids"], np.int32)))


def encode(loaded: Mapping, prompt: str | None = None, ids: Sequence[int] | None = None,
           images: Sequence | None = None, chat: bool = False) -> tuple[list[int], tuple | None]:
  """(prompt ids, image slots or None) of a request: `ids` as given, or `prompt` text (with `chat`
  one user turn, model turn opened: `data.chat.encode_prompt`).

  images: PIL images, preprocessed by the base's processor into (pixel_values_ipc float32,
  pixel_positions_ip2 int32). Then `ids` must hold each image's expanded token block, a chat puts
  them before the text, and a raw `prompt` holds one `<|image|>` placeholder per image, expanded
  as `processor(text=..., images=...)` does."""
  if images:
    return _image_prompt(loaded, images, prompt, chat, ids)
  return (list(ids) if ids is not None else _text_prompt(loaded, prompt, chat)), None


# ------------------------------------------------------------------------------ decoding
def generate(loaded: Mapping, ids: Sequence[int], *, max_new_tokens: int = 64,
             num_draft_tokens: int = 4, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] | None = None,
             query_position: str | None = None, images: tuple | None = None) -> dict[str, Any]:
  """Generates from one prompt; returns the CLI's JSON object (see `gemma_mtp_jax.generate`).

  stop_ids: None for `default_stop_ids`; images: None or the prompt's (pixel_values_ipc float32,
  pixel_positions_ip2 int32) slots (`encode`)."""
  sampling = speculative.Sampling(temperature, top_k, top_p)
  stop = default_stop_ids(loaded) if stop_ids is None else list(stop_ids)
  res = speculative.decode_prompts(
      loaded["params"], loaded["base_cfg"], [list(ids)], drafter_vars=loaded["drafter_vars"],
      drafter_cfg=loaded["drafter_cfg"], num_draft_tokens=num_draft_tokens,
      max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop, seed=seed,
      query_position=query_position or default_query_position(loaded),
      images=None if images is None else [images])
  tokens = res.tokens[0]
  tok = loaded["tokenizer"]
  out = dict(tokens=tokens, text=tok.decode(tokens, skip_special_tokens=True) if tok else None)
  out.update(res.row_stats(0))
  out.update(rounds=res.rounds[0], acceptance=res.acceptance(0),
             tokens_per_second=res.tokens_per_second,
             prefill_seconds=res.prefill_seconds, decode_seconds=res.decode_seconds,
             compile_seconds=res.compile_seconds, num_draft_tokens=res.num_draft_tokens,
             speculative=loaded["drafter_cfg"] is not None, prompt_length=len(ids),
             stop_ids=stop, images=0 if images is None else len(images[0]))
  return out


def run(base: str, *, drafter: str | None = None, step: int | None = None,
        dtype: str | None = None, plain: bool = False, prompt: str | None = None,
        ids: Sequence[int] | None = None, image_paths: Sequence[str] = (), chat: bool = False,
        max_new_tokens: int = 64, num_draft_tokens: int = 4, temperature: float = 0.0,
        top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] | None = None,
        query_position: str | None = None) -> dict[str, Any]:
  """The whole request of `generate`'s flags: checks (flags, then the drafter's fit and the base's
  vision tower from config files, the images) before any weights are read, then load, encode and
  `generate`. Returns its JSON object."""
  if not plain and num_draft_tokens < 1:
    raise GenerateError(f"--num-draft-tokens (K) must be >= 1, got {num_draft_tokens} (use "
                        "--plain for plain decoding)")
  if max_new_tokens < 1:
    raise GenerateError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  speculative.Sampling(temperature, top_k, top_p)  # its errors before loading
  pil_images = None
  if image_paths:
    check_vision(base)
    pil_images = read_images(image_paths)
  loaded = load(base, drafter, step, dtype, plain)
  if pil_images:
    check_vision(base, loaded["base_cfg"])
  prompt_ids, images = encode(loaded, prompt, ids, pil_images, chat)
  return generate(loaded, prompt_ids, max_new_tokens=max_new_tokens,
                  num_draft_tokens=num_draft_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, seed=seed, stop_ids=stop_ids, query_position=query_position,
                  images=images)
