"""The one base class of the errors a user can fix (bad input, config, data or environment).

Every command's error boundary (`gemma_mtp_jax.cli`) prints such an error as one `error: ...` line
and exits 2; anything else is a bug. Each layer's own error types (ConfigError, DataError,
ShardingError, ConversionError, GenerateError, TrainingError, LockedError, the CLI's UsageError)
subclass `UserError` (keeping ValueError or RuntimeError as a second base, for callers that catch
those), so the boundary recognises them by type, whichever module raised them.
"""


class UserError(Exception):
  """An error whose message names what the user must fix (a file, flag, config key, row...)."""
