"""`python -m gemma_mtp_jax.generate --image ...` on a tiny random HF image-text base (vision tower,
bidirectional image mask) and a tiny assistant: greedy tokens == HF's `generate` on the processor's
inputs for the same chat (plain and assisted), from the HF dir and from its converted pair dir;
raw prompts with `<|image|>` placeholders; clear errors for bad images and text-only bases."""

import itertools
import json
import os
import re
import types

import numpy as np
import PIL.Image
import pytest
import torch

from gemma_mtp_jax import hf_torch
from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax.data import corpus as corpus_lib
from gemma_mtp_jax.data import images as images_lib
from gemma_mtp_jax.data import tokenizer as tokenizer_lib
from gemma_mtp_jax.decoding import request
from gemma_mtp_jax.decoding import speculative
from tests import hf_helpers
from tests import vision_helpers
from tests.test_generate_cli import _json, _run

S, F = hf_helpers.S, hf_helpers.F
VOCAB = 512  # the tiny multimodal tokenizer's vocab; its last 7 ids are the image/audio/video markers
MAX_POS = 256  # two images of <= 70 soft tokens each + the chat text + the new tokens
K, NEW = 3, 12
PROMPT = "What differs between these two pictures?"


@pytest.fixture(scope="module", autouse=True)
def _assistant_kv_sharing():
  """transformers 5.23 refuses an assistant whose every layer is KV-shared (see test_generate_cli)."""
  with hf_torch.hf_assistant_patch():
    yield


def _models(tok):
  """A tiny HF image-text base (bidirectional image attention) whose image token ids are the
  tokenizer's, and an assistant of the same vocab."""
  img, boi, eoi = tok.convert_tokens_to_ids([tokenizer_lib.IMAGE, tokenizer_lib.BOI,
                                             tokenizer_lib.EOI])
  cfg = vision_helpers.hf_vlm_config(text_over=dict(
      vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, max_position_embeddings=MAX_POS,
      use_bidirectional_attention="vision"))
  cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id = img, boi, eoi
  torch.manual_seed(0)
  import transformers
  target = hf_helpers.randomize_(transformers.Gemma4ForConditionalGeneration(cfg).eval().float(), 0)
  target = vision_helpers.randomize_vision_buffers_(target, 0)
  target.generation_config.eos_token_id = None
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
              layer_types=[S, F], sliding_window=6, hidden_size_per_layer_input=0,
              vocab_size_per_layer_input=0, num_kv_shared_layers=2)
  assistant = hf_torch.hf_assistant(dict(text_config=text, backbone_hidden_size=64,
                                         use_ordered_embeddings=False), seed=1)
  hf_helpers.randomize_(assistant, seed=5)
  assistant.generation_config.num_assistant_tokens = K
  return target, assistant


