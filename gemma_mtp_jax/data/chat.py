"""One chat example -> Gemma 4 chat tokens and the mask of tokens the model must produce.

A row becomes [(gemma_role, content), ...] turns by its data schema (`schemas`: the registry of
`messages`, `conversation`, `problem_solution`, `image_qa` and any schema registered later;
`to_turns` and `detect_schema` are re-exported here). A content is a string or, in user turns, a
list of strings and `ImagePart`s.

`encode_example` renders the turns as Gemma 4's chat template does (`chat_pieces`) and tokenizes
them piece by piece, so control tokens always come from the tokenizer and a literal `<|turn>` in
the data stays text. The template writes an image item as "\n\n<|image|>\n\n" and the processor
expands `<|image|>` to `<|image>` + n x `<|image|>` + `<image|>` (n = the image's soft tokens);
the tokens here are that expansion. A document is a dict:
  tokens          int32[L]      starting with `<bos>`
  loss_mask       bool[L]       True exactly on model-turn content and its closing `<turn|>`
and, only when the example has images (i of them, in order of their token blocks):
  pixel_values    float32[i, p, c]  `images.preprocess`: transformers' Gemma 4 image processor
  pixel_positions int32[i, p, 2]
  image_spans     int32[i, 2]       [start, stop) of each image's token block (boi .. eoi)
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Sequence

import numpy as np

from gemma_mtp_jax.data import images as images_lib
from gemma_mtp_jax.data.errors import DataError
from gemma_mtp_jax.data.images import ImagePart
from gemma_mtp_jax.data.schemas import (CONVERSATION, IMAGE_QA, MESSAGES, MODEL_ROLE,
                                        PROBLEM_SOLUTION, detect_schema, to_turns)
from gemma_mtp_jax.data.tokenizer import BOI, BOS, EOI, IMAGE, TURN_CLOSE, TURN_OPEN

# Re-exported: DataError lives in `errors`, the schema names and `to_turns` in `schemas`; callers
# that encode examples reach them all here.
__all__ = ["CONVERSATION", "DataError", "IMAGE_QA", "ImagePart", "MESSAGES", "MODEL_ROLE",
           "PROBLEM_SOLUTION", "detect_schema", "to_turns"]

Doc = dict[str, np.ndarray]  # tokens, loss_mask (+ pixel_values, pixel_positions with images)


# ---------------------------------------------------------------------------------- chat format


def _user_pieces(role: str, content) -> list[tuple[Any, bool, bool]]:
  """A non-model turn's body: text between images merged into one piece (tokenized as in the
  rendered string, where the tokenizer splits only at special tokens); an image is one piece."""
  if isinstance(content, str):
    return [(f"{role}\n{content.strip()}", False, False)]
  pieces, text = [], f"{role}\n"
  for part in content:
    if isinstance(part, ImagePart):  # the template's "\n\n<|image|>\n\n"
      pieces += [(text + "\n\n", False, False), (part, True, False)]
      text = "\n\n"
    else:
      text += part
  return pieces + [(text, False, False)]


def chat_pieces(turns: Sequence[tuple[str, Any]]) -> list[tuple[Any, bool, bool]]:
  """Gemma 4's rendering of `turns` as (text, is_control_token, is_target) pieces, in order.

  `<bos>` then, per turn, `<|turn>{role}\\n{content}<turn|>\\n`. Targets are a model turn's
  content and its `<turn|>`: what the model generates after the `<|turn>model\\n` prompt, up to the
  token it stops on. The "\\n" after `<turn|>` is never generated, so never a target. An image is
  a control piece whose "text" is its `ImagePart` (its token block comes from the processor).
  """
  pieces = [(BOS, True, False)]
  for role, content in turns:
    is_model = role == MODEL_ROLE
    pieces.append((TURN_OPEN, True, False))
    if is_model:
      pieces += [(f"{role}\n", False, False), (content.strip(), False, True)]
    else:
      pieces += _user_pieces(role, content)
    pieces += [(TURN_CLOSE, True, is_model), ("\n", False, False)]
  return pieces


def render_chat(turns: Sequence[tuple[str, Any]]) -> str:
  """The chat text that `encode_example` tokenizes (what Gemma 4's chat template writes: an image
  is its `<|image|>` placeholder, before the processor expands it)."""
  return "".join(IMAGE if isinstance(text, ImagePart) else text
                 for text, _, _ in chat_pieces(turns))


_CONTROL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_ids(tokenizer, names: Sequence[str]) -> dict[str, int]:
  ids = {}
  for name in names:
    ids[name] = tokenizer.bos_token_id if name == BOS else tokenizer.convert_tokens_to_ids(name)
  missing = [n for n, i in ids.items() if i is None or i == tokenizer.unk_token_id]
  if missing:
    raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {missing} "
                    "token(s); Gemma 4 chat data needs a Gemma 4 tokenizer (images: one with "
                    "Gemma 4's image tokens, e.g. the tiny one built with multimodal=True)")
  return ids


def control_ids(tokenizer) -> dict[str, int]:
  """{`<bos>`, `<|turn>`, `<turn|>`} -> their ids in `tokenizer`; never assumed, vocabs differ."""
  ids = _CONTROL_IDS.get(tokenizer)
  if ids is None:
    ids = _CONTROL_IDS[tokenizer] = _token_ids(tokenizer, (BOS, TURN_OPEN, TURN_CLOSE))
  return ids


def _image_blocks(parts: Sequence[ImagePart], tokenizer, image_processor, base_dir):
  """The images' token blocks (boi + n x image + eoi) and their pixel slots."""
  if image_processor is None:
    raise DataError("the example has images but no image processor is set (data.vision)")
  ids = _token_ids(tokenizer, (BOI, IMAGE, EOI))
  loaded = [images_lib.load_image(p.value, base_dir) for p in parts]
  pixel_values, positions, soft = images_lib.preprocess(loaded, image_processor)
  blocks = [[ids[BOI]] + [ids[IMAGE]] * n + [ids[EOI]] for n in soft]
  return blocks, dict(pixel_values=pixel_values, pixel_positions=positions)


