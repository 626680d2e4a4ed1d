"""The data pipeline's one error type (below every other data module, so all of them can raise it)."""


class DataError(ValueError):
  """Bad data or data config; the message names the source (file, dir or hub id) at fault."""
