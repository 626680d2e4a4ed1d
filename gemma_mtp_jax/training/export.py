"""The end of a run: the trained pair exported as HF dirs (WORKDIR/hf/{base,drafter}), and the
optional check that HF assisted generation with that export accepts what the trainer reported."""

from __future__ import annotations

import os

from gemma_mtp_jax.checkpoint import pair as checkpoint
from gemma_mtp_jax.checkpoint import safetensors_io as convert_io

HF_EXPORT_DIR = "hf"


def export_pair(workdir: str, base_cfg, dcfg, host_vars, step: int, dtype: str | None,
                num_draft_steps: int) -> str:
  """Writes WORKDIR/hf/{base,drafter} from the trained variables (checkpoint layout, on the host)
  with the workdir's pair.json / tokenizer / carried tensors; returns WORKDIR/hf."""
  def sub(name):
    p = os.path.join(workdir, name)
    return p if os.path.isdir(p) else None
  pair = checkpoint.Pair(base_cfg, dcfg, host_vars, sub(checkpoint.TOKENIZER_DIR),
                         dict(kind="workdir", path=workdir, step=step, train=None,
                              pair=checkpoint.read_pair_json(workdir),
                              extra_dir=sub(checkpoint.HF_EXTRA_DIR)))
  export_dir = checkpoint.export_hf(pair, os.path.join(workdir, HF_EXPORT_DIR), overwrite=True,
                                    dtype=dtype, num_assistant_tokens=num_draft_steps)
  _tokenizer_to_drafter(export_dir)
  return export_dir


def hf_message(hf: dict, seconds: float) -> str:
  """The "[hf check]" line: HF's tokens per target forward next to the trainer's figure."""
  msg = (f"[hf check] HF assisted generation (transformers {_hf_version()}): "
         f"{hf['hf/tokens_per_round']:.3f} tokens per target forward")
  if "trainer/tokens_per_round" in hf:
    msg += (f" vs {hf['trainer/tokens_per_round']:.3f} reported by the trainer "
            f"({100 * hf['hf/relative_diff']:+.1f}%, within 10%: {hf['hf/within_10pct']})")
  if "hf_fixed/tokens_per_round" in hf:
    msg += (f"; with the stale-K/V fix (hf_torch.hf_stale_kv_fix): "
            f"{hf['hf_fixed/tokens_per_round']:.3f} ({100 * hf['hf_fixed/relative_diff']:+.1f}%)")
  if hf.get("hf/same_as_trainer") is not None:
    msg += (f"; HF's output == the trainer's JAX greedy continuation for "
            f"{100 * hf['hf/same_as_trainer']:.0f}% of prompts")
  return msg + f"; {seconds:.0f}s"


def _tokenizer_to_drafter(export_dir: str) -> None:
  """The base's tokenizer files beside the drafter too, so each HF dir loads on its own."""
  base, drafter = os.path.join(export_dir, "base"), os.path.join(export_dir, "drafter")
  if os.path.isdir(drafter):
    names = [n for n in convert_io.aux_files(base) if "token" in n or n.endswith(".jinja")]
    convert_io.copy_files(base, names, drafter)


def _hf_version() -> str:
  import transformers
  return transformers.__version__


def hf_check(export_dir: str, prompts, num_new: int, stop_ids, num_draft_steps: int,
             reported: float | None, reference=None, images=None) -> dict | None:
  """HF assisted generation's tokens per target forward with the exported pair, next to what the
  trainer reported (`hf_torch.hf_acceptance`); None (with a message) if torch is not installed.

  If transformers as installed is more than 10% off, generation runs again with
  `hf_torch.hf_stale_kv_fix` (transformers 5.23 hands the drafter stale K/V after a partial
  acceptance), which tells a drafting difference from an export or numerics problem.
  `reference`: the trainer's greedy continuations, compared with HF's outputs; `images`: per
  prompt, its images (pixel_values_ipc, pixel_positions_ip2) or None."""
  try:
    import torch  # noqa: F401
  except ImportError:
    print("[hf check] skipped: torch is not installed (pip install -e '.[test]')")
    return None
  from gemma_mtp_jax import hf_torch

  dirs = os.path.join(export_dir, "base"), os.path.join(export_dir, "drafter")
  hf = hf_torch.hf_acceptance(*dirs, prompts, num_new, stop_ids, num_draft_steps,
                              reference=reference, images=images)
  names = ["hf"]
  if reported and abs(hf["hf/tokens_per_round"] / reported - 1.0) > 0.10:
    hf.update(hf_torch.hf_acceptance(*dirs, prompts, num_new, stop_ids, num_draft_steps,
                                     reference=reference, fix_stale_kv=True, images=images))
    names.append("hf_fixed")
  if reported:
    hf["trainer/tokens_per_round"] = float(reported)
    for name in names:
      hf[f"{name}/relative_diff"] = hf[f"{name}/tokens_per_round"] / reported - 1.0
      hf[f"{name}/within_10pct"] = abs(hf[f"{name}/relative_diff"]) <= 0.10
  return hf