def encode_example(example: Mapping[str, Any], tokenizer, schema: str | None = None, *,
                   image_processor=None, base_dir: str | None = None) -> Doc:
  """One example -> Gemma 4 chat tokens and the mask of tokens the model must produce.

  Args:
    image_processor: Gemma 4's image processor (`images.build_image_processor`); needed only
      when the example has images.
    base_dir: where relative image paths are resolved (the data file's dir).
  Returns:
    tokens: int32[L], starting with `<bos>`.
    loss_mask: bool[L], True exactly on model-turn content tokens and their closing `<turn|>`.
    pixel_values float32[i, p, c], pixel_positions int32[i, p, 2], image_spans int32[i, 2]: only
      if it has i > 0 images.
  """
  pieces = chat_pieces(to_turns(example, schema))
  ids = control_ids(tokenizer)
  texts = [text for text, is_control, _ in pieces if not is_control]
  # split_special_tokens: a literal "<|turn>" inside the data stays text and cannot forge a turn
  # boundary (tokenizing the template's rendered string would turn it into the control token).
  encoded = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"])
  parts = [text for text, _, _ in pieces if isinstance(text, ImagePart)]
  blocks, extra = (_image_blocks(parts, tokenizer, image_processor, base_dir) if parts
                   else ([], {}))
  blocks = iter(blocks)
  tokens, loss_mask, spans = [], [], []
  for text, is_control, is_target in pieces:
    if isinstance(text, ImagePart):
      piece = next(blocks)
      spans.append((len(tokens), len(tokens) + len(piece)))
    else:
      piece = [ids[text]] if is_control else next(encoded)
    tokens += piece
    loss_mask += [is_target] * len(piece)
  if spans:
    extra["image_spans"] = np.asarray(spans, np.int32)
  return dict(tokens=np.asarray(tokens, np.int32), loss_mask=np.asarray(loss_mask, bool), **extra)


def encode_prompt(messages: Sequence[Mapping[str, Any]], tokenizer, image_processor=None,
                  base_dir: str | None = None) -> Doc:
  """A chat request -> the prompt a model continues: its tokens with the model turn opened.

  The one chat encoder of decoding (`generate --chat`, text or images): `messages` ([{role,
  content}], HF's chat form, images in user turns) are rendered and tokenized by `encode_example`,
  as training data are, then the model turn's header (`<|turn>model\\n`, the template's generation
  prompt) is appended, tokenized as `chat_pieces` renders a model turn. For the built-in template
  the tokens equal `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.

  Returns:
    tokens: int32[L], starting with `<bos>`, ending with the opened model turn.
    pixel_values float32[i, p, c], pixel_positions int32[i, p, 2], image_spans int32[i, 2]: only
      if the messages hold i > 0 images (as `encode_example`).
  """
  doc = encode_example({"messages": list(messages)}, tokenizer, image_processor=image_processor,
                       base_dir=base_dir)
  # A model turn's pieces before its content (the first target piece), `<bos>` left out.
  header = []
  for text, is_control, is_target in chat_pieces([(MODEL_ROLE, "")])[1:]:
    if is_target:
      break
    header += ([control_ids(tokenizer)[text]] if is_control else
               tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
  out = {k: v for k, v in doc.items() if k != "loss_mask"}
  out["tokens"] = np.concatenate([doc["tokens"], np.asarray(header, np.int32)])
  return out
