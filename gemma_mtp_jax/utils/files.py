"""Files and directories written so that readers never see them half done.

`atomic_dir` is the one way the package publishes a directory (pair dirs, HF exports, train
workdirs, the tiny tokenizer, the local corpus): the contents are built in a temp dir beside the
final path and renamed into place, so a failure or kill mid-write leaves any previous output intact
and never a partial directory under the final name.

Every directory the package publishes as a product (pair dirs, HF exports, train workdirs) carries
an ownership marker, `MARKER` (`{"kind": ...}`), written by `atomic_dir(..., kind=...)`. Only a
directory with the marker counts as the project's own: `--overwrite` never replaces anything
else (`gemma_mtp_jax.checkpoint.layout.check_output`).

`is_hub_id` is the one rule for strings that may name a local path or a Hugging Face Hub repo.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Iterator

from gemma_mtp_jax.utils.errors import UserError

log = logging.getLogger("gemma_mtp_jax.files")

# Temp dirs are named `.{base}.partial-{pid}-...` (being written) and `.{base}.old-{pid}-...` (a
# previous output moved aside): the pid tells a later writer whether the owner is still alive.
_PARTIAL, _OLD = ".partial-", ".old-"
_RENAME_EXCHANGE = 2
MARKER = ".gemma_mtp_jax.json"
_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_AT_FDCWD = -100


def write_json(path: str, obj) -> None:
  """JSON as HF writes configs and indexes (2-space indent, sorted keys, trailing newline)."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_marker(path: str) -> str | None:
  """The `kind` recorded in a directory's ownership marker, or None when it has none."""
  try:
    with open(os.path.join(path, MARKER), encoding="utf-8") as f:
      kind = json.load(f).get("kind")
  except (OSError, ValueError, AttributeError):
    return None
  return kind if isinstance(kind, str) else None


def write_marker(path: str, kind: str) -> None:
  """Marks `path` as a directory this project wrote, of `kind` ("pair", "hf_export", ...)."""
  write_json(os.path.join(path, MARKER), {"kind": kind, "writer": "gemma_mtp_jax"})


def relation(a: str, b: str) -> str | None:
  """How path `a` lies relative to path `b` after resolving symlinks: "is", "contains",
  "lies inside", or None when neither holds."""
  ra, rb = os.path.realpath(a), os.path.realpath(b)
  if ra == rb:
    return "is"
  if rb.startswith(ra.rstrip(os.sep) + os.sep):
    return "contains"
  if ra.startswith(rb.rstrip(os.sep) + os.sep):
    return "lies inside"
  return None


def is_hub_id(s: str) -> bool:
  """Whether `s`, which names no existing local path, is a Hub repo id rather than a missing path.

  The rule: a Hub id is exactly `org/name` (two parts of letters, digits, `.`, `_`, `-`, neither
  starting with `.`) whose `org` is not an existing local directory. Anything else that looks
  like a path (absolute, starting with `.` or `~`, one part or more than two, a backslash, or
  whose parent directory exists, like `runs/tiny` beside a `runs/`) is a local path, so a
  missing one is reported as missing and never sent to the Hub.
  """
  parts = s.split("/")
  return (len(parts) == 2 and all(_HUB_PART.match(p) for p in parts)
          and not os.path.isdir(parts[0]))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  return True


