"""The one compile counter: XLA backend compilations in this process, counted through
`jax.monitoring` (the trainer's "compiled once" line, the decode programs, the benchmarks, tests)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_TOTAL = [0]


def _listener(event: str, *args, **kwargs) -> None:
  del args, kwargs
  if event == _EVENT:
    _TOTAL[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


def total() -> int:
  """Backend compilations since this module was imported."""
  return _TOTAL[0]


@dataclasses.dataclass
class Count:
  """Compilations inside a `counting()` block (`n` is live while the block runs)."""
  start: int

  @property
  def n(self) -> int:
    return _TOTAL[0] - self.start


@contextlib.contextmanager
def counting() -> Iterator[Count]:
  """`with counting() as c: ...; c.n` is the number of XLA compilations in the block."""
  yield Count(_TOTAL[0])
