"""One chat example -> Gemma 4 chat tokens and the mask of tokens the model must produce.

Two dataset schemas are read: `messages` (Tulu-3: a list of {role, content}) and
`problem_solution` (Magicoder OSS-Instruct: problem is the user turn, solution the model's).
`encode_example` renders the turns as Gemma 4's chat template does (`chat_pieces`) and tokenizes
them piece by piece, so control tokens always come from the tokenizer and a literal `<|turn>` in
the data stays text. A document is a dict:
  tokens     int32[L]  starting with `<bos>`
  loss_mask  bool[L]   True exactly on model-turn content and its closing `<turn|>`
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gemma_mtp_jax.data.tokenizer import BOS, TURN_CLOSE, TURN_OPEN

Doc = dict[str, np.ndarray]  # tokens int32[L], loss_mask bool[L]

MESSAGES = "messages"  # Tulu-3: messages = [{role, content}, ...]
PROBLEM_SOLUTION = "problem_solution"  # Magicoder OSS-Instruct: problem (user), solution (model)
SCHEMA_COLUMNS = {MESSAGES: ("messages",), PROBLEM_SOLUTION: ("problem", "solution")}

# Dataset roles -> Gemma 4 roles. Gemma 4's template spells the assistant `model` and renders a
# system (or developer) message as its own `system` turn.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "model",
         "model": "model"}
MODEL_ROLE = "model"


class DataError(ValueError):
  """Bad data or data config; the message names the source (file, dir or hub id) at fault."""


# ---------------------------------------------------------------------------------- schemas
def detect_schema(columns: Iterable[str], where: str = "example") -> str:
  """The schema whose columns `columns` has: `messages` first, then `problem_solution`."""
  columns = list(columns)
  for schema, needed in SCHEMA_COLUMNS.items():
    if set(needed) <= set(columns):
      return schema
  raise DataError(
      f"{where}: unknown schema; it has columns {columns}, expected 'messages' (a list of "
      "{role, content}) or 'problem' + 'solution'")


def _text(value: Any, what: str) -> str:
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  # Multimodal-style content: [{"type": "text", "text": ...}, ...]; only text parts exist here.
  if isinstance(value, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                     for p in value):
    return "".join(p.get("text") or "" for p in value)
  raise DataError(f"{what} must be a string (or a list of text parts), got {type(value).__name__}")


def to_turns(example: Mapping[str, Any], schema: str | None = None) -> list[tuple[str, str]]:
  """One example of either schema -> [(gemma_role, content), ...] with roles system/user/model."""
  schema = schema or detect_schema(example.keys())
  if schema == MESSAGES:
    turns = []
    for i, message in enumerate(example["messages"] or ()):
      role = ROLES.get(message.get("role"))
      if role is None:
        raise DataError(f"message {i} has role {message.get('role')!r}; expected one of "
                        f"{sorted(ROLES)}")
      turns.append((role, _text(message.get("content"), f"message {i} content")))
    return turns
  if schema == PROBLEM_SOLUTION:
    return [("user", _text(example["problem"], "problem")),
            (MODEL_ROLE, _text(example["solution"], "solution"))]
  raise DataError(f"unknown schema {schema!r}; expected one of {sorted(SCHEMA_COLUMNS)}")


# ---------------------------------------------------------------------------------- chat format


def chat_pieces(turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool, bool]]:
  """Gemma 4's rendering of `turns` as (text, is_control_token, is_target) pieces, in order.

  `<bos>` then, per turn, `<|turn>{role}\\n{content.strip()}<turn|>\\n`. Targets are a model turn's
  content and its `<turn|>`: what the model generates after the `<|turn>model\\n` prompt, up to the
  token it stops on. The "\\n" after `<turn|>` is never generated, so never a target.
  """
  pieces = [(BOS, True, False)]
  for role, content in turns:
    is_model = role == MODEL_ROLE
    pieces.append((TURN_OPEN, True, False))
    if is_model:
      pieces += [(f"{role}\n", False, False), (content.strip(), False, True)]
    else:  # one text piece, tokenized exactly as in the whole rendered string
      pieces.append((f"{role}\n{content.strip()}", False, False))
    pieces += [(TURN_CLOSE, True, is_model), ("\n", False, False)]
  return pieces


def render_chat(turns: Sequence[tuple[str, str]]) -> str:
  """The chat text that `encode_example` tokenizes (what Gemma 4's chat template writes)."""
  return "".join(text for text, _, _ in chat_pieces(turns))


_CONTROL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def control_ids(tokenizer) -> dict[str, int]:
  """{`<bos>`, `<|turn>`, `<turn|>`} -> their ids in `tokenizer`; never assumed, vocabs differ."""
  ids = _CONTROL_IDS.get(tokenizer)
  if ids is None:
    ids = {BOS: tokenizer.bos_token_id}
    for name in (TURN_OPEN, TURN_CLOSE):
      ids[name] = tokenizer.convert_tokens_to_ids(name)
    missing = [n for n, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
      raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {missing} "
                      "token(s); Gemma 4 chat data needs a Gemma 4 tokenizer")
    _CONTROL_IDS[tokenizer] = ids
  return ids


def encode_example(example: Mapping[str, Any], tokenizer, schema: str | None = None) -> Doc:
  """One example -> Gemma 4 chat tokens and the mask of tokens the model must produce.

  Returns:
    tokens: int32[L], starting with `<bos>`.
    loss_mask: bool[L], True exactly on model-turn content tokens and their closing `<turn|>`.
  """
  pieces = chat_pieces(to_turns(example, schema))
  ids = control_ids(tokenizer)
  texts = [text for text, is_control, _ in pieces if not is_control]
  # split_special_tokens: a literal "<|turn>" inside the data stays text and cannot forge a turn
  # boundary (tokenizing the template's rendered string would turn it into the control token).
  encoded = iter(tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"])
  tokens, loss_mask = [], []
  for text, is_control, is_target in pieces:
    piece = [ids[text]] if is_control else next(encoded)
    tokens += piece
    loss_mask += [is_target] * len(piece)
  return dict(tokens=np.asarray(tokens, np.int32), loss_mask=np.asarray(loss_mask, bool))