def _png(path, w, h, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
  img = 127.5 * (1 + 0.8 * np.stack([np.sin((5 + c) * xx + seed) * np.cos(3 * yy + c)
                                      for c in range(3)], -1)) + rng.normal(0, 10, (h, w, 3))
  PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(path)
  return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """HF dirs (base with tokenizer + processor, text-only base, assistant), the pair dir converted
  from them, two PNGs of different aspect ratios, and the HF models themselves."""
  root = tmp_path_factory.mktemp("genimg")
  corpus = corpus_lib.build_local_corpus(str(root / "corpus"))
  texts = itertools.islice(corpus_lib.corpus_texts(corpus.values()), 1500)
  tok_dir = str(root / "tok")
  tokenizer_lib.build_tiny_tokenizer(texts, tok_dir, vocab_size=VOCAB, multimodal=True)
  processor = images_lib.build_processor(
      tok_dir, max_soft_tokens=vision_helpers.MAX_SOFT_TOKENS,
      patch_size=vision_helpers.VISION["patch_size"],
      pooling_kernel_size=vision_helpers.VISION["pooling_kernel_size"])
  target, assistant = _models(processor.tokenizer)
  out = {k: str(root / k) for k in ("base", "text", "drafter", "pair")}
  target.save_pretrained(out["base"])
  images_lib.save_processor(processor, out["base"])
  assistant.save_pretrained(out["drafter"])
  hf_helpers.hf_causal_lm("e_style", vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB,
                          max_position_embeddings=MAX_POS).save_pretrained(out["text"])
  images_lib.save_processor(processor, out["text"])
  checkpoint.hf_to_jax(out["base"], out["pair"], drafter=out["drafter"])
  out["images"] = [_png(root / "wide.png", 96, 40, 1), _png(root / "tall.png", 36, 80, 2)]
  return dict(out, target=target, assistant=assistant, processor=processor)


def _hf_inputs(env, text=None):
  """The processor's inputs for the same request: the chat rendered by the processor's template
  (images first, then the text; model turn opened), or a raw `text`."""
  processor = env["processor"]
  if text is None:
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    special = dict(add_special_tokens=False)  # the rendered chat starts with <bos> already
  else:
    special = {}
  images = [PIL.Image.open(p) for p in env["images"]]
  return processor(text=[text], images=[images], return_tensors="pt", **special)


def _hf_generate(env, inputs, **kw):
  with torch.no_grad():
    out = env["target"].generate(**inputs, do_sample=False, max_new_tokens=NEW, pad_token_id=0,
                                 **kw)
  return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_chat_with_images_equals_hf_generate(env, capsys):
  inputs = _hf_inputs(env)
  image_id = env["target"].config.image_token_id
  n_soft = int((inputs["input_ids"] == image_id).sum())
  assert inputs["pixel_values"].shape[0] == 2 and n_soft > 40  # both images are in the prompt
  # The request the CLI builds: the processor's tokens and pixels exactly.
  loaded = dict(pair=types.SimpleNamespace(tokenizer_path=env["base"], meta={}))
  pil = [PIL.Image.open(p) for p in env["images"]]
  ids, (pixels, positions) = request.encode(loaded, PROMPT, images=pil, chat=True)
  assert ids == inputs["input_ids"][0].tolist()
  np.testing.assert_array_equal(pixels, inputs["pixel_values"].numpy())
  np.testing.assert_array_equal(positions, inputs["image_position_ids"].numpy())
  plain_ref = _hf_generate(env, inputs)
  fast_ref = _hf_generate(env, inputs, assistant_model=env["assistant"])
  assert fast_ref == plain_ref
  common = ["--image", env["images"][0], "--image", env["images"][1], "--prompt", PROMPT,
            "--chat", "--max-new-tokens", NEW, "--no-stop"]
  plain = _json(capsys, "--base", env["base"], *common, "--plain")
  assert plain["prompt_length"] == inputs["input_ids"].shape[1] and plain["images"] == 2
  assert plain["tokens"] == plain_ref and plain["draft_rounds"] == 0
  fast = _json(capsys, "--base", env["base"], "--drafter", env["drafter"], *common,
               "--num-draft-tokens", K)
  assert fast["tokens"] == plain_ref and fast["draft_rounds"] > 0 and fast["speculative"]
  # The pair dir: the processor travelled in its tokenizer/ dir; the stored drafter is used.
  assert os.path.isfile(os.path.join(env["pair"], "tokenizer", "processor_config.json"))
  stored = _json(capsys, "--base", env["pair"], *common, "--num-draft-tokens", K)
  assert stored["tokens"] == plain_ref and stored["draft_rounds"] > 0
  # The images matter: the same two in the other order (same prompt length) continue differently.
  swapped = _json(capsys, "--base", env["base"], "--image", env["images"][1], "--image",
                  env["images"][0], "--prompt", PROMPT, "--chat", "--max-new-tokens", NEW,
                  "--no-stop", "--plain")
  assert swapped["prompt_length"] == plain["prompt_length"] and swapped["tokens"] != plain_ref


def test_raw_prompt_placeholders_expand_as_the_processor(env, capsys):
  text = f"Left {tokenizer_lib.IMAGE} right {tokenizer_lib.IMAGE} which is wider?"
  inputs = _hf_inputs(env, text)
  ref = _hf_generate(env, inputs)
  r = _json(capsys, "--base", env["base"], "--image", env["images"][0], "--image",
            env["images"][1], "--prompt", text, "--max-new-tokens", NEW, "--no-stop", "--plain")
  assert r["prompt_length"] == inputs["input_ids"].shape[1] and r["tokens"] == ref
  # --prompt-ids holding the expanded blocks: the same request.
  ids = ",".join(map(str, inputs["input_ids"][0].tolist()))
  r2 = _json(capsys, "--base", env["base"], "--image", env["images"][0], "--image",
             env["images"][1], "--prompt-ids", ids, "--max-new-tokens", NEW, "--no-stop",
             "--plain")
  assert r2["tokens"] == ref


@pytest.mark.parametrize("argv, match", [
    (("--base", "{base}", "--image", "{missing}", "--prompt", "hi", "--chat"),
     r"--image .*nope\.png.* not found"),
    (("--base", "{base}", "--image", "{garbage}", "--prompt", "hi", "--chat"),
     r"--image .*garbage\.png.* not a readable image"),
    (("--base", "{base}", "--image", "https://example.com/a.png", "--prompt", "hi", "--chat"),
     r"--image https://example.com/a.png: .*URL"),
    (("--base", "{text}", "--image", "{img0}", "--prompt", "hi", "--chat"),
     r"--image: the base .*text has no vision tower"),
    (("--base", "{base}", "--image", "{img0}", "--image", "{img1}", "--prompt",
      "one <|image|> only"), r"--prompt has 1 <\|image\|> placeholder\(s\) for 2 --image"),
    (("--base", "{base}", "--image", "{img0}", "--prompt-ids", "2,3,4"),
     r"prompt 0 has 0 image tokens .* but its images give \d+ soft tokens"),
])
def test_bad_image_requests_exit_2_before_any_compute(env, capsys, tmp_path, argv, match):
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"not a png at all")
  paths = dict(base=env["base"], text=env["text"], missing=str(tmp_path / "nope.png"),
               garbage=str(garbage), img0=env["images"][0], img1=env["images"][1])
  before = dict(speculative.compiled_programs())
  code, out, err = _run(capsys, *[a.format(**paths) if "{" in a else a for a in argv])
  assert code == 2 and out == "" and err.startswith("error: ")
  assert re.search(match, err), err
  assert dict(speculative.compiled_programs()) == before


def test_text_only_base_is_refused_before_weights_are_read(env, capsys, monkeypatch):
  def no_load(*a, **k):
    raise AssertionError("weights were read")
  monkeypatch.setattr(checkpoint, "load_pair", no_load)
  code, _, err = _run(capsys, "--base", env["text"], "--image", env["images"][0], "--prompt", "hi",
                      "--chat")
  assert code == 2 and "no vision tower" in err and "--image" in err