def _clean_stale(parent: str, base: str) -> None:
  """Removes temp dirs that killed writers of `base` left behind; restores a displaced previous
  output if a writer died between the two renames of the non-atomic replace."""
  for name in os.listdir(parent):
    for kind in (_PARTIAL, _OLD):
      head = f".{base}{kind}"
      if not name.startswith(head):
        continue
      try:
        pid = int(name[len(head):].split("-", 1)[0])
      except ValueError:
        continue
      if _pid_alive(pid):
        continue
      p, out = os.path.join(parent, name), os.path.join(parent, base)
      if kind == _OLD and not os.path.lexists(out):
        os.rename(p, out)
        log.warning("restored %s from an interrupted replace", out)
      else:
        shutil.rmtree(p, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def _replace(tmp: str, out: str) -> None:
  """Puts `tmp` at `out`, moving the previous `out` into `tmp` (which the caller then deletes)."""
  if _exchange(tmp, out):
    log.info("replaced %s", out)
    return
  parent, base = os.path.split(out)
  old = os.path.join(parent, f".{base}{_OLD}{os.getpid()}-{os.path.basename(tmp)}")
  os.rename(out, old)
  os.rename(tmp, out)
  shutil.rmtree(old, ignore_errors=True)


def _merge(tmp: str, out: str, marker: str) -> None:
  """Moves `tmp`'s entries into the existing dir `out`, `marker` last."""
  for name in sorted(os.listdir(tmp), key=lambda n: n == marker):
    os.replace(os.path.join(tmp, name), os.path.join(out, name))


@contextlib.contextmanager
def atomic_dir(out_dir: str, *, replace: bool = False, marker: str | None = None,
               kind: str | None = None) -> Iterator[str]:
  """Yields an empty temp dir beside `out_dir`; when the block succeeds it becomes `out_dir`.

  With `kind`, the ownership marker (`MARKER`) is written into the temp dir first, so the
  published directory is recognised as the project's own (see the module docstring).

  A new (or empty) `out_dir` appears with one rename. An existing one is
    - with `marker`: kept, and the new files are moved into it one by one with `marker` last
      (caches and train workdirs: readers treat `out_dir` as complete once `marker` exists, and
      files already there, e.g. a workdir's checkpoints/, stay);
    - with `replace`: swapped atomically with the new one (renameat2), then deleted;
    - otherwise: refused up front with FileExistsError, before the block runs.
  If the block raises, or the process dies, `out_dir` keeps its previous contents (or stays
  absent): the temp dir is removed on error, and a killed writer's temp dir is removed by the next
  writer to the same path.
  """
  out = os.path.abspath(out_dir)
  if not replace and marker is None and os.path.lexists(out):
    raise FileExistsError(errno.EEXIST, "output directory exists", out)
  parent, base = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  _clean_stale(parent, base)
  tmp = tempfile.mkdtemp(prefix=f".{base}{_PARTIAL}{os.getpid()}-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's mode
  try:
    if kind is not None:
      write_marker(tmp, kind)
    yield tmp
    try:
      os.rename(tmp, out)  # POSIX also replaces an empty directory this way
      return
    except OSError:
      if not os.path.lexists(out):
        raise
    # out_dir exists and is not an empty dir (another writer won the race, or it was there before).
    if marker is not None:
      _merge(tmp, out, marker)
    elif replace:
      _replace(tmp, out)
    else:
      raise FileExistsError(errno.EEXIST, "output directory exists", out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ the workdir lock
LOCK_NAME = ".gemma_mtp_jax.lock"


class LockedError(UserError, RuntimeError):
  """The directory is locked by another live process; the message names its pid and host."""


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (/proc/PID/stat field 22), to tell a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _read_lock(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      j = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return j if isinstance(j, dict) else {}


def _holder_alive(holder: dict) -> bool:
  """Whether the process a lock names still runs; a lock from another host counts as alive (its
  pid cannot be checked from here)."""
  import socket
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return True
  if not _pid_alive(holder["pid"]):
    return False
  start = holder.get("start")
  return start is None or _process_start(holder["pid"]) in (None, start)


@contextlib.contextmanager
def dir_lock(directory: str, what: str = "directory") -> Iterator[str]:
  """Holds `directory/LOCK_NAME` (pid, host, process start time) for the block: one holder at a
  time. The file is created complete and atomically (written to a temp file, then hard-linked to
  its name, which fails if it exists: the O_EXCL of a whole file). A lock left by a dead process
  on this host is taken over with a warning; a live one (or one from another host) raises
  LockedError naming pid and host. Released when the block ends, however it ends (exceptions,
  a signal the caller turns into a stop); a SIGKILL leaves a stale lock, taken over next time.
  Creates `directory` if needed. Yields the lock file's path."""
  import socket
  path = os.path.join(directory, LOCK_NAME)
  os.makedirs(directory, exist_ok=True)
  me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
  fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", dir=directory)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(me, f)
    for _ in range(2):
      try:
        os.link(tmp, path)
        break
      except FileExistsError:
        holder = _read_lock(path)
        if holder is None:  # released in between
          continue
        if not holder or _holder_alive(holder):
          who = (f"pid {holder.get('pid')} on host {holder.get('host')}" if holder
                 else f"an unknown process (unreadable {path})")
          raise LockedError(f"{what} {directory} is in use by {who} (lock file {path}; remove it "
                            "only if that process is gone)") from None
        log.warning("taking over the stale lock %s of pid %s on this host (no longer running)",
                    path, holder.get("pid"))
        os.remove(path)
    else:
      raise LockedError(f"{what} {directory} is in use (lock file {path} keeps reappearing)")
  finally:
    os.remove(tmp)
  try:
    yield path
  finally:
    if _read_lock(path) == me:  # still ours (nobody took it over meanwhile)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
