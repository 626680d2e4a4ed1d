"""Training data: chat examples -> Gemma 4 chat tokens -> packed, segment-masked rows.

The pipeline, top-down, with the module that does each step:

  sources.py  source (`datasets`: hub id or local json/jsonl/parquet) in a data schema
              (`schemas.py`: the registry of `messages`, `problem_solution`, ...) -> held-out
              split by a hash of each example's content (independent of the training seed)
  packing.py  weighted mixture (e.g. Tulu-3 80% / Magicoder 20%), a fixed function of
              (seed, doc index)
  chat.py     `encode_example`: Gemma 4 chat tokens + a loss mask on what the model must produce
  packing.py  `pack_batch`: documents laid end to end in fixed-length rows, with segment ids and
              positions (the batch format is in its docstring) -> `DataIterator`: resumable from a
              dict of ints; each process takes its rows of a global batch
  corpus.py   `builtin:chat` / `builtin:code`: the no-download local corpus from Python's own docs
  vision_qa.py  `builtin:vision_qa`: the generated image QA set (rendered shapes, colours, counts)
  images.py   image values -> transformers' Gemma 4 image processor -> pixel slots; the processor
  tokenizer.py  Gemma 4's tokenizer, or the tiny one trained on the local corpus

Images: a data config with a `vision` section ({max_soft_tokens, patch_size, pooling_kernel_size,
max_images_per_row}; the sizes must be the model's vision tower's) encodes image items with
Gemma 4's image processor, and its batches carry `max_images_per_row` image slots per row
(`packing`). Without it, batches are text only and an example with an image is an error.

A source's `schema` is a name in the registry of `schemas` (or "auto"); a program adds one with
`register_schema(Schema(name, columns, to_turns))` before it builds the datasets.

This module holds the data configs and builds the iterators from one (`make_datasets`). The names
the trainer, train CLI, benchmarks and tests reach as `pipeline.<name>` are importable from here
(`__all__`).
"""

from __future__ import annotations

import hashlib
import os

import ml_collections

from gemma_mtp_jax.data.chat import DataError, control_ids
from gemma_mtp_jax.data.corpus import BUILTIN, build_local_corpus, corpus_texts, default_cache_dir
from gemma_mtp_jax.data.images import build_image_processor, build_processor, save_processor
from gemma_mtp_jax.data.packing import Batch, DataIterator, make_eval_batches
from gemma_mtp_jax.data.schemas import MESSAGES, PROBLEM_SOLUTION, Schema, register_schema
from gemma_mtp_jax.data.sources import VISION_QA, load_source, spec_dict, split_source
from gemma_mtp_jax.data.tokenizer import TURN_CLOSE, build_tiny_tokenizer, load_tokenizer
from gemma_mtp_jax.utils import files

__all__ = [
    "DataError", "TURN_CLOSE", "build_processor", "control_ids", "corpus_texts",
    "default_data_config", "image_processor_from_config", "load_source", "make_datasets",
    "processor_from_config", "save_processor", "split_source", "tokenizer_from_config",
    "tulu_magicoder_data_config", "vision_qa_data_config", "tokenizer_files_dir",
    "check_image_tokens", "Schema", "register_schema",
]


def default_data_config() -> ml_collections.ConfigDict:
  """The tiny run: the local corpus, 80% chat / 20% code, and a tokenizer trained on it."""
  cfg = ml_collections.ConfigDict()
  cfg.sources = [
      dict(name="chat", path=BUILTIN + "chat", weight=0.8, schema=MESSAGES),
      dict(name="code", path=BUILTIN + "code", weight=0.2, schema=PROBLEM_SOLUTION),
  ]
  cfg.eval_fraction = 0.02  # of each source's examples, chosen by content hash
  cfg.eval_max_batches = 4  # 0 = every held-out example
  cfg.corpus_dir = ""  # "" = <default_cache_dir()>/corpus
  cfg.hf_cache_dir = ""  # "" = datasets' default cache
  cfg.tokenizer = ""  # dir or hub id; "" = the tiny tokenizer trained on the local corpus
  cfg.tiny_vocab_size = 4096
  return cfg


