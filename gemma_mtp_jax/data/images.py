"""Images of chat data: reading a record's image values, Gemma 4's image processor, the processor.

Preprocessing is transformers' own: `Gemma4ImageProcessorPil` (the PIL backend `AutoImageProcessor`
picks when torchvision is absent) resizes each image, keeping its aspect ratio, to at most
`max_soft_tokens * pooling_kernel_size**2` patches of `patch_size`**2 pixels, rescales to [0, 1] and
patchifies it; nothing here resizes or patches by hand. Per image it gives
  pixel_values  float32[p, c]  p = max_soft_tokens * pooling_kernel_size**2, c = 3 * patch_size**2;
                               padding patches are zeros
  positions     int32[p, 2]    each patch's (x, y) in the patch grid; padding patches (-1, -1)
  soft tokens   int            the image's placeholder count: boi + n x image token + eoi

An image value is what records hold: a local path (relative paths resolve against the data file's
dir), raw bytes, a PIL image, or `datasets`' undecoded Image dict {"bytes", "path"}. URLs are
refused, never fetched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Sequence

import numpy as np
import PIL.Image
import transformers

from gemma_mtp_jax.data.errors import DataError

MAX_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the values Gemma 4's image processor accepts
_PROCESSOR_CONFIG = "processor_config.json"


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePart:
  """One image item of a chat turn: the record's value, read only when the example is encoded."""

  value: Any  # str path | bytes | PIL.Image.Image | {"bytes": ..., "path": ...}

  def key(self) -> str:
    """A short content identity (for the eval split's hash): the path, or a digest of the data."""
    value = self.value
    if isinstance(value, dict):
      value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
      return value
    if isinstance(value, PIL.Image.Image):
      value = value.tobytes() + repr((value.size, value.mode)).encode()
    if isinstance(value, (bytes, bytearray)):
      return "sha1:" + hashlib.sha1(bytes(value)).hexdigest()
    return repr(value)


def _open(data_or_path, what: str) -> PIL.Image.Image:
  try:
    image = PIL.Image.open(data_or_path)
    image.load()  # decode now: a truncated file fails here, not inside the processor
    return image
  except (OSError, PIL.Image.DecompressionBombError, ValueError, SyntaxError) as e:
    raise DataError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None


def load_image(value: Any, base_dir: str | None = None) -> PIL.Image.Image:
  """An image value of a record -> a loaded PIL image.

  Raises DataError naming the path (or the byte count) for a missing or unreadable image, a URL,
  or a value of another type.
  """
  if isinstance(value, dict):  # datasets' Image feature with decode=False
    if value.get("bytes"):
      value = value["bytes"]
    elif value.get("path"):
      value = value["path"]
    else:
      raise DataError(f"image {value!r} has neither 'bytes' nor 'path'")
  if isinstance(value, PIL.Image.Image):
    return value
  if isinstance(value, (bytes, bytearray)):
    return _open(io.BytesIO(bytes(value)), f"image bytes ({len(value)} bytes)")
  if isinstance(value, str):
    if value.startswith(("http://", "https://")):
      raise DataError(f"image {value!r} is a URL; images are not downloaded, give a local path")
    path = os.path.expanduser(value)
    if not os.path.isabs(path) and base_dir:
      path = os.path.join(base_dir, path)
    if not os.path.isfile(path):
      raise DataError(f"image {value!r} not found (looked for {path})")
    return _open(path, f"image {value!r} ({path})")
  raise DataError(f"image value of type {type(value).__name__}; expected a local path, bytes, a "
                  "PIL image or {'bytes', 'path'}")


def build_image_processor(max_soft_tokens: int = 280, patch_size: int = 16,
                          pooling_kernel_size: int = 3):
  """transformers' Gemma 4 image processor (PIL backend) with these sizes (Gemma 4's defaults)."""
  if max_soft_tokens not in MAX_SOFT_TOKENS:
    raise DataError(f"max_soft_tokens must be one of {MAX_SOFT_TOKENS}, got {max_soft_tokens}")
  from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

  return Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens, patch_size=patch_size,
                                 pooling_kernel_size=pooling_kernel_size)


def slot_shape(image_processor) -> tuple[int, int]:
  """(p, c) of one image slot: the processor's max patches and values per patch."""
  p = image_processor.max_soft_tokens * image_processor.pooling_kernel_size**2
  return p, 3 * image_processor.patch_size**2


def preprocess(images: Sequence[PIL.Image.Image],
               image_processor) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """Images -> (pixel_values float32[n, p, c], positions int32[n, p, 2], soft tokens per image)."""
  out = image_processor(images=list(images), return_tensors="np")
  return (np.asarray(out["pixel_values"], np.float32),
          np.asarray(out["image_position_ids"], np.int32),
          [int(n) for n in out["num_soft_tokens_per_image"]])


