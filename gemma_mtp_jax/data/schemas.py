"""Data schemas: which columns a dataset row has and how it becomes chat turns, one entry each.

A `Schema` is a name, the columns a row must have, and `to_turns(row) -> [(gemma_role, content),
...]` (roles system / user / model; a content is a string, or in a user turn a list of strings and
`ImagePart`s). Everything that reads rows goes through this registry: auto-detection (the first
registered schema whose columns a source has, in registration order), the sources' column checks
and eval-split hash, `chat.encode_example`, and the error for an unknown schema, whose list of the
valid ones is written from the registry. So a new schema is one `register_schema` call and nothing
else; the four built-ins at the end of this module are four such calls:

  messages          Tulu-3, or HF's multimodal chat: messages = [{role, content}, ...]
  conversation      the same list under NeMo's MedPix-VQA key
  problem_solution  Magicoder OSS-Instruct: problem is the user turn, solution the model's
  image_qa          one image, a question (the user turn) and an answer (the model's)

A message content is a string or HF's list of items: {"type": "text", "text": ...} and, in user
turns, {"type": "image", "image": <local path | bytes | PIL image | {"bytes", "path"}>} (also under
"path"; URLs are refused when the image is read). `read_content` / `read_messages` parse them, for
any schema to reuse.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

from gemma_mtp_jax.data.errors import DataError
from gemma_mtp_jax.data.images import ImagePart

Turn = tuple[str, Any]  # (gemma_role, content)

# Dataset roles -> Gemma 4 roles. Gemma 4's template spells the assistant `model` and renders a
# system (or developer) message as its own `system` turn.
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "model",
         "model": "model"}
MODEL_ROLE = "model"
AUTO = (None, "", "auto")  # a source's `schema` values that mean "detect it from the columns"


@dataclasses.dataclass(frozen=True)
class Schema:
  """One data schema.

  Attributes:
    name: what a data source's `schema` key says.
    columns: the columns a row must have; `to_turns` reads only these (the eval split hashes the
      turns of exactly these columns).
    to_turns: a row (a mapping with at least `columns`) -> [(gemma_role, content), ...]. Raises
      DataError for a bad row, saying which field is wrong (the caller adds the file and record).
    doc: optional, what the columns hold, for error messages (e.g. "a list of {role, content}").
  """

  name: str
  columns: tuple[str, ...]
  to_turns: Callable[[Mapping[str, Any]], list[Turn]]
  doc: str = ""

  def needs(self) -> str:
    """This schema's entry in the unknown-schema error: `'name' needs col1 + col2 (doc)`."""
    doc = f" ({self.doc})" if self.doc else ""
    return f"{self.name!r} needs {' + '.join(self.columns)}{doc}"


SCHEMAS: dict[str, Schema] = {}  # name -> Schema, in registration (= detection) order


def register_schema(schema: Schema) -> Schema:
  """Adds `schema` to the registry (detected after every schema registered before it).

  Raises ValueError for a name already registered or reserved for auto-detection, or no columns.
  """
  columns = tuple(schema.columns)
  if not isinstance(schema.name, str) or schema.name in AUTO:
    raise ValueError(f"schema name {schema.name!r} is reserved for auto-detection")
  if schema.name in SCHEMAS:
    raise ValueError(f"schema {schema.name!r} is already registered")
  if not columns or not all(isinstance(c, str) and c for c in columns):
    raise ValueError(f"schema {schema.name!r} needs a non-empty tuple of column names, got "
                     f"{schema.columns!r}")
  SCHEMAS[schema.name] = schema = dataclasses.replace(schema, columns=columns)
  return schema


def registered() -> str:
  """The registered schemas and the columns each needs, for error messages."""
  return "; ".join(schema.needs() for schema in SCHEMAS.values())


def _prefixed(where: str, message: str) -> str:
  return f"{where}: {message}" if where else message


def get_schema(name: str, where: str = "") -> Schema:
  """The registered schema `name`; DataError (prefixed by `where`) listing them all if unknown."""
  schema = SCHEMAS.get(name) if isinstance(name, str) else None
  if schema is None:
    raise DataError(_prefixed(where, f"unknown schema {name!r}; expected a registered schema: "
                                     f"{registered()}"))
  return schema


