"""Host-side inputs of a decode request: validation, left padding, bucketing, image slots.

Image inputs of a prompt are fixed-shape slots (the shape letters of `gemma_mtp_jax.model`): pixel
slots (pixel_values_ipc, pixel_positions_ip2) as HF's image processor gives them per image, or soft
tokens already in the text width (soft_isD, valid_is). A batch stacks every prompt's slots into
[B, i, ...] arrays, i rounded up to a power of two so that nearby image counts share programs;
missing slots are empty (positions -1, zero values, no valid soft token).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gemma_mtp_jax.decoding.sampling import GenerateError
from gemma_mtp_jax.model import config as config_lib


def bucket(n: int, size: int) -> int:
  return -(-n // size) * size if size > 1 else n


def pad_left(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
  """[B, length] int32 tokens and bool validity, each prompt right-aligned."""
  tokens_BQ = np.full((len(prompts), length), pad_id, np.int32)
  valid_BQ = np.zeros((len(prompts), length), bool)
  for b, p in enumerate(prompts):
    if len(p):
      tokens_BQ[b, length - len(p):] = p
      valid_BQ[b, length - len(p):] = True
  return tokens_BQ, valid_BQ


def check_request(base_cfg: config_lib.ModelConfig, prompts: Sequence[Sequence[int]], *,
                  drafter_cfg: config_lib.DrafterConfig | None, num_draft: int, max_new_tokens: int,
                  prompt_length: int, max_cache_length: int | None) -> int:
  """Validates a request before any compute; returns the cache length it needs.

  num_draft: K of a speculative request (>= 1 required), 0 for plain decoding.
  """
  if drafter_cfg is not None:
    try:
      drafter_cfg.check_fits(base_cfg)
    except config_lib.ConfigError as e:
      raise GenerateError(f"the drafter does not fit the base: {e}") from None
  if max_new_tokens < 1:
    raise GenerateError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
  if not prompts:
    raise GenerateError("no prompts given")
  for b, p in enumerate(prompts):
    if not len(p):
      raise GenerateError(f"prompt {b} is empty")
    bad = [int(t) for t in p if not 0 <= int(t) < base_cfg.vocab_size]
    if bad:
      raise GenerateError(f"prompt {b} has token id {bad[0]} outside the vocab [0, "
                          f"{base_cfg.vocab_size})")
  cache_length = prompt_length + max_new_tokens + num_draft + 1
  limit = max_cache_length or base_cfg.max_position_embeddings
  if cache_length > limit:
    longest = max(len(p) for p in prompts)
    raise GenerateError(
        f"prompt length {longest} (padded to {prompt_length}) + --max-new-tokens {max_new_tokens} "
        f"+ K + 1 = {cache_length} cache slots exceed the maximum cache length {limit}; shorten "
        "the prompt or lower --max-new-tokens")
  return cache_length


def stack_slots(per_prompt: Sequence, fills: tuple, what: str) -> tuple[np.ndarray, ...]:
  """Per prompt None or a tuple of arrays [i_b, ...] -> the tuple of [B, i, ...] arrays, i the
  largest i_b rounded up to a power of two, empty slots filled with `fills`."""
  given = [(b, tuple(np.asarray(a) for a in x)) for b, x in enumerate(per_prompt) if x is not None]
  if len(given[0][1]) != len(fills):
    raise GenerateError(f"{what} of prompt {given[0][0]}: expected {len(fills)} arrays")
  tails = [a.shape[1:] for a in given[0][1]]
  for b, arrays in given:
    if len(arrays) != len(fills) or [a.shape[1:] for a in arrays] != tails or len(
        {a.shape[0] for a in arrays}) != 1:
      raise GenerateError(f"{what} of prompt {b}: shapes {[a.shape for a in arrays]} do not match "
                          f"the other prompts' [i, {', '.join(map(str, tails[0]))}] slots")
  most = max(arrays[0].shape[0] for _, arrays in given)
  slots = 1 << max(most - 1, 0).bit_length()
  out = []
  for j, fill in enumerate(fills):
    a0 = given[0][1][j]
    arr = np.full((len(per_prompt), slots) + a0.shape[1:], fill, a0.dtype)
    for b, arrays in given:
      arr[b, :arrays[j].shape[0]] = arrays[j]
    out.append(arr)
  return tuple(out)


def image_inputs(cfg: config_lib.ModelConfig, prompts: Sequence[Sequence[int]], images=None,
                 image_soft=None) -> tuple[tuple | None, tuple | None]:
  """(images, image_soft) of a request as batch slot arrays (each None when not given), after
  checking that every prompt has exactly as many `image_token_id` tokens as its images give soft
  tokens (HF raises on that mismatch too).

  images: per prompt None or (pixel_values_ipc float32, pixel_positions_ip2 int32), as HF's image
  processor gives them; image_soft: per prompt None or (soft_isD, valid_is) (already projected).
  """
  if images is None and image_soft is None:
    return None, None
  if images is not None and image_soft is not None:
    raise GenerateError("give images or image soft tokens, not both")
  per_prompt = images if images is not None else image_soft
  if len(per_prompt) != len(prompts):
    raise GenerateError(f"{len(per_prompt)} image lists for {len(prompts)} prompts")
  if cfg.image_token_id is None:
    raise GenerateError("the base model takes no images (its config has no image_token_id)")
  if images is not None and getattr(cfg, "vision", None) is None:
    raise GenerateError("the base model has no vision tower (its config has no vision section)")
  if all(x is None for x in per_prompt):
    return None, None
  for b, (p, x) in enumerate(zip(prompts, per_prompt)):
    want = int(np.sum(np.asarray(p) == cfg.image_token_id))
    got = 0 if x is None else soft_token_count(cfg, x, images is not None)
    if want != got:
      raise GenerateError(f"prompt {b} has {want} image tokens (id {cfg.image_token_id}) but its "
                          f"images give {got} soft tokens")
  if images is not None:
    return tuple(stack_slots(images, (0.0, -1), "images")), None
  return None, tuple(stack_slots(image_soft, (0.0, False), "image soft tokens"))


def soft_token_count(cfg: config_lib.ModelConfig, slots: tuple, pixels: bool) -> int:
  """Soft tokens of one prompt's images: the valid soft slots, or for pixel slots the real
  patches / pooling_kernel_size**2 per image (HF's split sizes; the 12B: one per patch)."""
  if not pixels:
    return int(np.sum(np.asarray(slots[1])))
  k2 = cfg.vision.patches_per_soft_token
  real_ip = np.all(np.asarray(slots[1]) != -1, axis=-1)
  return int(np.sum(real_ip.sum(axis=-1) // k2))
