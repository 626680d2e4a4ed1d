"""Builders shared by the HF-parity tests: tiny random HF Gemma 4 models (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from gemma_mtp_jax.model import config as config_lib

S, F = config_lib.SLIDING, config_lib.FULL

# Small configs covering every released variant's features.
VARIANTS = {
    # E2B/E4B-style: PLE + KV sharing + double-wide MLP + sliding/global mix.
    "e_style": dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, global_head_dim=32,
        layer_types=[S, S, F, S, S, F, F], sliding_window=6, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=256, num_kv_shared_layers=3, use_double_wide_mlp=True,
        final_logit_softcapping=30.0),
    # 26B-A4B-style: MoE + k_eq_v global layers with fewer global kv heads.
    "moe": dict(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S, S, S, F],
        sliding_window=5, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24,
        final_logit_softcapping=30.0),
    # 31B-style: k_eq_v global layers, no PLE, no KV sharing.
    "k_eq_v": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S, S, F, S, S, F],
        sliding_window=4, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
        final_logit_softcapping=30.0),
}


def hf_text_config(variant: str, **over) -> transformers.Gemma4TextConfig:
  kw = dict(VARIANTS[variant])
  kw.update(over)
  cfg = transformers.Gemma4TextConfig(**kw)
  cfg._attn_implementation = "eager"
  return cfg


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
  """Non-trivial values for every tensor (norm scales, layer scalars, router scales too), so a
  wrong layout or a forgotten scale shows up in the outputs."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or "scale" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(std * torch.randn(p.shape, generator=g) / max(1.0, p.shape[-1] ** 0.5) * 4)
    for name, b in model.named_buffers():
      if name.endswith("layer_scalar"):
        b.copy_(1.0 + 0.1 * torch.randn(b.shape, generator=g))
  return model


def hf_causal_lm(variant: str, seed: int = 0, **over):
  torch.manual_seed(seed)
  cfg = hf_text_config(variant, **over)
  model = transformers.Gemma4ForCausalLM(cfg).eval().float()
  return randomize_(model, seed)


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


# 12B-style ("gemma4_unified"): k_eq_v global layers with one global kv head, no PLE, no MoE, no KV
# sharing; the last sliding layer (4) sits right before the last full one (5), as 46/47 do in the 12B.
UNIFIED = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
    num_global_key_value_heads=1, attention_k_eq_v=True, layer_types=[S, S, S, F, S, F],
    sliding_window=4, final_logit_softcapping=30.0)


def hf_unified_text_config(**over):
  """A tiny `Gemma4UnifiedTextConfig` (eager attention)."""
  cfg = transformers.Gemma4UnifiedTextConfig(**{**UNIFIED, **over})
  cfg._attn_implementation = "eager"
  return cfg


def hf_unified_causal_lm(seed: int = 0, **over):
  """A tiny random `Gemma4UnifiedForCausalLM`. Build it inside `hf_torch.hf_assistant_patch` to
  get the store layers an assistant reads."""
  torch.manual_seed(seed)
  model = transformers.Gemma4UnifiedForCausalLM(hf_unified_text_config(**over)).eval().float()
  return randomize_(model, seed)


def hf_unified_assistant_config(vocab_size: int = 256, backbone: int = 64, ordered: bool = False,
                                **text_over) -> dict:
  """A `DrafterConfig.to_hf_config()`-style dict of a tiny 12B-style assistant ([s, s, s, f],
  reading the UNIFIED base's K/V: kv heads 2 / 1, head_dim 16 / 32, k_eq_v)."""
  text = dict(model_type="gemma4_unified_text", vocab_size=vocab_size, hidden_size=32,
              intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
              attention_k_eq_v=True, layer_types=[S, S, S, F], sliding_window=4,
              num_kv_shared_layers=4, final_logit_softcapping=None)
  text.update(text_over)
  return dict(model_type="gemma4_unified_assistant", text_config=text,
              backbone_hidden_size=backbone, use_ordered_embeddings=ordered, num_centroids=16,
              centroid_intermediate_top_k=4)


def jax_pair_from_hf(target: torch.nn.Module, assistant: torch.nn.Module):
  """(base config, drafter config, params {"base", "drafter"} as jax arrays, the drafter's
  variables with its "buffers") converted from an HF base + assistant: the JAX side of every "ours == HF's torch composite" test."""
  import jax
  import jax.numpy as jnp

  from gemma_mtp_jax import hf_torch
  from gemma_mtp_jax.checkpoint import hf_assistant as convert_drafter
  from gemma_mtp_jax.checkpoint import hf_base as convert_base

  base = config_lib.ModelConfig.from_hf_config(target.config.to_dict())
  params = {"base": convert_base.state_dict_to_params(base, numpy_state(target))}
  with hf_torch.hf_assistant_patch():
    dcfg = config_lib.DrafterConfig.from_hf_config(assistant.config.to_dict())
  variables = convert_drafter.state_dict_to_variables(dcfg, numpy_state(assistant))
  params["drafter"] = variables["params"]
  return base, dcfg, jax.tree.map(jnp.asarray, params), variables

