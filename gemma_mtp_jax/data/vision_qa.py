"""A generated visual-question-answering set: no download, deterministic by seed.

Each record is an HF chat (`messages` schema, or NeMo's MedPix-style `conversation`) whose user
turn holds one image (sometimes two) and a question, and whose model turn is a short templated
answer. The images are PIL-rendered scenes of 1-4 coloured shapes (circle, square, triangle) on a
plain background, of varied sizes and aspect ratios; the questions ask for a shape, a colour, a
count or a position:

  "What shape is the blue object?"      -> "It is a triangle."
  "How many shapes are there?"          -> "There are 3 shapes."
  "Where is the red circle?"            -> "The red circle is at the top left."
  (two images) "How many shapes are in the two images together?" -> "There are 5 shapes."

`build_vision_qa(out_dir)` writes `train.jsonl` and `images/*.png` (paths relative to the jsonl)
once, atomically; a few thousand records take a few seconds.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from gemma_mtp_jax.data.schemas import CONVERSATION, MESSAGES
from gemma_mtp_jax.utils import files

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (230, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle")
_MANIFEST = "manifest.json"
VERSION = 2  # of the generated set: a new version is written to a new dir (`sources`)
# Image sides in pixels; aspect ratios from 1:3 to 3:1. With the tiny_vision tower's 16-pixel soft
# tokens (8-pixel patches pooled 2 x 2) an image is 4 to 36 soft tokens, 16 on average.
_SIZES = (32, 48, 64, 80, 96)


def _where(cx: float, cy: float, w: int, h: int) -> str:
  row = "top" if cy < h / 2 else "bottom"
  col = "left" if cx < w / 2 else "right"
  return f"{row} {col}"


def _scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
  """One image and its objects [{shape, color, where}], objects in distinct quadrants."""
  w, h = (int(rng.choice(_SIZES)) for _ in range(2))
  if max(w, h) > 3 * min(w, h):
    h = w
  background = tuple(int(v) for v in rng.integers(200, 256, size=3))
  image = Image.new("RGB", (w, h), background)
  draw = ImageDraw.Draw(image)
  quadrants = rng.permutation(4)[:int(rng.integers(1, 5))]
  objects = []
  for q in quadrants:
    shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
    r = max(3.0, min(w, h) / 4 * rng.uniform(0.5, 0.9))
    cx = (0.25 + 0.5 * (q % 2)) * w + rng.uniform(-0.05, 0.05) * w
    cy = (0.25 + 0.5 * (q // 2)) * h + rng.uniform(-0.05, 0.05) * h
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
      draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
      draw.rectangle(box, fill=COLORS[color])
    else:
      draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    objects.append(dict(shape=shape, color=color, where=_where(cx, cy, w, h)))
  return image, objects


def _plural(n: int, word: str) -> str:
  return f"{n} {word}" + ("" if n == 1 else "s")


def _question(rng: np.random.Generator, objects: list[dict]) -> tuple[str, str]:
  """A question about one scene and its short answer."""
  o = objects[rng.integers(len(objects))]
  kind = rng.integers(5)
  if kind == 0:
    n = len(objects)
    return "How many shapes are there?", f"There {'is' if n == 1 else 'are'} {_plural(n, 'shape')}."
  if kind == 1:
    n = sum(x["color"] == o["color"] for x in objects)
    return (f"How many {o['color']} shapes are there?",
            f"There {'is' if n == 1 else 'are'} {_plural(n, o['color'] + ' shape')}.")
  if kind == 2 and sum(x["color"] == o["color"] for x in objects) == 1:
    return f"What shape is the {o['color']} object?", f"It is a {o['shape']}."
  if kind == 3 and sum(x["shape"] == o["shape"] for x in objects) == 1:
    return f"What color is the {o['shape']}?", f"The {o['shape']} is {o['color']}."
  return (f"Where is the {o['color']} {o['shape']}?",
          f"The {o['color']} {o['shape']} is at the {o['where']}.")


def _record(images: list[str], question: str, answer: str, shape: str) -> dict:
  content = [dict(type="image", image=p) for p in images] + [dict(type="text", text=question)]
  turns = [dict(role="user", content=content),
           dict(role="assistant", content=[dict(type="text", text=answer)])]
  return {shape: turns}


def build_vision_qa(out_dir: str, num_records: int = 3000, seed: int = 0,
                    two_image_fraction: float = 0.1, shape: str = "messages") -> str:
  """Writes (once) the generated image QA set into `out_dir`; returns its `train.jsonl` path.

  Args:
    num_records: records written; `two_image_fraction` of them hold two images.
    seed: everything (sizes, colours, shapes, questions) is a function of it.
    shape: "messages" (HF chat records) or "conversation" (NeMo's MedPix-VQA records).
  An existing set (its manifest.json) in `out_dir` is reused as is, whatever the arguments say.
  """
  if shape not in (MESSAGES, CONVERSATION):
    raise ValueError(f"shape must be {MESSAGES!r} or {CONVERSATION!r}, got {shape!r}")
  jsonl = os.path.join(out_dir, "train.jsonl")
  if os.path.exists(os.path.join(out_dir, _MANIFEST)):
    return jsonl
  rng = np.random.default_rng(seed)
  with files.atomic_dir(out_dir, marker=_MANIFEST) as tmp:
    os.makedirs(os.path.join(tmp, "images"))
    written = 0
    with open(os.path.join(tmp, "train.jsonl"), "w", encoding="utf-8") as f:
      for n in range(num_records):
        scenes = [_scene(rng) for _ in range(2 if rng.random() < two_image_fraction else 1)]
        paths = []
        for k, (image, _) in enumerate(scenes):
          paths.append(f"images/{n:06d}_{k}.png")
          image.save(os.path.join(tmp, paths[-1]), optimize=False, compress_level=1)
          written += 1
        if len(scenes) == 2:
          total = sum(len(objects) for _, objects in scenes)
          qa = ("How many shapes are in the two images together?",
                f"There are {_plural(total, 'shape')}.")
        else:
          qa = _question(rng, scenes[0][1])
        f.write(json.dumps(_record(paths, *qa, shape)) + "\n")
    files.write_json(os.path.join(tmp, _MANIFEST),
                     dict(version=VERSION, seed=seed, records=num_records, images=written,
                          shape=shape))
  return jsonl