def detect_schema(columns: Iterable[str], where: str = "example") -> str:
  """The name of the first registered schema whose columns are all in `columns`."""
  columns = list(columns)
  for schema in SCHEMAS.values():
    if set(schema.columns) <= set(columns):
      return schema.name
  raise DataError(_prefixed(where, f"unknown schema; it has columns {columns}, expected those of "
                                   f"a registered schema: {registered()}"))


def to_turns(example: Mapping[str, Any], schema: str | None = None) -> list[Turn]:
  """One example of a registered schema (None: detected from its keys) -> [(gemma_role, content),
  ...] with roles system/user/model.

  A content is a string, or (user turns with images) a list of strings and `ImagePart`s."""
  name = detect_schema(example.keys()) if schema in AUTO else schema
  return get_schema(name).to_turns(example)


# ---------------------------------------------------------------------------------- contents
def read_content(value: Any, what: str, images_ok: bool):
  """A message content -> a string, or a list of text strings and `ImagePart`s when it has images.

  Args:
    what: the field, for errors ("message 2 content", "problem").
    images_ok: whether image items are allowed (user turns only: Gemma 4 never writes images).
  In a list each text item is trimmed, as Gemma 4's template does."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if not isinstance(value, (list, tuple)):
    raise DataError(f"{what} must be a string or a list of content items, got "
                    f"{type(value).__name__}")
  parts = []
  for j, item in enumerate(value):
    kind = item.get("type") if isinstance(item, Mapping) else None
    if kind == "text":
      parts.append((item.get("text") or "").strip())
    elif kind == "image":
      if not images_ok:
        raise DataError(f"{what} item {j}: images are only read in user turns")
      image = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
      if image is None:
        raise DataError(f"{what} item {j}: an image item without 'image' (or 'path')")
      parts.append(ImagePart(image))
    else:
      raise DataError(f"{what} item {j} has type {kind!r}; expected 'text' or 'image'")
  if not any(isinstance(p, ImagePart) for p in parts):
    return "".join(parts)
  return parts


def read_messages(messages, what: str = "message") -> list[Turn]:
  """A list of {role, content} (dataset roles, `ROLES`) -> turns; images allowed in user turns."""
  turns = []
  for i, message in enumerate(messages or ()):
    role = ROLES.get(message.get("role"))
    if role is None:
      raise DataError(f"{what} {i} has role {message.get('role')!r}; expected one of "
                      f"{sorted(ROLES)}")
    turns.append((role, read_content(message.get("content"), f"{what} {i} content",
                                     role == "user")))
  return turns


# ---------------------------------------------------------------------------------- built-ins
def _chat(column: str) -> Callable[[Mapping[str, Any]], list[Turn]]:
  """A schema of one column holding a list of {role, content}."""
  def to_turns_(example: Mapping[str, Any]) -> list[Turn]:
    return read_messages(example[column])
  return to_turns_


def _user_model(user: str, model: str) -> Callable[[Mapping[str, Any]], list[Turn]]:
  """A schema of two text columns: the user turn and the model's answer."""
  def to_turns_(example: Mapping[str, Any]) -> list[Turn]:
    return [("user", read_content(example[user], user, False)),
            (MODEL_ROLE, read_content(example[model], model, False))]
  return to_turns_


def _image_qa(example: Mapping[str, Any]) -> list[Turn]:
  if example["image"] is None:
    raise DataError("the 'image' column is empty")
  question = read_content(example["question"], "question", False)
  return [("user", [ImagePart(example["image"]), question.strip()]),
          (MODEL_ROLE, read_content(example["answer"], "answer", False))]


_CHAT_DOC = "a list of {role, content}"
MESSAGES = register_schema(Schema("messages", ("messages",), _chat("messages"), _CHAT_DOC)).name
CONVERSATION = register_schema(Schema("conversation", ("conversation",), _chat("conversation"),
                                      _CHAT_DOC)).name
PROBLEM_SOLUTION = register_schema(Schema("problem_solution", ("problem", "solution"),
                                          _user_model("problem", "solution"))).name
IMAGE_QA = register_schema(Schema("image_qa", ("image", "question", "answer"), _image_qa)).name
