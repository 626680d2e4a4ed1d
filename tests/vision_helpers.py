"""Builders shared by the image tests: tiny random HF Gemma 4 image-text models and images run
through HF's own image processor (no downloads, no torchvision: the PIL backend)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import transformers

from tests import hf_helpers

# A tiny tower: 4-pixel patches pooled 2x2, so 70 soft tokens (the smallest budget the processor
# allows) are 280 patches; GQA (2 heads / 1 kv head) and head_dim 16 (4 rope quarters of 4).
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, patch_size=4, pooling_kernel_size=2,
              position_embedding_size=160, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "axial", "rope_theta": 100.0})
MAX_SOFT_TOKENS = 70
# Token ids of the tiny vocab (256) used for images: the text model never sees them as tokens.
IMAGE_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID = 250, 251, 252


def hf_vision_config(**over) -> transformers.Gemma4VisionConfig:
  """A tiny `Gemma4VisionConfig` (eager attention), `VISION` updated by `over`."""
  cfg = transformers.Gemma4VisionConfig(**{**VISION, **over})
  cfg._attn_implementation = "eager"
  return cfg


def hf_vlm_config(text_variant: str = "e_style", text_over: dict | None = None,
                  **vision_over) -> transformers.Gemma4Config:
  """A tiny `Gemma4Config`: `hf_helpers.hf_text_config(text_variant)` + `hf_vision_config`, no audio."""
  cfg = transformers.Gemma4Config(
      text_config=hf_helpers.hf_text_config(text_variant, **(text_over or {})),
      vision_config=hf_vision_config(**vision_over), audio_config=None,
      image_token_id=IMAGE_TOKEN_ID, boi_token_id=BOI_TOKEN_ID, eoi_token_id=EOI_TOKEN_ID)
  cfg._attn_implementation = "eager"
  cfg.text_config._attn_implementation = "eager"
  cfg.vision_config._attn_implementation = "eager"
  return cfg


def randomize_vision_buffers_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Non-trivial values for the tower's buffers: clip bounds that clip some activations (input and
  output), std_bias / std_scale away from 0 / 1. No-op for buffers the config does not have."""
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, b in model.named_buffers():
      if name.endswith(("input_max", "output_max")):
        b.fill_(float(0.8 + torch.rand((), generator=g)))
      elif name.endswith(("input_min", "output_min")):
        b.fill_(float(-0.8 - torch.rand((), generator=g)))
      elif name.endswith("std_bias"):
        b.copy_(0.5 * torch.randn(b.shape, generator=g))
      elif name.endswith("std_scale"):
        b.copy_(1.0 + 0.3 * torch.randn(b.shape, generator=g))
  return model


def hf_vlm(seed: int = 0, text_variant: str = "e_style", text_over: dict | None = None, **over):
  """A tiny randomised `Gemma4ForConditionalGeneration` with a vision tower (float32, eval).

  `over` updates the vision config (e.g. use_clipped_linears=True, standardize=True)."""
  torch.manual_seed(seed)
  model = transformers.Gemma4ForConditionalGeneration(hf_vlm_config(text_variant, text_over, **over))
  model = hf_helpers.randomize_(model.eval().float(), seed)
  return randomize_vision_buffers_(model, seed)


def hf_image_processor(patch_size: int = VISION["patch_size"],
                       pooling_kernel_size: int = VISION["pooling_kernel_size"],
                       max_soft_tokens: int = MAX_SOFT_TOKENS):
  """HF's Gemma 4 image processor (PIL backend) with the tiny tower's patch settings."""
  from transformers.models.gemma4 import image_processing_pil_gemma4 as proc
  return proc.Gemma4ImageProcessorPil(patch_size=patch_size, pooling_kernel_size=pooling_kernel_size,
                                      max_soft_tokens=max_soft_tokens)


def random_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list:
  """RGB PIL images of the given (width, height) with smooth random content (so resizing keeps
  structure) plus noise."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  out = []
  for w, h in sizes:
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(4 * yy + rng.uniform(0, 6))
                     for _ in range(3)], -1)
    img = 127.5 * (1 + 0.8 * base) + rng.normal(0, 12, (h, w, 3))
    out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
  return out


def process_images(images, **proc_kw) -> dict[str, np.ndarray]:
  """HF's processor on PIL images: {"pixel_values" float32 [n, p, c], "image_position_ids" int32
  [n, p, 2] (padding patches (-1, -1)), "num_soft_tokens" int [n]}, one entry per image."""
  out = hf_image_processor(**proc_kw)(images=list(images), return_tensors="np")
  return dict(pixel_values=np.asarray(out["pixel_values"], np.float32),
              image_position_ids=np.asarray(out["image_position_ids"], np.int32),
              num_soft_tokens=np.asarray(out["num_soft_tokens_per_image"], np.int64))


def image_slots(processed: dict[str, np.ndarray], rows: Sequence[Sequence[int]],
                num_slots: int) -> tuple[np.ndarray, np.ndarray]:
  """(pixel_values_Bipc float32, pixel_positions_Bip2 int32): row b's slots hold the processed
  images `rows[b]` in order; the slots left over are empty (zero pixels, positions -1)."""
  pv, pos = processed["pixel_values"], processed["image_position_ids"]
  b, (_, p, c) = len(rows), pv.shape
  pixels_Bipc = np.zeros((b, num_slots, p, c), np.float32)
  positions_Bip2 = np.full((b, num_slots, p, 2), -1, np.int32)
  for r, ids in enumerate(rows):
    if len(ids) > num_slots:
      raise ValueError(f"row {r} has {len(ids)} images but only {num_slots} slots")
    for j, k in enumerate(ids):
      pixels_Bipc[r, j], positions_Bip2[r, j] = pv[k], pos[k]
  return pixels_Bipc, positions_Bip2
