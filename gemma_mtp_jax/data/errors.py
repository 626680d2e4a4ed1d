"""The data pipeline's one error type (below every other data module, so all of them can raise it)."""

from gemma_mtp_jax.utils.errors import UserError


class DataError(UserError, ValueError):
  """Bad data or data config; the message names the source (file, dir or hub id) at fault."""
