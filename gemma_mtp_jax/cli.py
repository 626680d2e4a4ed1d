"""The commands' one error boundary: known errors end in one line on stderr, bugs keep their traceback.

  def main(argv=None) -> int:
    return cli.run(_main, argv)          # in-process callers and tests get the exit status
  if __name__ == "__main__":
    cli.exit_with(main)                  # the real command: sys.exit with the status below

Exit status of every command (`python -m gemma_mtp_jax.train`, `.generate`, `.convert`, `.aot`,
`tools/convert/*`):
  0    success
  1    reserved for `aot`'s "does not fit" verdict (its own report, not an error)
  2    bad input or environment, reported as ONE line `error: <message>` naming the file, flag,
       key, tensor or row: any `UserError` (ConfigError, DataError, ConversionError, GenerateError,
       TrainingError, ShardingError, LockedError, a bad flag from `ArgumentParser` below, ...), OS
       errors with a known cause (permission, no space, read-only disk, not a directory, is a
       directory, missing file, ...), undecodable bytes and invalid JSON
  70   a bug (any other exception): `exit_with` prints its full traceback first, so it stays
       visible (`run` re-raises it instead)
  130  interrupted (Ctrl-C / SIGTERM where the command turns it into KeyboardInterrupt)

User errors are recognised by type (`gemma_mtp_jax.utils.errors.UserError`, the base of every
layer's error types), whichever module raised them.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
import traceback
from typing import Callable, NoReturn, Sequence

from gemma_mtp_jax.utils.errors import UserError

OK, NOT_FIT, BAD_INPUT, BUG, INTERRUPTED = 0, 1, 2, 70, 130

# OS errors whose cause is the input or the machine, not the code.
_OS_CAUSES = {
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system", errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory", errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists", errno.ENOTEMPTY: "directory not empty",
    errno.ENAMETOOLONG: "file name too long", errno.ELOOP: "too many levels of symbolic links",
    errno.EMFILE: "too many open files", errno.EIO: "input/output error",
}


class UsageError(UserError, ValueError):
  """A bad command line (unknown flag, missing or out-of-range value)."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors raise UsageError (one `error:` line, exit 2 through `run`) instead of
  printing the usage block and exiting; `--help` is unchanged."""

  def error(self, message: str) -> NoReturn:
    raise UsageError(f"{message} (see {self.prog} --help)")


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def message(e: BaseException) -> str | None:
  """The one-line message for an error with a known cause, or None for a bug."""
  if isinstance(e, UserError):  # its message already names what is at fault
    return _one_line(e)
  if isinstance(e, UnicodeDecodeError):
    return _one_line(f"cannot decode bytes as {e.encoding} (byte {e.object[e.start:e.start + 1]!r} "
                     f"at position {e.start}): {e.reason}")
  if isinstance(e, json.JSONDecodeError):
    return _one_line(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")
  if isinstance(e, OSError) and e.errno in _OS_CAUSES:
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = _OS_CAUSES[e.errno]
    return _one_line(f"{where}: {what}" if where else f"{what} ({e.strerror or e})")
  return None


def run(main: Callable[[Sequence[str] | None], int | None], argv=None) -> int:
  """Runs `main(argv)` and returns its exit status (None counts as 0). An error with a known cause
  (see the module docstring) prints `error: <message>` on stderr and returns 2; any other
  exception propagates unchanged, traceback and all."""
  try:
    code = main(argv)
  except Exception as e:  # noqa: BLE001 (re-raised unless `message` knows the cause)
    text = message(e)
    if text is None:
      raise
    print(f"error: {text}", file=sys.stderr)
    return BAD_INPUT
  return OK if code is None else int(code)


def exit_with(main: Callable[[Sequence[str] | None], int | None], argv=None) -> NoReturn:
  """`sys.exit(run(main, argv))` for a command's `__main__`: a bug prints its traceback and exits
  70 (never 1, which is aot's "does not fit", or 2, bad input); Ctrl-C exits 130."""
  try:
    code = run(main, argv)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)
  except Exception:  # noqa: BLE001 (a bug: shown in full)
    traceback.print_exc()
    sys.exit(BUG)
  sys.exit(OK if code is None else int(code))


def number(kind: type, low, high=None, low_open: bool = False):
  """An argparse `type`: a `kind` (int or float) value in [low, high] ((low, high] if `low_open`;
  no upper bound if `high` is None). Floats must be finite: NaN and inf are refused."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                       f"got {text!r}") from None
    ok = math.isfinite(value) and (value > low if low_open else value >= low)
    if not ok or (high is not None and value > high):
      where = (f"in {'(' if low_open else '['}{low}, {high}]" if high is not None
               else f"{'>' if low_open else '>='} {low}")
      finite = "finite and " if kind is float else ""
      raise argparse.ArgumentTypeError(f"must be {finite}{where}, got {text}")
    return value
  return parse
