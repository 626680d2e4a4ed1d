"""Joint trainer entry point (MaxText / big_vision style flags):

    python -m gemma_mtp_jax.train [--config=configs/X.py[:arg]] [--workdir=DIR] [--config.a.b=value ...]

With no flags it runs the embedded default: configs/tiny.py into runs/tiny (a random-init tiny pair on
the local corpus, on CPU: train, eval, export to runs/tiny/hf). Running it again resumes from the
workdir's latest intact checkpoint. Exit codes (`gemma_mtp_jax.cli`): 0 finished or preempted
(checkpoint saved), 2 bad configuration, data or environment and training errors (a non-finite
loss, a workdir in use), one line `error: ...`, 70 a bug (traceback), 130 interrupted.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from gemma_mtp_jax import cli
from gemma_mtp_jax.training import config as train_config
from gemma_mtp_jax.training import loop as trainer


def _fail(error: BaseException) -> None:
  """ml_collections reports a bad override with a traceback; print one line naming the key."""
  print(f"error: {train_config.explain_override_error(sys.argv, error)}", file=sys.stderr)
  sys.exit(2)


try:  # config_flags loads the file and applies the --config.* overrides while defining the flag
  _CONFIG = config_flags.DEFINE_config_file(
      "config", train_config.default_config_path(), "Preset file (configs/X.py[:arg]); override any "
      "field with --config.section.key=value.", lock_config=True)
except Exception as e:  # noqa: BLE001 (KeyError, AttributeError, TypeError, ValueError, ...)
  _fail(e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots, hf/); "
                               "default runs/<config name>.")


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 (bad values surface here, as flags.Error and others)
    _fail(e)


def _main(argv) -> int:
  del argv
  # absl's default verbosity is INFO, which lets orbax narrate every save; the trainer prints what
  # matters. --verbosity=0 (or -v 0) brings the INFO logs back.
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  try:
    cfg = _CONFIG.value
    name = cfg.get("name")  # a file that failed to load gives a stand-in that raises when read
  except Exception as e:  # noqa: BLE001
    _fail(e)
  workdir = _WORKDIR.value or f"runs/{name or 'run'}"
  summary = trainer.run(cfg, workdir)
  return cli.OK if summary["status"] in ("finished", "preempted") else cli.BUG


def main(argv) -> int:
  """The command after flag parsing, through the one error boundary (`cli.run`): a known error
  is one `error:` line and exit 2, a bug keeps its traceback."""
  return cli.run(_main, argv)


if __name__ == "__main__":
  # absl parses the flags, then `cli.exit_with` runs main: known errors exit 2 with one line, a
  # bug prints its traceback and exits 70, Ctrl-C outside the loop's own handling exits 130.
  app.run(lambda argv: cli.exit_with(_main, argv), flags_parser=_parse)
