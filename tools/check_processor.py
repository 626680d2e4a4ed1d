"""Checks that an exported base dir loads with `AutoProcessor.from_pretrained` (a machine with
torchvision) and preprocesses images as the trainer did (transformers' PIL image processor).

  python tools/check_processor.py runs/tiny_vision/hf/base

Loads the dir's processor, runs both image processor backends on images of a few aspect ratios and
a chat turn with an image through `apply_chat_template`; exits 1 naming the first difference
(soft-token counts, patch positions, or pixel values beyond one 8-bit level), 0 otherwise.
Needs torchvision: transformers' Gemma 4 video processor requires it, so `AutoProcessor` cannot
load any Gemma 4 dir without it (the trainer and `generate` use `data.images.load_processor`).
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("base_dir", help="an exported WORKDIR/hf/base (or any Gemma 4 model dir)")
  args = parser.parse_args(argv)
  if not os.path.isfile(os.path.join(args.base_dir, "processor_config.json")):
    print(f"error: {args.base_dir!r} has no processor_config.json (expected an exported "
          "WORKDIR/hf/base or a Gemma 4 model dir)", file=sys.stderr)
    return 2
  from transformers import AutoProcessor
  from transformers.utils import is_torchvision_available

  if not is_torchvision_available():
    print("error: AutoProcessor needs torchvision for Gemma 4 (its video processor); "
          "install it to run this check", file=sys.stderr)
    return 2
  from gemma_mtp_jax.data import images as images_lib

  auto = AutoProcessor.from_pretrained(args.base_dir)
  pil = images_lib.load_processor_pil(args.base_dir).image_processor
  rng = np.random.default_rng(0)
  worst = 0.0
  for h, w in ((48, 64), (96, 32), (40, 40), (33, 71)):
    img = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
    a = auto.image_processor(images=[img], return_tensors="np")
    b = pil(images=[img], return_tensors="np")
    if list(a["num_soft_tokens_per_image"]) != list(b["num_soft_tokens_per_image"]) or not (
        np.array_equal(a["image_position_ids"], b["image_position_ids"])):
      print(f"error: {h}x{w} image: soft tokens / positions differ between the torchvision and "
            "PIL image processors", file=sys.stderr)
      return 1
    diff = float(np.abs(np.asarray(a["pixel_values"]) - np.asarray(b["pixel_values"])).max())
    worst = max(worst, diff)
    turn = [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": "What is shown?"}]}]
    ids = auto.apply_chat_template(turn, add_generation_prompt=True, tokenize=True,
                                   return_dict=True, return_tensors="np")["input_ids"][0]
    n_image = int((ids == auto.tokenizer.image_token_id).sum())
    if n_image != int(a["num_soft_tokens_per_image"][0]):
      print(f"error: {h}x{w} image: the chat template expands {n_image} image tokens for "
            f"{int(a['num_soft_tokens_per_image'][0])} soft tokens", file=sys.stderr)
      return 1
  if worst > 1.0 / 255 + 1e-6:
    print(f"error: pixel values differ by {worst:.4g} (> one 8-bit level)", file=sys.stderr)
    return 1
  print(f"ok: {type(auto).__name__} with {type(auto.image_processor).__name__} loads "
        f"{args.base_dir}; torchvision vs PIL pixel values within {worst:.4g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