# ---------------------------------------------------------------------------------- processor


def _torchvision() -> bool:
  from transformers.utils import is_torchvision_available

  return is_torchvision_available()


def _assemble(tokenizer, image_processor, feature_extractor, max_soft_tokens: int):
  """A `Gemma4Processor`. Without torchvision it has no video processor (transformers' Gemma 4
  video processor needs torchvision), which is all images and text need."""
  from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

  kwargs = dict(image_processor=image_processor, tokenizer=tokenizer,
                feature_extractor=feature_extractor, chat_template=tokenizer.chat_template,
                image_seq_length=max_soft_tokens)
  if _torchvision():
    from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

    return Gemma4Processor(video_processor=Gemma4VideoProcessor(), **kwargs)

  class _NoVideo(Gemma4Processor):  # only relaxes the class check for the missing video processor
    def check_argument_for_proper_class(self, name, arg):
      if name == "video_processor" and arg is None:
        return None
      return super().check_argument_for_proper_class(name, arg)

  processor = _NoVideo(video_processor=None, **kwargs)
  processor.__class__ = Gemma4Processor  # saved and reported as transformers' own class
  return processor


def _image_tokenizer(tokenizer_or_dir):
  tokenizer = (transformers.AutoTokenizer.from_pretrained(tokenizer_or_dir)
               if isinstance(tokenizer_or_dir, (str, os.PathLike)) else tokenizer_or_dir)
  if getattr(tokenizer, "image_token", None) is None or getattr(tokenizer, "boa_token",
                                                                None) is None:
    raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no Gemma 4 image "
                    "tokens (image_token/boi_token/eoi_token and the audio ones); use Gemma 4's "
                    "tokenizer or the tiny one built with multimodal=True")
  return tokenizer


def build_processor(tokenizer_or_dir, max_soft_tokens: int = 280, patch_size: int = 16,
                    pooling_kernel_size: int = 3):
  """transformers' `Gemma4Processor` over a Gemma 4 (or tiny multimodal) tokenizer or its dir."""
  from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

  tokenizer = _image_tokenizer(tokenizer_or_dir)
  image_processor = build_image_processor(max_soft_tokens, patch_size, pooling_kernel_size)
  return _assemble(tokenizer, image_processor, Gemma4AudioFeatureExtractor(), max_soft_tokens)


def save_processor(processor, out_dir: str) -> None:
  """Writes the processor as `save_pretrained` does (tokenizer files, chat template,
  processor_config.json), also when it has no video processor (no torchvision)."""
  if processor.video_processor is not None:
    processor.save_pretrained(out_dir)
    return
  os.makedirs(out_dir, exist_ok=True)
  processor.tokenizer._set_processor_class(type(processor).__name__)
  processor.tokenizer.save_pretrained(out_dir)
  config = processor.to_dict()
  # AutoProcessor (with torchvision) loads the video processor from this section; without
  # torchvision there is none to serialise, so name its class and let it take its defaults.
  config["video_processor"] = {"video_processor_type": "Gemma4VideoProcessor",
                               "processor_class": type(processor).__name__}
  config.pop("chat_template", None)  # the tokenizer wrote chat_template.jinja
  config["processor_class"] = type(processor).__name__
  with open(os.path.join(out_dir, _PROCESSOR_CONFIG), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def load_processor(path: str):
  """`AutoProcessor.from_pretrained(path)`; without torchvision, the same processor less video."""
  if _torchvision():
    return transformers.AutoProcessor.from_pretrained(path)
  return load_processor_pil(path)


def load_processor_pil(path: str):
  """The dir's `Gemma4Processor` with transformers' PIL image processor and no video processor
  (what `load_processor` gives without torchvision, whatever is installed)."""
  from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
  from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

  config_path = os.path.join(path, _PROCESSOR_CONFIG)
  if not os.path.isfile(config_path):
    raise DataError(f"processor dir {path!r} has no {_PROCESSOR_CONFIG}")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  image_cfg = {k: v for k, v in config.get("image_processor", {}).items()
               if k not in ("image_processor_type", "processor_class")}
  audio_cfg = {k: v for k, v in config.get("feature_extractor", {}).items()
               if k not in ("feature_extractor_type", "processor_class")}
  image_processor = Gemma4ImageProcessorPil(**image_cfg)
  return _assemble(_image_tokenizer(path), image_processor,
                   Gemma4AudioFeatureExtractor(**audio_cfg), image_processor.max_soft_tokens)