def tulu_magicoder_data_config() -> ml_collections.ConfigDict:
  """The NeMo joint-drafter recipe's text mix: Tulu-3 SFT 80% / Magicoder OSS-Instruct 20%."""
  cfg = default_data_config()
  cfg.sources = [
      dict(name="tulu3", path="allenai/tulu-3-sft-mixture", weight=0.8, schema=MESSAGES,
           split="train"),
      dict(name="magicoder", path="ise-uiuc/Magicoder-OSS-Instruct-75K", weight=0.2,
           schema=PROBLEM_SOLUTION, split="train"),
  ]
  cfg.eval_fraction = 0.002  # ~1.9k Tulu + ~150 Magicoder examples
  cfg.eval_max_batches = 16
  cfg.tokenizer = "google/gemma-4-E4B-it"
  return cfg


def vision_qa_data_config() -> ml_collections.ConfigDict:
  """The tiny vision run: the generated image QA set and a tiny tokenizer with Gemma 4's image
  tokens. `vision` sizes the image processor; they must match the model's vision tower
  (patch_size, pooling_kernel_size) and `max_soft_tokens` bounds the tokens of one image."""
  cfg = default_data_config()
  cfg.sources = [dict(name="vision_qa", path=BUILTIN + VISION_QA, weight=1.0, schema=MESSAGES)]
  cfg.eval_fraction = 0.02
  cfg.vision = ml_collections.ConfigDict(dict(
      max_soft_tokens=70,  # the smallest Gemma 4 budget: <= 70 soft tokens per image
      patch_size=8, pooling_kernel_size=2,  # 280 patches of 8x8 pixels per image slot
      max_images_per_row=4))  # the set has 1 or 2 images per record
  return cfg


def image_processor_from_config(data_cfg):
  """Gemma 4's image processor sized by `data_cfg.vision`; None for text-only data."""
  vision = data_cfg.get("vision")
  if not vision:
    return None
  return build_image_processor(int(vision.get("max_soft_tokens", 280)),
                               int(vision.get("patch_size", 16)),
                               int(vision.get("pooling_kernel_size", 3)))


def processor_from_config(data_cfg, tokenizer):
  """transformers' `Gemma4Processor` (tokenizer + `data_cfg.vision`'s image processor): what an
  export writes next to the model (`save_processor`); None for text-only data."""
  vision = data_cfg.get("vision")
  if not vision:
    return None
  return build_processor(tokenizer, int(vision.get("max_soft_tokens", 280)),
                         int(vision.get("patch_size", 16)), int(vision.get("pooling_kernel_size", 3)))


def tokenizer_files_dir(data_cfg, tokenizer) -> str | None:
  """The dir whose files travel with a trained model (into WORKDIR/tokenizer and the HF export):
  the tokenizer's own dir for text data; for image data, a processor dir (tokenizer, chat template,
  processor_config.json with the image processor) written once to the cache. None when the
  tokenizer has no local dir (a hub id: the HF base's dir carries its files)."""
  processor = processor_from_config(data_cfg, tokenizer)
  source = getattr(tokenizer, "name_or_path", None)
  if processor is None:
    return source if source and os.path.isdir(source) else None
  vision = data_cfg.vision
  key = hashlib.sha256(repr((os.path.abspath(source or ""), len(tokenizer),
                             sorted(dict(vision).items()))).encode()).hexdigest()[:16]
  out = os.path.join(default_cache_dir(), "processors", key)
  if not os.path.isdir(out):
    with files.atomic_dir(out) as tmp:
      save_processor(processor, tmp)
  return out


