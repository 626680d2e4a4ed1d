"""Weight converters between HF safetensors and JAX checkpoints of a Gemma 4 (base, assistant) pair.

  python -m gemma_mtp_jax.convert hf-to-jax --base HF_DIR_OR_REPO [--drafter HF_DIR_OR_REPO] \
      --out JAX_DIR [--dtype bfloat16|float32] [--overwrite]
  python -m gemma_mtp_jax.convert jax-to-hf --checkpoint JAX_DIR_OR_TRAIN_WORKDIR [--step N] \
      --out OUT_DIR [--max-shard-size 5GB] [--dtype ...] [--num-assistant-tokens 4] [--overwrite]

hf-to-jax writes a pair dir (see `gemma_mtp_jax.checkpoint`); jax-to-hf writes OUT_DIR/base/ and
OUT_DIR/drafter/, which torch `from_pretrained` + `generate(assistant_model=...)` run unchanged.
Both write to a temp dir beside the output and rename it into place, so an interrupted run leaves
any previous output intact. An --out that is, contains or lies inside an input is refused, whatever
the flags; --overwrite replaces only a pair dir or HF export this project wrote (it carries the
project's marker file), never a train workdir or any other directory. A train workdir's newest
step that cannot be read is skipped, with a warning, for the newest intact one (unless --step).
A missing local path is reported as missing; only an `org/name` with no local `org/` is a hub id.
Exit status (`gemma_mtp_jax.cli`): 0 ok, 2 bad input with one `error:` line naming the file, flag
or tensor, 130 interrupted, 70 a bug (traceback shown).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from gemma_mtp_jax import cli

# checkpoint.DTYPES, repeated so that --help needs no JAX import.
DTYPES = ("bfloat16", "float32")
SCHEDULES = ("constant", "heuristic", "heuristic_transient")


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m gemma_mtp_jax.convert", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  h = sub.add_parser("hf-to-jax", help="HF safetensors dir(s) or hub id(s) -> JAX pair dir")
  h.add_argument("--base", required=True, help="HF Gemma 4 model dir or hub id (the target)")
  h.add_argument("--drafter", help="HF Gemma 4 assistant dir or hub id")
  h.add_argument("--out", required=True, help="pair dir to write")
  h.add_argument("--dtype", choices=DTYPES,
                 help="cast float tensors to this dtype (logged); default: keep stored dtypes")
  h.add_argument("--max-shard-size", default="5GB",
                 help="shard size of the carried-through (vision/audio) tensors' safetensors")
  h.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

  j = sub.add_parser("jax-to-hf", help="JAX pair dir / train workdir -> HF dirs base/ + drafter/")
  j.add_argument("--checkpoint", required=True,
                 help="pair dir, train workdir, or HF dir (round trip in memory)")
  j.add_argument("--step", type=cli.number(int, 0),
                 help="train workdir step (default: the newest intact one)")
  j.add_argument("--drafter", help="HF assistant dir or hub id to export instead of the stored one")
  j.add_argument("--out", required=True, help="output dir (gets base/ and drafter/)")
  j.add_argument("--max-shard-size",
                 help="e.g. 5GB; default: the source's shard layout when tensors are unchanged, "
                      "else 5GB")
  j.add_argument("--dtype", choices=DTYPES,
                 help="cast float tensors to this dtype (logged); default: write them as held")
  j.add_argument("--num-assistant-tokens", type=cli.number(int, 1),
                 help="drafter generation_config num_assistant_tokens (default: source's, else 4)")
  j.add_argument("--assistant-schedule", choices=SCHEDULES,
                 help="drafter num_assistant_tokens_schedule (default: source's, else constant)")
  j.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  return p


def _raise_on_sigterm(signum, frame):
  # A terminated conversion unwinds like Ctrl-C, so the temp output dir is removed.
  raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> str:
  """Runs a parsed command; returns the output path."""
  from gemma_mtp_jax import checkpoint

  if args.command == "hf-to-jax":
    return checkpoint.hf_to_jax(args.base, args.out, drafter=args.drafter, dtype=args.dtype,
                                overwrite=args.overwrite, max_shard_size=args.max_shard_size)
  return checkpoint.jax_to_hf(args.checkpoint, args.out, step=args.step, drafter=args.drafter,
                              overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                              dtype=args.dtype, num_assistant_tokens=args.num_assistant_tokens,
                              assistant_schedule=args.assistant_schedule)


def main(argv=None) -> int:
  """CLI entry point; returns the exit status (2 on bad input, with one `error:` line on stderr;
  see `gemma_mtp_jax.cli`)."""
  return cli.run(_main, argv)


def _main(argv) -> int:
  args = _parser().parse_args(argv)
  # Our own progress and dtype decisions at INFO; libraries (orbax, absl) keep their defaults.
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
  logger = logging.getLogger("gemma_mtp_jax")
  level = logger.level
  logger.setLevel(logging.INFO)
  logger.addHandler(handler)
  propagate, logger.propagate = logger.propagate, False  # no second copy via a root handler
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if main_thread else None
  try:
    out = run(args)
  except KeyboardInterrupt:
    print("interrupted: nothing written (any previous output is intact)", file=sys.stderr)
    return cli.INTERRUPTED
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate
    if main_thread:
      signal.signal(signal.SIGTERM, previous)
  print(out)
  return 0


if __name__ == "__main__":
  cli.exit_with(main)
