"""Generate text with a Gemma 4 base, speculatively with its assistant drafter when there is one.

  python -m gemma_mtp_jax.generate --base DIR [--drafter DIR]
      (--prompt TEXT | --prompt-ids 2,105,...) [--image PATH ...] [--max-new-tokens N]
      [--num-draft-tokens K] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--json]
      [--chat] [--step N] [--plain] [--stop-ids 1,106 | --no-stop]

DIR is an HF model dir (converted in memory), a pair dir (`convert hf-to-jax`) or a train workdir
(latest step, or --step). The drafter is --drafter (an HF assistant dir) or the one stored with a
pair dir / workdir; without either (or with --plain) decoding is plain. Greedy at temperature 0
(the default): the output is exactly the base's own greedy output, whatever the drafter proposes.

Without --json the new text is printed (token ids when there is no tokenizer); with --json one
JSON object: tokens (new ids), text, target_forwards (base forwards after the prefill),
draft_rounds, drafted, accepted, mean_accepted_length (new tokens per target forward, the prefill's
first token excluded), rounds (per round: drafted ids and the number accepted), acceptance (per
draft position k = 1..K: "rate" P(accepted >= k) over the rounds, "alpha" P(accepted >= k | >= k - 1);
`speculative.acceptance_rates`), tokens_per_second
(new tokens per second of prefill + decode), prefill_seconds, decode_seconds, compile_seconds (not
counted in the others).

Images (--image PATH, repeatable; local files only, URLs are refused) need a base with a vision
tower and its processor files (processor_config.json beside the tokenizer: the HF dir itself, or a
pair dir's / workdir's tokenizer/); they are preprocessed by that processor (transformers' Gemma 4
image processor). With --chat the prompt is one user turn holding the images, in order, then the
text (HF's content list [{"type": "image"}, ..., {"type": "text"}]). Without --chat, --prompt must
hold one `<|image|>` placeholder per --image where that image goes; the processor expands each into
its token block (`<|image>` + n x `<|image|>` + `<image|>`), exactly `processor(text=...,
images=...)`. With --prompt-ids the ids must already hold each image's expanded block. The JSON
gains "images": n.

--chat, with or without images, encodes the user turn as the training data are encoded
(`data.chat.encode_prompt`) and opens the model turn; for the built-in chat template those are
the tokens of the tokenizer's `apply_chat_template(..., add_generation_prompt=True)`. The request
itself (loading, stop ids, encoding, decoding) is `gemma_mtp_jax.decoding.request`.

Stop tokens default to the base's eos ids (config and generation config) plus the tokenizer's
`<turn|>` (the end of a chat turn) when it has one. Exit status 2 with a one-line reason for bad
input (missing dirs, a drafter that does not fit the base, a prompt too long for the cache, a token
id outside the vocab, K < 1, a sampling value out of range: temperature finite and >= 0, top-k >= 0,
top-p in (0, 1], max-new-tokens >= 1; NaN and inf refused), checked before any model compute; see
`gemma_mtp_jax.cli` for all exit codes. A missing local path (e.g. `runs/tiny` beside a `runs/`)
is reported as missing; only an `org/name` with no local `org/` is taken for a hub id. A train
workdir whose newest step cannot be read falls back, with a warning, to the newest intact step.
"""

from __future__ import annotations

import argparse
import json

from gemma_mtp_jax import cli


def _id_list(text: str) -> list[int]:
  """An argparse `type`: comma-separated token ids ("2,105, 2364")."""
  try:
    return [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m gemma_mtp_jax.generate", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="HF model dir, pair dir or train workdir")
  p.add_argument("--drafter", help="HF assistant dir (default: the pair's own drafter, if any)")
  p.add_argument("--step", type=cli.number(int, 0),
                 help="train workdir step (default: the newest intact one)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="prompt text (tokenized with the base's tokenizer)")
  src.add_argument("--prompt-ids", type=_id_list,
                   help="comma-separated prompt token ids, e.g. 2,105,2364")
  p.add_argument("--chat", action="store_true",
                 help="wrap --prompt as a user turn with the chat template (model turn opened)")
  p.add_argument("--image", action="append", default=[], metavar="PATH",
                 help="a local image file (repeatable, in order); with --chat the images open the "
                 "user turn, else --prompt needs one <|image|> placeholder per image")
  p.add_argument("--max-new-tokens", type=cli.number(int, 1), default=64)
  p.add_argument("--num-draft-tokens", type=int, default=4,
                 help="K drafts per round (>= 1; checked unless --plain)")
  p.add_argument("--temperature", type=cli.number(float, 0.0), default=0.0, help="0: greedy")
  p.add_argument("--top-k", type=cli.number(int, 0), default=0, help="0: off")
  p.add_argument("--top-p", type=cli.number(float, 0.0, 1.0, low_open=True), default=1.0,
                 help="in (0, 1]; 1.0: off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--plain", action="store_true", help="plain decoding even with a drafter")
  stops = p.add_mutually_exclusive_group()
  stops.add_argument("--stop-ids", type=_id_list,
                     help="comma-separated stop token ids (default: eos + <turn|>)")
  stops.add_argument("--no-stop", action="store_true", help="always generate --max-new-tokens")
  p.add_argument("--query-position", choices=("next", "anchor"),
                 help="drafter query RoPE position (default: the training run's, else next)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"),
                 help="cast params (default: as stored)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  return p


def main(argv=None) -> int:
  """CLI entry point; returns the exit status (2 on bad input, with one `error:` line on stderr;
  see `gemma_mtp_jax.cli`)."""
  return cli.run(_main, argv)


def _main(argv) -> int:
  args = _parser().parse_args(argv)
  from gemma_mtp_jax.decoding import request  # after parsing: --help and flag errors need no JAX

  out = request.run(
      args.base, drafter=args.drafter, step=args.step, dtype=args.dtype, plain=args.plain,
      prompt=args.prompt, ids=args.prompt_ids, image_paths=args.image, chat=args.chat,
      max_new_tokens=args.max_new_tokens, num_draft_tokens=args.num_draft_tokens,
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
      stop_ids=[] if args.no_stop else (args.stop_ids or None), query_position=args.query_position)
  if args.json:
    print(json.dumps(out))
  else:
    print(out["text"] if out["text"] is not None else " ".join(map(str, out["tokens"])))
  return 0


if __name__ == "__main__":
  cli.exit_with(main)