def check_image_tokens(tokenizer, image_token_id: int | None, boi_token_id: int | None,
                       eoi_token_id: int | None, where: str = "model") -> None:
  """The base's image / boi / eoi token ids must be the tokenizer's (DataError naming both)."""
  for name, want in (("image_token", image_token_id), ("boi_token", boi_token_id),
                     ("eoi_token", eoi_token_id)):
    token = getattr(tokenizer, name, None)
    got = tokenizer.convert_tokens_to_ids(token) if token else None
    if want is not None and got != want:
      raise DataError(f"config key '{where}.{name}_id' is {want} but the tokenizer "
                      f"{getattr(tokenizer, 'name_or_path', '')!r} has {name} {token!r} = {got}")


def _corpus_dir(data_cfg) -> str:
  return data_cfg.get("corpus_dir") or os.path.join(default_cache_dir(), "corpus")


def tokenizer_from_config(data_cfg):
  """`data_cfg.tokenizer` if set, else the tiny tokenizer of the local corpus (built once); with
  a `vision` section, the tiny tokenizer carries Gemma 4's image tokens (in its own dir)."""
  if data_cfg.get("tokenizer"):
    return load_tokenizer(data_cfg.tokenizer)
  corpus_dir = _corpus_dir(data_cfg)
  corpus = build_local_corpus(corpus_dir)
  vocab_size = int(data_cfg.get("tiny_vocab_size") or 4096)
  multimodal = bool(data_cfg.get("vision"))
  name = f"tokenizer_{vocab_size}" + ("_mm" if multimodal else "")
  return build_tiny_tokenizer(corpus_texts(corpus.values()), os.path.join(corpus_dir, name),
                              vocab_size, multimodal=multimodal)


def make_datasets(data_cfg, tokenizer, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0,
                  process_count: int = 1) -> tuple[DataIterator, list[Batch]]:
  """Builds the training iterator and the fixed eval batches from a data config.

  Args:
    data_cfg: `default_data_config()`-shaped: `sources` (list of {path, weight, schema, name, split,
      subset, limit}), `eval_fraction`, `eval_max_batches`, `corpus_dir`, `hf_cache_dir`.
    tokenizer: an HF Gemma 4 tokenizer (or the tiny one).
    seq_len, batch_size: row length T and *global* rows per batch B.
    seed: the mixture order; the eval split does not depend on it.
    process_index, process_count: this process's share, B / process_count rows of each batch.
  Returns:
    (train_iter, eval_batches): an infinite `DataIterator` and a list of batches, both yielding
    dicts of tokens/segment_ids/positions/loss_mask of shape [B / process_count, T], plus
    pixel_values [B / process_count, i, p, c] / pixel_positions [..., i, p, 2] when
    `data_cfg.vision` is set (i = vision.max_images_per_row).
  """
  if not data_cfg.sources:
    raise DataError("data config has no sources")
  train, held_out, weights = [], [], []
  for spec in data_cfg.sources:
    spec = spec_dict(spec)
    source = load_source(spec, cache_dir=data_cfg.get("hf_cache_dir") or None,
                         corpus_dir=_corpus_dir(data_cfg))
    train_part, eval_part = split_source(source, float(data_cfg.get("eval_fraction", 0.0)))
    train.append(train_part)
    held_out.append(eval_part)
    weights.append(float(spec.get("weight", 1.0)))
  images = dict(image_processor=image_processor_from_config(data_cfg),
                max_images_per_row=int((data_cfg.get("vision") or {}).get("max_images_per_row", 0)))
  train_iter = DataIterator(train, weights, tokenizer, seq_len=seq_len, batch_size=batch_size,
                            seed=seed, process_index=process_index, process_count=process_count,
                            **images)
  eval_batches = make_eval_batches(
      held_out, tokenizer, seq_len=seq_len, batch_size=batch_size,
      max_batches=int(data_cfg.get("eval_max_batches", 0)), process_index=process_index,
      process_count=process_count, **images)
  return train_iter, eval_batches
