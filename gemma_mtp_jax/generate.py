"""Generate text with a Gemma 4 base, speculatively with its assistant drafter when there is one.

  python -m gemma_mtp_jax.generate --base DIR [--drafter DIR]
      (--prompt TEXT | --prompt-ids 2,105,...) [--image PATH ...] [--max-new-tokens N]
      [--num-draft-tokens K] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]
      [--chat] [--step N] [--plain] [--stop-ids 1,106 | --no-stop]

DIR is an HF model dir (converted in memory), a pair dir (`convert hf-to-jax`) or a train workdir
(latest step, or --step). The drafter is --drafter (an HF assistant dir) or the one stored with a
pair dir / workdir; without either (or with --plain) decoding is plain. Greedy at temperature 0
(the default): the output is exactly the base's own greedy output, whatever the drafter proposes.

Without --json the new text is printed (token ids when there is no tokenizer); with --json one
JSON object: tokens (new ids), text, target_forwards (base forwards after the prefill),
draft_rounds, drafted, accepted, mean_accepted_length (new tokens per target forward, the prefill's
first token excluded), rounds (per round: drafted ids and the number accepted), acceptance (per
draft position k = 1..K: "rate" P(accepted >= k) over the rounds, "alpha" P(accepted >= k | >= k - 1);
`speculative.acceptance_rates`), tokens_per_second
(new tokens per second of prefill + decode), prefill_seconds, decode_seconds, compile_seconds (not
counted in the others).

Images (--image PATH, repeatable; local files only, URLs are refused) need a base with a vision
tower and its processor files (processor_config.json beside the tokenizer: the HF dir itself, or a
pair dir's / workdir's tokenizer/); they are preprocessed by that processor (transformers' Gemma 4
image processor). With --chat the prompt is one user turn holding the images, in order, then the
text (HF's content list [{"type": "image"}, ..., {"type": "text"}]), encoded by the training chat
encoder (`data.chat`) with the model turn opened. Without --chat, --prompt must hold one `<|image|>`
placeholder per --image where that image goes; the processor expands each into its token block
(`<|image>` + n x `<|image|>` + `<image|>`), exactly `processor(text=..., images=...)`. With
--prompt-ids the ids must already hold each image's expanded block. The JSON gains "images": n.

Stop tokens default to the base's eos ids (config and generation config) plus the tokenizer's
`<turn|>` (the end of a chat turn) when it has one. Exit status 2 with a one-line reason for bad
input (missing dirs, a drafter that does not fit the base, a prompt too long for the cache, a token
id outside the vocab, K < 1, a sampling value out of range: temperature finite and >= 0, top-k >= 0,
top-p in (0, 1], max-new-tokens >= 1; NaN and inf refused), checked before any model compute; see
`gemma_mtp_jax.cli` for all exit codes. A missing local path (e.g. `runs/tiny` beside a `runs/`)
is reported as missing; only an `org/name` with no local `org/` is taken for a hub id. A train
workdir whose newest step cannot be read falls back, with a warning, to the newest intact step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Sequence

from gemma_mtp_jax import cli

TURN_CLOSE = "<turn|>"


def _number(kind, low, high=None, low_open=False):
  """An argparse `type`: a finite `kind` (int / float) in [low, high] ((low, high] if low_open)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                       f"got {text!r}") from None
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (high is None or value <= high)
    if not ok:
      where = (f"in {'(' if low_open else '['}{low}, {high}]" if high is not None
               else f"{'>' if low_open else '>='} {low}")
      raise argparse.ArgumentTypeError(f"must be finite and {where}, got {text}")
    return value
  return parse


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m gemma_mtp_jax.generate", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="HF model dir, pair dir or train workdir")
  p.add_argument("--drafter", help="HF assistant dir (default: the pair's own drafter, if any)")
  p.add_argument("--step", type=_number(int, 0),
                 help="train workdir step (default: the newest intact one)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="prompt text (tokenized with the base's tokenizer)")
  src.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 2,105,2364")
  p.add_argument("--chat", action="store_true",
                 help="wrap --prompt as a user turn with the chat template (model turn opened)")
  p.add_argument("--image", action="append", default=[], metavar="PATH",
                 help="a local image file (repeatable, in order); with --chat the images open the "
                 "user turn, else --prompt needs one <|image|> placeholder per image")
  p.add_argument("--max-new-tokens", type=_number(int, 1), default=64)
  p.add_argument("--num-draft-tokens", type=int, default=4,
                 help="K drafts per round (>= 1; checked unless --plain)")
  p.add_argument("--temperature", type=_number(float, 0.0), default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=_number(int, 0), default=0, help="0: off")
  p.add_argument("--top-p", type=_number(float, 0.0, 1.0, low_open=True), default=1.0,
                 help="in (0, 1]; 1.0: off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--plain", action="store_true", help="plain decoding even with a drafter")
  stops = p.add_mutually_exclusive_group()
  stops.add_argument("--stop-ids", help="comma-separated stop token ids (default: eos + <turn|>)")
  stops.add_argument("--no-stop", action="store_true", help="always generate --max-new-tokens")
  p.add_argument("--query-position", choices=("next", "anchor"),
                 help="drafter query RoPE position (default: the training run's, else next)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"),
                 help="cast params (default: as stored)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  return p


def _ids(text: str, flag: str) -> list[int]:
  from gemma_mtp_jax.decoding import speculative
  try:
    return [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    raise speculative.GenerateError(f"{flag} must be comma-separated integers, got {text!r}") \
        from None


# ------------------------------------------------------------------------------ loading
def _configs_of(path: str):
  """(base ModelConfig, DrafterConfig or None) of a model dir from its JSON files only, or None
  when they cannot be read without loading weights (hub ids)."""
  from gemma_mtp_jax import checkpoint
  from gemma_mtp_jax.checkpoint import hf_config
  from gemma_mtp_jax.checkpoint import safetensors_io

  if not os.path.isdir(path):
    return None
  kind = checkpoint.detect_kind(path)
  if kind == "hf":
    hf = safetensors_io.read_json(os.path.join(path, safetensors_io.CONFIG_NAME))
    if hf.get("model_type") in hf_config.assistant_types():
      return None, hf_config.drafter_config_from_hf(hf)
    return hf_config.model_config_from_hf(hf), None
  return checkpoint.pair_configs(checkpoint.read_pair_json(path))


def check_fit(base: str, drafter: str | None) -> None:
  """Refuses a drafter that does not fit the base from the config files alone (before any weights
  are read); `load_pair` checks again for sources this cannot read."""
  from gemma_mtp_jax.model import config as config_lib
  from gemma_mtp_jax.decoding import speculative

  if drafter is None:
    return
  b, d = _configs_of(base), _configs_of(drafter)
  if b is None or d is None:
    return
  if b[0] is None:
    raise speculative.GenerateError(f"--base {base} is an assistant (drafter) checkpoint; pass the "
                                    "base model as --base and the assistant as --drafter")
  if d[1] is None:
    raise speculative.GenerateError(f"--drafter {drafter} is not a Gemma 4 assistant checkpoint")
  try:
    d[1].check_fits(b[0])
  except config_lib.ConfigError as e:
    raise speculative.GenerateError(f"the drafter {drafter} does not fit the base {base}: {e}") \
        from None


def load(base: str, drafter: str | None = None, step: int | None = None, dtype: str | None = None,
         plain: bool = False) -> dict:
  """Loads a pair for decoding: {"base_cfg", "params", "drafter_cfg", "drafter_vars", "tokenizer",
  "pair"} with configs and params in decoding layout (`speculative.decode_params`)."""
  from gemma_mtp_jax import checkpoint
  from gemma_mtp_jax.decoding import speculative
  from gemma_mtp_jax.data import tokenizer as tokenizer_lib

  check_fit(base, None if plain else drafter)
  pair = checkpoint.load_pair(base, drafter=None if plain else drafter, step=step, dtype=dtype)
  base_cfg, params = speculative.decode_params(pair.base_cfg, pair.params["base"])
  dcfg, dvars = None, None
  if not plain and pair.drafter_cfg is not None and pair.params.get("drafter") is not None:
    dcfg, dvars = speculative.decode_drafter(pair.drafter_cfg, pair.params["drafter"])
  tok = tokenizer_lib.load_tokenizer(pair.tokenizer_path) if pair.tokenizer_path else None
  return dict(base_cfg=base_cfg, params=params, drafter_cfg=dcfg, drafter_vars=dvars,
              tokenizer=tok, pair=pair)


def default_stop_ids(loaded: dict) -> list[int]:
  """eos ids of the base's config and generation config, plus the tokenizer's `<turn|>`."""
  ids = set()

  def add(x):
    if x is None:
      return
    ids.update(int(i) for i in (x if isinstance(x, (list, tuple)) else [x]))

  add(loaded["base_cfg"].eos_token_id)
  pj = loaded["pair"].meta.get("pair") or {}
  gen = ((pj.get("hf_extra") or {}).get("base") or {}).get("generation_config") or {}
  add(gen.get("eos_token_id"))
  tok = loaded["tokenizer"]
  if tok is not None:
    tid = tok.convert_tokens_to_ids(TURN_CLOSE)
    if tid is not None and tid != tok.unk_token_id:
      ids.add(int(tid))
  return sorted(ids)


def default_query_position(loaded: dict) -> str:
  """The drafter query position the pair was trained with (workdir meta / train config), else the
  HF convention "next"."""
  pair = loaded["pair"]
  for where in (pair.meta.get("train") or {}, (pair.meta.get("pair") or {}).get("train") or {}):
    qp = where.get("draft_query_position") if isinstance(where, dict) else None
    if qp in ("next", "anchor"):
      return qp
  return "next"


def prompt_ids(loaded: dict, prompt: str, chat: bool) -> list[int]:
  """Token ids of a text prompt with the pair's tokenizer (as a chat user turn with `chat`)."""
  from gemma_mtp_jax.decoding import speculative

  tok = loaded["tokenizer"]
  if tok is None:
    raise speculative.GenerateError(f"{loaded['pair'].meta.get('path')}: no tokenizer files; "
                                    "pass --prompt-ids instead of --prompt")
  if chat:
    out = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                  add_generation_prompt=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
  return list(tok(prompt)["input_ids"])


# ------------------------------------------------------------------------------ images
def check_vision(base: str, cfg=None) -> None:
  """Refuses --image for a base without a vision tower: from `cfg`, else from its config files
  (before any weights are read; hub ids are checked once loaded)."""
  from gemma_mtp_jax.decoding import speculative

  if cfg is None:
    configs = _configs_of(base)
    cfg = configs[0] if configs else None
  if cfg is not None and cfg.vision is None:
    raise speculative.GenerateError(
        f"--image: the base {base} has no vision tower (its config has no vision section); give "
        "an image-text base (Gemma4ForConditionalGeneration) or drop --image")


def read_images(paths: Sequence[str]) -> list:
  """The --image files as loaded PIL images; a missing or unreadable file, or a URL, is refused
  naming it."""
  from gemma_mtp_jax.data import images as images_lib
  from gemma_mtp_jax.data.errors import DataError
  from gemma_mtp_jax.decoding import speculative

  out = []
  for path in paths:
    try:
      out.append(images_lib.load_image(path))
    except DataError as e:
      raise speculative.GenerateError(f"--image {path}: {e}") from None
  return out


def load_processor(loaded: dict):
  """The base's Gemma 4 processor, from the dir its tokenizer came from (the HF dir itself, or a
  pair dir's / workdir's tokenizer/, where `convert` and the trainer put the processor files)."""
  from gemma_mtp_jax.data import images as images_lib
  from gemma_mtp_jax.data.errors import DataError
  from gemma_mtp_jax.decoding import speculative

  path = loaded["pair"].tokenizer_path
  if not path or not os.path.isfile(os.path.join(path, "processor_config.json")):
    where = f" (looked in {path})" if path else ""
    raise speculative.GenerateError(
        f"--image: {loaded['pair'].meta.get('path')} has no image processor files "
        f"(processor_config.json beside the tokenizer{where}); save the processor with the base")
  try:
    return images_lib.load_processor(path)
  except DataError as e:
    raise speculative.GenerateError(f"--image: {e}") from None


def _chat_image_prompt(processor, images: Sequence, prompt: str) -> tuple[list[int], tuple]:
  from gemma_mtp_jax.data import chat as chat_lib
  from gemma_mtp_jax.data import tokenizer as tokenizer_lib

  tok = processor.tokenizer
  content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": prompt}]
  doc = chat_lib.encode_example({"messages": [{"role": "user", "content": content}]}, tok,
                                image_processor=processor.image_processor)
  # The template's generation prompt `<|turn>model\n`, tokenized as the encoder tokenizes a model
  # turn's header (the control token, then the role text on its own).
  opened = [chat_lib.control_ids(tok)[tokenizer_lib.TURN_OPEN]] + tok(
      f"{chat_lib.MODEL_ROLE}\n", add_special_tokens=False, split_special_tokens=True)["input_ids"]
  return doc["tokens"].tolist() + opened, (doc["pixel_values"], doc["pixel_positions"])


def image_prompt(loaded: dict, images: Sequence, prompt: str | None, chat: bool,
                 ids: Sequence[int] | None = None) -> tuple[list[int], tuple]:
  """(prompt ids, (pixel_values_ipc float32, pixel_positions_ip2 int32)) of a request with PIL
  `images`, preprocessed by the base's processor (see the module docstring for the three forms:
  --chat, a raw --prompt with `<|image|>` placeholders, --prompt-ids already expanded)."""
  import numpy as np
  from gemma_mtp_jax.data import images as images_lib
  from gemma_mtp_jax.decoding import speculative

  processor = load_processor(loaded)
  if ids is not None:
    pixel_values, positions, _ = images_lib.preprocess(images, processor.image_processor)
    return list(ids), (pixel_values, positions)
  if chat:
    return _chat_image_prompt(processor, images, prompt)
  placeholder = processor.image_token
  n = prompt.count(placeholder)
  if n != len(images):
    raise speculative.GenerateError(
        f"--prompt has {n} {placeholder} placeholder(s) for {len(images)} --image file(s); "
        f"without --chat put one {placeholder} in --prompt where each image goes (or use --chat)")
  out = processor(text=[prompt], images=[list(images)], return_tensors="np")
  return (np.asarray(out["input_ids"][0]).tolist(),
          (np.asarray(out["pixel_values"], np.float32),
           np.asarray(out["image_position_ids"], np.int32)))


# ------------------------------------------------------------------------------ decoding
def plain_decode(params, cfg, prompts: Sequence[Sequence[int]], **kw):
  """Plain (non-speculative) decoding of the base alone: `speculative.decode_prompts` with no drafter,
  the same KV cache and loop (one base forward per token)."""
  from gemma_mtp_jax.decoding import speculative
  return speculative.decode_prompts(params, cfg, prompts, **kw)


def generate(loaded: dict, ids: Sequence[int], *, max_new_tokens: int = 64,
             num_draft_tokens: int = 4, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] | None = None,
             query_position: str | None = None, images: tuple | None = None) -> dict[str, Any]:
  """Generates from one prompt; returns the CLI's JSON object (see the module docstring).

  images: None or the prompt's (pixel_values_ipc float32, pixel_positions_ip2 int32) slots
  (`image_prompt`)."""
  from gemma_mtp_jax.decoding import speculative

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


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs parsed flags; returns the JSON object."""
  from gemma_mtp_jax.decoding import speculative

  if not args.plain and args.num_draft_tokens < 1:
    raise speculative.GenerateError(f"--num-draft-tokens (K) must be >= 1, got "
                                    f"{args.num_draft_tokens} (use --plain for plain decoding)")
  if args.max_new_tokens < 1:
    raise speculative.GenerateError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  speculative.Sampling(args.temperature, args.top_k, args.top_p)  # flag errors before loading
  ids_flag = _ids(args.prompt_ids, "--prompt-ids") if args.prompt_ids is not None else None
  pil_images = None
  if args.image:  # refused before any weights are read
    check_vision(args.base)
    pil_images = read_images(args.image)
  loaded = load(args.base, args.drafter, args.step, args.dtype, args.plain)
  images = None
  if pil_images:
    check_vision(args.base, loaded["base_cfg"])
    ids, images = image_prompt(loaded, pil_images, args.prompt, args.chat, ids_flag)
  else:
    ids = ids_flag if ids_flag is not None else prompt_ids(loaded, args.prompt, args.chat)
  stop = [] if args.no_stop else (_ids(args.stop_ids, "--stop-ids") if args.stop_ids else None)
  return generate(loaded, ids, max_new_tokens=args.max_new_tokens,
                  num_draft_tokens=args.num_draft_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=stop,
                  query_position=args.query_position, images=images)


def main(argv=None) -> int:
  """CLI entry point; returns the exit status (2 on bad input, with one `error:` line on stderr;
  see `gemma_mtp_jax.cli`)."""
  return cli.run(_main, argv)


def _main(argv) -> int:
  args = _parser().parse_args(argv)
  out = run(args)
  if args.json:
    print(json.dumps(out))
  else:
    print(out["text"] if out["text"] is not None else " ".join(map(str, out["tokens"])))
  return 0


if __name__ == "__main__":
  cli.exit_with(main)
