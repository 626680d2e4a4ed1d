"""Joint (base + drafter) train-step benchmark: the trainer's own step (`training.step.programs`, as
`python -m gemma_mtp_jax.train` compiles it for the preset's mesh and optimizer) vs the same composite
in HF torch.

The torch side is written here, since HF has no joint trainer: the base forward returning its shared
(store-layer) K/V states and final hidden, then the K-step assistant loop over every anchor row with
the same teacher-forced inputs, masks and query positions as `objective.joint_forward`, the same losses,
backward and AdamW (`gemma_mtp_jax.hf_torch.torch_composite_loss`).

    python -m benchmarks joint [--preset tiny] [--batch 2] [--seq 64] [--steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Sequence

from gemma_mtp_jax.hf_torch import hf_assistant, hf_assistant_patch, torch_composite_loss


def _args(argv):
  p = argparse.ArgumentParser(prog="bench_joint", description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny", help="preset name or configs/*.py path")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--steps", type=int, default=20, help="timed steps per framework")
  p.add_argument("--draft-steps", type=int, default=None, help="K (default: the preset's)")
  p.add_argument("--no-torch", action="store_true", help="skip the HF torch side")
  return p.parse_args(argv)


def _batches(n, batch, seq, vocab, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  return [dict(tokens=rng.integers(3, vocab, (batch, seq)).astype(np.int32),
               loss_mask=rng.random((batch, seq)) > 0.2) for _ in range(n)]


def bench_jax(base_cfg, dcfg, tcfg, batches, mesh=None, rules=None):
  """(seconds per step, XLA compiles during the warm-up and timed steps) of the trainer's own step,
  `step.programs(...).step`: jitted with the run's shardings, donation and optimizer."""
  import jax
  import numpy as np
  from gemma_mtp_jax import sharding
  from gemma_mtp_jax.training import step as step_lib
  from gemma_mtp_jax.utils import compiles

  mesh = mesh if mesh is not None else sharding.make_mesh()
  rules = rules if rules is not None else sharding.DEFAULT_RULES
  progs = step_lib.programs(base_cfg, dcfg, tcfg, mesh, rules)
  with sharding.use_mesh(mesh, rules):
    params, buffers = step_lib.split_vars(step_lib.random_variables(
        base_cfg, dcfg, tcfg.seed, tcfg.init_embedding_std, mesh, rules))
    state = progs.new_state(params)
    batches = [jax.device_put(b, progs.batch_sh) for b in batches]
    jax.block_until_ready(batches)
    with compiles.counting() as compiled:
      state, m = progs.step(state, buffers, batches[0])  # compile + warm-up
      jax.block_until_ready(m["loss"])
      t0 = time.perf_counter()
      for batch in batches:
        state, m = progs.step(state, buffers, batch)
      jax.block_until_ready(m["loss"])
      dt = (time.perf_counter() - t0) / len(batches)
  assert np.isfinite(float(m["loss"]))
  return dt, compiled.n


def bench_torch(base_cfg, dcfg, tcfg, batches):
  """Seconds per step of the same composite train step in HF torch (eager, float32, sdpa), with the
  trainer's optimizer settings (AdamW, global-norm clipping)."""
  import torch
  import transformers

  from gemma_mtp_jax.checkpoint import hf_config
  text = transformers.Gemma4TextConfig(**hf_config.model_config_to_hf(base_cfg))
  text._attn_implementation = "sdpa"
  torch.manual_seed(0)
  target = transformers.Gemma4ForCausalLM(text).float().train()
  assistant = hf_assistant(hf_config.drafter_config_to_hf(dcfg), attn_implementation="sdpa").train()
  if dcfg.use_ordered_embeddings:
    assistant.masked_embedding.token_ordering.copy_(torch.randperm(dcfg.text.vocab_size))
  params = list(assistant.parameters())
  if not tcfg.freeze_base:
    params += list(target.parameters())
  opt = torch.optim.AdamW(params, lr=tcfg.learning_rate, betas=(tcfg.adam_b1, tcfg.adam_b2),
                          eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay)
  data = [(torch.as_tensor(b["tokens"]).long(), torch.as_tensor(b["loss_mask"])) for b in batches]

  def step(tokens, mask):
    opt.zero_grad(set_to_none=True)
    with hf_assistant_patch():
      loss = torch_composite_loss(target, assistant, tokens, mask, tcfg, dcfg)
    loss.backward()
    if tcfg.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip_norm)
    opt.step()
    return float(loss.detach())

  step(*data[0])  # warm-up
  t0 = time.perf_counter()
  for tokens, mask in data:
    step(tokens, mask)
  return (time.perf_counter() - t0) / len(data)


def bench_joint(argv: Sequence[str] | None = None) -> int:
  """Prints JAX vs HF-torch joint train-step throughput and the JAX compile count."""
  args = _args(argv)
  import jax
  from gemma_mtp_jax import presets
  from gemma_mtp_jax import sharding
  from gemma_mtp_jax.training import config as train_config
  cfg = presets.load_config(args.preset)
  base_cfg, dcfg = presets.model_configs(cfg)
  if dcfg is None:
    raise SystemExit(f"preset {args.preset!r} has no drafter")
  overrides = dict(batch_size=args.batch, seq_len=args.seq, grad_accum_steps=1)
  if args.draft_steps:
    overrides.update(num_draft_steps=args.draft_steps, step_weights=None)
  tcfg = dataclasses.replace(train_config.TrainConfig.from_config(cfg.train), **overrides)
  mesh = sharding.make_mesh(train_config.as_dict(cfg.mesh.axes))
  rules = sharding.rules_from_config(cfg.mesh.rules)
  batches = _batches(args.steps, args.batch, args.seq, base_cfg.vocab_size)
  tokens = args.batch * args.seq
  print(f"joint train step: preset {cfg.name}, B={args.batch} T={args.seq} K={tcfg.num_draft_steps} "
        f"({tokens} tokens/step), {args.steps} timed steps, backend {jax.default_backend()}")
  jax_dt, compiles = bench_jax(base_cfg, dcfg, tcfg, batches, mesh, rules)
  print(f"  jax (trainer step): {tokens / jax_dt:9.1f} tokens/s  ({1e3 * jax_dt:8.1f} ms/step)  "
        f"compiles over {args.steps} steps: {compiles}")
  if not args.no_torch:
    torch_dt = bench_torch(base_cfg, dcfg, tcfg, batches)
    print(f"  hf torch:          {tokens / torch_dt:9.1f} tokens/s  ({1e3 * torch_dt:8.1f} ms/step)")
    print(f"  ratio jax/torch: {torch_dt / jax_dt:.2f}x")
  return 0 if compiles == 1 else 1


def main(argv: Sequence[str] | None = None) -> int:
  return bench_joint(argv)


if __name__ == "__main__":
  raise SystemExit(main())
